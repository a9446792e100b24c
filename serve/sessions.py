"""A user's latest session and its long-term window, from raw events, exactly as training built them.

Serving must not re-implement the sessionizer: everything here calls its own
stage functions (`sessionize.schema.check_log`, `times.timestamp_expr`,
`normalise.read_events`, `sessions.sessionize`, `windows.sessions_table`,
`long_windows`, `rows_table`, `timelines`, `encode.encode`) with the training run's resolved config
and vocabularies, then reads the result with the trainer's own
`pipeline.dataset.sessions_from_record_batch`. Only two steps are serving's:
keeping each user's *latest* session (before `at`), and taking user profiles
(and, for side features the events lack, item features) from the encoded
`users.parquet` / `items.parquet` of the data or export directory.

Side features the events lack are read, like training did, from the raw items
table: `items_raw.parquet` of the data or export directory (sessionize and export
copy it there), or the caller's `--items`. The path recorded in the training
config is never read, so answers never depend on the working directory.

A numeric feature (price) is bucketised by the training buckets its vocabulary
holds (`sessionize.numeric`), through the same `encode`. Events of items outside
the vocabulary are index 1 (OOV), as in training. Given
`ColdItems` (serving's cold candidates, `--candidates catalogue`), each such event
also gets its candidate index in `seq___cold` / `long___cold` (1 = not a cold
item), so a cold item of the session can be excluded or copied; and an item added
with `Recommender.add_items` gets its side features, in the features the events
did not carry, as if it were a row of the items table.

The training run's config, vocabularies and tables come from `serve.lookups.Lookups`
(a data or an export directory, every file checked as it is loaded).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from sdm.config import SessionizeConfig
from sdm.errors import DataError, first_line, storage_error
from sdm.pipeline.dataset import sessions_from_record_batch, user_column
from sdm.serve.lookups import Lookups
# the training code itself
from sdm.sessionize import numeric
from sdm.sessionize.columns import ITEM, ROW, SID, TS, USER, feat_col
from sdm.sessionize.encode import encode
from sdm.sessionize.io import polars_errors
from sdm.sessionize.normalise import read_events
from sdm.sessionize.schema import value_kind
from sdm.sessionize.read import Input as _Input
from sdm.sessionize.read import open_input as _open
from sdm.sessionize.read import read_bucket as _bucket_input
from sdm.sessionize.schema import check_log
from sdm.sessionize.sessions import SESS, sessionize
from sdm.sessionize.split import SPLIT
from sdm.sessionize.times import timestamp_expr
from sdm.sessionize.windows import long_windows, rows_table, sessions_table, timelines

SPLIT_SERVE = 2  # the split label of served sessions (unused downstream; rows_table groups by it)


COLD = "__cold"
"""Pseudo item feature of served sessions: each event's cold candidate index (`ColdItems`), 1 = none."""


@dataclass
class ColdItems:
    """Items outside the vocabulary that serving may recommend, by raw id (cold candidates).

    Attributes:
        vocab: a vocabulary frame (`raw`, `index`): raw id -> candidate index (num_items + j).
        side: (C, F) int64, row j = candidate num_items + j, columns `Lookups.item_features`:
            side feature indices that events of the item take for the features they do not
            carry themselves; 0 = keep the event's own (export's cold items: training gave them
            the events' and the items table's values, and so does serving).
    """

    vocab: pl.DataFrame
    side: np.ndarray | None = None


@dataclass
class Served:
    """Latest sessions of a group of users, as the trainer's session arrays.

    Attributes:
        arrays: `sessions_from_record_batch` output (seq_<f>, long_<f>, seq_len, long_len, user_<f>, ...).
        user_id: raw user ids (the log's type), one per session.
        session_start: (S,) session start, us since epoch UTC.
        dropped: rows of the events left out, by reason (`columns.DROP_REASONS`: a null user,
            item or time, a behaviour `--behaviors` leaves out, a duplicate), as the
            sessionizer drops them; a slice (`take`) carries none.
    """

    arrays: dict[str, np.ndarray]
    user_id: pl.Series
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def session_start(self) -> np.ndarray:
        return self.arrays["start_ts"]

    def __len__(self) -> int:
        return int(self.arrays["seq_len"].shape[0])


def open_log(lookups: Lookups, log: Path, items: Path | None = None) -> tuple[_Input, list[str]]:
    """Open a log file with the training config (`sessionize._open`: formats, checks, timestamps)."""
    from sdm.sessionize.io import scan_table

    _, schema = scan_table(Path(log), "log", lookups.config.get("format"), lookups.config.get("delimiter"))
    cfg, missing = lookups.session_config(schema.names(), items)
    inp = _open(cfg, Path(log))
    check_kinds(lookups, inp.cfg, inp.schema, inp.items_lf, Path(log))
    return inp, missing


