"""What needs the whole log: the buckets' first passes combined into cutoffs, vocabularies and a shard layout.

A bucket's first pass (`passes.first_pass`) returns a `Part`: its counts, one
row per session and its sessionized events (held, or spilled to a file).
`make_plan` reads only those, never the raw log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize import encode, split, tables, vocab
from sdm.sessionize.columns import DROP_REASONS, USER
from sdm.sessionize.io import collect
from sdm.sessionize.normalise import item_columns, raw_item_rows
from sdm.sessionize.previous import Previous
from sdm.sessionize.read import Input
from sdm.sessionize.sessions import SESS, START


@dataclass
class Part:
    """First-pass result of one bucket: counts, session summary and the sessionized events."""

    rows_in: int
    dropped: dict[str, int]
    sessions: pl.DataFrame  # USER, START, SESS (bucket-local), SLEN of every session, in sess order
    min_ts: int | None
    max_ts: int | None
    events: pl.DataFrame | None  # sessionized events, held when not spilled
    spill: Path | None

    def frame(self) -> pl.LazyFrame:
        """The sessionized events (from memory or the spill file)."""
        return self.events.lazy() if self.events is not None else pl.scan_ipc(self.spill)


@dataclass
class Plan:
    """Cutoffs, vocabularies, session-id offsets, shard layout and side tables of one run.

    Attributes:
        cut: split cutoffs.
        rows_in, dropped: input row count and dropped rows by reason.
        vocabs: name -> vocabulary frame (raw, index, count).
        offsets: USER -> global sess_id of the user's first session.
        shards: per split, per bucket: (first shard number, number of shards).
        items_table, users_table: the encoded side tables (users with `_user`).
    """

    buckets: int
    cut: split.Cutoffs
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
    codes: dict[str, pl.DataFrame] = field(default_factory=dict)
    """Per items-table feature: item -> feature index (`encode.feature_codes`)."""
    items_raw: pl.DataFrame | None = None
    """items_raw.parquet (`normalise.raw_item_rows`) when an items table was given."""
    history: dict[str, int] = field(default_factory=lambda: {"sessions": 0, "events": 0})
    """Sessions and events before `train_start`, in no split (`split.history_counts`)."""
    vocab_from: dict[str, Any] | None = None
    """The manifest's `vocab_from` entry (`previous.Previous.entry`), None without `--vocab-from`."""

    def __getstate__(self) -> dict[str, Any]:
        # a worker's pass never reads the raw items table: it stays in the driver
        return {**self.__dict__, "items_raw": None}


