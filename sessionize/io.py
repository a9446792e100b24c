"""Stage: read and validate. Open the input tables lazily and check their schemas and values.

A table is opened with `scan_parquet` / `scan_csv` (one file, a directory of
parts or a glob), its schema checked with `collect_schema()` (cheap: Parquet
metadata only). Every problem with the user's files is an `SdmError` naming
the file, column or value. The normalised column names live here too.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError, DataError, SdmError
from sdm.names import vocab_file
from sdm.sessionize.numeric import default_numeric

# Normalised column names used by the rest of the package. `ROW` and `DROP` are
# added next to the log's own columns, so they carry a prefix no log uses
# (`RESERVED_PREFIX`, refused in a log); the others only exist after the log's
# columns were selected away (`to_events`), so any log column name is fine.
RESERVED_PREFIX = "__sdm_"
ROW, DROP = RESERVED_PREFIX + "row", RESERVED_PREFIX + "drop"
USER, ITEM, TS, SID = "_user", "_item", "_ts", "_sid"
DROP_REASONS = ("null_user", "null_item", "null_timestamp", "behavior", "duplicate")
MIN_US = -62_135_596_800_000_000
"""0001-01-01T00:00:00Z in us since epoch: the earliest time a Python datetime holds."""
MAX_US = 253_402_300_799_999_999
"""9999-12-31T23:59:59.999999Z in us since epoch: the latest."""
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}


def feat_col(name: str) -> str:
    """Normalised column name of item side feature `name`."""
    return f"_f_{name}"


def values_col(name: str) -> str:
    """Normalised column of the value list of a multi-valued feature `name`."""
    return f"_m_{name}"


def value_list(column: pl.Expr, sep: str) -> pl.Expr:
    """A multi-valued string as its values: 'Comedy| Romance' -> ['Comedy', 'Romance'] (split on
    `sep`, each value stripped, empty values dropped; a null string stays null)."""
    return column.str.split(sep).list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))


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


@dataclass(frozen=True)
class LogSpec:
    """What was found in the input files: which columns play which role.

    Attributes:
        user_key: log column used as the user (the user column, or the session
            column when the log has no user column).
        session_key: log column holding back-end session ids, or None.
        log_item_features: item features taken from the log.
        table_item_features: item features taken from the items table.
        user_features: profile features (always from the users table).
        behavior: whether to filter on the behavior column.
        log_columns: every column of the log (duplicates are judged over these).
    """

    user_key: str
    session_key: str | None
    log_item_features: list[str] = field(default_factory=list)
    table_item_features: list[str] = field(default_factory=list)
    user_features: list[str] = field(default_factory=list)
    behavior: bool = False
    log_columns: list[str] = field(default_factory=list)
    user_from_session: bool = False


def _found(schema: pl.Schema) -> str:
    return ", ".join(schema.names()) or "(none)"


def timestamp_expr(cfg: SessionizeConfig, dtype: pl.DataType, path: Path, sample: str | None = None) -> pl.Expr:
    """Expression turning the log's time column into int64 microseconds since epoch, UTC.

    Naive datetimes are taken as UTC; zoned ones are converted to UTC
    (`dt.epoch` does both). Dates are midnight UTC. Integers are epoch seconds or
    milliseconds as declared by `cfg.time_unit`. Strings are parsed with
    `cfg.time_format` (strftime codes; a value that does not match is an error).

    Args:
        sample: a value of a string column, shown in the error when no
            time_format is given.

    Raises:
        SdmError: a column of any other type, an integer column without
            time_unit, or a string column without time_format.
    """
    col = pl.col(cfg.time_col)
    if dtype == pl.String and cfg.time_format is not None:
        return col.str.to_datetime(cfg.time_format, time_unit="us", strict=True).dt.epoch("us")
    if cfg.time_format is not None:
        raise SdmError(f"{path}: --time-format is for a string time column; {cfg.time_col!r} is {dtype}")
    if isinstance(dtype, pl.Datetime):
        return col.dt.epoch("us")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.epoch("us")
    if dtype.is_integer():
        if cfg.time_unit is None:
            raise SdmError(
                f"{path}: column {cfg.time_col!r} is an integer ({dtype}); "
                "pass --time-unit s or --time-unit ms to read it as epoch seconds/milliseconds"
            )
        factor = 1_000_000 if cfg.time_unit == "s" else 1_000
        return col.cast(pl.Int64) * factor
    if dtype == pl.String:
        raise string_times(cfg, path, sample)
    raise SdmError(
        f"{path}: column {cfg.time_col!r} has type {dtype}; expected a timestamp "
        "(datetime), an integer epoch with --time-unit s|ms, or a string with --time-format"
    )


def string_times(cfg: SessionizeConfig, path: Path, sample: str | None) -> SdmError:
    """The error for a time column of strings that is read without `--time-format`."""
    shown = f" such as {sample!r}" if sample is not None else ""
    return SdmError(
        f"{path}: column {cfg.time_col!r} holds strings{shown}, not timestamps; pass --time-format "
        "with their strftime pattern (e.g. '%Y-%m-%d %H:%M:%S UTC'), or use integer epochs with --time-unit s|ms"
    )


RAW_TIME = "__sdm_raw_time"
"""An integer time column as read, kept next to the events until its range is checked."""


def check_time_range(df: pl.DataFrame, cfg: SessionizeConfig, dtype: pl.DataType, path: Path) -> None:
    """Refuse timestamps a datetime cannot hold (before year 1 or after 9999), before anything is written.

    `df` holds kept events: `TS` and, for an integer time column, `RAW_TIME`.
    Integer epochs are checked as read, before the scaling to microseconds
    (where int64 would wrap around silently).

    Raises:
        SdmError: naming the value and what it would be.
    """
    if df.height == 0:
        return
    if dtype.is_integer() and cfg.time_unit is not None:
        factor = 1_000_000 if cfg.time_unit == "s" else 1_000
        lo, hi = df.select(pl.col(RAW_TIME).cast(pl.Int64).min().alias("lo"), pl.col(RAW_TIME).cast(pl.Int64).max().alias("hi")).row(0)
        for v in (lo, hi):
            if v is not None and not MIN_US <= v * factor <= MAX_US:
                hint = " (milliseconds read as seconds? try --time-unit ms)" if cfg.time_unit == "s" else ""
                raise SdmError(
                    f"{path}: {cfg.time_col!r} value {v} is outside years 1-9999 as epoch "
                    f"{'seconds' if cfg.time_unit == 's' else 'milliseconds'}{hint}"
                )
        return
    lo, hi = df.select(pl.col(TS).min().alias("lo"), pl.col(TS).max().alias("hi")).row(0)
    for v in (lo, hi):
        if v is not None and not MIN_US <= v <= MAX_US:
            raise SdmError(f"{path}: {cfg.time_col!r} holds a time outside years 1-9999 ({v} us since 1970)")


def _numeric(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal)


def behavior_values(cfg: SessionizeConfig, dtype: pl.DataType) -> list[Any]:
    """`--behaviors` as values of the behavior column: numbers on a numeric column, else strings.

    On a numeric column the listed strings are parsed as numbers, so `4`, `4.0`
    and `4.00` are one value (comparing strings, the float 4.0 never equalled
    "4"). On an integer column a fraction (`4.5`) stays in the list as None:
    it matches no row, which `read.check_behaviors` reports.

    Raises:
        ConfigError: a listed value that is not a number, on a numeric column.
    """
    listed = [str(b) for b in cfg.behaviors or []]
    if not _numeric(dtype):
        return listed
    values: list[Any] = []
    for text in listed:
        try:
            number = Decimal(text.strip())
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise ConfigError(
                f"--behaviors {text!r} is not a number, and the behavior column {cfg.behavior_col!r} holds numbers ({dtype})"
            )
        if dtype.is_integer():
            values.append(int(number) if number == number.to_integral_value() else None)
        else:
            values.append(float(number))
    return values


def behavior_in(cfg: SessionizeConfig, dtype: pl.DataType, values: list[Any]) -> pl.Expr:
    """Whether the behavior column's value is one of `values` (`behavior_values`); null for a null behavior.

    Numbers are compared as the column's own type (a float32 column's 0.1 is
    the float32 nearest 0.1); strings as the column cast to strings.
    """
    col = pl.col(cfg.behavior_col)
    if not _numeric(dtype):
        return col.cast(pl.String).is_in(pl.Series(values, dtype=pl.String).implode())
    if dtype.is_integer():
        wanted = pl.Series([v for v in values if v is not None], strict=False).cast(dtype, strict=False).drop_nulls()
        return col.is_in(wanted.implode())
    floats = pl.Series(values, dtype=pl.Float64)
    if dtype.is_float():
        return col.is_in(floats.cast(dtype).implode())
    return col.cast(pl.Float64).is_in(floats.implode())  # a Decimal column


_CATEGORICAL = (pl.String, pl.Categorical, pl.Enum, pl.Boolean)


def _categorical(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or isinstance(dtype, _CATEGORICAL) or dtype == pl.String


def resolve_features(
    cfg: SessionizeConfig, items_schema: pl.Schema | None, users_schema: pl.Schema | None
) -> tuple[SessionizeConfig, list[str]]:
    """Default side features to the tables' columns when a table is given without a feature list.

    `--items T` without `--item-features` takes every categorical (integer,
    string, boolean) and numeric (float, decimal: bucketised, see
    `numeric`) column of T except its key; the same for `--users` and
    `--user-features`. Other columns (dates, lists, ...) are left out and
    named in the returned notes. An explicit list, even an empty one, is kept.

    Returns:
        The config with the features filled in, and one note per table
        defaulted (for the summary line and the manifest).
    """
    notes, update = [], {}
    reserved = {"item", "user"}
    for kind, schema, key, table in (
        ("item", items_schema, cfg.item_col, cfg.items),
        ("user", users_schema, cfg.user_col, cfg.users),
    ):
        field_name = f"{kind}_features"
        if schema is None or field_name in cfg.model_fields_set:
            continue
        cols = [c for c in schema.names() if c != key and c not in reserved and not c.startswith(RESERVED_PREFIX)]
        used = [c for c in cols if _categorical(schema[c]) or default_numeric(schema[c])]
        skipped = [c for c in cols if c not in used]
        if kind == "user":  # a name already an item feature would collide (see check_log)
            used = [c for c in used if c not in update.get("item_features", cfg.item_features)]
        update[field_name] = used
        listed = cfg.numeric_features
        shown = [
            f"{c} (numeric)" if (c in listed if listed is not None else default_numeric(schema[c])) else c for c in used
        ]
        note = f"{kind} features from {table}: {', '.join(shown) or 'none'}"
        if skipped:
            note += f" (neither categorical nor numeric, left out: {', '.join(skipped)})"
        notes.append(note)
    return (cfg.model_copy(update=update) if update else cfg), notes


def check_log(
    cfg: SessionizeConfig,
    path: Path,
    schema: pl.Schema,
    items_schema: pl.Schema | None,
    users_schema: pl.Schema | None,
) -> LogSpec:
    """Check that the log and side tables hold the columns the config names.

    The user is the user column when the log has one; otherwise, when the log
    has the session column, each session id is its own user (so the long-term
    window is empty). That fallback applies to the default column names only:
    a `user_col` or `session_col` the user named (flag or config file) must
    exist. Item features are looked up in the log first, then in the items
    table (the log wins when both have the column). Profile features come from
    the users table only.

    Raises:
        SdmError: naming the missing column(s) and the columns found.
    """
    names = set(schema.names())
    reserved = sorted(c for c in names if c.startswith(RESERVED_PREFIX))
    if reserved:
        raise SdmError(f"{path}: column name(s) {reserved} start with {RESERVED_PREFIX!r}, reserved for the sessionizer; rename them")
    explicit = cfg.model_fields_set
    for key, flag in (("user_col", "--user-col"), ("session_col", "--session-col")):
        col = getattr(cfg, key)
        if key in explicit and col not in names and not (key == "session_col" and col == ""):
            raise SdmError(f"{path}: {flag} {col!r} is not a column of the log; found: {_found(schema)}")
    missing = [c for c in (cfg.item_col, cfg.time_col) if c not in names]
    if cfg.user_col not in names and cfg.session_col not in names:
        missing.insert(0, f"{cfg.user_col} (or a session column {cfg.session_col})")
    if missing:
        raise SdmError(f"{path}: missing required column(s) {', '.join(missing)}; found: {_found(schema)}")
    user_from_session = cfg.user_col not in names
    user_key = cfg.session_col if user_from_session else cfg.user_col
    session_key = cfg.session_col if cfg.session_col in names else None

    if items_schema is not None:
        if cfg.item_col not in items_schema.names():
            raise SdmError(
                f"{cfg.items}: items table has no key column {cfg.item_col!r}; found: {_found(items_schema)}"
            )
        _check_key_type(cfg.items, "items table", cfg.item_col, items_schema[cfg.item_col], schema[cfg.item_col], path)
    if users_schema is not None:
        if user_from_session:
            raise SdmError(
                f"{cfg.users}: a users table was given but the log {path} has no user column "
                f"{cfg.user_col!r}; found: {_found(schema)}"
            )
        if cfg.user_col not in users_schema.names():
            raise SdmError(
                f"{cfg.users}: users table has no key column {cfg.user_col!r}; found: {_found(users_schema)}"
            )
        _check_key_type(cfg.users, "users table", cfg.user_col, users_schema[cfg.user_col], schema[cfg.user_col], path)

    roles = {user_key: "the user column", cfg.item_col: "the item column", cfg.time_col: "the time column"}
    if session_key:
        roles[session_key] = "the session column"
    log_feats, table_feats = [], []
    for f in cfg.item_features:
        if f in roles:
            raise SdmError(f"item feature {f!r} is {roles[f]} of the log, not a side feature")
        if f in names:
            log_feats.append(f)
        elif items_schema is not None and f in items_schema.names():
            table_feats.append(f)
        else:
            where = f"the log {path}"
            where += f" or the items table {cfg.items}" if cfg.items else " (no --items table given)"
            raise SdmError(f"item feature column {f!r} not found in {where}")
    for f in cfg.user_features:
        if users_schema is None:
            raise SdmError(f"user feature column {f!r} needs a users table (--users); none was given")
        if f == cfg.user_col:
            raise SdmError(f"{cfg.users}: user feature {f!r} is the users table's key column, not a profile feature")
        if f not in users_schema.names():
            raise SdmError(
                f"{cfg.users}: user feature column {f!r} not found; found: {_found(users_schema)}"
            )

    for f in cfg.multi_valued:
        if f in cfg.user_features:
            dtype = users_schema[f]  # type: ignore[index]
        elif f in cfg.item_features:
            dtype = schema[f] if f in log_feats else items_schema[f]  # type: ignore[index]
        else:
            raise SdmError(
                f"multi-valued feature {f!r} is neither an item nor a user feature (add it to --item-features or "
                "--user-features)"
            )
        if dtype != pl.String:
            raise SdmError(f"multi-valued feature {f!r} is {dtype}; it must be a string column ('a{cfg.value_sep}b')")
    both = sorted(set(cfg.item_features) & set(cfg.user_features))
    if both:
        raise SdmError(f"feature name(s) {both} used as both item and user features; vocabularies would collide")
    behavior = cfg.behaviors is not None
    if behavior and cfg.behavior_col not in names:
        raise SdmError(
            f"{path}: --behaviors given but the log has no behavior column {cfg.behavior_col!r}; "
            f"found: {_found(schema)}"
        )
    check_output_names(cfg, log_feats, table_feats)
    return LogSpec(
        user_key=user_key,
        session_key=session_key,
        log_item_features=log_feats,
        table_item_features=table_feats,
        user_features=list(cfg.user_features),
        behavior=behavior,
        log_columns=schema.names(),
        user_from_session=user_from_session,
    )


def check_output_names(cfg: SessionizeConfig, log_feats: list[str], table_feats: list[str]) -> None:
    """Refuse feature names that would collide with another name in an output file, before anything is written.

    A feature's name becomes columns (`seq_<f>`, `oov_<f>`, `user_<f>`, `<f>` and
    `<f>_values` of items.parquet, `<f>` of catalogue.parquet) and a vocabulary file (`names.vocab_file`,
    never a path outside `vocab/`); `item` and `user` are the id vocabularies.
    Two names whose vocabulary files differ only in case would be one file on
    a case-insensitive file system.

    Raises:
        ConfigError: naming the feature and the name it collides with.
    """
    item_feats, user_feats = list(cfg.item_features), list(cfg.user_features)
    for f in (*item_feats, *user_feats):
        if f in ("item", "user"):
            raise ConfigError(f"feature {f!r}: the name of the {f} id's own vocabulary; rename the column")
    outputs = {
        "a shard": [
            "user_id", "user", *[f"user_{f}" for f in user_feats], "ts", "seq_item", *[f"seq_{f}" for f in log_feats],
            "seq_oov", *[f"oov_{f}" for f in table_feats], "sess_id", "sess_start", "sess_len", "long_start", "long_end",
        ],
        "items.parquet": ["item", "item_id", *item_feats, *[f"{f}_values" for f in cfg.multi_valued if f in item_feats]],
        "users.parquet": [USER, "user_id", "user", *user_feats, *[f"{f}_values" for f in cfg.multi_valued if f in user_feats]],
        "catalogue.parquet": ["item_id", "oov_hash", "known_from", *item_feats],
    }  # fmt: skip
    for where, columns in outputs.items():
        seen: set[str] = set()
        for c in columns:
            if c in seen:
                raise ConfigError(f"feature names collide: {where} would hold two columns {c!r}; rename a feature column")
            seen.add(c)
    files: dict[str, str] = {}
    for f in ("item", "user", *item_feats, *user_feats):
        other = files.setdefault(vocab_file(f).lower(), f)
        if other != f:
            raise ConfigError(f"features {other!r} and {f!r} differ only in case: their vocabulary files would be one")


def _check_key_type(table: Path | None, what: str, key: str, dtype: pl.DataType, log_dtype: pl.DataType, log: Path) -> None:
    """A side table's key must compare with the log's column: both integers, or both strings.

    Raises:
        SdmError: naming the table, the key and both types.
    """
    def kind(t: pl.DataType) -> str:
        if t.is_integer():
            return "integer"
        if t == pl.String or isinstance(t, (pl.Categorical, pl.Enum)):
            return "string"
        return str(t)

    if kind(dtype) != kind(log_dtype):
        raise SdmError(
            f"{table}: {what} key {key!r} is {dtype} but the log's {key!r} is {log_dtype} "
            f"({log}); store both as integers or both as strings"
        )


def to_utc_us(value: dt.datetime) -> int:
    """A config datetime as microseconds since epoch, UTC (naive = UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return delta // dt.timedelta(microseconds=1)


def from_us(value: int) -> str:
    """Microseconds since epoch as an ISO-8601 UTC string."""
    base = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (base + dt.timedelta(microseconds=int(value))).isoformat()