def open_frame(lookups: Lookups, frame: pl.DataFrame, items: Path | None = None) -> tuple[_Input, list[str]]:
    """The same as `open_log` for events already in memory (the API)."""
    source = Path("<events>")
    schema = frame.schema
    cfg, missing = lookups.session_config(schema.names(), items)
    time_col = cfg.time_col if cfg.time_col in schema else None
    sample = None
    if time_col is not None and schema[time_col] == pl.String:
        values = frame.get_column(time_col).drop_nulls()
        sample = values[0] if len(values) else None
    # The checks and expressions depend on the schema only: once per schema, not per request.
    key = (tuple((n, str(t)) for n, t in schema.items()), None if items is None else str(items), sample)
    if key not in lookups.opened:
        items_lf, items_schema = None, None
        if cfg.items is not None:
            from sdm.sessionize.io import scan_table

            items_lf, items_schema = scan_table(cfg.items, "items table", None, cfg.delimiter)
        spec = check_log(cfg, source, schema, items_schema, None)
        check_kinds(lookups, cfg, schema, items_lf, source)
        ts = timestamp_expr(cfg, schema[cfg.time_col], source, sample)
        lookups.opened[key] = (items_lf, spec, ts)
    items_lf, spec, ts = lookups.opened[key]
    inp = _Input(cfg=cfg, log=source, lf=frame.lazy(), schema=schema, items_lf=items_lf, users_lf=None, spec=spec, ts=ts)
    return inp, missing


def check_kinds(lookups: Lookups, cfg: SessionizeConfig, schema: pl.Schema, items_lf: pl.LazyFrame | None,
                source: Path) -> None:  # fmt: skip
    """Refuse a column of the events (or of the items table) of another kind than training's.

    Raw values are looked up by value, so a user id 1.0 (pandas makes an integer column
    with a gap float) matches no profile, and a price 'cheap' no bucket: each would be
    served as unknown without a word. User ids are integers or strings (profiles are
    found by their text); a numeric feature takes numbers; any other feature the kind
    of its vocabulary's raw values, as `Recommender.add_items` and `--vocab-from` ask.
    A column of nulls only passes (every value missing, as in training).

    Raises:
        DataError: naming the file (or `<events>`), the column and both kinds.
    """
    user = schema.get(cfg.user_col)
    if user is not None and user != pl.Null and lookups.user_raw is not None and value_kind(user) not in ("integers", "strings"):
        raise DataError(f"{source}: user column {cfg.user_col!r} holds {user}; training's user ids are {value_kind(lookups.user_raw)}")
    tables = [(source, schema, [f for f in cfg.item_features if f in schema])]
    if items_lf is not None and cfg.items is not None:
        with polars_errors(str(cfg.items)):
            table = items_lf.collect_schema()
        tables.append((cfg.items, table, [f for f in cfg.item_features if f not in schema and f in table]))
    for where, columns, features in tables:
        for f in features:
            dtype, vocab = columns[f], lookups.vocabs[f]
            if dtype == pl.Null:
                continue
            if numeric.is_numeric(vocab):
                if not numeric.numeric_dtype(dtype):
                    raise DataError(f"{where}: column {f!r} holds {dtype}; the numeric feature {f!r} takes numbers")
            elif vocab.height and value_kind(dtype) != value_kind(vocab.schema["raw"]):
                raise DataError(f"{where}: column {f!r} holds {dtype}; training's values of {f!r} are {value_kind(vocab.schema['raw'])}")


