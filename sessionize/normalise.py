"""Stage: normalise. Drop unusable rows (counted by reason), rename to the normalised columns.

Events leave this stage as `ROW` (input order), `_user`, `_item`, `_ts` (int64
us UTC), `_sid` (back-end session id or null) and one `_f_<name>` column per
item side feature. Exact duplicates are found on the time-sorted events
(`copies`), where copies are neighbours.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from sdm.config import SessionizeConfig
from sdm.sessionize.behaviors import behavior_in, behavior_values
from sdm.sessionize.columns import DROP, DROP_REASONS, ITEM, ROW, SID, TS, USER, feat_col, value_list, values_col
from sdm.sessionize.io import polars_errors
from sdm.sessionize.schema import LogSpec
from sdm.sessionize.times import RAW_TIME, check_time_range
from sdm.sessionize.sessions import sort_events


def tag_drops(lf: pl.LazyFrame, cfg: SessionizeConfig, spec: LogSpec, ts: pl.Expr) -> pl.LazyFrame:
    """Add the drop reason (null when the row is kept); `lf` already carries the row index `ROW`.

    Reasons, first match wins: null_user, null_item (null or NaN ids),
    null_timestamp, behavior (not among cfg.behaviors). The last reason,
    duplicate, is decided later on the sorted events (`copies`). The reason
    is its position in `DROP_REASONS` (a UInt8: one byte per row, where a
    column of strings costs 16). Behaviors compare by value on a numeric
    column (`behaviors.behavior_in`).
    """
    schema = lf.collect_schema()

    def missing(name: str) -> pl.Expr:
        # a float id column's NaN is as missing as a null
        col = pl.col(name)
        return (col.is_null() | col.is_nan()) if schema[name].is_float() else col.is_null()

    code = {r: pl.lit(k, dtype=pl.UInt8) for k, r in enumerate(DROP_REASONS)}
    reason = (
        pl.when(missing(spec.user_key)).then(code["null_user"])
        .when(missing(cfg.item_col)).then(code["null_item"])
        .when(ts.is_null()).then(code["null_timestamp"])
    )
    if spec.behavior:
        dtype = schema[cfg.behavior_col]
        kept = behavior_in(cfg, dtype, behavior_values(cfg, dtype))
        reason = reason.when(~kept.fill_null(False)).then(code["behavior"])
    return lf.with_columns(reason.otherwise(pl.lit(None, dtype=pl.UInt8)).alias(DROP))


DUP = "_dup"
"""Hash of the log columns an event does not carry (behavior, the raw time, ...): the rest of an exact copy."""


def read_columns(cfg: SessionizeConfig, spec: LogSpec) -> list[str]:
    """The log columns the sessionizer reads: all of them when exact duplicates are dropped."""
    if not cfg.keep_duplicates:
        return list(spec.log_columns)
    wanted = {spec.user_key, cfg.item_col, cfg.time_col, spec.session_key, *spec.log_item_features}
    if spec.behavior:
        wanted.add(cfg.behavior_col)
    return [c for c in spec.log_columns if c in wanted]


def _dup_key(cfg: SessionizeConfig, spec: LogSpec, time_exact: bool) -> pl.Expr:
    """`DUP`: a 64-bit hash of the columns `to_events` does not keep as they are.

    The user, item, session id and single-valued log features are compared
    exactly on the events, and so is the raw time when `time_exact` (its
    microseconds are one-to-one with it: integers, datetimes of us or coarser
    units); everything else (behavior, columns the model does not use,
    multi-valued strings, ns or string times) through this hash.
    """
    exact = {spec.user_key, cfg.item_col, spec.session_key, *[f for f in spec.log_item_features if f not in cfg.multi_valued]}
    if time_exact:
        exact.add(cfg.time_col)
    rest = [c for c in spec.log_columns if c not in exact]
    if not rest:
        return pl.lit(0, dtype=pl.UInt64).alias(DUP)
    # xor of per-column hashes with distinct seeds: at 100M events about 15x
    # cheaper than hashing a struct of the columns, and as exact for equality
    # up to 64-bit collisions (distinct seeds keep swapped values apart)
    key = pl.col(rest[0]).hash(seed=11)
    for k, c in enumerate(rest[1:], start=12):
        key = key ^ pl.col(c).hash(seed=k)
    return key.alias(DUP)


def _time_exact(dtype: pl.DataType) -> bool:
    """Whether equal normalised times (int64 us) mean equal raw times for a time column of `dtype`."""
    if isinstance(dtype, pl.Datetime):
        return dtype.time_unit in ("us", "ms")
    return dtype.is_integer() or dtype == pl.Date


def copies(events: pl.DataFrame, dup_key: pl.DataFrame, features: list[str]) -> pl.Series:
    """`ROW` of every exact copy (over all the log's columns) of an earlier row; the first copy is kept.

    `events` are sorted by (user, time, input order) (`sessions.sort_events`);
    `dup_key` holds each event's `ROW` and `DUP`, in input order (only `DUP`
    when the rows are 0..n-1: then a row's number is its position). Copies share
    user and time, so they sit in one tie group of that pair: only the rows of
    such groups (few) are compared, on every event column and the hash of the
    rest (looked up by `ROW`), in input order.
    """
    user, t = pl.col(USER), pl.col(TS)
    in_tie = (
        ((user == user.shift(1)) & (t == t.shift(1))).fill_null(False)
        | ((user == user.shift(-1)) & (t == t.shift(-1))).fill_null(False)
    )
    cols = [USER, TS, ITEM, SID, DUP, *[feat_col(f) for f in features]]
    tied = events.lazy().filter(in_tie).sort(ROW).collect(engine="in-memory")
    if tied.height == 0:
        return tied.get_column(ROW)
    if ROW not in dup_key.columns:
        at = tied.get_column(ROW)
    else:
        if not dup_key.get_column(ROW).is_sorted():
            dup_key = dup_key.sort(ROW)
        # ROW increases along dup_key (input order): a binary search finds each tied row
        at = dup_key.get_column(ROW).search_sorted(tied.get_column(ROW), side="left")
    return (
        tied.with_columns(dup_key.get_column(DUP).gather(at).alias(DUP))
        .lazy()
        .filter(~pl.struct(cols).is_first_distinct())
        .select(pl.col(ROW))
        .collect(engine="in-memory")
        .get_column(ROW)
    )


NARROW_ROWS = 1 << 24
"""From this many rows (16.8M) the sort moves narrowed ids (`_narrow`): below it, memory is not
what limits a run and the narrowing costs more time (0.3 s at 10M events) than it saves."""


def _narrow(columns: dict[str, pl.Series], narrow: list[str]) -> tuple[pl.DataFrame, dict[str, tuple[int, pl.DataType]]]:
    """The `narrow` 64-bit integer columns as UInt32 offsets from their minimum where the range allows.

    The sort moves every column; 64-bit ids that span less than 2^32 move at
    half the width (at 100M events 1.2 GB less per copy). The columns are
    taken out of `columns` one at a time, so the (many-chunked) streaming
    result is never held twice.

    Returns:
        The frame and, per narrowed column, (minimum, original dtype) for `_widen`.
    """
    offsets, out = {}, {}
    for name in list(columns):
        col = columns.pop(name)
        if name in narrow and col.dtype in (pl.Int64, pl.UInt64) and len(col):
            lo, hi = col.min(), col.max()
            if lo is not None and hi - lo < 2**32:
                offsets[name] = (int(lo), col.dtype)
                col = (col - lo).cast(pl.UInt32)
        out[name] = col.rechunk()
        del col
    return pl.DataFrame(out), offsets


def _widen(frame: pl.DataFrame, offsets: dict[str, tuple[int, pl.DataType]]) -> pl.DataFrame:
    """Undo `_narrow`: the original values and dtypes (the sorted flag of the first column is kept).

    One column at a time, so memory holds the frame plus one widened column
    and its temporary, not the narrow and the wide frame at once.
    """
    for c, (lo, dtype) in offsets.items():
        frame = frame.with_columns((pl.col(c).cast(dtype) + pl.lit(lo, dtype=dtype)).alias(c))
    return frame


def normalised(rows: pl.LazyFrame, inp: Any, items: pl.LazyFrame | None = None) -> pl.LazyFrame:
    """Raw rows (with `ROW`) -> every row as event columns plus its drop reason (`DROP`), lazily.

    Also `RAW_TIME` for an integer time column (its range is checked before
    anything is kept) and `DUP` when exact copies are dropped. `inp` is a
    `read.Input`; `items`: an items table to join the table features from
    (serving); the sessionizer gives none. Streaming-friendly: no sort, no
    group-by, so the raw rows (behavior strings and all) are never held.
    """
    cfg, spec = inp.cfg, inp.spec
    dtype = inp.schema[cfg.time_col]
    extra = [pl.col(DROP)]
    if dtype.is_integer():
        extra.append(pl.col(cfg.time_col).alias(RAW_TIME))
    if not cfg.keep_duplicates:
        extra.append(_dup_key(cfg, spec, _time_exact(dtype)))
    return to_events(tag_drops(rows, cfg, spec, inp.ts), cfg, spec, inp.ts, items, inp.schema[cfg.item_col], extra)


def read_events(
    rows: pl.LazyFrame, inp: Any, items: pl.LazyFrame | None = None
) -> tuple[pl.DataFrame, dict[str, int], int]:
    """`normalised` rows collected by the streaming engine, then `clean_events`."""
    with polars_errors(str(inp.log)):
        tagged = normalised(rows, inp, items).collect(engine="streaming")
    return clean_events(tagged, inp)


def clean_events(tagged: pl.DataFrame, inp: Any) -> tuple[pl.DataFrame, dict[str, int], int]:
    """`normalised` rows -> kept events sorted by (user, time, input order), drops by reason, rows read.

    The one path from rows to events, for the sessionizer and for serving.
    """
    cfg, spec = inp.cfg, inp.spec
    dtype = inp.schema[cfg.time_col]
    rows_in = tagged.height
    counts = dict(tagged.get_column(DROP).drop_nulls().value_counts().iter_rows())
    dropped = {r: int(counts.get(k, 0)) for k, r in enumerate(DROP_REASONS)}
    if sum(dropped.values()):
        tagged = tagged.filter(pl.col(DROP).is_null())
    check_time_range(tagged, cfg, dtype, inp.log)
    tagged = tagged.drop(DROP, RAW_TIME, strict=False)
    dup_key = None
    if not cfg.keep_duplicates:
        # the hash stays out of the sort; the few tied rows look theirs up by ROW
        rows = tagged.get_column(ROW)
        # ROW = 0..n-1 (nothing dropped, input order): a position is its own row number
        identity = rows.is_sorted() and (rows.len() == 0 or (rows[0] == 0 and rows[-1] == rows.len() - 1))
        dup_key = tagged.select(pl.col(DUP)) if identity else tagged.select(pl.col(ROW), pl.col(DUP))
        del rows
        tagged = tagged.drop(DUP)
    if tagged.height >= NARROW_ROWS:
        columns = {c: tagged.get_column(c) for c in tagged.columns}
        del tagged
        narrow, offsets = _narrow(columns, [USER, ITEM, SID])
        # the session id is only compared with its neighbour: it stays narrow
        offsets.pop(SID, None)
        events = sort_events(narrow)
        del narrow  # before widening: the unsorted copy would be a third frame in memory
        events = _widen(events, offsets)
    else:
        events = sort_events(tagged)
        del tagged
    if dup_key is not None:
        # table features follow the item: comparing the log's own columns is enough
        dup = copies(events, dup_key, list(spec.log_item_features))
        del dup_key
        dropped["duplicate"] = len(dup)
        if len(dup):
            events = events.filter(~pl.col(ROW).is_in(dup.implode()))
    return events, dropped, rows_in


def split_values(frame: pl.LazyFrame, cfg: SessionizeConfig, features: list[str]) -> pl.LazyFrame:
    """Multi-valued item features: 'Comedy| Romance' -> `_m_<f>` ['Comedy', 'Romance'], `_f_<f>` the first value."""
    for f in features:
        values = value_list(pl.col(feat_col(f)), cfg.value_sep)
        frame = frame.with_columns(values.alias(values_col(f))).with_columns(
            pl.col(values_col(f)).list.first().alias(feat_col(f))
        )
    return frame


def raw_item_rows(items: pl.LazyFrame, cfg: SessionizeConfig, spec: LogSpec, item_dtype: pl.DataType) -> pl.LazyFrame:
    """The items table as the sessionizer uses it: its item column and table features, one row per item.

    The key is cast to the log's item type (the table may store it with
    another integer width; a key the log's type cannot hold matches no event
    and is left out, as are null keys); the first row of a key wins, so
    duplicate keys cannot multiply events. Column names are the table's own.
    Written as items_raw.parquet, so serving needs no path outside the data
    directory.
    """
    return (
        items
        .select(pl.col(cfg.item_col).cast(item_dtype, strict=False), *[pl.col(f) for f in spec.table_item_features])
        .drop_nulls(cfg.item_col)
        .unique(subset=[cfg.item_col], keep="first", maintain_order=True)
    )  # fmt: skip


def item_table(items: pl.LazyFrame, cfg: SessionizeConfig, spec: LogSpec, item_dtype: pl.DataType) -> pl.LazyFrame:
    """The items table's features as `_item`, `_f_<f>` (and `_m_<f>`): one row per item, the first wins."""
    return item_columns(raw_item_rows(items, cfg, spec, item_dtype), cfg, spec)


