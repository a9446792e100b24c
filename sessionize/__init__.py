"""`sdm sessionize`: raw interaction log -> sessions, long-term windows, splits, shards.

Implements SPEC sections 1-4 and writes the shard directory of docs/FORMAT.md.
Entry point: `run(cfg, log)`. The stages are lazy polars transforms
(`sessionize.core`), with reading/validation in `sessionize.io` and writing in
`sessionize.write`.

Scale: `buckets` = N hash-partitions the users; the log is split once into
per-bucket files (one streaming read), then a first pass sessionizes
bucket by bucket (spilled to disk) and derives what needs the whole log
(cutoffs, vocabularies, per-user sess_id offsets, shard layout); a second pass
writes each bucket's shards. Peak memory is about one bucket's; the output
equals the one-bucket output. `sessionize.partial` runs the same two passes as
separate jobs (`--plan-only`, `--bucket i/N`, `sdm sessionize-combine`).

Choices where the SPEC is silent (also in the docstrings below):

- Naive timestamps are UTC; zoned ones are converted to UTC; integer columns
  are epoch seconds/milliseconds per `time_unit` (required for integers).
- No user column but a session column: each session id is its own user (empty
  long-term). A users table is then refused.
- Item side features come from the log or, when the log lacks the column, from
  the items table joined on the item column (the log wins when both have it).
  Profile features come from the users table only.
- Split defaults: valid_fraction = test_fraction = 0.1 when nothing is given.
  `*_days` count back from the end of the log = last timestamp + 1 us.
- Vocabulary counts: events of training sessions (item and its features, user);
  for profile features, training users (each counted once).
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from sdm.config import SessionizeConfig, save_config
from sdm.errors import SdmError
from sdm.sessionize import core, write
from sdm.sessionize.io import (
    DROP,
    DROP_REASONS,
    ITEM,
    ROW,
    SID,
    TS,
    USER,
    LogSpec,
    check_log,
    check_time_range,
    feat_col,
    from_us,
    values_col,
    resolve_features,
    scan_table,
    table_format,
    tag_drops,
    timestamp_expr,
    to_events,
)

__all__ = ["run", "make_plan", "Plan", "bucket_expr"]

FORMAT_NAME = "sdm-shards"
FORMAT_VERSION = 1


def _stage_printer(progress: bool, t0: float) -> Callable[[str], None]:
    """A function printing one stage line on stderr (seconds since t0), or doing nothing."""

    def say(msg: str) -> None:
        if progress:
            print(f"[sessionize {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def _collect(lf: pl.LazyFrame, what: str = "sessionize") -> pl.DataFrame:
    """Collect, turning polars read/cast failures into one-line SdmErrors.

    The in-memory engine is used on purpose: the transforms are window
    expressions over the whole sorted frame, which polars 2's default streaming
    engine runs about twice as slowly (measured on 3M events).
    """
    try:
        return lf.collect(engine="in-memory")
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{what}: {first}") from None


@dataclass
class _Input:
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


def _open(cfg: SessionizeConfig, log: Path) -> _Input:
    """Open the log and side tables lazily and check their schemas (metadata only).

    The returned `cfg` has the side features filled in when a table came
    without a feature list (`io.resolve_features`); use it, not the argument.
    """
    log = Path(log)
    lf, schema = scan_table(log, "log", cfg.format, cfg.delimiter)
    items_lf, items_schema = scan_table(cfg.items, "items table", None, cfg.delimiter) if cfg.items else (None, None)
    users_lf, users_schema = scan_table(cfg.users, "users table", None, cfg.delimiter) if cfg.users else (None, None)
    cfg, notes = resolve_features(cfg, items_schema, users_schema)
    spec = check_log(cfg, log, schema, items_schema, users_schema)
    sample = None
    if schema[cfg.time_col] == pl.String:
        sample = _peek(lf, cfg.time_col, log, cfg)
    ts = timestamp_expr(cfg, schema[cfg.time_col], log, sample)
    return _Input(cfg, log, lf, schema, items_lf, users_lf, spec, ts, notes)


def _peek(lf: pl.LazyFrame, column: str, log: Path, cfg: SessionizeConfig) -> str | None:
    """The first non-null value of a string column (for messages), after checking the log has rows.

    A CSV with a header and no rows reads every column as strings: that is an
    empty log, not a log whose timestamps are strings.

    Raises:
        SdmError: a log with no rows, or a CSV polars cannot parse.
    """
    kind = table_format(log, cfg.format, cfg.delimiter)[0]
    try:
        head = lf.select(pl.col(column)).head(1000).collect()
        if head.height == 0 and kind == "csv":
            # polars' head of a CSV whose quote never closes is silently empty; a full read raises
            head = lf.collect().select(pl.col(column))
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if first.startswith("could not parse `\""):
            first += " (an unterminated quote?)"
        raise SdmError(f"{log}: not a readable {kind.upper() if kind == 'csv' else 'Parquet'} file ({first})") from None
    if head.height == 0:
        raise SdmError(f"{log}: empty log (0 rows" + (", only a header)" if kind == "csv" else ")"))
    values = head.get_column(column).drop_nulls()
    return values[0] if len(values) else None


def bucket_expr(user_key: str, buckets: int) -> pl.Expr:
    """Bucket of each row: a hash of the user, so a user's events (and its exact duplicates) share one.

    polars' hash is stable for one polars version, not across versions: every
    partition of one plan must run with the same polars.
    """
    return (pl.col(user_key).hash(seed=0) % buckets).cast(pl.Int64)


@dataclass
class _Part:
    """First-pass result of one bucket: counts, session summary and the sessionized events."""

    rows_in: int
    dropped: dict[str, int]
    sessions: pl.DataFrame  # USER, START, SESS (bucket-local), SLEN of every session, in sess order
    max_ts: int | None
    events: pl.DataFrame | None  # sessionized events, held when not spilled
    spill: Path | None
    min_ts: int | None = None

    def frame(self) -> pl.LazyFrame:
        """The sessionized events (from memory or the spill file)."""
        return self.events.lazy() if self.events is not None else pl.scan_parquet(self.spill)


_SPLIT_KEY = "__sdm_bucket"
"""Partition column of `split_log`'s directories (`_bucket=<b>/`)."""


