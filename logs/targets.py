"""The files `sdm convert` and `sdm synth` write: a log and, beside it, its items and users
tables, all claimed before the first byte is written (`claim_targets`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from sdm.errors import OutputError
from sdm.outputs import OutputFile


def side_paths(out: Path) -> tuple[Path, Path]:
    """Paths of the items and users tables written next to log `out`."""
    return out.parent / "items.parquet", out.parent / "users.parquet"


def check_log_name(out: Path, command: str) -> None:
    """The log is named `*.parquet` (sdm writes Parquet, and a `.csv` name would be read back as
    CSV) and is not the items or users table written beside it (`side_paths`).

    Raises:
        OutputError: naming the file.
    """
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise OutputError(f"{out}: `sdm {command}` writes Parquet; name the log *.parquet")
    if out in side_paths(out):
        raise OutputError(f"{out}: the log would be its own items or users table, written beside it; choose another name")


@contextlib.contextmanager
def claim_targets(targets: Sequence[Path], inputs: Sequence[Path], overwrite: bool, command: str) -> Iterator[None]:
    """Hold every output file of `sdm convert` / `sdm synth` (`sdm.outputs.OutputFile`), checked before anything is written.

    Every output file (the log and both side tables, even one this dataset
    does not write: a stale table from another dataset beside the new log
    would be misleading) must be absent, or `overwrite` given; none may be an
    input; each is locked against a second writer; the folder must be
    creatable and writable.

    Raises:
        OutputError: naming the file (`check_log_name`); LockedError: another sdm process writes it.
    """
    check_log_name(Path(targets[0]), command)
    with contextlib.ExitStack() as stack:
        for p in targets:
            stack.enter_context(OutputFile(p, command, overwrite=overwrite, inputs={"input file": list(inputs)}))
        yield