def item_columns(rows: pl.LazyFrame, cfg: SessionizeConfig, spec: LogSpec) -> pl.LazyFrame:
    """`raw_item_rows` renamed to `_item`, `_f_<f>`, with the values of multi-valued features split (`_m_<f>`)."""
    table = rows.select(pl.col(cfg.item_col).alias(ITEM), *[pl.col(f).alias(feat_col(f)) for f in spec.table_item_features])
    return split_values(table, cfg, [f for f in cfg.multi_valued if f in spec.table_item_features])


def to_events(
    kept: pl.LazyFrame,
    cfg: SessionizeConfig,
    spec: LogSpec,
    ts: pl.Expr,
    items: pl.LazyFrame | None,
    item_dtype: pl.DataType,
    extra: list[pl.Expr] | None = None,
) -> pl.LazyFrame:
    """Normalise kept rows to `_row, _user, _item, _ts, _sid, _f_<feature>...` (+ the `extra` columns).

    Item features missing from the log are joined from `items` (the items
    table) on the item column, when given: the table's first row per item
    wins, so duplicate keys cannot multiply events. The sessionizer passes
    None: it looks table features up per item after encoding (`encode`).
    """
    sid = pl.col(spec.session_key) if spec.session_key else pl.lit(None, dtype=pl.String)
    out = kept.select(
        pl.col(ROW),
        pl.col(spec.user_key).alias(USER),
        pl.col(cfg.item_col).alias(ITEM),
        ts.cast(pl.Int64).alias(TS),
        sid.alias(SID),
        *[pl.col(f).alias(feat_col(f)) for f in spec.log_item_features],
        *(extra or []),
    )
    out = split_values(out, cfg, [f for f in cfg.multi_valued if f in spec.log_item_features])
    if spec.table_item_features and items is not None:
        out = out.join(item_table(items, cfg, spec, item_dtype), on=ITEM, how="left", maintain_order="left")
    return out