def _bucket_input(inp: _Input, b: int, n: int, split: Path | None) -> pl.DataFrame:
    """The raw rows of bucket `b` of `n` with their input row numbers `_row`.

    From the bucket's file of `split_log` when given; else filtered out of the
    log by the streaming engine, which keeps only the bucket's rows in memory
    (the in-memory engine materialises every row before filtering: 6.9 GB to
    keep one quarter of a 100M-event log).
    """
    lf = inp.lf.with_row_index(ROW)
    if split is not None:
        files = sorted((split / f"{_SPLIT_KEY}={b}").glob("*.parquet"))
        if not files:
            return pl.DataFrame(schema=lf.collect_schema())
        lf = pl.scan_parquet(files, hive_partitioning=False)
        return _collect(lf, str(inp.log))
    if n == 1:
        return _collect(lf, str(inp.log))
    try:
        return lf.filter(bucket_expr(inp.spec.user_key, n) == b).collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{inp.log}: {first}") from None


def split_log(inp: _Input, n: int, out: Path) -> None:
    """Write the log, with input row numbers `_row`, split by user bucket into `out/_bucket=<b>/`.

    One streaming read of the log instead of one read per bucket; memory stays
    bounded by the engine's batches. lz4: the files are read back once, soon.
    """
    lf = inp.lf.with_row_index(ROW)
    try:
        lf.sink_parquet(
            pl.PartitionBy(out, key=bucket_expr(inp.spec.user_key, n).alias(_SPLIT_KEY), include_key=False),
            compression="lz4",
            mkdir=True,
        )
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{inp.log}: {first}") from None


def _first_pass(inp: _Input, b: int, n: int, spill: Path | None, split: Path | None = None) -> _Part:
    """Read bucket `b` of `n`, count drops, sessionize it; spill the events to `spill` when given.

    `split`: the directory `split_log` wrote (else the bucket is filtered out of the log).
    """
    cfg = inp.cfg
    raw = _bucket_input(inp, b, n, split)
    tagged = _collect(tag_drops(raw.lazy(), cfg, inp.spec, inp.ts), str(inp.log))
    del raw
    check_time_range(tagged.filter(pl.col(DROP).is_null()), cfg, inp.schema[cfg.time_col], inp.ts, inp.log)
    counts = dict(tagged.get_column(DROP).drop_nulls().value_counts().iter_rows())
    dropped = {r: int(counts.get(r, 0)) for r in DROP_REASONS}
    events = to_events(
        tagged.lazy().filter(pl.col(DROP).is_null()), cfg, inp.spec, inp.ts, inp.items_lf, inp.schema[cfg.item_col]
    )
    gap_us = cfg.gap_td // dt.timedelta(microseconds=1)
    # the back-end session id is not needed once sessions are numbered
    ev = _collect(core.sessionize(events, gap_us, cfg.max_session_len).drop(SID), str(inp.log))
    rows_in = tagged.height
    del tagged
    sessions = ev.filter(pl.col(core.NEW)).select(pl.col(USER), pl.col(core.START), pl.col(core.SESS), pl.col(core.SLEN))
    max_ts = ev.get_column(TS).max() if ev.height else None
    min_ts = ev.get_column(TS).min() if ev.height else None
    if spill is not None:
        # lz4: the spill is read back once, soon; speed matters more than size
        ev.write_parquet(spill, compression="lz4")
        ev = None
    return _Part(
        rows_in, dropped, sessions, None if max_ts is None else int(max_ts), ev, spill,
        None if min_ts is None else int(min_ts),
    )  # fmt: skip