def latest_sessions(
    inp: _Input, lookups: Lookups, missing: list[str], at_us: int | None, raw: pl.DataFrame | None = None,
    cold: ColdItems | None = None,
) -> Served:
    """Every user's latest session starting before `at_us` (events at or after it ignored), with its window.

    Args:
        inp: the opened log (`open_log` / `open_frame`).
        lookups: vocabularies and tables.
        missing: side features to take from items.parquet (second value of `open_*`).
        at_us: cut time in us since epoch UTC, or None for the whole log.
        raw: the raw rows to use (with `_row`), default all of `inp.lf`.
        cold: cold candidates: the arrays then also hold `seq___cold` / `long___cold` (see `ColdItems`).
    """
    cfg = inp.cfg
    if raw is None:
        raw = inp.lf.with_row_index(ROW).collect()
    if at_us is not None:
        raw = raw.filter(inp.ts < at_us)
    events, dropped, _ = read_events(raw.lazy(), inp, _items_for(inp, lookups, raw))
    ev = (
        sessionize(events.lazy(), cfg.gap_us, cfg.max_session_len)
        .drop(SID)
        .collect(engine="in-memory")
    )
    sessions = (
        sessions_table(ev.lazy(), ev.height)
        .with_columns(pl.lit(SPLIT_SERVE, dtype=pl.Int8).alias(SPLIT))
        # serving's own step: the user's latest session only
        .filter(pl.col(SESS) == pl.col(SESS).max().over(USER))
        .collect(engine="in-memory")
    )
    rows = rows_table(long_windows(sessions, ev, cfg.long_window_us, cfg.max_long_len))
    ev = ev.lazy()

    enc = encode(ev, ITEM, _vocab_for(lookups, lookups.vocabs["item"], raw, cfg.item_col), "seq_item")
    read = [f for f in lookups.item_features if f not in missing]
    for f in read:
        vocab = _vocab_for(lookups, lookups.vocabs[f], raw, f) if f in inp.spec.log_item_features else lookups.vocabs[f]
        enc = encode(enc, feat_col(f), vocab, f"seq_{f}")
    extra = []
    if cold is not None:
        enc = encode(enc, ITEM, _vocab_for(lookups, cold.vocab, raw, cfg.item_col), f"seq_{COLD}")
        extra = [f"seq_{COLD}"]
    enc = enc.select(pl.col(TS), pl.col("seq_item"), *[pl.col(f"seq_{f}") for f in read], *extra)
    # the in-memory engine, as the sessionizer's own collects: for one user's events, planning
    # and the streaming engine's hand-offs cost more than the work (7 ms vs 2.6 ms measured)
    enc_df = enc.collect(engine="in-memory")
    if missing:
        idx = enc_df.get_column("seq_item").to_numpy().astype(np.int64)
        enc_df = enc_df.with_columns(
            pl.Series(f"seq_{f}", lookups.item_table[idx, 1 + lookups.item_features.index(f)], dtype=pl.Int32)
            for f in missing
        )
    if cold is not None and cold.side is not None:
        enc_df = _cold_features(enc_df, cold.side, lookups, [f for f in lookups.item_features
                                                             if f not in inp.spec.log_item_features])  # fmt: skip
    seq_cols = ["seq_item"] + [f"seq_{f}" for f in lookups.item_features] + extra
    rows = timelines(rows, enc_df, {TS: "ts", **{c: c for c in seq_cols}})
    arrays = _to_arrays(rows, lookups, seq_cols)
    return Served(arrays, rows.get_column(USER).gather(arrays["row"]), {r: n for r, n in dropped.items() if n})


def _cold_features(enc: pl.DataFrame, side: np.ndarray, lookups: Lookups, features: list[str]) -> pl.DataFrame:
    """Events of cold candidates take `side`'s non-zero values for `features` (those not read from the events)."""
    rows = enc.get_column(f"seq_{COLD}").to_numpy().astype(np.int64) - lookups.num_items
    at = np.flatnonzero(rows >= 0)
    if not len(at) or not features:
        return enc
    cols = []
    for f in features:
        values = enc.get_column(f"seq_{f}").to_numpy().astype(np.int32)  # a writable copy
        new = side[rows[at], lookups.item_features.index(f)]
        values[at[new > 0]] = new[new > 0]
        cols.append(pl.Series(f"seq_{f}", values, dtype=pl.Int32))
    return enc.with_columns(cols)
def _items_for(inp: _Input, lookups: Lookups, raw: pl.DataFrame) -> pl.LazyFrame | None:
    """The raw items table for `to_events`, cut to the items of `raw` when that is much smaller.

    `to_events` de-duplicates and joins the whole table; for one user's events that
    cost ~9 ms on a 100k-item table per request. The table is read once per Lookups,
    and its rows for other items cannot match.
    """
    if inp.items_lf is None:
        return None
    key = str(inp.cfg.items)
    if key not in lookups.raw_items:
        try:
            lookups.raw_items[key] = inp.items_lf.collect()
        except (pl.exceptions.PolarsError, OSError, pl.exceptions.PanicException) as exc:
            raise DataError(f"{inp.cfg.items}: not a readable items table ({first_line(exc)})") from None
    table = lookups.raw_items[key]
    col = inp.cfg.item_col
    if raw.height * 4 >= table.height or col not in table.columns:
        return table.lazy()
    return _rows_for(lookups, table, col, raw.get_column(col)).lazy()
