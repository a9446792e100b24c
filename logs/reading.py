"""What the format readers of `sdm convert` share (`formats.py`, `movielens.py`).

The `Tables` a reader returns, and the first-line sniffing and error helpers
every reader uses to recognise its files and name a malformed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from sdm.errors import SdmError


@dataclass
class Tables:
    """What a format reader produces: lazy frames plus counts of dropped rows."""

    log: pl.LazyFrame
    items: pl.LazyFrame | None = None
    users: pl.LazyFrame | None = None
    raw_rows: pl.LazyFrame | None = None
    """Lazy count of input rows, when rows may be filtered (dropped = raw - written)."""
    notes: dict[str, Any] = field(default_factory=dict)


def read_first_line(path: Path) -> str:
    """A text file's first line (at most 64 KiB), without a byte-order mark or line end."""
    with open(path, "rb") as fh:
        line = fh.readline(1 << 16)
    return line.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")


def bad(path: Path, why: str) -> SdmError:
    return SdmError(f"{path}: {why}")
