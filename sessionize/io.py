"""Stage: read. Open an input table lazily, and turn polars failures into one line naming the file.

A table is opened with `scan_parquet` / `scan_csv` (one file, a directory of
parts or a glob), its schema read with `collect_schema()` (cheap: Parquet
metadata only). Every problem with the user's files is an `SdmError` naming
the file, column or value. The checks of the schemas against the config
live in `schema`, the time column in `times`, the normalised column names in
`columns`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from sdm.errors import DataError, SdmError


_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}


def table_format(path: Path, fmt: str | None = None, delimiter: str | None = None) -> tuple[str, str]:
    """(kind, delimiter) of an input table: "csv" or "parquet".

    `fmt` "csv"/"parquet" wins; otherwise (None or "auto") the suffix decides:
    `.csv`, `.tsv` and `.txt` are CSV (tab-separated for `.tsv`), anything else
    Parquet. `delimiter` overrides the CSV separator.
    """
    suffix = Path(path).suffix.lower()
    kind = fmt if fmt in ("csv", "parquet") else ("csv" if suffix in _CSV_SUFFIXES else "parquet")
    sep = delimiter if delimiter is not None else _CSV_SUFFIXES.get(suffix, ",")
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)  # `--delimiter '\t'` from a shell is two characters
    if len(sep.encode()) != 1:
        raise SdmError(f"--delimiter {delimiter!r}: a CSV separator is one single-byte character (e.g. ',', ';', '\\t')")
    return kind, sep


def input_files(path: Path, what: str) -> list[Path]:
    """The files of an input given as one file, a directory of parts, or a glob pattern.

    A directory stands for every Parquet/CSV file below it (partitioned logs,
    `date=.../part-0.parquet`); a glob (`logs/2024-*.parquet`) for the files it
    matches. Hidden files and folders (`.`/`_` prefixes, e.g. `_SUCCESS`) are
    not parts.

    Raises:
        SdmError: nothing there, or a directory/glob with no Parquet or CSV file.
    """
    path = Path(path)
    text = str(path)
    if any(c in text for c in "*?["):
        anchor = Path(text[: min(text.index(c) for c in "*?[" if c in text)]).parent
        files = sorted(p for p in anchor.glob(str(path.relative_to(anchor))) if p.is_file())
        if not files:
            raise SdmError(f"{path}: the {what} pattern matches no file")
        return files
    if not path.exists():
        raise SdmError(f"{path}: {what} file not found")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in {".parquet", *_CSV_SUFFIXES}
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise SdmError(f"{path}: the {what} directory holds no .parquet or .csv file")
    return files


def scan_table(
    path: Path,
    what: str,
    fmt: str | None = None,
    delimiter: str | None = None,
    as_strings: list[str] | None = None,
) -> tuple[pl.LazyFrame, pl.Schema]:
    """Open a Parquet or CSV table (a file, a directory of parts or a glob) lazily and read its schema.

    Args:
        path: the file, directory or glob (see `input_files`).
        what: what the file is ("log", "items table", ...), for error messages.
        fmt: "csv", "parquet", or None/"auto" (by suffix).
        delimiter: CSV field separator (default "," or tab for `.tsv`).
        as_strings: CSV columns read as strings, not parsed as dates (a time
            column with `--time-format`: polars' date guess would otherwise
            take `2024-01-10 08:59:12 UTC` for a datetime and fail on the
            suffix). Ignored for Parquet and for columns the table lacks.

    Returns:
        The lazy frame (the parts in file-name order) and its schema.

    Raises:
        SdmError: missing file, parts of mixed formats, a file that is not
            readable Parquet/CSV, or a CSV header naming a column twice.
    """
    files = input_files(path, what)
    kinds = {table_format(f, fmt, delimiter) for f in files}
    if len(kinds) > 1:
        raise SdmError(f"{path}: the {what} mixes CSV and Parquet parts; give one format")
    kind, sep = kinds.pop()
    is_csv = kind == "csv"
    source = files[0] if len(files) == 1 else files
    try:
        if is_csv:
            # try_parse_dates turns ISO timestamps into Datetime columns; epoch
            # numbers stay integers and then need --time-unit.
            overrides = {c: pl.String for c in as_strings or []}
            lf = pl.scan_csv(source, try_parse_dates=True, separator=sep, schema_overrides=overrides or None)
        else:
            lf = pl.scan_parquet(source, hive_partitioning=False)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SdmError(f"{path}: not a readable {'CSV' if is_csv else 'Parquet'} file ({_first_line(exc)})") from None
    if is_csv and any(_DUPLICATED.search(c) for c in schema.names()):
        _check_csv_header(files, sep, what)
    return lf, schema


_DUPLICATED = re.compile(r"_duplicated_\d+$")
"""polars renames the second `a` of a CSV header `a,a` to `a_duplicated_0`."""


def _check_csv_header(files: list[Path], sep: str, what: str) -> None:
    """Refuse a CSV whose header names a column twice (polars would silently read the first one).

    Only called when polars' schema shows a renamed duplicate, so a column
    really named `x_duplicated_0` costs one header read, not an error.

    Raises:
        DataError: naming the file and the duplicated column.
    """
    for f in files:
        try:
            with open(f, newline="", encoding="utf-8-sig", errors="replace") as fh:
                header = next(csv.reader(fh, delimiter=sep), [])
        except OSError as exc:
            raise DataError(f"{f}: cannot read the {what} ({exc.strerror or exc})") from None
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise DataError(f"{f}: the {what}'s header names column {name!r} twice; rename one of them")
            seen.add(name)


@contextmanager
def polars_errors(what: str) -> Iterator[None]:
    """A polars failure inside the block becomes one `SdmError` line naming `what` (a file, a table)."""
    try:
        yield
    except pl.exceptions.PolarsError as exc:
        raise SdmError(f"{what}: {_first_line(exc)}") from None


def collect(lf: pl.LazyFrame, what: str = "sessionize") -> pl.DataFrame:
    """Collect on the in-memory engine; a polars failure is one line naming `what`.

    The in-memory engine on purpose: the stages are window expressions over
    the whole sorted frame, which the streaming engine runs about twice as
    slowly (measured on 3M events).
    """
    with polars_errors(what):
        return lf.collect(engine="in-memory")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (polars errors run over many lines)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if first.startswith("could not parse `\""):
        first += " (an unterminated quote?)"
    return first
