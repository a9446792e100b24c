"""Output ownership: what sdm may write, replace and delete.

Every command that writes goes through one of two guards:

- `OutputDir(out, command, owns, ...)` for a directory (`sessionize`, `train`,
  `evaluate`, `export`, `demo`);
- `OutputFile(out, command, ...)` for one file (`recommend`, `synth`, `convert`).

Both, before a byte is written or deleted:

1. refuse an `out` that equals, contains or lies inside any input of the
   command (`check_disjoint`; symlinks are resolved first);
2. take an exclusive lock (`flock`) on the output, so a second sdm process
   writing the same output is refused in one line (`LockedError`);
3. remove scratch (`.sdm-tmp-*`) that a killed run left there: under the lock
   no other writer can own it.

A directory is then checked entry by entry: `--overwrite` replaces a directory
that is empty or holds only what this command writes (its `owns` names), and
refuses, naming it, any other file. The marker `.sdm-output.json` records which
command wrote a directory, so `sdm evaluate --overwrite` never clears a shard
directory even where the names would overlap (`config.json`). `prepare()`
deletes the command's own earlier files and writes the marker; it is called
after the command validated its input, so refused input leaves the old output
intact.

Every file is written through `atomic_path`: a temporary name unique to the
process in the same directory, renamed into place when complete. A reader never
sees half a file, and a killed run leaves only scratch, which the next run
removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sdm.errors import LockedError, OutputError, StorageError, storage_error

MARKER = ".sdm-output.json"
"""Written into every output directory: {"command": ..., "format": "sdm-output"}."""
SCRATCH_PREFIX = ".sdm-tmp-"
"""Temporary files and folders: `.sdm-tmp-<pid>-<random>-<final name>`."""
LOCK_PREFIX = ".sdm-lock-"
"""Lock file beside a single-file output: `.sdm-lock-<name>` (removed when the run ends)."""

InputPaths = Mapping[str, "Path | str | Sequence[Path | str] | None"]


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _expand(path: Path | str) -> list[Path]:
    """An input path as the real paths it names: a glob's matches (or its base folder when none match)."""
    text = str(path)
    if any(c in text for c in "*?["):
        found = glob.glob(text, recursive=True)
        if found:
            return [_real(p) for p in found]
        text = text[: min(text.index(c) for c in "*?[" if c in text)]
        return [_real(Path(text).parent if not text.endswith(os.sep) else text)]
    return [_real(path)]


def check_disjoint(out: Path | str, inputs: InputPaths, flag: str = "--out") -> None:
    """Refuse an `out` that equals, contains or lies inside one of `inputs` (symlinks resolved).

    Args:
        out: the output path (file or directory, existing or not).
        inputs: what each input is ("log", "data directory", ...) -> its path, a list
            of paths, or None (not given).
        flag: how the user named `out`, for the message.

    Raises:
        OutputError: naming the input and the output.
    """
    o = _real(out)
    for what, value in inputs.items():
        if value is None:
            continue
        for given in value if isinstance(value, (list, tuple)) else [value]:
            for r in _expand(given):
                if r == o:
                    raise OutputError(f"{flag} {out} is the {what} ({given}); sdm never writes over its input")
                if o in r.parents:
                    raise OutputError(f"{flag} {out} contains the {what} {given}; choose an --out outside every input")
                if r in o.parents:
                    raise OutputError(f"{flag} {out} lies inside the {what} {given}; choose an --out outside every input")


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (outermost first)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p == p.parent:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise OutputError(f"{path}: cannot create the output directory: {p} is a file")
    try:
        for d in reversed(missing):
            d.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        raise storage_error(exc, path) from None
    return list(reversed(missing))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_scratch(folder: Path, suffix: str = "", prefixes: Sequence[str] = (SCRATCH_PREFIX,)) -> None:
    """Delete scratch (names starting with one of `prefixes`, ending in `suffix`) that a killed run left in `folder`."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(folder):
            if name.startswith(tuple(prefixes)) and name.endswith(suffix):
                with contextlib.suppress(OSError):
                    _remove(folder / name)


def scratch_name(final: Path) -> Path:
    """A temporary path beside `final`, unique to this process and call."""
    return final.with_name(f"{SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final.name}")


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` when the block succeeds.

    On any error (a full disk, Ctrl-C) the temporary file or folder is removed and
    `final` is left as it was. OSError becomes a one-line `StorageError` naming `final`.
    """
    final = Path(final)
    tmp = scratch_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, final) from None
        raise


def side_config(out: Path) -> Path:
    """The `<stem>.config.json` written beside an output Parquet file."""
    return out.with_name(out.stem + ".config.json")


