"""Reading the log: open it with its side tables, and read it by user hash bucket.

`Input` is what every stage needs to know about the input files; it holds
LazyFrames, so an engine sends (config, log path) to a worker and the worker
opens the input itself (`open_input`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError, SdmError
from sdm.sessionize import numeric
from sdm.sessionize.behaviors import behavior_in, behavior_values
from sdm.sessionize.columns import ROW, USER
from sdm.sessionize.io import polars_errors, scan_table
from sdm.sessionize.schema import LogSpec, check_log, resolve_features
from sdm.sessionize.times import string_times, timestamp_expr
from sdm.sessionize.normalise import normalised, read_columns


_CSV = (".csv", ".tsv", ".txt")


@dataclass
class Input:
    """The opened input files and what `check_log` found in them."""

    cfg: SessionizeConfig
    log: Path
    lf: pl.LazyFrame
    schema: pl.Schema
    items_lf: pl.LazyFrame | None
    users_lf: pl.LazyFrame | None
    spec: LogSpec
    ts: pl.Expr
    notes: list[str] = field(default_factory=list)


def open_input(cfg: SessionizeConfig, log: Path) -> Input:
    """Open the log and side tables lazily and check their schemas (metadata only).

    The returned `cfg` has the side features filled in when a table came
    without a feature list (`schema.resolve_features`) and the numeric features
    resolved (`numeric.resolve`); use it, not the argument.
    """
    log = Path(log)
    # a time column parsed by --time-format is read as the strings it holds
    as_strings = [cfg.time_col] if cfg.time_format is not None else None
    lf, schema = scan_table(log, "log", cfg.format, cfg.delimiter, as_strings)
    items_lf, items_schema = scan_table(cfg.items, "items table", None, cfg.delimiter) if cfg.items else (None, None)
    users_lf, users_schema = scan_table(cfg.users, "users table", None, cfg.delimiter) if cfg.users else (None, None)
    cfg, notes = resolve_features(cfg, items_schema, users_schema)
    _refuse_header_only(lf, schema, log, cfg)  # before check_log compares its all-string columns' types
    spec = check_log(cfg, log, schema, items_schema, users_schema)
    cfg = numeric.resolve(cfg, feature_types(spec, schema, items_schema, users_schema))
    sample = None
    if schema[cfg.time_col] == pl.String or _kind(log, cfg) == "csv":
        sample = _peek(lf, cfg.time_col, log, cfg)
    ts = timestamp_expr(cfg, schema[cfg.time_col], log, sample)
    return Input(cfg, log, lf, schema, items_lf, users_lf, spec, ts, notes)


def feature_types(
    spec: LogSpec, schema: pl.Schema, items_schema: pl.Schema | None, users_schema: pl.Schema | None
) -> dict[str, pl.DataType]:
    """The raw type of every side feature, from where `check_log` found it (log, items or users table)."""
    types = {f: schema[f] for f in spec.log_item_features}
    if items_schema is not None:
        types.update({f: items_schema[f] for f in spec.table_item_features})
    if users_schema is not None:
        types.update({f: users_schema[f] for f in spec.user_features})
    return types


def _kind(log: Path, cfg: SessionizeConfig) -> str:
    """"csv" or "parquet": how the log is read."""
    return "csv" if cfg.format == "csv" or (cfg.format != "parquet" and str(log).lower().endswith(_CSV)) else "parquet"


def _refuse_header_only(lf: pl.LazyFrame, schema: pl.Schema, log: Path, cfg: SessionizeConfig) -> None:
    """A CSV with a header and no rows reads every column as strings: say it is empty, before a
    type check blames its 'String' item column (against an items table's integer key)."""
    if _kind(log, cfg) != "csv" or not all(t == pl.String for t in schema.dtypes()):
        return
    try:
        empty = lf.head(1).collect().height == 0 and lf.collect().height == 0
    except pl.exceptions.PolarsError:
        return  # unreadable: `_peek` names the problem
    if empty:
        raise SdmError(f"{log}: empty log (0 rows, only a header)")


def _peek(lf: pl.LazyFrame, column: str, log: Path, cfg: SessionizeConfig) -> str | None:
    """The first non-null value of a string column (for messages), after checking the log has rows.

    A CSV with a header and no rows reads every column as strings: that is an
    empty log, not a log whose timestamps are strings. A CSV time column that
    polars took for dates but cannot parse (`2024-01-10 08:59:12 UTC`) holds
    strings: that error asks for `--time-format`.

    Raises:
        SdmError: a log with no rows, a CSV polars cannot parse, or CSV times
            that need `--time-format`.
    """
    kind = _kind(log, cfg)
    try:
        head = lf.select(pl.col(column)).head(1000).collect()
        if head.height == 0 and kind == "csv":
            # polars' head of a CSV whose quote never closes is silently empty; a full read raises
            head = lf.collect().select(pl.col(column))
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if kind == "csv" and first.startswith("could not parse") and f"at column '{column}'" in first:
            strings, _ = scan_table(log, "log", cfg.format, cfg.delimiter, [column])
            with polars_errors(str(log)):
                values = strings.select(pl.col(column)).head(1000).collect().get_column(column).drop_nulls()
            raise string_times(cfg, log, values[0] if len(values) else None) from None
        if first.startswith("could not parse `\""):
            first += " (an unterminated quote?)"
        raise SdmError(f"{log}: not a readable {kind.upper() if kind == 'csv' else 'Parquet'} file ({first})") from None
    if head.height == 0:
        raise SdmError(f"{log}: empty log (0 rows" + (", only a header)" if kind == "csv" else ")"))
    values = head.get_column(column).drop_nulls()
    return values[0] if len(values) and head.schema[column] == pl.String else None


def check_behaviors(inp: Input) -> None:
    """Refuse `--behaviors` values that match no row of the whole log (a typo would drop most of it).

    One streaming pass over the behavior column (its distinct values), before
    the log is split into buckets, so the check holds for the whole log, not
    per bucket. Values compare as the filter compares them (`behaviors.behavior_in`).

    Raises:
        ConfigError: naming the values that match nothing and a few that exist.
    """
    cfg = inp.cfg
    if not inp.spec.behavior:
        return
    if not cfg.behaviors:
        raise ConfigError("--behaviors lists no value; leave it out to keep every behavior")
    dtype = inp.schema[cfg.behavior_col]
    values = behavior_values(cfg, dtype)
    with polars_errors(str(inp.log)):
        present = inp.lf.select(pl.col(cfg.behavior_col).unique()).collect(engine="streaming")
    found = present.select([behavior_in(cfg, dtype, [v]).any().alias(str(k)) for k, v in enumerate(values)]).row(0)
    missing = [b for b, hit in zip(cfg.behaviors or [], found) if not hit]
    if missing:
        shown = sorted(str(v) for v in present.get_column(cfg.behavior_col).drop_nulls().to_list())
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        raise ConfigError(
            f"{inp.log}: --behaviors {', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} no row "
            f"of the log; its {cfg.behavior_col!r} column holds {', '.join(map(repr, shown[:10])) or 'only nulls'}{more}"
        )


def bucket_expr(user_key: str, buckets: int) -> pl.Expr:
    """Bucket of each row: a hash of the user, so a user's events (and its exact duplicates) share one.

    polars' hash is stable for one polars version, not across versions: every
    worker of one run must use the same polars.
    """
    return (pl.col(user_key).hash(seed=0) % buckets).cast(pl.Int64)


SPLIT_KEY = "__sdm_bucket"
"""Partition column of the bucket folders of `split_log` and `split_events` (`__sdm_bucket=<b>/`)."""


def _columns(inp: Input) -> pl.LazyFrame:
    """The log's columns the sessionizer reads, with input row numbers `ROW`."""
    return inp.lf.select(read_columns(inp.cfg, inp.spec)).with_row_index(ROW)


def scan_bucket(inp: Input, b: int, n: int, split: Path | None) -> pl.LazyFrame:
    """The raw rows of bucket `b` of `n` with their input row numbers `ROW`, lazily.

    From the bucket's file of `split_log` when given; else the log, filtered
    by the user hash when there are several buckets. Collect it with the
    streaming engine: the in-memory engine materialises every row before
    filtering (6.9 GB to keep one quarter of a 100M-event log).
    """
    lf = _columns(inp)
    if split is not None:
        files = sorted((split / f"{SPLIT_KEY}={b}").glob("*.parquet"))
        if not files:
            return pl.LazyFrame(schema=lf.collect_schema())
        return pl.scan_parquet(files, hive_partitioning=False)
    if n == 1:
        return lf
    return lf.filter(bucket_expr(inp.spec.user_key, n) == b)


def read_bucket(inp: Input, b: int, n: int, split: Path | None) -> pl.DataFrame:
    """`scan_bucket`, collected (streaming)."""
    with polars_errors(str(inp.log)):
        return scan_bucket(inp, b, n, split).collect(engine="streaming")


def split_log(inp: Input, n: int, out: Path) -> None:
    """Write the raw log, with input row numbers `ROW`, split by user bucket into `out/__sdm_bucket=<b>/`.

    For `sdm recommend`, which filters raw rows by time before normalising
    them; the sessionizer splits normalised rows (`split_events`).

    One streaming read of the log instead of one read per bucket; memory stays
    bounded by the engine's batches. lz4: the files are read back once, soon.
    """
    lf = _columns(inp)
    with polars_errors(str(inp.log)):
        lf.sink_parquet(
            pl.PartitionBy(out, key=bucket_expr(inp.spec.user_key, n).alias(SPLIT_KEY), include_key=False),
            compression="lz4",
            mkdir=True,
        )


def split_events(inp: Input, n: int, out: Path) -> None:
    """Normalise the log in one streaming pass and write its rows by user bucket into `out/__sdm_bucket=<b>/`.

    What is written is `normalise.normalised` (event columns, drop reason,
    duplicate hash): a bucket's first pass reads it back as it is, and the
    raw columns it no longer needs (behavior strings, ...) are never written.
    Arrow IPC, uncompressed: the files are read back once, soon, and at 100M
    events IPC writes in 3.5 s what Parquet needs 7-8 s for.
    """
    lf = normalised(_columns(inp), inp)
    # a failure names both ends: reading the log, or writing the spill (no space left)
    with polars_errors(f"{inp.log} -> {out}"):
        lf.sink_ipc(pl.PartitionBy(out, key=bucket_expr(USER, n).alias(SPLIT_KEY), include_key=False), mkdir=True)


def bucket_events(inp: Input, b: int, n: int, split: Path | None) -> pl.DataFrame:
    """The `normalised` rows of bucket `b` of `n`: from `split_events`' folder when given, else from the log."""
    if split is None:
        lf = normalised(scan_bucket(inp, b, n, None), inp)
    else:
        files = sorted((split / f"{SPLIT_KEY}={b}").glob("*.ipc"))
        lf = pl.scan_ipc(files, hive_partitioning=False) if files else normalised(_columns(inp).head(0), inp)
    with polars_errors(str(inp.log)):
        return lf.collect(engine="streaming")

