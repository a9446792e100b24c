"""Input side of the sessionizer: open tables, check their schema, normalise the log.

Everything here is lazy: a table is opened with `scan_parquet` / `scan_csv`, its
schema checked with `collect_schema()` (cheap: Parquet metadata only), and the
log is turned into one `LazyFrame` of normalised event columns. Every problem
with the user's files is an `SdmError` naming the file, column or value.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import SdmError

# Normalised column names used by the rest of the package. The leading
# underscore keeps them apart from whatever the user's log calls its columns.
ROW, USER, ITEM, TS, SID, DROP = "_row", "_user", "_item", "_ts", "_sid", "_drop"
DROP_REASONS = ("null_user", "null_item", "null_timestamp", "behavior", "duplicate")


def feat_col(name: str) -> str:
    """Normalised column name of item side feature `name`."""
    return f"_f_{name}"


def scan_table(path: Path, what: str) -> tuple[pl.LazyFrame, pl.Schema]:
    """Open a Parquet (or, by suffix `.csv`, CSV) table lazily and read its schema.

    Args:
        path: the file.
        what: what the file is ("log", "items table", ...), for error messages.

    Returns:
        The lazy frame and its schema.

    Raises:
        SdmError: missing file, or a file that is not readable Parquet/CSV.
    """
    path = Path(path)
    if not path.exists():
        raise SdmError(f"{path}: {what} file not found")
    if path.is_dir():
        raise SdmError(f"{path}: {what} is a directory, expected a Parquet or CSV file")
    is_csv = path.suffix.lower() == ".csv"
    try:
        if is_csv:
            # try_parse_dates turns ISO timestamps into Datetime columns; epoch
            # numbers stay integers and then need --time-unit.
            lf = pl.scan_csv(path, try_parse_dates=True)
        else:
            lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        kind = "CSV" if is_csv else "Parquet"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{path}: not a readable {kind} file ({first})") from None
    return lf, schema


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


def timestamp_expr(cfg: SessionizeConfig, dtype: pl.DataType, path: Path) -> pl.Expr:
    """Expression turning the log's time column into int64 microseconds since epoch, UTC.

    Naive datetimes are taken as UTC; zoned ones are converted to UTC
    (`dt.epoch` does both). Dates are midnight UTC. Integers are epoch seconds or
    milliseconds as declared by `cfg.time_unit`.

    Raises:
        SdmError: a column of any other type, or an integer column without time_unit.
    """
    col = pl.col(cfg.time_col)
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
    raise SdmError(
        f"{path}: column {cfg.time_col!r} has type {dtype}; expected a timestamp "
        "(datetime) or an integer epoch with --time-unit s|ms"
    )


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
    window is empty). Item features are looked up in the log first, then in the
    items table (the log wins when both have the column). Profile features come
    from the users table only.

    Raises:
        SdmError: naming the missing column(s) and the columns found.
    """
    names = set(schema.names())
    missing = [c for c in (cfg.item_col, cfg.time_col) if c not in names]
    if cfg.user_col not in names and cfg.session_col not in names:
        missing.insert(0, f"{cfg.user_col} (or a session column {cfg.session_col})")
    if missing:
        raise SdmError(f"{path}: missing required column(s) {', '.join(missing)}; found: {_found(schema)}")
    user_from_session = cfg.user_col not in names
    user_key = cfg.session_col if user_from_session else cfg.user_col
    session_key = cfg.session_col if cfg.session_col in names else None

    if items_schema is not None and cfg.item_col not in items_schema.names():
        raise SdmError(
            f"{cfg.items}: items table has no key column {cfg.item_col!r}; found: {_found(items_schema)}"
        )
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

    log_feats, table_feats = [], []
    for f in cfg.item_features:
        if f in names and f not in (cfg.item_col, cfg.user_col, cfg.time_col):
            log_feats.append(f)
        elif items_schema is not None and f in items_schema.names() and f != cfg.item_col:
            table_feats.append(f)
        else:
            where = f"the log {path}"
            where += f" or the items table {cfg.items}" if cfg.items else " (no --items table given)"
            raise SdmError(f"item feature column {f!r} not found in {where}")
    for f in cfg.user_features:
        if users_schema is None:
            raise SdmError(f"user feature column {f!r} needs a users table (--users); none was given")
        if f not in users_schema.names() or f == cfg.user_col:
            raise SdmError(
                f"{cfg.users}: user feature column {f!r} not found; found: {_found(users_schema)}"
            )

    both = sorted(set(cfg.item_features) & set(cfg.user_features))
    if both:
        raise SdmError(f"feature name(s) {both} used as both item and user features; vocabularies would collide")
    behavior = cfg.behaviors is not None
    if behavior and cfg.behavior_col not in names:
        raise SdmError(
            f"{path}: --behaviors given but the log has no behavior column {cfg.behavior_col!r}; "
            f"found: {_found(schema)}"
        )
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


