"""The sessionizer's transforms (SPEC sections 2-4), each `LazyFrame -> LazyFrame`.

Events arrive normalised by `io.to_events`: `ROW` (input order), `_user`,
`_item`, `_ts` (int64 us UTC), `_sid` (back-end session id or null) and one
`_f_<name>` column per item side feature. All per-user logic is window
expressions (`.over(_user)`) on the frame sorted by (user, time, input row):
no Python loop per user or per event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize.io import ROW, SID, TS, USER, from_us, to_utc_us

SESS = "sess_id"
IDX = "_idx"          # position of the event in its user's timeline (0..)
NEW = "_new"          # first event of a (cut) session
SLEN = "_slen"        # length of the event's session
START = "_start"      # start time of the event's session
SPLIT = "_split"      # 0 train, 1 valid, 2 test
SPLITS = ("train", "valid", "test")
BASE = "_base"        # frame position of the user's first event


def sessionize(events: pl.LazyFrame, gap_us: int, max_len: int) -> pl.LazyFrame:
    """Number sessions (SPEC 2): same non-null session id or gap < `gap_us`, cut at `max_len`.

    Adds `_idx` (position in the user's timeline), `_new` (session start),
    `sess_id` (0.. over the frame in (user, start time) order), `_slen`
    (session length) and `_start` (session start time).

    After the sort every user and every session is a contiguous run, so each
    per-group quantity is a shift comparison or a forward/backward fill over
    run starts: no `.over()` hash grouping (about 5x slower at 10M events).
    """
    first = pl.col("_first_of_user")
    return (
        events
        # ties in time keep input order: ROW breaks them
        .sort([USER, TS, ROW])
        .with_columns(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("_g"),
            (pl.col(USER).ne_missing(pl.col(USER).shift(1)) | (pl.int_range(pl.len()) == 0)).alias("_first_of_user"),
        )
        .with_columns(
            (
                first
                | ~((pl.col(TS).diff() < gap_us) | (pl.col(SID) == pl.col(SID).shift(1)).fill_null(False))
            ).alias("_raw_new"),
            (pl.col("_g") - pl.when(first).then(pl.col("_g")).forward_fill()).alias(IDX),
        )
        # position inside the uncut session decides where the max_len cuts fall
        .with_columns(
            ((pl.col("_g") - pl.when(pl.col("_raw_new")).then(pl.col("_g")).forward_fill()) % max_len == 0).alias(NEW),
        )
        .with_columns(
            (pl.col(NEW).cum_sum() - 1).cast(pl.Int64).alias(SESS),
            # length = next session's first position - this session's first position
            (
                pl.when(pl.col(NEW)).then(pl.col("_g")).shift(-1).backward_fill().fill_null(pl.len())
                - pl.when(pl.col(NEW)).then(pl.col("_g")).forward_fill()
            ).cast(pl.UInt32).alias(SLEN),
            pl.when(pl.col(NEW)).then(pl.col(TS)).forward_fill().alias(START),
        )
        .drop("_first_of_user", "_raw_new", "_g")
    )


@dataclass(frozen=True)
class Cutoffs:
    """Split cutoffs in us since epoch, UTC: train < valid_start <= valid < test_start <= test."""

    valid_start: int
    test_start: int


def _fraction_position(n: int, fraction: float) -> int:
    """Index (0-based, in start-time order) of the first of the last floor(fraction * n) sessions."""
    # the epsilon keeps 0.1 * 30 == 3 from becoming 2.9999... -> 2
    return n - math.floor(fraction * n + 1e-9)


def compute_cutoffs(cfg: SessionizeConfig, starts: pl.Series, max_ts: int) -> Cutoffs:
    """Resolve the split cutoffs from the config and the sorted session start times.

    Test cutoff first: an explicit `test_start`; or `test_days` before the end of
    the log, where the end is the last timestamp + 1 us (exclusive, so 0 days
    gives an empty split and 1 day covers exactly the last 24 h); or
    `test_fraction` f: the start time of the session at 0-based position
    n - floor(f * n) in start-time order (sessions tying with it go to test too).
    Then the validation cutoff: explicit `valid_start`; `valid_days` before the
    test cutoff; or `valid_fraction` f: floor(f * n) sessions just before the
    test cutoff. With nothing given, valid_fraction = test_fraction = 0.1.
    An empty test split has test_start = end of the log.

    Raises:
        SdmError: an explicit valid_start after the computed test cutoff.
    """
    n = len(starts)
    end = max_ts + 1
    def none_given(name: str) -> bool:
        return all(getattr(cfg, f"{name}_{k}") is None for k in ("start", "days", "fraction"))

    if cfg.test_start is not None:
        test_start = to_utc_us(cfg.test_start)
    elif cfg.test_days is not None:
        test_start = end - round(cfg.test_days * 86_400_000_000)
    else:
        f = 0.1 if none_given("test") else cfg.test_fraction
        p = _fraction_position(n, f)
        test_start = int(starts[p]) if p < n else end
    if cfg.valid_start is not None:
        valid_start = to_utc_us(cfg.valid_start)
        if valid_start > test_start:
            raise SdmError(
                f"valid_start {cfg.valid_start.isoformat()} is after the test cutoff "
                f"({from_us(test_start)}); choose an earlier valid_start"
            )
    elif cfg.valid_days is not None:
        valid_start = test_start - round(cfg.valid_days * 86_400_000_000)
    else:
        f = 0.1 if none_given("valid") else cfg.valid_fraction
        p_test = int(starts.search_sorted(test_start, side="left"))
        p = max(0, p_test - math.floor(f * n + 1e-9))
        valid_start = int(starts[p]) if p < p_test else test_start
    return Cutoffs(valid_start=valid_start, test_start=test_start)


def assign_split(events: pl.LazyFrame, cut: Cutoffs) -> pl.LazyFrame:
    """Label each event with the split of its session, by the session's start time (SPEC 4)."""
    return events.with_columns(
        pl.when(pl.col(START) < cut.valid_start).then(0)
        .when(pl.col(START) < cut.test_start).then(1)
        .otherwise(2)
        .cast(pl.Int8)
        .alias(SPLIT)
    )


def sessions_table(events: pl.LazyFrame) -> pl.LazyFrame:
    """One row per session: sess_id, user, split, start offset, length, start time, long_end.

    `long_end` = number of the user's events strictly before the start time T,
    i.e. the first timeline position whose time is T (ties with T are not
    "before T", even when an earlier cut chunk holds them).
    """
    return (
        events
        # first timeline position of the event's (user, time) tie group: the
        # frame is sorted by (user, time), so a forward fill finds it
        .with_columns(
            pl.when((pl.col(IDX) == 0) | (pl.col(TS) != pl.col(TS).shift(1)))
            .then(pl.col(IDX))
            .forward_fill()
            .alias("long_end"),
            # frame position of the user's first event: timelines gather by it
            (pl.int_range(pl.len(), dtype=pl.Int64) - pl.col(IDX)).alias(BASE),
        )
        .filter(pl.col(NEW))
        .select(
            pl.col(SESS),
            pl.col(USER),
            pl.col(SPLIT),
            pl.col(BASE),
            pl.col(IDX).alias("start_idx"),
            pl.col(SLEN).alias("len"),
            pl.col(START).alias("start_ts"),
            pl.col("long_end"),
        )
    )


def long_windows(sessions: pl.LazyFrame, events: pl.LazyFrame, window_us: int, max_long: int) -> pl.LazyFrame:
    """Add `long_start` to the sessions table (SPEC 3): the window is [T - window, T), last `max_long`.

    The lower bound counts the user's events with time < T - window: the query
    rows are merged into the events, sorted so that a query sorts before events
    at the same time, and a running count of events over the user gives, at
    each query, the number of events strictly before its key.
    """
    queries = sessions.select(
        pl.col(USER),
        (pl.col("start_ts") - window_us).alias("_key"),
        pl.col(SESS),
        pl.lit(0, dtype=pl.Int8).alias("_kind"),
    )
    points = events.select(
        pl.col(USER),
        pl.col(TS).alias("_key"),
        pl.lit(None, dtype=pl.Int64).alias(SESS),
        pl.lit(1, dtype=pl.Int8).alias("_kind"),
    )
    # the running count restarts per user: global cum_sum minus its value
    # just before the user's first row (a forward fill, not `.over(user)`)
    lower = (
        pl.concat([queries, points], how="vertical")
        # stable: queries of one user with equal keys stay in sess_id order, so
        # the filtered queries below come out in the sessions' own order
        .sort([USER, "_key", "_kind"], maintain_order=True)
        .with_columns(pl.col("_kind").cast(pl.Int64).cum_sum().alias("_cum"))
        .with_columns(
            (
                pl.col("_cum")
                - pl.when(pl.col(USER).ne_missing(pl.col(USER).shift(1)) | (pl.int_range(pl.len()) == 0))
                .then(pl.col("_cum") - pl.col("_kind").cast(pl.Int64))
                .forward_fill()
            ).alias("_before")
        )
        .filter(pl.col("_kind") == 0)
        .select(pl.col("_before"))
    )
    # row k of `lower` is session k of `sessions` (see the stable sort): a
    # horizontal concat instead of an order-keeping join
    return (
        pl.concat([sessions, lower], how="horizontal")
        .with_columns(
            pl.max_horizontal(pl.col("_before"), pl.col("long_end") - max_long).alias("long_start"),
        )
        .drop("_before")
    )


def rows_table(sessions: pl.LazyFrame) -> pl.LazyFrame:
    """One row per (user, split): session lists with offsets relative to the row's timeline.

    The timeline of a row runs from the earliest long-term event of its
    sessions (`row_start`) to the end of its last session (`row_end`).
    """
    key = [USER, SPLIT]
    return (
        sessions
        .sort(SESS)
        .with_columns(pl.col("long_start").min().over(key).alias("row_start"))
        .with_columns(
            (pl.col("start_idx") - pl.col("row_start")).cast(pl.Int32).alias("sess_start"),
            pl.col("len").cast(pl.Int32).alias("sess_len"),
            (pl.col("long_start") - pl.col("row_start")).cast(pl.Int32).alias("long_start_off"),
            (pl.col("long_end") - pl.col("row_start")).cast(pl.Int32).alias("long_end_off"),
            (pl.col("start_idx") + pl.col("len")).alias("_end"),
        )
        .group_by(key, maintain_order=True)
        .agg(
            pl.col(SESS),
            pl.col("sess_start"),
            pl.col("sess_len"),
            pl.col("long_start_off").alias("long_start"),
            pl.col("long_end_off").alias("long_end"),
            pl.col("row_start").first(),
            pl.col("_end").max().alias("row_end"),
            pl.col(BASE).first(),
        )
    )


def timelines(rows: pl.DataFrame, events: pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """Attach to each (user, split) row the events of its timeline as list columns.

    Eager on purpose: the lists are built straight from Arrow offsets over
    gathered event columns (one gather per column, no explode/group_by round
    trip), which is several times cheaper than joining rows to events and
    aggregating.

    Args:
        rows: output of `rows_table` (with `row_start`, `row_end`, `_base`).
        events: the frame the sessions were numbered on, in the same order
            (`_base` + timeline index = frame position).
        columns: event column -> output list column (e.g. `_ts` -> `ts`).
    """
    lengths = (rows.get_column("row_end") - rows.get_column("row_start")).cast(pl.Int64)
    first = rows.get_column(BASE) + rows.get_column("row_start")
    positions = (
        pl.DataFrame({"a": first, "b": first + lengths})
        .select(pl.int_ranges(pl.col("a"), pl.col("b"), dtype=pl.Int64).explode().alias("p"))
        .get_column("p")
    )
    if rows.height == 0:
        positions = positions.clear()
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths.to_numpy())]).astype(np.int64))
    picked = events.select(*[pl.col(c) for c in columns]).pipe(lambda df: df[positions] if len(positions) else df.clear())
    lists = {}
    for src, name in columns.items():
        values = picked.get_column(src).to_arrow()
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        lists[name] = pl.from_arrow(pa.LargeListArray.from_arrays(offsets, values))
    return rows.with_columns(**{name: series for name, series in lists.items()})


