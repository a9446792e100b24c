"""`sdm sessionize`: raw interaction log -> sessions, long-term windows, splits, shards.

Implements SPEC sections 1-4 and writes the shard directory of docs/FORMAT.md.
Entry point: `run(cfg, log)`. The stages are lazy polars transforms
(`sessionize.core`), with reading/validation in `sessionize.io` and writing in
`sessionize.write`.

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
import sys
import time
from pathlib import Path
from typing import Any, Callable

import polars as pl

from sdm.config import SessionizeConfig, save_config
from sdm.errors import SdmError
from sdm.sessionize import core, write
from sdm.sessionize.io import (
    DROP,
    DROP_REASONS,
    ITEM,
    ROW,
    TS,
    USER,
    check_log,
    feat_col,
    from_us,
    scan_table,
    tag_drops,
    timestamp_expr,
    to_events,
)

__all__ = ["run"]

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


def run(cfg: SessionizeConfig, log: Path, progress: bool = True) -> dict[str, Any]:
    """Sessionize `log` into the shard directory `cfg.out` and return its manifest.

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
    t0 = time.perf_counter()
    say = _stage_printer(progress, t0)
    log = Path(log)
    out = Path(cfg.out)
    write.check_out_dir(out, cfg.overwrite)

    lf, schema = scan_table(log, "log")
    items_lf, items_schema = scan_table(cfg.items, "items table") if cfg.items else (None, None)
    users_lf, users_schema = scan_table(cfg.users, "users table") if cfg.users else (None, None)
    spec = check_log(cfg, log, schema, items_schema, users_schema)
    ts = timestamp_expr(cfg, schema[cfg.time_col], log)

    say(f"reading {log}")
    tagged = _collect(tag_drops(lf, cfg, spec, ts), str(log))
    rows_in = tagged.height
    if rows_in == 0:
        raise SdmError(f"{log}: empty log (0 rows)")
    counts = dict(tagged.get_column(DROP).drop_nulls().value_counts().iter_rows())
    dropped = {r: int(counts.get(r, 0)) for r in DROP_REASONS}
    rows_kept = rows_in - sum(dropped.values())
    if rows_kept == 0:
        raise SdmError(f"{log}: all {rows_in} rows were dropped ({dropped})")

    say(f"sessionizing {rows_kept} events ({rows_in - rows_kept} dropped)")
    events = to_events(
        tagged.lazy().filter(pl.col(DROP).is_null()), cfg, spec, ts, items_lf, schema[cfg.item_col]
    )
    gap_us = cfg.gap_td // dt.timedelta(microseconds=1)
    ev = _collect(core.sessionize(events, gap_us, cfg.max_session_len), str(log))
    starts = ev.filter(pl.col(core.NEW)).get_column(core.START).sort()
    cut = core.compute_cutoffs(cfg, starts, int(ev.get_column(TS).max()))
    ev = _collect(ev.lazy().pipe(core.assign_split, cut))

    say("long-term windows")
    window_us = cfg.long_window_td // dt.timedelta(microseconds=1)
    sessions = _collect(core.long_windows(core.sessions_table(ev.lazy()), ev.lazy(), window_us, cfg.max_long_len))

    say("vocabularies")
    train = ev.lazy().filter(pl.col(core.SPLIT) == 0)
    item_feats = list(cfg.item_features)
    vocabs: dict[str, pl.DataFrame] = {"item": _collect(core.build_vocab(train.select(pl.col(ITEM).alias("raw"))))}
    for f in item_feats:
        vocabs[f] = _collect(core.build_vocab(train.select(pl.col(feat_col(f)).alias("raw"))))
    vocabs["user"] = _collect(core.build_vocab(train.select(pl.col(USER).alias("raw"))))
    profiles = _profiles(cfg, users_lf, schema[spec.user_key])
    train_users = train.select(pl.col(USER)).unique()
    for f in spec.user_features:
        vocabs[f] = _collect(
            core.build_vocab(train_users.join(profiles, on=USER, how="inner").select(pl.col(f).alias("raw"))),
            str(cfg.users),
        )

    enc = ev.lazy()
    enc = core.encode(enc, ITEM, vocabs["item"].lazy(), "seq_item")
    for f in item_feats:
        enc = core.encode(enc, feat_col(f), vocabs[f].lazy(), f"seq_{f}")
    seq_cols = ["seq_item"] + [f"seq_{f}" for f in item_feats]
    users_table = _users_table(ev.lazy(), profiles, vocabs, spec.user_features)
    items_table = _items_table(enc, vocabs, item_feats)

    say("building shard rows")
    rows = core.timelines(core.rows_table(sessions.lazy()), enc, seq_cols)
    user_cols = users_table.lazy().select(
        pl.col(USER),
        pl.col("user_id"),
        pl.col("user"),
        *[pl.col(f).alias(f"user_{f}") for f in spec.user_features],
    )
    rows = _collect(
        rows.join(user_cols, on=USER, how="left", maintain_order="left").select(
            pl.col(core.SPLIT),
            pl.col("user_id"),
            pl.col("user"),
            *[pl.col(f"user_{f}") for f in spec.user_features],
            pl.col("ts"),
            *[pl.col(c) for c in seq_cols],
            pl.col(core.SESS),
            pl.col("sess_start"),
            pl.col("sess_len"),
            pl.col("long_start"),
            pl.col("long_end"),
        ),
        str(log),
    )

    # Only now touch the output: bad input above leaves an old directory intact.
    write.clear_out_dir(out)
    splits: dict[str, Any] = {}
    for code, name in enumerate(core.SPLITS):
        part = rows.filter(pl.col(core.SPLIT) == code).drop(core.SPLIT)
        splits[name] = write.write_split(out, name, part, cfg.rows_per_shard, cfg.min_shards)
        say(f"{name}: {splits[name]['sessions']} sessions in {len(splits[name]['shards'])} shards")
    for name, vocab in vocabs.items():
        write.write_table(vocab, out / "vocab" / f"{name}.parquet")
    write.write_table(items_table, out / "items.parquet")
    write.write_table(users_table.drop(USER), out / "users.parquet")
    save_config(cfg, out / "config.json")

    config = cfg.model_dump(mode="json")
    vocab_sizes = {name: vocab.height + 2 for name, vocab in vocabs.items()}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": write.fingerprint(out, splits, vocab_sizes, config),
        "item_features": ["item", *item_feats],
        "user_features": ["user", *spec.user_features],
        "vocab_sizes": vocab_sizes,
        "num_items": vocab_sizes["item"],
        "max_session_len": cfg.max_session_len,
        "max_long_len": cfg.max_long_len,
        "cutoffs": {"valid_start": from_us(cut.valid_start), "test_start": from_us(cut.test_start)},
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "dropped": dropped,
        "splits": splits,
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


def _items_table(encoded: pl.LazyFrame, vocabs: dict[str, pl.DataFrame], features: list[str]) -> pl.DataFrame:
    """items.parquet: every item index 2.., its raw id, and each feature of its last training event."""
    last = (
        encoded
        .filter(pl.col(core.SPLIT) == 0)
        .sort([TS, ROW])
        .group_by(ITEM, maintain_order=True)
        .agg(*[pl.col(f"seq_{f}").last().alias(f) for f in features])
    )
    return (
        vocabs["item"].lazy()
        .select(pl.col("index").alias("item"), pl.col("raw").alias("item_id"))
        .join(last, left_on="item_id", right_on=ITEM, how="left", maintain_order="left")
        .with_columns(*[pl.col(f).fill_null(1).cast(pl.Int32) for f in features])
        .sort("item")
        .pipe(_collect, "items table")
    )
