"""The two passes over one user bucket, each calling the stages in order.

first pass:  read -> normalise (drops, sort, duplicates) -> sessions
second pass: split -> windows -> encode -> shard rows -> write

Between them `plan.make_plan` combines every bucket's first pass. A pass
knows nothing of the engine that runs it: the jobs below take plain,
picklable arguments (config, log path, bucket) and open the input themselves.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import polars as pl

from sdm.config import SessionizeConfig
from sdm.sessionize import encode, split, windows, write
from sdm.sessionize.io import SID, TS, USER, collect
from sdm.sessionize.normalise import clean_events
from sdm.sessionize.plan import Part, Plan, global_sess
from sdm.sessionize.read import Input, open_input, read_bucket
from sdm.sessionize.sessions import SESS, session_starts, sessionize

_US = dt.timedelta(microseconds=1)


def first_pass(inp: Input, b: int, n: int, spill: Path | None, split_dir: Path | None = None) -> Part:
    """Read bucket `b` of `n`, count drops, sessionize it; spill the events to `spill` when given.

    `split_dir`: the directory `read.split_log` wrote (else the bucket is
    filtered out of the log).
    """
    cfg = inp.cfg
    raw = read_bucket(inp, b, n, split_dir)
    rows_in = raw.height
    events, dropped = clean_events(raw, inp)
    del raw
    # the back-end session id is not needed once sessions are numbered
    ev = collect(sessionize(events.lazy(), cfg.gap_td // _US, cfg.max_session_len).drop(SID), str(inp.log))
    del events
    ts = ev.get_column(TS)
    min_ts, max_ts = (int(ts.min()), int(ts.max())) if ev.height else (None, None)
    sessions = session_starts(ev)
    if spill is not None:
        # lz4: the spill is read back once, soon; speed matters more than size
        ev.write_parquet(spill, compression="lz4")
        ev = None
    return Part(rows_in, dropped, sessions, min_ts, max_ts, ev, spill)


def second_pass(inp: Input, plan: Plan, b: int, part: Part, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Split, long-term windows, encoding and shard rows of bucket `b`; writes its shards into `out`.

    Returns:
        Per split, the manifest entries of the shards written.
    """
    cfg = inp.cfg
    ev = collect(part.frame().pipe(split.assign_split, plan.cut))
    sessions = windows.long_windows(
        windows.sessions_table(ev.lazy()), ev, cfg.long_window_td // _US, cfg.max_long_len
    )
    if plan.buckets > 1:
        sessions = pl.concat(
            [sessions.drop(SESS), pl.DataFrame({SESS: global_sess(part.sessions, plan.offsets)}).lazy()],
            how="horizontal",
        )
    seq_cols = ["seq_item"] + [f"seq_{f}" for f in plan.item_features] + ["seq_oov"]
    enc = encode.encode_events(ev.lazy(), plan.vocabs, plan.item_features, plan.codes).select(pl.col(TS), *seq_cols)
    rows, enc_df = pl.collect_all([windows.rows_table(sessions), enc], engine="in-memory")
    del ev
    rows = windows.timelines(rows, enc_df, {TS: "ts", **{c: c for c in seq_cols}})
    del enc_df
    user_cols = plan.users_table.lazy().select(
        pl.col(USER), pl.col("user_id"), pl.col("user"), *[pl.col(f).alias(f"user_{f}") for f in plan.user_features]
    )
    rows = collect(
        rows.lazy().join(user_cols, on=USER, how="left", maintain_order="left").select(
            pl.col(split.SPLIT), pl.col("user_id"), pl.col("user"), *[pl.col(f"user_{f}") for f in plan.user_features],
            pl.col("ts"), *[pl.col(c) for c in seq_cols],
            pl.col(SESS), pl.col("sess_start"), pl.col("sess_len"), pl.col("long_start"), pl.col("long_end"),
        ),
        str(inp.log),
    )  # fmt: skip
    written = {}
    for code, name in enumerate(split.SPLITS):
        first, count = plan.shards[name][b]
        written[name] = write.write_shards(out, name, rows.filter(pl.col(split.SPLIT) == code).drop(split.SPLIT), first, count)
    return written


def first_pass_job(args: tuple[SessionizeConfig, Path, int, int, Path | None, Path | None]) -> Part:
    """`first_pass` in a worker (re-opens the input: LazyFrames are not sent)."""
    cfg, log, b, n, spill, split_dir = args
    return first_pass(open_input(cfg, log), b, n, spill, split_dir)


def second_pass_job(args: tuple[SessionizeConfig, Path, Plan, int, Part, Path]) -> dict[str, list[dict[str, Any]]]:
    """`second_pass` in a worker."""
    cfg, log, plan, b, part, out = args
    return second_pass(open_input(cfg, log), plan, b, part, out)