SMALL_VOCAB = 10_000


def _vocab_for(lookups: Lookups, vocab: pl.DataFrame, raw: pl.DataFrame, column: str) -> pl.DataFrame:
    """The rows of a large vocabulary whose raw value occurs in `raw[column]` (the rest cannot match).

    `encode` joins events to the vocabulary; for one user's few events, hashing a
    100k-row vocabulary each request cost ~10 ms. The subset gives the same indices.
    """
    if vocab.height <= SMALL_VOCAB or column not in raw.columns or numeric.is_numeric(vocab):
        return vocab
    return _rows_for(lookups, vocab, "raw", raw.get_column(column))


def _rows_for(lookups: Lookups, table: pl.DataFrame, key: str, values: pl.Series) -> pl.DataFrame:
    """Rows of `table` whose `key` is one of `values` (a dict lookup when the types agree, else a filter)."""
    values = values.drop_nulls().unique()
    if table.schema[key] != values.dtype:
        # encode / to_events cast the table's key to the log's type: filter the same way
        return table.filter(pl.col(key).cast(values.dtype, strict=False).is_in(values.implode()))
    index = lookups.row_of.get(id(table))
    if index is None:
        index = lookups.row_of[id(table)] = {v: i for i, v in enumerate(table.get_column(key).to_list())}
    rows = [index[v] for v in values.to_list() if v in index]
    return table[np.array(sorted(rows), dtype=np.int64)] if rows else table.clear()


def _to_arrays(rows: pl.DataFrame, lookups: Lookups, seq_cols: list[str]) -> dict[str, np.ndarray]:
    """Shard-format rows (one per user) -> the trainer's session arrays."""
    profile = ["user", *lookups.user_features]
    frame = rows.with_columns(pl.col(USER).cast(pl.String).alias("user_id"))
    # users.parquet rows by user id (a dict built once per Lookups): unknown user / profile -> OOV (1)
    pos = np.array([lookups.user_row.get(u, -1) for u in frame.get_column("user_id").to_list()], dtype=np.int64)
    user_cols = {
        user_column(f): pa.array(np.where(pos >= 0, lookups.user_values[:, j][np.maximum(pos, 0)], 1))
        for j, f in enumerate(profile)
    }
    table = pa.table(
        {
            "user_id": frame.get_column("user_id").to_arrow(),
            "ts": frame.get_column("ts").to_arrow(),
            "sess_id": frame.get_column(SESS).to_arrow(),
            "sess_start": frame.get_column("sess_start").to_arrow(),
            "sess_len": frame.get_column("sess_len").to_arrow(),
            "long_start": frame.get_column("long_start").to_arrow(),
            "long_end": frame.get_column("long_end").to_arrow(),
            **{c: frame.get_column(c).to_arrow() for c in seq_cols},
            **user_cols,
        }
    )
    rb = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    features = [c.removeprefix("seq_") for c in seq_cols]  # "item", the side features (and COLD)
    return sessions_from_record_batch(rb, features, profile, lookups.max_session_len, lookups.max_long_len, min_len=1)


def bucketed(
    inp: _Input, lookups: Lookups, missing: list[str], at_us: int | None, buckets: int, scratch: Path | None = None,
    cold: ColdItems | None = None,
) -> Iterator[Served]:
    """`latest_sessions` one hash bucket of users at a time (the sessionizer's `bucket_expr`): bounded memory.

    With `scratch` (a folder to create, e.g. `outputs.scratch_name(out)`) and several
    buckets, the log is first split by bucket in one streaming pass
    (`sessionize.read.split_log`) into it, so each bucket reads its own file instead
    of filtering the whole log again. The folder is removed at the end; one that a
    killed run left carries the `.sdm-tmp-` prefix, so the next run removes it.
    """
    import shutil

    from sdm.sessionize.read import split_log

    split = None
    if scratch is not None and buckets > 1:
        split = Path(scratch)
        try:
            split.mkdir()
        except OSError as exc:
            raise storage_error(exc, split) from None
    try:
        if split is not None:
            split_log(inp, buckets, split / "input")
        for b in range(buckets):
            raw = _bucket_input(inp, b, buckets, None if split is None else split / "input")
            if raw.height:
                yield latest_sessions(inp, lookups, missing, at_us, raw, cold)
    finally:
        if split is not None:
            shutil.rmtree(split, ignore_errors=True)


def take(served: Served, sl: slice) -> Served:
    """The sessions in `sl`."""
    return Served({k: v[sl] for k, v in served.arrays.items()}, served.user_id[sl])