def _first_pass_job(args: tuple[SessionizeConfig, Path, int, int, Path | None, Path | None]) -> _Part:
    """`_first_pass` in a worker process (re-opens the input: LazyFrames are not sent)."""
    cfg, log, b, n, spill, split = args
    return _first_pass(_open(cfg, log), b, n, spill, split)


@dataclass
class Plan:
    """What needs the whole log: cutoffs, vocabularies, session-id offsets, shard layout.

    Attributes:
        cut: split cutoffs.
        rows_in, dropped: input row count and dropped rows by reason.
        vocabs: name -> vocabulary frame (raw, index, count).
        offsets: USER -> global sess_id of the user's first session.
        shards: per split, per bucket: (first shard number, number of shards).
        items_table, users_table: the encoded side tables (users with `_user`).
    """

    buckets: int
    cut: core.Cutoffs
    rows_in: int
    dropped: dict[str, int]
    vocabs: dict[str, pl.DataFrame]
    offsets: pl.DataFrame
    shards: dict[str, list[tuple[int, int]]]
    items_table: pl.DataFrame
    users_table: pl.DataFrame
    item_features: list[str]
    user_features: list[str]
    warnings: list[str] = field(default_factory=list)
    side_tables: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _allocate(rows: list[int], rows_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
    """Shards of one split over buckets: (first number, count) per bucket.

    The total is the one-bucket count, max(ceil(R / rows_per_shard),
    min(min_shards, R)), dealt in proportion to each bucket's rows (rounded up,
    so the total may exceed it by up to buckets - 1; never more than a
    bucket's rows).
    """
    total = sum(rows)
    if total == 0:
        return [(0, 0) for _ in rows]
    n = max(math.ceil(total / rows_per_shard), min(min_shards, total))
    counts = [min(r, max(math.ceil(r / rows_per_shard), math.ceil(n * r / total))) for r in rows]
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    return list(zip(firsts, counts))


def make_plan(inp: _Input, parts: list[_Part]) -> Plan:
    """Combine the buckets' first passes into the plan (needs no raw event beyond the spills)."""
    cfg, spec = inp.cfg, inp.spec
    rows_in = sum(p.rows_in for p in parts)
    if rows_in == 0:
        raise SdmError(f"{inp.log}: empty log (0 rows)")
    dropped = {r: sum(p.dropped[r] for p in parts) for r in DROP_REASONS}
    if rows_in == sum(dropped.values()):
        raise SdmError(f"{inp.log}: all {rows_in} rows were dropped ({dropped})")
    starts = pl.concat([p.sessions.get_column(core.START) for p in parts]).sort()
    max_ts = max(p.max_ts for p in parts if p.max_ts is not None)
    min_ts = min(p.min_ts for p in parts if p.min_ts is not None)
    cut = core.compute_cutoffs(cfg, starts, max_ts)
    warnings = _time_warnings(cfg, starts, min_ts, max_ts)
    warnings += _check_splits(cfg, inp.log, parts, cut, min_ts, max_ts)
    del starts

    # global sess_id = sessions of all users before this one (users in sort order) + ordinal
    per_user = pl.concat(
        [p.sessions.group_by(USER).agg(pl.len().cast(pl.Int64).alias("_n")) for p in parts]
    ).sort(USER)
    offsets = per_user.select(pl.col(USER), (pl.col("_n").cum_sum() - pl.col("_n")).alias("_offset"))

    split_of = (
        pl.when(pl.col(core.START) < cut.valid_start).then(0).when(pl.col(core.START) < cut.test_start).then(1).otherwise(2)
    )
    rows = [
        p.sessions.group_by(split_of.alias(core.SPLIT)).agg(pl.col(USER).n_unique().alias("n"))
        for p in parts
    ]
    shards = {
        name: _allocate(
            [int(r.filter(pl.col(core.SPLIT) == code).get_column("n").sum()) for r in rows],
            cfg.rows_per_shard,
            cfg.min_shards,
        )
        for code, name in enumerate(core.SPLITS)
    }

    events = pl.concat([p.frame() for p in parts], how="vertical")
    train = events.pipe(core.assign_split, cut).filter(pl.col(core.SPLIT) == 0)
    item_feats = list(cfg.item_features)
    vocabs: dict[str, pl.DataFrame] = {"item": _collect(core.build_vocab(train.select(pl.col(ITEM).alias("raw"))))}
    for f in item_feats:
        # a multi-valued feature's vocabulary counts every value, not only the first
        col = pl.col(values_col(f)).explode() if f in cfg.multi_valued else pl.col(feat_col(f))
        vocabs[f] = _collect(core.build_vocab(train.select(col.alias("raw"))))
    vocabs["user"] = _collect(core.build_vocab(train.select(pl.col(USER).alias("raw"))))
    profiles = _profiles(cfg, inp.users_lf, inp.schema[spec.user_key])
    train_users = train.select(pl.col(USER)).unique()
    for f in spec.user_features:
        vocabs[f] = _collect(
            core.build_vocab(train_users.join(profiles, on=USER, how="inner").select(pl.col(f).alias("raw"))),
            str(cfg.users),
        )
    users_table = _users_table(per_user.lazy(), profiles, vocabs, spec.user_features)
    items_table = _items_table(train, vocabs, item_feats, list(cfg.multi_valued))
    side = _side_tables(inp, events, per_user)
    for what, st in side.items():
        if st["log_keys_found"] == 0:
            warnings.append(f"no {what.split()[0][:-1]} of the log is in the {what} {st['path']}: every side feature from it is OOV (wrong key column?)")
    return Plan(
        buckets=len(parts),
        cut=cut,
        rows_in=rows_in,
        dropped=dropped,
        vocabs=vocabs,
        offsets=offsets,
        shards=shards,
        items_table=items_table,
        users_table=users_table,
        item_features=item_feats,
        user_features=list(spec.user_features),
        warnings=warnings,
        side_tables=side,
        notes=list(inp.notes),
    )


def _split_settings(cfg: SessionizeConfig) -> str:
    """The split flags in effect, for messages ("--test-days 1000, --valid-fraction 0.1 (default)")."""
    given = [
        f"--{k.replace('_', '-')} {v.isoformat() if isinstance(v, dt.datetime) else v}"
        for k in ("valid_start", "valid_days", "valid_fraction", "test_start", "test_days", "test_fraction")
        if (v := getattr(cfg, k)) is not None
    ]
    for name in ("valid", "test"):
        if all(getattr(cfg, f"{name}_{k}") is None for k in ("start", "days", "fraction")):
            given.append(f"--{name}-fraction 0.1 (default)")
    return ", ".join(given)


def _check_splits(
    cfg: SessionizeConfig, log: Path, parts: list[_Part], cut: core.Cutoffs, min_ts: int, max_ts: int
) -> list[str]:
    """Refuse a training split with no sample; warn about an empty validation or test split.

    Train needs at least one session of two or more events (a sample, SPEC 5);
    an empty valid or test split only means nothing to validate or evaluate on,
    so it is a warning (in the manifest and on stderr), not an error.

    Raises:
        SdmError: one line naming the split settings and the log's time range.
    """
    sess = pl.concat([p.sessions.select(pl.col(core.START), pl.col(core.SLEN)) for p in parts])
    code = pl.when(pl.col(core.START) < cut.valid_start).then(0).when(pl.col(core.START) < cut.test_start).then(1).otherwise(2)
    counts = sess.group_by(code.alias("s")).agg(
        pl.len().alias("n"), (pl.col(core.SLEN).cast(pl.Int64) - 1).sum().alias("samples")
    )
    per = {int(r["s"]): (int(r["n"]), int(r["samples"])) for r in counts.iter_rows(named=True)}
    span = f"the log runs {from_us(min_ts)} to {from_us(max_ts)}"
    cuts = f"cutoffs valid {from_us(cut.valid_start)}, test {from_us(cut.test_start)}"
    n_train, train_samples = per.get(0, (0, 0))
    if n_train == 0:
        raise SdmError(
            f"{log}: the training split is empty ({cuts}; {span}; {_split_settings(cfg)}); "
            "choose later cutoffs or smaller valid/test shares"
        )
    warnings = []
    if train_samples == 0:
        # a warning here (tiny hand-made logs legitimately have them); `sdm train` refuses the data
        warnings.append(
            f"no training session has 2 or more events ({n_train:,} sessions of one event; "
            f"--gap {cfg.gap}): there is no training sample"
        )
    for code_, name in ((1, "validation"), (2, "test")):
        n, samples = per.get(code_, (0, 0))
        if samples == 0:
            what = "is empty" if n == 0 else f"has {n:,} sessions but none of 2 or more events"
            warnings.append(f"the {name} split {what} ({cuts}; {_split_settings(cfg)})")
    return warnings


_YEAR_US = 365 * 86_400 * 1_000_000
_1980_US = 315_532_800_000_000


def _time_warnings(cfg: SessionizeConfig, starts: pl.Series, min_ts: int, max_ts: int) -> list[str]:
    """Warnings about timestamps that look misread: all in 1970, or single events centuries away."""
    warnings = []
    if cfg.time_unit == "ms" and max_ts < _1980_US:
        warnings.append(
            f"every timestamp is before 1980 ({from_us(min_ts)} to {from_us(max_ts)}) with --time-unit ms: "
            "are they seconds (--time-unit s)?"
        )
    median = int(starts[len(starts) // 2])
    for v, side in ((min_ts, "earliest"), (max_ts, "latest")):
        if abs(v - median) > 100 * _YEAR_US:
            warnings.append(
                f"the {side} event, {from_us(v)}, is over 100 years from the median session start "
                f"{from_us(median)}: a wrong timestamp? (--*-days cutoffs count from the last event)"
            )
    return warnings


def _side_tables(inp: _Input, events: pl.LazyFrame, per_user: pl.DataFrame) -> dict[str, Any]:
    """Rows, duplicate keys and join coverage of the items and users tables.

    `log_keys_found`: the share of the log's distinct (kept) items, or users,
    that have a row in the table; a table keyed on the wrong column shows 0.
    Duplicate keys: rows beyond the first of a key (the first row wins).
    """
    cfg = inp.cfg
    out: dict[str, Any] = {}
    for what, lf, key, log_key, log_ids in (
        ("items table", inp.items_lf, cfg.item_col, ITEM, events.select(pl.col(ITEM)).unique()),
        ("users table", inp.users_lf, cfg.user_col, USER, per_user.lazy().select(pl.col(USER))),
    ):
        if lf is None:
            continue
        path = cfg.items if what == "items table" else cfg.users
        dtype = inp.schema[cfg.item_col if what == "items table" else inp.spec.user_key]
        keys = _collect(lf.select(pl.col(key).cast(dtype, strict=False).alias(log_key)), str(path)).get_column(log_key)
        found = _collect(
            log_ids.select(pl.len().alias("n"), pl.col(log_key).is_in(keys.implode()).sum().alias("found")),
            str(path),
        ).row(0, named=True)
        out[what] = {
            "path": str(path),
            "rows": len(keys),
            "duplicate_keys": len(keys) - keys.n_unique(),
            "log_keys_found": round(found["found"] / found["n"], 6) if found["n"] else 0.0,
        }
    return out


def _second_pass(inp: _Input, plan: Plan, b: int, part: _Part, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Split, long-term windows, encoding and shard rows of bucket `b`; writes its shards into `out`.

    Returns:
        Per split, the manifest entries of the shards written.
    """
    cfg = inp.cfg
    ev = _collect(part.frame().pipe(core.assign_split, plan.cut))
    window_us = cfg.long_window_td // dt.timedelta(microseconds=1)
    sessions = core.long_windows(core.sessions_table(ev.lazy()), ev.lazy(), window_us, cfg.max_long_len)
    if plan.buckets > 1:
        sessions = pl.concat(
            [sessions.drop(core.SESS), pl.DataFrame({core.SESS: _global_sess(part.sessions, plan.offsets)}).lazy()],
            how="horizontal",
        )
    rows = _collect(core.rows_table(sessions), str(inp.log))

    enc = ev.lazy()
    enc = core.encode(enc, ITEM, plan.vocabs["item"].lazy(), "seq_item")
    for f in plan.item_features:
        enc = core.encode(enc, feat_col(f), plan.vocabs[f].lazy(), f"seq_{f}")
    # OOV events keep their identity as a hash (0 for known items), so evaluation can
    # count distinct unknown targets instead of collapsing them into index 1.
    enc = enc.with_columns(
        pl.when(pl.col("seq_item") == 1).then((pl.col(ITEM).hash(7) // 4).cast(pl.Int64) + 1).otherwise(0).alias("seq_oov")
    )
    seq_cols = ["seq_item"] + [f"seq_{f}" for f in plan.item_features] + ["seq_oov"]
    enc_df = _collect(enc.select(pl.col(TS), *[pl.col(c) for c in seq_cols]))
    del ev
    rows = core.timelines(rows, enc_df, {TS: "ts", **{c: c for c in seq_cols}})
    del enc_df

    user_cols = plan.users_table.lazy().select(
        pl.col(USER),
        pl.col("user_id"),
        pl.col("user"),
        *[pl.col(f).alias(f"user_{f}") for f in plan.user_features],
    )
    rows = _collect(
        rows.lazy().join(user_cols, on=USER, how="left", maintain_order="left").select(
            pl.col(core.SPLIT),
            pl.col("user_id"),
            pl.col("user"),
            *[pl.col(f"user_{f}") for f in plan.user_features],
            pl.col("ts"),
            *[pl.col(c) for c in seq_cols],
            pl.col(core.SESS),
            pl.col("sess_start"),
            pl.col("sess_len"),
            pl.col("long_start"),
            pl.col("long_end"),
        ),
        str(inp.log),
    )
    written = {}
    for code, name in enumerate(core.SPLITS):
        first, count = plan.shards[name][b]
        part_rows = rows.filter(pl.col(core.SPLIT) == code).drop(core.SPLIT)
        written[name] = write.write_shards(out, name, part_rows, first, count)
    return written


def _global_sess(sessions: pl.DataFrame, offsets: pl.DataFrame) -> pl.Series:
    """Global sess_id of a bucket's sessions (`_Part.sessions`, in bucket-local sess order).

    A user's sessions are consecutive in both numberings, so global = the
    user's offset + (local id - the user's first local id). The bucket's users
    come sorted (as `offsets` is), so a binary search finds their offsets: no
    join over every user of the log per bucket.
    """
    runs = sessions.get_column(USER).rle()
    users = runs.struct.field("value")
    counts = runs.struct.field("len").cast(pl.Int64).to_numpy()
    keys = offsets.get_column(USER)
    pos = keys.search_sorted(users, side="left")
    if len(users) and (int(pos.max()) >= len(keys) or not keys.gather(pos).equals(users, check_names=False, check_dtypes=False)):
        raise SdmError("plan offsets do not cover this bucket's users (another log or polars version?)")
    local_first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shift = offsets.get_column("_offset").gather(pos).cast(pl.Int64).to_numpy() - local_first
    local = sessions.get_column(core.SESS).cast(pl.Int64).to_numpy()
    # local ids run 0.. in the bucket
    return pl.Series(core.SESS, local + np.repeat(shift, counts), dtype=pl.Int64)


def _second_pass_job(args: tuple[SessionizeConfig, Path, Plan, int, _Part, Path]) -> dict[str, list[dict[str, Any]]]:
    """`_second_pass` in a worker process."""
    cfg, log, plan, b, part, out = args
    return _second_pass(_open(cfg, log), plan, b, part, out)


def _map(fn: Callable, jobs: list[Any], workers: int) -> list[Any]:
    """Run jobs in order, or in `workers` spawned processes sharing the cores' polars threads."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    threads = max(1, (os.cpu_count() or 1) // workers)
    old = os.environ.get("POLARS_MAX_THREADS")
    # read by polars when a child imports it; spawn (not fork) so no parent thread pool is copied
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            return list(pool.map(fn, jobs))
    finally:
        if old is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
        else:
            os.environ["POLARS_MAX_THREADS"] = old


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when its parent dies, even by `kill -9`.

    A killed parent cannot shut its pool down, and the workers would wait on
    their task queue forever. On Linux the kernel sends SIGKILL when the parent
    goes (PR_SET_PDEATHSIG); a thread checking the parent's pid every second
    covers other systems and a parent thread that exits first.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="sdm-parent-watch", daemon=True).start()


def _first_passes(inp: _Input, n: int, work: Path | None, say: Callable[[str], None]) -> list[_Part]:
    """First pass over every bucket (the log split once by bucket, spilled to `work` when there are several)."""
    cfg = inp.cfg
    spills = [None if work is None else work / f"bucket-{b:05d}.parquet" for b in range(n)]
    split = None
    if work is not None and n > 1:
        split = work / "input"
        split_log(inp, n, split)
        say(f"split the log into {n} buckets")
    try:
        if cfg.workers > 1 and n > 1:
            say(f"first pass: {n} buckets in {cfg.workers} processes")
            return _map(_first_pass_job, [(cfg, inp.log, b, n, spills[b], split) for b in range(n)], cfg.workers)
        parts = []
        for b in range(n):
            parts.append(_first_pass(inp, b, n, spills[b], split))
            if split is not None:
                # each bucket's input is read once
                shutil.rmtree(split / f"{_SPLIT_KEY}={b}", ignore_errors=True)
            if n > 1:
                say(f"first pass: bucket {b + 1}/{n} ({parts[-1].sessions.height} sessions)")
        return parts
    finally:
        if split is not None:
            shutil.rmtree(split, ignore_errors=True)


def run(cfg: SessionizeConfig, log: Path, progress: bool = True) -> dict[str, Any]:
    """Sessionize `log` into the shard directory `cfg.out` and return its manifest.

    With `cfg.buckets` = N > 1 the users are hash-partitioned into N buckets:
    a first pass sessionizes bucket by bucket (spilling each to a work
    directory `.sdm-work-*` inside `out`) and derives what needs the whole log (cutoffs,
    vocabularies, sess_id offsets, shard layout); a second pass writes each
    bucket's shards. The sessions, windows, splits and vocabularies equal the
    one-bucket output; only which shard holds which user differs.
    `cfg.plan_only` stops after the first pass and writes the plan;
    `cfg.bucket` = "i/N" writes partition i only (see `sessionize.partial`).

    Args:
        cfg: the resolved sessionize config.
        log: the interaction log (Parquet, or CSV when the suffix is `.csv`).
        progress: print stage lines to stderr.

    Returns:
        The manifest dict (also written, last, as `cfg.out/manifest.json`),
        with an extra key `seconds` (wall time).

    Raises:
        SdmError: any problem with the input files or the output directory.
    """
    from sdm.sessionize import partial

    if cfg.bucket is not None:
        return partial.run_partition(cfg, log, progress)
    t0 = time.perf_counter()
    say = _stage_printer(progress, t0)
    out = Path(cfg.out)
    # Everything that can be checked is checked before the first byte is written.
    write.check_inputs_outside(out, {"log": log, "items table": cfg.items, "users table": cfg.users})
    write.check_out_dir(out, cfg.overwrite)
    inp = _open(cfg, log)
    cfg = inp.cfg  # with defaulted side features
    n = cfg.buckets

    say(f"reading {inp.log}" + (f" in {n} buckets" if n > 1 else ""))
    for note in inp.notes:
        say(note)
    work = None
    created = not out.exists()
    if n > 1:
        # spill inside the output directory, so an interrupted run leaves nothing
        # beside it; a rerun removes what a killed one left (write.remove_stale_work)
        out.mkdir(parents=True, exist_ok=True)
        write.remove_stale_work(out)
        work = Path(tempfile.mkdtemp(prefix=write.WORK_PREFIX, dir=out))
    done = False
    try:
        parts = _first_passes(inp, n, work, say)
        plan = make_plan(inp, parts)
        rows_kept = plan.rows_in - sum(plan.dropped.values())
        say(f"sessionized {rows_kept} events ({plan.rows_in - rows_kept} dropped); vocabularies done")
        if cfg.plan_only:
            write.clear_out_dir(out, keep=work)
            done = True
            return partial.write_plan(cfg, inp.log, plan, out, time.perf_counter() - t0)

        # Only now touch the output: bad input above leaves an old directory intact.
        write.clear_out_dir(out, keep=work)
        done = True
        jobs = [(cfg, inp.log, plan, b, parts[b], out) for b in range(n)]
        if cfg.workers > 1 and n > 1:
            results = _map(_second_pass_job, jobs, cfg.workers)
        else:
            results = []
            for b in range(n):
                results.append(_second_pass(inp, plan, b, parts[b], out))
                parts[b] = None  # free the bucket's events
                if n > 1:
                    say(f"second pass: bucket {b + 1}/{n}")
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if created and not done and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused input: leave no empty directory behind
    shards = {name: [s for r in results for s in r[name]] for name in core.SPLITS}
    return finish(cfg, plan, out, shards, t0, say)


def finish(
    cfg: SessionizeConfig,
    plan: Plan,
    out: Path,
    shards: dict[str, list[dict[str, Any]]],
    t0: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Write vocabularies, side tables, config and (last) the manifest of a shard directory."""
    splits = {name: write.split_entry(sorted(shards[name], key=lambda s: s["path"])) for name in core.SPLITS}
    for name in core.SPLITS:
        say(f"{name}: {splits[name]['sessions']} sessions in {len(splits[name]['shards'])} shards")
    for name, vocab in plan.vocabs.items():
        write.write_table(vocab, out / "vocab" / f"{name}.parquet")
    write.write_table(plan.items_table, out / "items.parquet")
    write.write_table(plan.users_table.drop(USER), out / "users.parquet")
    save_config(cfg, out / "config.json")
    files = write.file_table(out)

    config = cfg.model_dump(mode="json")
    vocab_sizes = {name: vocab.height + 2 for name, vocab in plan.vocabs.items()}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": write.fingerprint(out, splits, vocab_sizes, config),
        "item_features": ["item", *plan.item_features],
        "user_features": ["user", *plan.user_features],
        "vocab_sizes": vocab_sizes,
        "num_items": vocab_sizes["item"],
        "max_session_len": cfg.max_session_len,
        "max_long_len": cfg.max_long_len,
        "cutoffs": {"valid_start": from_us(plan.cut.valid_start), "test_start": from_us(plan.cut.test_start)},
        "rows_in": plan.rows_in,
        "rows_kept": plan.rows_in - sum(plan.dropped.values()),
        "dropped": plan.dropped,
        "splits": splits,
        "side_tables": plan.side_tables,
        "multi_valued": {f: {"sep": cfg.value_sep, "items_column": f"{f}_values"} for f in cfg.multi_valued},
        "notes": plan.notes,
        "warnings": plan.warnings,
        "files": files,
        "config": config,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write.write_manifest(out, manifest)
    say(f"wrote {out} in {manifest['seconds']:.1f}s")
    return manifest


def _profiles(cfg: SessionizeConfig, users_lf: pl.LazyFrame | None, user_dtype: pl.DataType) -> pl.LazyFrame:
    """The users table as `_user` + profile columns, one row per user (the first wins)."""
    if users_lf is None:
        return pl.LazyFrame(schema={USER: user_dtype})
    return (
        users_lf
        .select(pl.col(cfg.user_col).cast(user_dtype).alias(USER), *[pl.col(f) for f in cfg.user_features])
        .unique(subset=[USER], keep="first", maintain_order=True)
    )


def _users_table(
    events: pl.LazyFrame, profiles: pl.LazyFrame, vocabs: dict[str, pl.DataFrame], features: list[str]
) -> pl.DataFrame:
    """users.parquet (plus the `_user` join key): every user of the log, encoded."""
    frame = (
        events
        .select(pl.col(USER))
        .unique()
        .sort(USER)
        .join(profiles, on=USER, how="left", maintain_order="left")
        .pipe(core.encode, USER, vocabs["user"].lazy(), "user")
        .with_columns(pl.col(USER).cast(pl.String).alias("user_id"))
    )
    for f in features:
        frame = frame.pipe(core.encode, f, vocabs[f].lazy(), f"_enc_{f}").with_columns(
            pl.col(f"_enc_{f}").alias(f)
        )
    return _collect(
        frame.select(pl.col(USER), pl.col("user_id"), pl.col("user"), *[pl.col(f) for f in features]), "users table"
    )


def _items_table(
    train: pl.LazyFrame, vocabs: dict[str, pl.DataFrame], features: list[str], multi: list[str] | None = None
) -> pl.DataFrame:
    """items.parquet: every item index 2.., its raw id, and each feature of its last training event.

    The last event is the one with the largest (time, input row); two window
    maxima find it without sorting the training events. A multi-valued
    feature f also gets `f_values`: the indices of all its values (a multi-hot
    as an index list; OOV values are 1).
    """
    multi = multi or []
    last = (
        train
        .select(
            pl.col(ITEM), pl.col(TS), pl.col(ROW), *[pl.col(feat_col(f)) for f in features],
            *[pl.col(values_col(f)) for f in multi],
        )
        .filter(pl.col(TS) == pl.col(TS).max().over(ITEM))
        .filter(pl.col(ROW) == pl.col(ROW).max().over(ITEM))
    )  # fmt: skip
    for f in features:
        last = last.pipe(core.encode, feat_col(f), vocabs[f].lazy(), f)
    last = _collect(last.select(pl.col(ITEM), *[pl.col(f) for f in features], *[pl.col(values_col(f)) for f in multi]))
    for f in multi:
        last = last.with_columns(_encode_values(last.get_column(values_col(f)), vocabs[f]).alias(f"{f}_values"))
    last = last.select(pl.col(ITEM), *[pl.col(f) for f in features], *[pl.col(f"{f}_values") for f in multi]).lazy()
    if not features:
        last = last.head(0)  # nothing to look up: skip the scan
    return (
        vocabs["item"].lazy()
        .select(pl.col("index").alias("item"), pl.col("raw").alias("item_id"))
        .join(last, left_on="item_id", right_on=ITEM, how="left", maintain_order="left")
        .with_columns(*[pl.col(f).fill_null(1).cast(pl.Int32) for f in features])
        .with_columns(*[pl.col(f"{f}_values").fill_null(pl.lit([], dtype=pl.List(pl.Int32))) for f in multi])
        .sort("item")
        .pipe(_collect, "items table")
    )


def _encode_values(lists: pl.Series, vocab: pl.DataFrame) -> pl.Series:
    """Each list of raw values as a list of vocabulary indices (1 = OOV), order kept.

    `replace_strict` inside the lists: fine for the small vocabularies of
    multi-valued features (genres, tags), unlike item ids (see core.encode).
    """
    raw = vocab.get_column("raw").cast(pl.String)
    return lists.list.eval(
        pl.element().replace_strict(raw, vocab.get_column("index"), default=1, return_dtype=pl.Int32)
    )
