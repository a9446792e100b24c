"""File names for names that come from data: a column or feature name never becomes a path.

A feature's vocabulary lives at `vocab/<file>.parquet`, where `<file>` is the
feature name itself when it is a plain name (letters, digits, `_`, `-`, `.`,
at most 64 characters, not starting with `.` or `-`), and otherwise `h=` plus
the first 32 hex digits of the name's sha256. `=` is never part of a plain
name, so the two kinds cannot collide, and the mapping needs no table: every
reader computes the same file from the name the manifest lists. A name like
`../../x`, `/etc/x`, `a/b`, an empty name or one of 300 characters therefore
stays inside `vocab/`.
"""

from __future__ import annotations

import hashlib
import re

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def safe_file_stem(name: str) -> str:
    """A file name stem for `name` that is always one path component inside its folder."""
    if _PLAIN.fullmatch(name) and ".." not in name:
        return name
    return "h=" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def vocab_file(name: str) -> str:
    """The vocabulary of feature `name`, relative to a data or export directory (POSIX form)."""
    return f"vocab/{safe_file_stem(name)}.parquet"