def write_text(path: Path | str, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj: Any) -> None:
    """Write a JSON file (indented, newline-terminated) atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_finished(folder: Path | str, what: str) -> None:
    """Refuse to read an output another sdm process still holds (a model directory while
    `sdm train` runs: its best.pt is an epoch's, not the run's).

    Raises:
        LockedError: naming the folder.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # a missing or unreadable folder: the reader's own checks name it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockedError(f"{folder}: another sdm process is still writing this {what}; wait for it to finish") from None
    except OSError:
        pass  # a file system without locks
    finally:
        os.close(fd)  # closing releases a shared lock taken here


def _flock(fd: int, what: Path, command: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(f"{what}: another sdm process is writing this output; wait for it or choose another --out") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # a file system without locks
            return
        raise storage_error(exc, what) from None


class OutputDir:
    """Guard of an output directory: disjoint from inputs, locked, only the command's own files replaced.

    Use as a context manager; call `prepare()` once the input is validated, right
    before the first write. `existing` lists the own entries found (after the checks).

    Args:
        out: the directory.
        command: the sdm command ("sessionize", "train", ...), recorded in the marker.
        owns: names (fnmatch patterns) of the top-level entries the command writes, and of
            the files inside its folders (`vocab/*.parquet`, matched part by part): a file in
            an own folder that no pattern names is foreign, and stops `--overwrite`.
        overwrite: replace an earlier output of the same command.
        inputs: see `check_disjoint`.
        keep: earlier output may stay without `overwrite` (`train --resume`).
        hint: what to suggest when an earlier output is found without `overwrite`.
        scratch: name prefixes of the command's own scratch besides `.sdm-tmp-` (a killed
            run's spill folders): removed under the lock, never counted as output.
    """

    def __init__(
        self,
        out: Path | str,
        command: str,
        owns: Iterable[str],
        *,
        overwrite: bool,
        inputs: InputPaths | None = None,
        keep: bool = False,
        hint: str = "pass --overwrite to replace it",
        scratch: Sequence[str] = (),
    ) -> None:
        self.out = Path(out)
        self.command = command
        self.owns = tuple(owns)
        self.overwrite = overwrite
        self.inputs = dict(inputs or {})
        self.keep = keep
        self.hint = hint
        self.scratch = (SCRATCH_PREFIX, *scratch)
        self.existing: list[str] = []
        self._fd: int | None = None
        self._created: list[Path] = []

    def owned(self, name: str) -> bool:
        """Whether a top-level entry `name` is one this command writes."""
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.owns)

    def __enter__(self) -> "OutputDir":
        out = self.out
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: --out exists and is not a directory")
        check_disjoint(out, self.inputs)
        self._created = _make_dirs(out)
        try:
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            self._undo()
            raise storage_error(exc, out) from None
        try:
            _flock(fd, out, self.command)
        except BaseException:
            self._undo()
            raise
        self._fd = fd
        try:
            remove_scratch(out, prefixes=self.scratch)
            self._check_contents()
            _probe_writable(out)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _check_contents(self) -> None:
        out = self.out
        try:
            names = sorted(n for n in os.listdir(out) if n != MARKER and not n.startswith(self.scratch))
        except OSError as exc:
            raise storage_error(exc, out) from None
        if not names:
            return
        writer = _marker_command(out / MARKER)
        if writer is not None and writer != self.command:
            raise OutputError(
                f"{out}: holds the output of `sdm {writer}`; `sdm {self.command}` never replaces it: choose another --out"
            )
        foreign = [n for n in names if not self.owned(n)] or self._foreign_inside(names)
        if foreign:
            raise OutputError(
                f"{out}: holds {foreign[0]!r}, which `sdm {self.command}` did not write; sdm replaces only its own "
                "files: choose a new or empty --out"
            )
        if not self.overwrite and not self.keep:
            raise OutputError(f"{out}: holds an earlier `sdm {self.command}` output ({', '.join(names[:3])}); {self.hint}")
        self.existing = names

    def _foreign_inside(self, names: list[str]) -> list[str]:
        """Files inside the own folders among `names` that no nested pattern of `owns` names
        (`vocab/*.parquet`): a folder is replaced whole, so a file put in it must stop that."""
        nested = [tuple(p.split("/")) for p in self.owns if "/" in p]
        foreign = []
        for name in names:
            top = self.out / name
            if not top.is_dir() or top.is_symlink():
                continue
            for path in sorted(top.rglob("*")):
                rel = path.relative_to(self.out).parts
                if path.is_dir() and not path.is_symlink() or any(p.startswith(self.scratch) for p in rel):
                    continue
                if rel[-1] == MARKER or any(_matches(rel, pat) for pat in nested):
                    continue
                foreign.append("/".join(rel))
        return foreign

    def prepare(self, first: Sequence[str] = (), clear: bool = True) -> None:
        """Delete the command's earlier entries (`first` ones before the rest) and write the marker."""
        out = self.out
        try:
            if clear:
                ordered = [n for n in first if n in self.existing] + [n for n in self.existing if n not in first]
                for name in ordered:
                    _remove(out / name)
                self.existing = []
            if _marker_command(out / MARKER) != self.command:
                write_json(out / MARKER, {"format": "sdm-output", "command": self.command})
        except OSError as exc:
            raise storage_error(exc, out) from None

    def _undo(self) -> None:
        """Remove the folders this guard created, if nothing but the marker is in them."""
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                if d == self.out:
                    (d / MARKER).unlink(missing_ok=True)
                d.rmdir()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self._created:
            with contextlib.suppress(OSError):
                if not [n for n in os.listdir(self.out) if n != MARKER]:
                    self._undo()
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """A relative path against a pattern, part by part (fnmatch's `*` never crosses a `/`)."""
    return len(parts) == len(pattern) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pattern))