def tag_drops(lf: pl.LazyFrame, cfg: SessionizeConfig, spec: LogSpec, ts: pl.Expr) -> pl.LazyFrame:
    """Add the drop reason (null when the row is kept); `lf` already carries the row index `_row`.

    `lf` is read twice (the copies are found in a separate filter): pass a
    collected frame's `.lazy()`, not a scan.

    Reasons, first match wins: null_user, null_item, null_timestamp, behavior
    (not among cfg.behaviors), duplicate (an exact copy, over all the log's
    columns, of an earlier row; the first copy is kept; not checked with
    cfg.keep_duplicates).
    """
    behaviors = [str(b) for b in (cfg.behaviors or [])]
    reason = (
        pl.when(pl.col(spec.user_key).is_null()).then(pl.lit("null_user"))
        .when(pl.col(cfg.item_col).is_null()).then(pl.lit("null_item"))
        .when(ts.is_null()).then(pl.lit("null_timestamp"))
    )
    if spec.behavior:
        reason = reason.when(
            ~pl.col(cfg.behavior_col).cast(pl.String).is_in(behaviors).fill_null(False)
        ).then(pl.lit("behavior"))
    if not cfg.keep_duplicates:
        reason = reason.when(pl.col(ROW).is_in(_copies(lf, cfg, spec).implode())).then(pl.lit("duplicate"))
    return lf.with_columns(reason.otherwise(pl.lit(None, dtype=pl.String)).alias(DROP))


def _copies(lf: pl.LazyFrame, cfg: SessionizeConfig, spec: LogSpec) -> pl.Series:
    """Row index of every exact copy (over all the log's columns) of an earlier row."""
    # Exact duplicates, cheaply: copies share user and raw time, so after a
    # sort by (user, time, input row) only rows of a tie group of that pair can
    # be copies; just those get the exact (slow) struct comparison, in input
    # order within the group.
    cols = spec.log_columns
    user, t = pl.col(spec.user_key), pl.col(cfg.time_col)
    in_tie = (
        ((user == user.shift(1)) & (t == t.shift(1))).fill_null(False)
        | ((user == user.shift(-1)) & (t == t.shift(-1))).fill_null(False)
    )
    return (
        lf
        .select(pl.col(ROW), *[pl.col(c) for c in cols])
        .sort([spec.user_key, cfg.time_col, ROW])
        .filter(in_tie)
        .filter(~pl.struct(cols).is_first_distinct())
        .select(pl.col(ROW))
        # collected here: the copies are few, and an is_in over them is much
        # cheaper than an order-keeping left join of every row (measured 5 s at 10M)
        .collect(engine="in-memory")
        .get_column(ROW)
    )


def to_events(
    kept: pl.LazyFrame,
    cfg: SessionizeConfig,
    spec: LogSpec,
    ts: pl.Expr,
    items: pl.LazyFrame | None,
    item_dtype: pl.DataType,
) -> pl.LazyFrame:
    """Normalise kept rows to `_row, _user, _item, _ts, _sid, _f_<feature>...`.

    Item features missing from the log are joined from the items table on the
    item column (the table's first row per item wins, so duplicate keys cannot
    multiply events).
    """
    sid = pl.col(spec.session_key) if spec.session_key else pl.lit(None, dtype=pl.String)
    out = kept.select(
        pl.col(ROW),
        pl.col(spec.user_key).alias(USER),
        pl.col(cfg.item_col).alias(ITEM),
        ts.cast(pl.Int64).alias(TS),
        sid.alias(SID),
        *[pl.col(f).alias(feat_col(f)) for f in spec.log_item_features],
    )
    if spec.table_item_features and items is not None:
        table = (
            items
            .select(
                # the items table may store the key with another integer width
                pl.col(cfg.item_col).cast(item_dtype).alias(ITEM),
                *[pl.col(f).alias(feat_col(f)) for f in spec.table_item_features],
            )
            .unique(subset=[ITEM], keep="first", maintain_order=True)
        )
        out = out.join(table, on=ITEM, how="left", maintain_order="left")
    return out


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
