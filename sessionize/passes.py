"""The two passes over one user bucket, each calling the stages in order.

first pass:  read -> normalise (drops, sort, duplicates) -> sessions
second pass: split -> windows -> encode -> shard rows -> write

Between them `plan.make_plan` combines every bucket's first pass. A pass
knows nothing of the engine that runs it: the jobs below take plain,
picklable arguments (config, log path, bucket) and open the input themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from sdm.config import SessionizeConfig
from sdm.sessionize import catalogue, encode, split, windows, write
from sdm.sessionize.columns import ITEM, ROW, SID, TS, USER
from sdm.sessionize.io import collect, polars_errors
from sdm.sessionize.normalise import clean_events
from sdm.sessionize.plan import Part, Plan, global_sess, positions
from sdm.sessionize.read import Input, bucket_events, open_input
from sdm.sessionize.sessions import SESS, session_starts, sessionize


def first_pass(inp: Input, b: int, n: int, spill: Path | None, split_dir: Path | None = None) -> Part:
    """Read bucket `b` of `n`, count drops, sessionize it; spill the events to `spill` when given.

    `split_dir`: the directory `read.split_events` wrote (else the bucket is
    filtered out of the log).
    """
    cfg = inp.cfg
    events, dropped, rows_in = clean_events(bucket_events(inp, b, n, split_dir), inp)
    if not inp.spec.log_item_features:
        # input order only breaks ties of items.parquet's "last event" for log features
        events = events.drop(ROW)
    # the back-end session id is not needed once sessions are numbered
    ev = collect(sessionize(events.lazy(), cfg.gap_us, cfg.max_session_len).drop(SID), str(inp.log))
    del events
    ts = ev.get_column(TS)
    min_ts, max_ts = (int(ts.min()), int(ts.max())) if ev.height else (None, None)
    sessions = session_starts(ev)
    if spill is not None:
        # Arrow IPC, uncompressed: read back soon, by column; speed matters more than size
        with polars_errors(str(spill)):
            ev.write_ipc(spill)
        ev = None
    return Part(rows_in, dropped, sessions, min_ts, max_ts, ev, spill)


def second_pass(inp: Input, plan: Plan, b: int, part: Part, out: Path) -> dict[str, Any]:
    """Split, long-term windows, encoding and shard rows of bucket `b`; writes its shards into `out`.

    Returns:
        Per split, the manifest entries of the shards written; under
        `catalogue.KEY` the bucket's items outside the vocabulary
        (`catalogue.bucket_cold`).
    """
    cfg = inp.cfg
    ev = collect(part.frame())
    part.events = None  # this pass owns the bucket's events now: freed as soon as they are encoded
    sessions = collect(windows.sessions_table(ev.lazy(), ev.height).pipe(split.assign_split, plan.cut), str(inp.log))
    sessions = windows.long_windows(sessions, ev, cfg.long_window_us, cfg.max_long_len)
    if plan.buckets > 1:
        sessions = sessions.with_columns(global_sess(part.sessions, plan.offsets))
    if plan.cut.train_start is not None:
        # history sessions (before train_start) are in no split: no row of their own, but their
        # events stay in `ev`, where the windows above (and the timelines below) reach them
        sessions = sessions.filter(pl.col(split.SPLIT) != split.HISTORY)
    rows = windows.rows_table(sessions)
    del sessions
    # features of the items table ride along as items.parquet's rows (+ `oov_<f>`), not per event
    per_event = [f for f in plan.item_features if f not in plan.codes]
    seq_cols = ["seq_item"] + [f"seq_{f}" for f in per_event] + ["seq_oov"]
    with polars_errors(str(inp.log)):
        enc_df = encode.encode_events(ev, plan.vocabs, per_event).insert_column(0, ev.get_column(TS))
    oov = None
    if plan.codes:
        oov = encode.oov_codes(ev.get_column(ITEM), enc_df.get_column("seq_item"), plan.codes, plan.vocabs)
    cold = catalogue.bucket_cold(ev, enc_df, per_event)
    del ev  # from here on the encoded columns are all the events there are
    # users.parquet is sorted by user: each row finds its user by a binary search, not a hash
    # join that builds a table of every user of the log per bucket (0.6 s in all at 100M events)
    users = plan.users_table
    at = positions(users.get_column(USER), rows.get_column(USER), "the users table")
    rows = rows.hstack(
        users.select(pl.col("user_id"), pl.col("user"), *[pl.col(f).alias(f"user_{f}") for f in plan.user_features])[at]
    )
    order = [
        "user_id", "user", *[f"user_{f}" for f in plan.user_features], "ts", *seq_cols,
        *[f"oov_{f}" for f in plan.codes], SESS, "sess_start", "sess_len", "long_start", "long_end",
    ]  # fmt: skip
    columns = {TS: "ts", **{c: c for c in seq_cols}}

    def shard(block: pl.DataFrame) -> pl.DataFrame:
        # the event lists are built one shard at a time: memory holds one shard's lists
        return windows.timelines(block, enc_df, columns, oov).select(order)

    # rows come split by split (`windows.rows_table`): each split is a slice
    per_split = rows.get_column(split.SPLIT).value_counts().sort(split.SPLIT)
    sizes = dict(zip(per_split.get_column(split.SPLIT).to_list(), per_split.get_column("count").to_list()))
    written, offset = {}, 0
    for code, name in enumerate(split.SPLITS):
        first, count = plan.shards[name][b]
        size = sizes.get(code, 0)
        written[name] = write.write_shards(out, name, rows.slice(offset, size), first, count, build=shard)
        offset += size
    written[catalogue.KEY] = cold
    return written


def first_pass_job(args: tuple[SessionizeConfig, Path, int, int, Path | None, Path | None]) -> Part:
    """`first_pass` in a worker (re-opens the input: LazyFrames are not sent)."""
    cfg, log, b, n, spill, split_dir = args
    return first_pass(open_input(cfg, log), b, n, spill, split_dir)


def second_pass_job(args: tuple[SessionizeConfig, Path, Plan, int, Part, Path]) -> dict[str, Any]:
    """`second_pass` in a worker."""
    cfg, log, plan, b, part, out = args
    return second_pass(open_input(cfg, log), plan, b, part, out)