def nested(prefix: str, owns: Iterable[str]) -> tuple[str, ...]:
    """`owns` of a command whose output lies at `prefix` inside another's (`sdm demo`'s data/, model/)."""
    return (prefix, *(f"{prefix}/{p}" for p in owns))


def _marker_command(path: Path) -> str | None:
    """The command recorded in an output marker; '?' for a damaged marker; None when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "?"
    cmd = data.get("command") if isinstance(data, dict) else None
    return cmd if isinstance(cmd, str) else "?"


_KINDS = {"sessionize": "a shard directory", "train": "a model directory", "export": "an export directory",
          "evaluate": "an evaluation report directory", "demo": "a demo directory"}  # fmt: skip
_SIGNS = (("manifest.json", "sessionize"), ("user_tower.json", "export"), ("best.pt", "train"), ("last.pt", "train"),
          ("metrics.json", "evaluate"))  # fmt: skip


def written_by(folder: Path | str) -> str | None:
    """The sdm command whose output `folder` is: its marker, else the files it holds; None when neither tells."""
    folder = Path(folder)
    writer = _marker_command(folder / MARKER)
    if writer not in (None, "?"):
        return writer
    return next((cmd for name, cmd in _SIGNS if (folder / name).exists()), None)


def describe(folder: Path | str) -> str:
    """'a model directory (written by `sdm train`)' and the like, for messages."""
    cmd = written_by(folder)
    return f"{_KINDS.get(cmd, 'an output')} (written by `sdm {cmd}`)" if cmd else "not an sdm output directory"


def _probe_writable(folder: Path) -> None:
    """Raise a one-line StorageError when `folder` cannot be written (read-only mount, permission)."""
    probe = scratch_name(folder / "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise StorageError(f"{folder}: cannot write here ({exc.strerror or exc})") from None


class OutputFile:
    """Guard of a one-file output: disjoint from inputs, locked, replaced only with `overwrite`.

    The file itself is written through `atomic_path(guard.out)`, so an existing
    file is replaced only when the new one is complete. The lock is a file
    `.sdm-lock-<name>` beside it, removed when the guard exits.
    """

    def __init__(self, out: Path | str, command: str, *, overwrite: bool, inputs: InputPaths | None = None) -> None:
        self.out = Path(out)
        self.command = command
        self.overwrite = overwrite
        self.inputs = dict(inputs or {})
        self._fd: int | None = None
        self._lock: Path | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "OutputFile":
        out = self.out
        if out.is_dir():
            raise OutputError(f"{out}: --out is a directory; give a file name")
        check_disjoint(out, self.inputs)
        if out.exists() and not self.overwrite:
            raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
        self._created = _make_dirs(out.parent)
        self._lock = out.with_name(LOCK_PREFIX + out.name)
        try:
            self._fd = _lock_file(self._lock, out, self.command)
            remove_scratch(out.parent, "-" + out.name)
            _probe_writable(out.parent)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._fd is not None and self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.unlink()
            os.close(self._fd)
            self._fd = None
        if exc_type is not None:
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _lock_file(lock: Path, what: Path, command: str) -> int:
    """Open and flock `lock`, retrying when another run removed it between our open and our lock."""
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, lock) from None
        _flock(fd, what, command)
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise LockedError(f"{what}: another sdm process keeps writing this output")
