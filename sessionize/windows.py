"""Stage: long-term windows (SPEC 3) and the per-(user, split) timelines they index.

A session starting at T gets the window [T - `long_window`, T) of its user's
events, the most recent `max_long_len`. Shard rows hold one timeline per
(user, split) with offsets into it (docs/FORMAT.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from sdm.sessionize.columns import TS, USER
from sdm.sessionize.sessions import IDX, SESS, SLEN, START, session_rows
from sdm.sessionize.split import SPLIT

BASE = "_base"        # frame position of the user's first event


def sessions_table(events: pl.LazyFrame, total: int) -> pl.LazyFrame:
    """One row per session of sessionized events (`total` rows): sess_id, user, start offset,
    length, start time, long_end. The split comes after (`split.assign_split`).

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
            (pl.int_range(pl.len(), dtype=pl.Int64) - pl.col(IDX)).cast(pl.UInt32).alias(BASE),
        )
        .pipe(session_rows, total)
        .select(
            pl.col(SESS),
            pl.col(USER),
            pl.col(BASE),
            pl.col(IDX).alias("start_idx"),
            pl.col(SLEN).alias("len"),
            pl.col(START).alias("start_ts"),
            pl.col("long_end"),
        )
    )


SEARCH_SLICE = 100_000
"""Fewest sessions per thread of `long_windows`' search (below it one thread searches them all)."""