def build_vocab(values: pl.LazyFrame) -> pl.LazyFrame:
    """Vocabulary from a one-column frame `raw` (one row per occurrence).

    Returns `raw`, `index` (int32, 2.. by descending count then raw value) and
    `count` (int64). Nulls are not vocabulary entries (they map to 1).
    """
    return (
        values
        .drop_nulls("raw")
        .group_by("raw")
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .sort(["count", "raw"], descending=[True, False])
        .with_row_index("index", offset=2)
        .select(pl.col("raw"), pl.col("index").cast(pl.Int32), pl.col("count"))
    )


def encode(frame: pl.LazyFrame, column: str, vocab: pl.LazyFrame | pl.DataFrame, alias: str) -> pl.LazyFrame:
    """Replace raw values of `column` by vocabulary indices in a new column `alias` (1 = OOV or null).

    An order-keeping left join on the vocabulary (its keys are unique, so rows
    are neither added nor lost). Not `replace_strict`: with a large vocabulary
    that is dramatically slower (4M items over 25M events: 181 s against 7 s
    for the join, polars 2.1).
    """
    vocab = vocab.collect() if isinstance(vocab, pl.LazyFrame) else vocab
    dtype = frame.collect_schema()[column]
    tmp = "__sdm_enc"
    lut = vocab.lazy().select(pl.col("raw").cast(dtype, strict=False).alias(column), pl.col("index").alias(tmp))
    return (
        frame
        .join(lut, on=column, how="left", maintain_order="left")
        .with_columns(pl.col(tmp).fill_null(1).cast(pl.Int32).alias(alias))
        .drop(tmp)
    )