def allocate(rows: list[int], rows_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
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


def make_plan(inp: Input, parts: list[Part], prev: Previous | None = None) -> Plan:
    """Combine the buckets' first passes into the plan (reads no raw event, only the parts).

    `prev` (`--vocab-from`): the vocabularies are seeded with its, and its
    items.parquet rows fill what this run cannot describe (`tables.items_table`).
    """
    cfg, spec = inp.cfg, inp.spec
    rows_in = sum(p.rows_in for p in parts)
    if rows_in == 0:
        raise SdmError(f"{inp.log}: empty log (0 rows)")
    dropped = {r: sum(p.dropped[r] for p in parts) for r in DROP_REASONS}
    if rows_in == sum(dropped.values()):
        raise SdmError(f"{inp.log}: all {rows_in} rows were dropped ({dropped})")
    sessions = pl.concat([p.sessions for p in parts])
    starts = sessions.get_column(START).sort()
    max_ts = max(p.max_ts for p in parts if p.max_ts is not None)
    min_ts = min(p.min_ts for p in parts if p.min_ts is not None)
    cut = split.compute_cutoffs(cfg, starts, max_ts)
    warnings = split.time_warnings(cfg, starts, min_ts, max_ts)
    warnings += split.check_splits(cfg, inp.log, sessions, cut, min_ts, max_ts)
    history = split.history_counts(sessions, cut)
    del starts

    per_user, offsets = _session_offsets(parts)
    shards = _shard_counts(cfg, parts, cut)

    # each bucket's events are read on their own: memory follows one bucket, not the log
    frames = [p.frame() for p in parts]
    in_train = [split.in_train(p.sessions, cut) for p in parts]
    trains = [f.filter(m) for f, m in zip(frames, in_train)]
    profile = tables.profiles(cfg, inp.users_lf, inp.schema[spec.user_key])
    table = raw = None
    if inp.items_lf is not None:
        raw = collect(raw_item_rows(inp.items_lf, cfg, spec, inp.schema[cfg.item_col]), str(cfg.items))
        if spec.table_item_features:
            table = collect(item_columns(raw.lazy(), cfg, spec), str(cfg.items))
    train_sessions = sessions.filter(split.is_train(pl.col(START), cut))
    old = None if prev is None else prev.vocabs
    vocabs = vocab.vocabularies(cfg, trains, train_sessions, list(spec.user_features), profile, table, old)
    users_table = tables.users_table(per_user.lazy(), profile, vocabs, spec.user_features, cfg)
    items_table = tables.items_table(
        trains, vocabs, list(cfg.item_features), [f for f in cfg.multi_valued if f in cfg.item_features], table,
        None if prev is None else prev.items,
    )  # fmt: skip
    codes = {} if table is None else encode.feature_codes(table, vocabs, list(spec.table_item_features))
    # the log's distinct items: the training ones are the item vocabulary, only the rest are read
    # (negated when read: no second mask per bucket is held)
    others = [f.filter(~pl.lit(m)) for f, m in zip(frames, in_train)]
    # (a kept item of --vocab-from that training no longer has is not one of the log's items)
    train_items = vocabs["item"] if prev is None else vocabs["item"].filter(pl.col("count") > 0)
    side = tables.side_tables(inp, others, train_items.get_column("raw"), per_user)
    for what, st in side.items():
        if st["log_keys_found"] == 0:
            warnings.append(f"no {what.split()[0][:-1]} of the log is in the {what} {st['path']}: every side feature from it is OOV (wrong key column?)")
    return Plan(
        buckets=len(parts),
        cut=cut,
        history=history,
        rows_in=rows_in,
        dropped=dropped,
        vocabs=vocabs,
        offsets=offsets,
        shards=shards,
        items_table=items_table,
        users_table=users_table,
        item_features=list(cfg.item_features),
        user_features=list(spec.user_features),
        warnings=warnings,
        side_tables=side,
        notes=list(inp.notes),
        codes=codes,
        items_raw=raw,
        vocab_from=None if prev is None else prev.entry,
    )


def _session_offsets(parts: list[Part]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(sessions per user, each user's first global session id - 1), users in sort order.

    A global sess_id is the number of sessions of all users before this one plus the
    session's ordinal. A part lists its sessions user by user: runs per part, then a
    group-by over users, not sessions.
    """
    runs = pl.concat([p.sessions.get_column(USER).rle() for p in parts]).struct.unnest()
    per_user = (
        runs.group_by(pl.col("value").alias(USER)).agg(pl.col("len").cast(pl.Int64).sum().alias("_n")).sort(USER)
    )
    return per_user, per_user.select(pl.col(USER), (pl.col("_n").cum_sum() - pl.col("_n")).alias("_offset"))


def _shard_counts(cfg: SessionizeConfig, parts: list[Part], cut: split.Cutoffs) -> dict[str, list[tuple[int, int]]]:
    """Each split's shards (`allocate`) from the users each part has in it."""
    code = split.split_of(pl.col(START), cut)
    rows = [p.sessions.group_by(code.alias(split.SPLIT)).agg(pl.col(USER).n_unique().alias("n")) for p in parts]
    return {
        name: allocate(
            [int(r.filter(pl.col(split.SPLIT) == c).get_column("n").sum()) for r in rows],
            cfg.rows_per_shard,
            cfg.min_shards,
        )
        for c, name in enumerate(split.SPLITS)
    }


def global_sess(sessions: pl.DataFrame, offsets: pl.DataFrame) -> pl.Series:
    """Global sess_id of a bucket's sessions (`Part.sessions`, in bucket-local sess order).

    A user's sessions are consecutive in both numberings, so global = the
    user's offset + (local id - the user's first local id). The bucket's users
    come sorted (as `offsets` is), so a binary search finds their offsets: no
    join over every user of the log per bucket.
    """
    runs = sessions.get_column(USER).rle()
    users = runs.struct.field("value")
    counts = runs.struct.field("len").cast(pl.Int64).to_numpy()
    pos = positions(offsets.get_column(USER), users, "plan offsets")
    local_first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shift = offsets.get_column("_offset").gather(pos).cast(pl.Int64).to_numpy() - local_first
    local = sessions.get_column(SESS).cast(pl.Int64).to_numpy()
    # local ids run 0.. in the bucket
    return pl.Series(SESS, local + np.repeat(shift, counts), dtype=pl.Int64)


def positions(keys: pl.Series, values: pl.Series, what: str) -> pl.Series:
    """The position in the sorted, distinct `keys` of each of `values` (a binary search, no hash join).

    Raises:
        SdmError: a value is not among the keys (the plan was made for another log).
    """
    pos = keys.search_sorted(values, side="left")
    if len(values) and (int(pos.max()) >= len(keys) or not keys.gather(pos).equals(values, check_names=False, check_dtypes=False)):
        raise SdmError(f"{what}: not every user of this bucket is there (made for another log, or by another polars version?)")
    return pos