def long_windows(sessions: pl.DataFrame, events: pl.DataFrame, window_us: int, max_long: int) -> pl.DataFrame:
    """Add `long_start` to the sessions table (SPEC 3): the window is [T - window, T), last `max_long`.

    `events` are the sorted events the sessions table was built from; the
    upper bound, `long_end`, comes from `sessions_table`. The lower bound is
    max(number of the user's events with time < T - window, long_end -
    max_long), so it lies in [long_end - max_long, long_end]: a binary search
    over at most `max_long` + 1 timeline positions of each session, all
    sessions at once (numpy, about log2(max_long) gathers of the sessions'
    times). No key of every event is built: at 10M events 0.15-0.31 s against
    0.37-0.80 s for one search of a fused (user, time) key of every event.
    Eager (DataFrames) because the search needs both sides materialised.
    """
    if sessions.height == 0 or events.height == 0:
        return sessions.with_columns(pl.col("long_end").alias("long_start"))
    times = events.get_column(TS).to_numpy()
    base = sessions.get_column(BASE).cast(pl.Int64).to_numpy()
    end = sessions.get_column("long_end").cast(pl.Int64).to_numpy()
    # (a window of 2^62 us reaches before year 1 from any time: wider ones change nothing, and
    # the bound keeps the subtraction in int64)
    query = sessions.get_column("start_ts").to_numpy() - min(window_us, 2**62)
    lo = np.maximum(end - max_long, 0)
    # numpy releases the GIL in these loops: the sessions are searched in one slice per polars
    # thread (at 10M events 0.08-0.11 s against 0.13 s in one, on 2 cores)
    k = max(1, min(pl.thread_pool_size(), len(lo) // SEARCH_SLICE))
    cuts = [i * len(lo) // k for i in range(k + 1)]
    slices = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]

    def search(s: slice) -> None:
        _search(times, base[s], lo[s], end[s].copy(), query[s])

    if k == 1:
        search(slices[0])  # no thread pool for a small table (a served request has a few sessions)
    else:
        with ThreadPoolExecutor(max_workers=k) as pool:
            list(pool.map(search, slices))
    return sessions.with_columns(pl.Series("long_start", lo, dtype=pl.Int64))


def _search(times: np.ndarray, base: np.ndarray, lo: np.ndarray, hi: np.ndarray, query: np.ndarray) -> None:
    """Per session, the first timeline position of [lo, hi] whose time is >= query (hi if none), into `lo`.

    A binary search of all sessions at once: each step halves every
    session's range; an empty one (lo = hi) stays put, and its probe is
    clamped into the frame. A range of r positions is empty after
    r.bit_length() steps. `lo` (a view of the caller's array) and `hi` are
    overwritten.
    """
    if len(lo) == 0:
        return
    last = len(times) - 1
    mid, probe = np.empty_like(lo), np.empty_like(lo)
    below = np.empty(len(lo), dtype=bool)
    for _ in range(int((hi - lo).max()).bit_length()):
        np.add(lo, hi, out=mid)
        np.right_shift(mid, 1, out=mid)
        np.add(base, mid, out=probe)
        np.minimum(probe, last, out=probe)
        np.less(times[probe], query, out=below)
        below &= lo < hi
        # below: the answer is after mid; else it is at most mid
        np.copyto(lo, mid + 1, where=below)
        np.copyto(hi, mid, where=~below)


def rows_table(sessions: pl.DataFrame) -> pl.DataFrame:
    """One row per (user, split): session lists with offsets relative to the row's timeline.

    The timeline of a row runs from the earliest long-term event of its
    sessions (`row_start`) to the end of its last session (`row_end`). Rows
    come split by split (train, valid, test; users in order within each), so
    each split's shards are slices, not copies.

    Eager, like `long_windows` and `timelines`: after one stable sort by split
    every row is a contiguous run of sessions, so the lists are the session
    columns cut at the run boundaries (Arrow offsets) and the per-row bounds are
    numpy reductions over the runs; at 10M events 0.07 s, against 0.24 s for
    a polars window (`.over`) plus `group_by`.
    """
    if not sessions.get_column(SESS).is_sorted():
        sessions = sessions.sort(SESS)
    df = sessions.sort(SPLIT, maintain_order=True)  # (split, sess): users contiguous within a split
    n = df.height
    user, split = df.get_column(USER).to_numpy(), df.get_column(SPLIT).to_numpy()
    new_row = np.ones(n, dtype=bool)
    new_row[1:] = (user[1:] != user[:-1]) | (split[1:] != split[:-1])
    starts = np.flatnonzero(new_row)
    offsets = np.append(starts, n).astype(np.int64)
    first = pl.Series(starts, dtype=pl.Int64)

    def col(name: str) -> np.ndarray:
        return df.get_column(name).to_numpy().astype(np.int64)

    row_start = np.minimum.reduceat(col("long_start"), starts)
    row_end = np.maximum.reduceat(col("start_idx") + col("len"), starts)
    start_of_session_row = row_start[np.cumsum(new_row) - 1]

    def rel(name: str) -> pl.Series:
        # a session offset relative to its row's timeline
        return _list_column(offsets, (col(name) - start_of_session_row).astype(np.int32))

    return df.select(pl.col(USER), pl.col(SPLIT)).gather(first).with_columns(
        _list_column(offsets, df.get_column(SESS).to_numpy()).alias(SESS),
        rel("start_idx").alias("sess_start"),
        _list_column(offsets, df.get_column("len").cast(pl.Int32).to_numpy()).alias("sess_len"),
        rel("long_start").alias("long_start"),
        rel("long_end").alias("long_end"),
        pl.Series("row_start", row_start, dtype=pl.Int64),
        pl.Series("row_end", row_end, dtype=pl.Int64),
        df.get_column(BASE).gather(first),
    )


def _list_column(offsets: np.ndarray, values: np.ndarray | pa.Array) -> pl.Series:
    """A list column from Arrow offsets (row k = values[offsets[k]:offsets[k + 1]]), without copying per row."""
    lists = pa.LargeListArray.from_arrays(_arrow(offsets), values if isinstance(values, pa.Array) else _arrow(values))
    # through the Arrow C data interface: `pl.from_arrow` imports pyarrow.compute first (~40 ms a run)
    return pl.Series(_CArray(lists))


class _CArray:
    """An Arrow array seen only through `__arrow_c_array__`, so polars imports it without pyarrow.compute."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __arrow_c_array__(self, requested_schema: Any = None) -> Any:
        return self.array.__arrow_c_array__(requested_schema)


def _arrow(values: np.ndarray) -> pa.Array:
    """A numeric numpy array as an Arrow array, without a copy.

    Not `pa.array`: its first call imports pandas (0.15 s of every run, measured at 10M events).
    """
    values = np.ascontiguousarray(values)
    if values.dtype.kind not in "iuf":  # booleans are bit-packed in Arrow, objects have no buffer
        return pa.array(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def timelines(rows: pl.DataFrame, events: pl.DataFrame, columns: dict[str, str], oov: pl.DataFrame | None = None) -> pl.DataFrame:
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
        oov: `encode.oov_codes` (rows keyed by the ascending event position
            `_pos` of every event whose `seq_item` is 1; `seq_item` must be one
            of `columns`): each of its other columns becomes a list column of
            the values of the timeline's OOV events, in timeline order.
    """
    lengths = (rows.get_column("row_end") - rows.get_column("row_start")).cast(pl.Int64)
    first = rows.get_column(BASE).cast(pl.Int64) + rows.get_column("row_start")
    positions = (
        pl.DataFrame({"a": first, "b": first + lengths})
        .select(pl.int_ranges(pl.col("a"), pl.col("b"), dtype=pl.Int64).explode().alias("p"))
        .get_column("p")
    )
    if rows.height == 0:
        positions = positions.clear()
    offsets = np.concatenate([[0], np.cumsum(lengths.to_numpy())]).astype(np.int64)
    picked = events.select(*[pl.col(c) for c in columns]).pipe(lambda df: df[positions] if len(positions) else df.clear())
    lists = {}
    for src, name in columns.items():
        values = picked.get_column(src).to_arrow()
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        lists[name] = _list_column(offsets, values)
    if oov is not None and oov.width > 1:
        lists.update(_oov_lists(positions.to_numpy(), picked.get_column("seq_item").to_numpy() == 1, offsets, oov))
    return rows.with_columns(**{name: series for name, series in lists.items()})


def _oov_lists(positions: np.ndarray, flag: np.ndarray, offsets: np.ndarray, oov: pl.DataFrame) -> dict[str, pl.Series]:
    """Per value column of `oov`: the values of the flagged events of each timeline, as a list column.

    Only the flagged (OOV) positions are searched in `oov._pos`, so the cost
    follows the OOV events, not the timelines.
    """
    at = np.searchsorted(oov.get_column("_pos").to_numpy(), positions[flag])
    kept = np.concatenate([[0], np.cumsum(flag, dtype=np.int64)])[offsets]
    return {
        name: _list_column(kept, oov.get_column(name).to_numpy()[at].astype(np.int32))
        for name in oov.columns
        if name != "_pos"
    }
