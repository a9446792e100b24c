"""The sessionizer's transforms (SPEC sections 2-4), each `LazyFrame -> LazyFrame`.

Events arrive normalised by `io.to_events`: `_row` (input order), `_user`,
`_item`, `_ts` (int64 us UTC), `_sid` (back-end session id or null) and one
`_f_<name>` column per item side feature. All per-user logic is window
expressions (`.over(_user)`) on the frame sorted by (user, time, input row):
no Python loop per user or per event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize.io import ROW, SID, TS, USER, to_utc_us

SESS = "sess_id"
IDX = "_idx"          # position of the event in its user's timeline (0..)
NEW = "_new"          # first event of a (cut) session
SLEN = "_slen"        # length of the event's session
START = "_start"      # start time of the event's session
SPLIT = "_split"      # 0 train, 1 valid, 2 test
SPLITS = ("train", "valid", "test")


def sessionize(events: pl.LazyFrame, gap_us: int, max_len: int) -> pl.LazyFrame:
    """Number sessions (SPEC 2): same non-null session id or gap < `gap_us`, cut at `max_len`.

    Adds `_idx` (position in the user's timeline), `_new` (session start),
    `sess_id` (0.. over the whole log in (user, start time) order), `_slen`
    (session length) and `_start` (session start time).
    """
    return (
        events
        # ties in time keep input order: _row breaks them
        .sort([USER, TS, ROW])
        .with_columns(
            pl.col(TS).diff().over(USER).alias("_gap"),
            (pl.col(SID) == pl.col(SID).shift(1).over(USER)).fill_null(False).alias("_same_sid"),
        )
        .with_columns(
            (pl.col("_gap").is_null() | ~((pl.col("_gap") < gap_us) | pl.col("_same_sid"))).alias("_raw_new"),
        )
        # position inside the uncut session decides where the max_len cuts fall;
        # the frame is sorted, so it is the distance to the last uncut-session
        # start (a forward fill: much cheaper than int_range().over([user, session]))
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_g"))
        .with_columns(
            (pl.col("_g") - pl.when(pl.col("_raw_new")).then(pl.col("_g")).forward_fill()).alias("_pos"),
            pl.int_range(pl.len(), dtype=pl.Int64).over(USER).alias(IDX),
        )
        .with_columns((pl.col("_pos") % max_len == 0).alias(NEW))
        .with_columns((pl.col(NEW).cum_sum() - 1).cast(pl.Int64).alias(SESS))
        .with_columns(
            pl.len().over(SESS).alias(SLEN),
            pl.col(TS).first().over(SESS).alias(START),
        )
        .drop("_gap", "_same_sid", "_raw_new", "_g", "_pos")
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
                f"(computed {test_start} us); choose an earlier valid_start"
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
            .alias("long_end")
        )
        .filter(pl.col(NEW))
        .select(
            pl.col(SESS),
            pl.col(USER),
            pl.col(SPLIT),
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
    lower = (
        pl.concat([queries, points], how="vertical")
        .sort([USER, "_key", "_kind"])
        .with_columns(pl.col("_kind").cast(pl.Int64).cum_sum().over(USER).alias("_before"))
        .filter(pl.col("_kind") == 0)
        .select(pl.col(SESS), pl.col("_before"))
    )
    return (
        sessions
        .join(lower, on=SESS, how="left", maintain_order="left")
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
        )
    )


def timelines(rows: pl.LazyFrame, encoded: pl.LazyFrame, seq_cols: list[str]) -> pl.LazyFrame:
    """Attach to each (user, split) row the events of its timeline as lists.

    Args:
        rows: output of `rows_table`.
        encoded: events with `_user`, `_idx`, `_ts` and the encoded `seq_cols`.
        seq_cols: encoded per-event columns (`seq_item`, `seq_<f>`).
    """
    key = [USER, SPLIT]
    spans = rows.select(pl.col(USER), pl.col(SPLIT), pl.col("row_start"), pl.col("row_end"))
    lists = (
        encoded
        .select(pl.col(USER), pl.col(IDX), pl.col(TS), *[pl.col(c) for c in seq_cols])
        .join(spans, on=USER, how="inner")
        .filter((pl.col(IDX) >= pl.col("row_start")) & (pl.col(IDX) < pl.col("row_end")))
        .sort([USER, SPLIT, IDX])
        .group_by(key, maintain_order=True)
        .agg(pl.col(TS).alias("ts"), *[pl.col(c) for c in seq_cols])
    )
    return rows.join(lists, on=key, how="left", maintain_order="left")


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


def encode(frame: pl.LazyFrame, column: str, vocab: pl.LazyFrame, alias: str) -> pl.LazyFrame:
    """Replace raw values of `column` by vocabulary indices in a new column `alias` (1 = OOV or null)."""
    return (
        frame
        .join(
            vocab.select(pl.col("raw").alias(column), pl.col("index").alias(alias)),
            on=column,
            how="left",
            maintain_order="left",
        )
        .with_columns(pl.col(alias).fill_null(1).cast(pl.Int32))
    )
