"""Stage: encode. Vocabularies from the training split, raw ids -> indices, the item and user tables.

Index 0 is padding, 1 out-of-vocabulary (or null); known values get 2.. by
descending training count, then raw value. A numeric feature's vocabulary is
instead buckets of training quantiles, null and NaN a bucket of their own
(`numeric`); `encode` tells the two apart by the vocabulary's columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from sdm.config import SessionizeConfig
from sdm.sessionize import numeric
from sdm.sessionize.io import ITEM, ROW, TS, USER, feat_col, polars_errors, value_list, values_col
from sdm.sessionize.io import collect as _collect
from sdm.sessionize.previous import seed
from sdm.sessionize.sessions import SLEN


def _collect_all(lfs: list[pl.LazyFrame], what: str) -> list[pl.DataFrame]:
    """`collect_all` on the in-memory engine (shared sub-plans run once); failures as one line."""
    with polars_errors(what):
        return pl.collect_all(lfs, engine="in-memory")


class Tally:
    """Counts of values over several parts (buckets): `add` each part, then `frame`.

    Integers of a bounded range (at most `LUT_MAX`, and 16x the values
    counted) are counted by `np.bincount` into one dense array over all
    parts: one sequential pass, several times cheaper than a hash group-by
    when there are millions of distinct ids (the hash table no longer fits
    in cache), and the parts merge by adding arrays. Anything else is
    counted by a group-by per part and summed at the end.
    """

    def __init__(self) -> None:
        self.lo: int | None = None
        self.bins: np.ndarray | None = None
        self.dtype: pl.DataType | None = None
        self.seen = 0
        self.frames: list[pl.DataFrame] = []

    def add(self, values: pl.Series, weights: pl.Series | None = None) -> None:
        """Count `values` (each `weights` times when given); nulls are not counted."""
        if weights is not None:
            keep = values.is_not_null()
            values, weights = values.filter(keep), weights.filter(keep)
        else:
            values = values.drop_nulls()
        if len(values) == 0:
            return
        self.dtype = values.dtype
        self.seen += len(values)
        if values.dtype.is_integer() and not self.frames and int(values.max()) < 2**63:
            # (ids of 2^63 and above do not fit the int64 arithmetic below: a group-by counts them)
            lo, hi = int(values.min()), int(values.max())
            if self.bins is not None:
                lo, hi = min(lo, self.lo), max(hi, self.lo + len(self.bins) - 1)
            if hi - lo < min(LUT_MAX, 16 * self.seen + 1024):
                if self.bins is None:
                    self.lo, self.bins = lo, np.zeros(hi - lo + 1, dtype=np.int64)
                elif lo < self.lo or hi >= self.lo + len(self.bins):
                    grown = np.zeros(hi - lo + 1, dtype=np.int64)
                    grown[self.lo - lo : self.lo - lo + len(self.bins)] += self.bins
                    self.lo, self.bins = lo, grown
                w = None if weights is None else weights.cast(pl.Float64).to_numpy()
                counted = np.bincount(values.cast(pl.Int64).to_numpy() - self.lo, weights=w, minlength=len(self.bins))
                self.bins += counted.astype(np.int64) if w is not None else counted
                return
        if self.bins is not None:  # the range outgrew the array: fall back to frames
            self.frames.append(self._dense())
            self.lo = self.bins = None
        frame = values.to_frame("raw").with_columns(
            (pl.lit(1, dtype=pl.Int64) if weights is None else weights.cast(pl.Int64)).alias("count")
        )
        self.frames.append(_collect(frame.lazy().group_by("raw").agg(pl.col("count").sum())))

    def _dense(self) -> pl.DataFrame:
        seen = np.flatnonzero(self.bins)
        return pl.DataFrame({
            # ascending by construction: flagged, so `build_vocab`'s sort by raw costs nothing
            "raw": pl.Series(seen + self.lo).cast(self.dtype).set_sorted(),
            "count": pl.Series(self.bins[seen], dtype=pl.Int64),
        })

    def frame(self) -> pl.DataFrame:
        """`raw`, `count` (int64), one row per distinct value."""
        if self.bins is not None:
            return self._dense()
        if not self.frames:
            return pl.DataFrame(schema={"raw": self.dtype or pl.Int64, "count": pl.Int64})
        if len(self.frames) == 1:
            return self.frames[0]
        return _collect(pl.concat(self.frames).lazy().group_by("raw").agg(pl.col("count").sum()))


def count_values(values: pl.LazyFrame) -> pl.LazyFrame:
    """Occurrences of each non-null value of a one-column frame `raw`: `raw`, `count` (int64)."""
    return values.drop_nulls("raw").group_by("raw").agg(pl.len().cast(pl.Int64).alias("count"))


def build_vocab(counts: pl.LazyFrame, unique: bool = False, prev: pl.DataFrame | None = None) -> pl.LazyFrame:
    """Vocabulary from value counts (`count_values`; several frames' counts may repeat a value: summed).

    Returns `raw`, `index` (int32, 2.. by descending count then raw value) and
    `count` (int64), in index order. Nulls are not vocabulary entries (they
    map to 1). `unique`: each value has one row already (a `Tally`), nothing
    to sum. `prev` (`--vocab-from`, `previous.seed`): a previous vocabulary
    (`raw`, `index` 2..n+1) whose values keep their indices, with this run's
    counts (0 for a value absent now); the new values follow from n+2, in
    the usual order.
    """
    if not unique:
        counts = counts.group_by("raw").agg(pl.col("count").sum())
    if prev is None:
        return _ranked(counts, 2)
    old = prev.lazy().select(pl.col("raw"), pl.col("index"))
    kept = old.join(counts, on="raw", how="left", maintain_order="left").select(
        pl.col("raw"), pl.col("index"), pl.col("count").fill_null(0).cast(pl.Int64)
    )
    new = counts.join(old.select(pl.col("raw")), on="raw", how="anti")
    return pl.concat([kept, _ranked(new, 2 + prev.height)])


def _ranked(counts: pl.LazyFrame, first: int) -> pl.LazyFrame:
    """`raw`, `index` (first.. by descending count then raw value), `count` of unique value counts."""
    return (
        counts
        # (count desc, raw) as two single-key sorts, the second stable: 4M items (100M events)
        # 0.15 s against 0.7 s for one two-key sort, the same order. The row index between
        # them keeps the optimiser from fusing them back into that two-key sort.
        .sort("raw")
        .with_row_index("_by_raw")
        .sort("count", descending=True, maintain_order=True)
        .with_row_index("index", offset=first)
        .select(pl.col("raw"), pl.col("index").cast(pl.Int32), pl.col("count"))
    )


LUT_MAX = 1 << 24
"""Largest integer id range encoded by a lookup array (64 MiB of int32) instead of a join."""


def encode(
    frame: pl.LazyFrame, column: str, vocab: pl.LazyFrame | pl.DataFrame, alias: str, missing: int = 1
) -> pl.LazyFrame:
    """Replace raw values of `column` by vocabulary indices in a new column `alias` (`missing`, 1, = OOV or null).

    A numeric feature's vocabulary (`numeric.is_numeric`) buckets the values
    instead (`numeric.bucket_expr`: no value is OOV, null and NaN get the
    missing bucket). `missing`: the index of a value the vocabulary lacks;
    1 but for a lookup of items (`feature_codes`) of a numeric feature, where
    an item the table lacks has no value: its missing bucket (`numeric.null_index`).

    Integer ids whose range spans at most `LUT_MAX` values (and at most 16x
    the vocabulary) are looked up in a dense array: one gather, about 6x
    cheaper than a join at 10M events. Others get an order-keeping left join
    on the vocabulary (its keys are unique, so rows are neither added nor
    lost). Not `replace_strict`: with a large vocabulary that is dramatically
    slower (4M items over 25M events: 181 s against 7 s for the join, polars 2.1).
    """
    vocab = vocab.collect() if isinstance(vocab, pl.LazyFrame) else vocab
    if numeric.is_numeric(vocab):
        return frame.with_columns(numeric.bucket_expr(pl.col(column), vocab).alias(alias))
    dtype = frame.collect_schema()[column]
    raw = vocab.get_column("raw").cast(dtype, strict=False)
    if dtype.is_integer() and vocab.height and raw.null_count() == 0:
        lo, hi = int(raw.min()), int(raw.max())
        lut = _lookup_array(raw, vocab.get_column("index"), lo, hi, missing)
        if lut is not None:
            col = pl.col(column).cast(pl.Int64)
            looked = pl.lit(lut).gather((col - lo).clip(0, hi - lo))
            return frame.with_columns(
                pl.when(col.is_between(lo, hi)).then(looked).otherwise(missing).fill_null(missing).cast(pl.Int32).alias(alias)
            )
    tmp = "__sdm_enc"
    lut_frame = pl.DataFrame({column: raw, tmp: vocab.get_column("index")}).lazy()
    return (
        frame
        .join(lut_frame, on=column, how="left", maintain_order="left")
        .with_columns(pl.col(tmp).fill_null(missing).cast(pl.Int32).alias(alias))
        .drop(tmp)
    )


def vocabularies(
    cfg: SessionizeConfig,
    trains: list[pl.LazyFrame],
    train_sessions: pl.DataFrame,
    user_features: list[str],
    profile: pl.LazyFrame,
    table: pl.DataFrame | None = None,
    prev: dict[str, pl.DataFrame] | None = None,
) -> dict[str, pl.DataFrame]:
    """Every vocabulary from the training events of each bucket: item, item features, user, profile features.

    Vocabulary counts: events of training sessions (item and its features,
    user); for profile features, training users (each counted once). A
    multi-valued feature's vocabulary counts every value, not only the first.
    Each bucket is counted on its own and the counts summed: memory follows
    the number of distinct values, not of events. A feature of the items
    `table` (`normalise.item_table`) follows its item, so its counts are the
    items' training counts summed per value: the same numbers, without the
    feature riding along every event. `prev` (`--vocab-from`): name -> a
    previous vocabulary whose indices are kept (`build_vocab`).

    A numeric feature (`cfg.numeric_features`) is counted the same way, and
    its buckets are cut from those counts (`numeric.vocabulary`); with `prev`
    its previous buckets are kept.
    """
    prev = prev or {}
    in_table = [] if table is None else [f for f in cfg.item_features if feat_col(f) in table.columns]
    columns = {"item": pl.col(ITEM)}
    for f in cfg.item_features:
        if f not in in_table:
            columns[f] = pl.col(values_col(f)).explode() if f in cfg.multi_valued else pl.col(feat_col(f))
    tallies = {name: Tally() for name in columns}
    for train in trains:
        # one query for every column of a bucket: its training events are filtered once
        values = _collect_all([train.select(col.alias("raw")) for col in columns.values()], "vocabularies")
        for name, frame in zip(columns, values):
            tallies[name].add(frame.get_column("raw"))
        del values
    # a user's training events are its training sessions' lengths: no event is read
    tallies["user"] = Tally()
    tallies["user"].add(train_sessions.get_column(USER), train_sessions.get_column(SLEN))
    counts = {name: t.frame() for name, t in tallies.items()}
    if in_table:
        # one join of the item counts with the table for every table feature (collect_all runs it once)
        cols = {f: values_col(f) if f in cfg.multi_valued else feat_col(f) for f in in_table}
        per_item = counts["item"].lazy().join(
            table.lazy().select(pl.col(ITEM).alias("raw"), *[pl.col(c) for c in set(cols.values())]), on="raw", how="inner"
        )
        per_value = []
        for f, col in cols.items():
            value = per_item.select(pl.col(col).alias("raw"), pl.col("count"))
            per_value.append((value.explode("raw") if f in cfg.multi_valued else value).drop_nulls("raw"))
        counts.update(zip(in_table, _collect_all(per_value, "vocabularies of the items table")))
    names = ("item", *cfg.item_features, "user")
    numbers = set(cfg.numeric_features or [])
    cats = [name for name in names if name not in numbers]
    seeded = {name: seed(prev.get(name), counts[name], name) for name in cats}
    built = _collect_all(
        [build_vocab(seeded[name][0].lazy(), unique=name in tallies, prev=seeded[name][1]) for name in cats],
        "vocabularies",
    )
    vocabs = dict(zip(cats, built))
    events = int(counts["item"].get_column("count").sum())  # every training event has an item
    for f in numbers & set(cfg.item_features):
        vocabs[f] = numeric.vocabulary(counts[f], events, cfg.numeric_buckets, prev.get(f))
    vocabs = {name: vocabs[name] for name in names}  # in the usual order
    train_users = train_sessions.lazy().select(pl.col(USER)).unique()
    for f in user_features:
        raw = pl.col(f)
        if f in cfg.multi_valued:  # every value of each training user's set, each user counted once per value
            raw = value_list(raw, cfg.value_sep).list.unique(maintain_order=True)
        values = train_users.join(profile, on=USER, how="inner").select(raw.alias("raw"))
        values = count_values(values.explode("raw") if f in cfg.multi_valued else values)
        if f in numbers:
            users = train_sessions.get_column(USER).n_unique()
            vocabs[f] = numeric.vocabulary(_collect(values, str(cfg.users)), users, cfg.numeric_buckets, prev.get(f))
            continue
        values, old = seed(prev.get(f), values, f)
        vocabs[f] = _collect(build_vocab(values, prev=old), str(cfg.users))
    return vocabs


def feature_codes(table: pl.DataFrame, vocabs: dict[str, pl.DataFrame], features: list[str]) -> dict[str, pl.DataFrame]:
    """Per table feature f: every item of the items table with the index of its f (`raw` = item, `index`).

    `encode(events, ITEM, codes[f], ...)` then gives each event its item's
    feature index; items missing from the table get 1, as a null feature
    does (pass `numeric.null_index` as `missing` for a numeric feature's
    missing bucket). A multi-valued feature (the table has its value lists,
    `normalise.split_values`) also gets `values`: the indices of all its
    values (`encode_values`; the cold catalogue's `<f>_values`).
    """
    codes = {}
    for f in features:
        multi = values_col(f) in table.columns
        frame = _collect(
            table.lazy()
            .pipe(encode, feat_col(f), vocabs[f], "index")
            .select(pl.col(ITEM).alias("raw"), pl.col("index"), *([pl.col(values_col(f))] if multi else [])),
            f"{f} of the items table",
        )
        if multi:
            lists = frame.get_column(values_col(f))
            frame = frame.drop(values_col(f)).with_columns(encode_values(fill_empty(lists), vocabs[f]).alias("values"))
        codes[f] = frame
    return codes


def fill_empty(lists: pl.Series) -> pl.Series:
    """A list column with null rows (no value at all) as empty lists."""
    return lists.fill_null(pl.lit([], dtype=lists.dtype))


def _lookup_array(raw: pl.Series, index: pl.Series, lo: int, hi: int, missing: int = 1) -> pl.Series | None:
    """Int32 array over the ids lo..hi: each raw id's index, `missing` elsewhere; None when the range is too wide.

    Too wide: more than `LUT_MAX` values or 16x the vocabulary, or ids of 2^63
    and above, which do not fit the int64 arithmetic (those get the join).
    """
    if hi - lo >= min(LUT_MAX, 16 * len(raw) + 1024) or hi >= 2**63:
        return None
    lut = np.full(hi - lo + 1, missing, dtype=np.int32)
    lut[raw.cast(pl.Int64).to_numpy() - lo] = index.to_numpy()
    return pl.Series(lut)


def encode_events(events: pl.DataFrame, vocabs: dict[str, pl.DataFrame], features: list[str]) -> pl.DataFrame:
    """`seq_item`, `seq_<feature>` of each of `features` (read from the event) and `seq_oov`, in event order.

    Features of the items table are not encoded per event: a known item's
    are items.parquet's row, looked up by index when shards are read; an OOV
    item's are `oov_codes`.

    OOV events keep their identity as a hash in `seq_oov` (0 for known
    items), so evaluation counts distinct unknown targets instead of
    collapsing them into index 1. The hash is computed for the OOV events
    only, and each column is one gather (`encode_series`). At 100M events
    (9 buckets, polars' own allocator setting) that took 0.085 s a bucket,
    against 0.26 s for the same as one lazy query, whose temporaries over
    every event (a clipped copy, a mask, a hash) were fresh memory.
    """
    item = events.get_column(ITEM)
    seq = encode_series(item, vocabs["item"]).alias("seq_item")
    columns = [seq, *[encode_series(events.get_column(feat_col(f)), vocabs[f]).alias(f"seq_{f}") for f in features]]
    oov = (seq == 1).arg_true()
    seq_oov = pl.zeros(len(seq), dtype=pl.Int64, eager=True).scatter(oov, oov_hash(item.gather(oov)))
    return pl.DataFrame([*columns, seq_oov.alias("seq_oov")])


def oov_hash(items: pl.Series) -> pl.Series:
    """The 62-bit hash (int64, >= 1) of raw item ids that `seq_oov` stores for an OOV event.

    Also catalogue.parquet's `oov_hash`: a cold item and its OOV events carry
    the same number. Depends on the raw type (give the log's item type) and
    on the polars version, like every polars hash.
    """
    return (items.hash(7) // 4).cast(pl.Int64) + 1


def encode_series(values: pl.Series, vocab: pl.DataFrame) -> pl.Series:
    """`encode` of one column, eagerly: vocabulary indices (int32, 1 = OOV or null) of `values`.

    When the integer range of the values and the vocabulary together passes
    `encode`'s bounds, the lookup array covers all of it (1 outside the
    vocabulary) and the column is one gather: no clip, no range mask.
    Otherwise `encode` does it, as it does a numeric feature's buckets.
    """
    dtype = values.dtype
    raw = vocab.get_column("raw").cast(dtype, strict=False)
    if dtype.is_integer() and not numeric.is_numeric(vocab) and vocab.height and raw.null_count() == 0 and values.len() > values.null_count():
        lo, hi = min(int(raw.min()), int(values.min())), max(int(raw.max()), int(values.max()))
        lut = _lookup_array(raw, vocab.get_column("index"), lo, hi)
        if lut is not None:
            at = values.cast(pl.Int64) - lo if lo else values
            out = lut.gather(at).alias(values.name)
            return out.fill_null(1) if values.null_count() else out
    frame = encode(values.to_frame("raw").lazy(), "raw", vocab, "index").select(pl.col("index").alias(values.name))
    return _collect(frame, "encode").to_series()


def oov_codes(
    items: pl.Series, seq_item: pl.Series, codes: dict[str, pl.DataFrame], vocabs: dict[str, pl.DataFrame]
) -> pl.DataFrame:
    """Items-table features of the OOV events (`seq_item` 1): `_pos` (event position, ascending) and `oov_<f>`.

    An item unseen in training has index 1, yet the items table may still
    know its category: shards keep these values (docs/FORMAT.md, `oov_<f>`),
    the only ones items.parquet cannot give. An item the table lacks has
    no value: 1, or a numeric feature's missing bucket (`numeric.null_index`).

    Args:
        items: raw item of every event; seq_item: its index (same order).
        codes: `feature_codes` of the table features; vocabs: the vocabularies.
    """
    pos = (seq_item == 1).arg_true().cast(pl.Int64)
    frame = pl.DataFrame({ITEM: items.gather(pos), "_pos": pos}).lazy()
    for f, table in codes.items():
        frame = encode(frame, ITEM, table, f"oov_{f}", numeric.null_index(vocabs[f]))
    return _collect(frame.select(pl.col("_pos"), *[pl.col(f"oov_{f}") for f in codes]), "OOV items of the items table")


def side_tables(inp: Any, others: list[pl.LazyFrame], train_items: pl.Series, per_user: pl.DataFrame) -> dict[str, Any]:
    """Rows, duplicate keys and join coverage of the items and users tables.

    `log_keys_found`: the share of the log's distinct (kept) items, or users,
    that have a row in the table; a table keyed on the wrong column shows 0.
    Duplicate keys: rows beyond the first of a key (the first row wins).
    The log's items are `train_items` (the item vocabulary's raw ids) and
    those of the events of `others` (every bucket's events outside training).
    """
    cfg = inp.cfg
    out: dict[str, Any] = {}
    items = None
    if inp.items_lf is not None:
        # distinct items by a `Tally` (a dense bincount for integer ids): 4x cheaper than unique()
        tally = Tally()
        for f in others:
            tally.add(_collect(f.select(pl.col(ITEM)), "items").get_column(ITEM))
        rest = tally.frame().get_column("raw")
        both = pl.concat([train_items, rest.cast(train_items.dtype)]) if len(rest) else train_items
        items = both.unique().to_frame(ITEM).lazy()
    for what, lf, key, log_key, log_ids in (
        ("items table", inp.items_lf, cfg.item_col, ITEM, items),
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


def profiles(cfg: SessionizeConfig, users_lf: pl.LazyFrame | None, user_dtype: pl.DataType) -> pl.LazyFrame:
    """The users table as `_user` + profile columns, one row per user (the first wins)."""
    if users_lf is None:
        return pl.LazyFrame(schema={USER: user_dtype})
    return (
        users_lf
        .select(pl.col(cfg.user_col).cast(user_dtype).alias(USER), *[pl.col(f) for f in cfg.user_features])
        .unique(subset=[USER], keep="first", maintain_order=True)
    )


def users_table(
    events: pl.LazyFrame, profile: pl.LazyFrame, vocabs: dict[str, pl.DataFrame], features: list[str],
    cfg: SessionizeConfig,
) -> pl.DataFrame:  # fmt: skip
    """users.parquet (plus the `_user` join key): every user of the log, encoded.

    A multi-valued profile feature f (`--multi-valued`) gets `f_values`, the indices of the
    user's values (1 = a value training never saw), and `f` becomes the index of that list
    among the distinct lists of the table, its *value set*: 2 .. S - 1 in the lists' sorted
    order, 1 for a user without a value (`value_sets`). The model keeps each set's values
    and pools their embeddings (`SDM.user_values`); the set's index carries nothing learned,
    so a new run may renumber the sets, while `vocab/<f>.parquet` (the values) is kept by
    `--vocab-from` like every vocabulary.
    """
    multi = [f for f in features if f in cfg.multi_valued]
    frame = (
        events
        .select(pl.col(USER))
        .unique()
        .sort(USER)
        .join(profile, on=USER, how="left", maintain_order="left")
        .pipe(encode, USER, vocabs["user"].lazy(), "user")
        .with_columns(pl.col(USER).cast(pl.String).alias("user_id"))
    )
    for f in features:
        if f in multi:
            frame = frame.with_columns(value_list(pl.col(f), cfg.value_sep).alias(f"{f}_values"))
            continue
        frame = frame.pipe(encode, f, vocabs[f].lazy(), f"_enc_{f}").with_columns(
            pl.col(f"_enc_{f}").alias(f)
        )
    table = _collect(
        frame.select(pl.col(USER), pl.col("user_id"), pl.col("user"), *[pl.col(f) for f in features],
                     *[pl.col(f"{f}_values") for f in multi]),
        "users table",
    )  # fmt: skip
    for f in multi:
        values = encode_values(fill_empty(table.get_column(f"{f}_values")), vocabs[f])
        table = table.with_columns(values.alias(f"{f}_values"), value_sets(values).alias(f))
    return table


def value_sets(lists: pl.Series) -> pl.Series:
    """The value-set index of each list of value indices (`users_table`): equal lists share
    one, 2 .. in the sorted order of the distinct lists; an empty list is 1 (int32)."""
    key = lists.list.eval(pl.element().cast(pl.String)).list.join(",")
    distinct = key.filter(key != "").unique().sort()
    index = pl.Series(range(2, 2 + len(distinct)), dtype=pl.Int32)
    return key.replace_strict(distinct, index, default=1, return_dtype=pl.Int32)


_FROM = {"log": "_from_log", "table": "_from_table"}
"""Marker columns of `items_table`: true where this run's training events (log) / items table hold the item."""


def items_table(
    trains: list[pl.LazyFrame],
    vocabs: dict[str, pl.DataFrame],
    features: list[str],
    multi: list[str] | None = None,
    table: pl.DataFrame | None = None,
    prev: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """items.parquet: every item index 2.., its raw id, and each feature of its last training event.

    A feature of the items `table` is the table's value for the item (what
    every event of the item carries). A log feature is read from the item's
    last training event, the one with the largest (time, input row): two
    window maxima per bucket, then the same over the buckets' candidates. A
    multi-valued feature f also gets `f_values`: the indices of all its values
    (a multi-hot as an index list; OOV values are 1). `prev` (`--vocab-from`):
    the previous items.parquet, whose values an item keeps where this run
    does not describe it (`carry_items`).
    """
    multi = multi or []
    index = vocabs["item"].select(pl.col("index").alias("item"), pl.col("raw").alias("item_id"))
    if not features:
        return index.sort("item")
    in_table = [] if table is None else [f for f in features if feat_col(f) in table.columns]

    def cols(fs: list[str]) -> list[str]:
        return [*[feat_col(f) for f in fs], *[values_col(f) for f in fs if f in multi]]

    from_log = [f for f in features if f not in in_table]
    found = index.lazy()
    if from_log:
        def latest(frame: pl.LazyFrame) -> pl.LazyFrame:
            return (
                frame
                .filter(pl.col(TS) == pl.col(TS).max().over(ITEM))
                .filter(pl.col(ROW) == pl.col(ROW).max().over(ITEM))
            )  # fmt: skip

        keep = [pl.col(ITEM), pl.col(TS), pl.col(ROW), *[pl.col(c) for c in cols(from_log)]]
        last = pl.concat([_collect(latest(t.select(keep)), "items table") for t in trains]).lazy().pipe(latest)
        found = found.join(
            last.select(pl.col(ITEM).alias("item_id"), *cols(from_log), pl.lit(True).alias(_FROM["log"])),
            on="item_id", how="left", maintain_order="left",
        )  # fmt: skip
    if in_table:
        rows = table.lazy().select(pl.col(ITEM).alias("item_id"), *cols(in_table), pl.lit(True).alias(_FROM["table"]))
        found = found.join(rows, on="item_id", how="left", maintain_order="left")
    for f in features:
        found = found.pipe(encode, feat_col(f), vocabs[f], f)
    found = _collect(found)
    for f in multi:
        found = found.with_columns(encode_values(fill_empty(found.get_column(values_col(f))), vocabs[f]).alias(f"{f}_values"))
    if prev is not None:
        found = carry_items(found, prev, {"log": from_log, "table": in_table}, multi)
    return found.select(
        pl.col("item"), pl.col("item_id"), *[pl.col(f) for f in features], *[pl.col(f"{f}_values") for f in multi]
    ).sort("item")


def carry_items(found: pl.DataFrame, prev: pl.DataFrame, sources: dict[str, list[str]], multi: list[str]) -> pl.DataFrame:
    """Keep an old item's previous values (`--vocab-from`) for the features this run has no source for.

    An item of the previous vocabulary that has no training event in this
    run has no "last training event" to read its log features from, and one
    the new items table lacks has no table features: its row would turn to
    OOV (1), and the model's item table would change meaning for an index
    that did not. Such features keep the previous items.parquet's values
    (encoded with the previous vocabularies, which this run keeps).
    `sources`: "log" / "table" -> the features read from there.
    """
    carried = [c for fs in sources.values() for f in fs for c in (f, *([f"{f}_values"] if f in multi else []))]
    old = prev.select(pl.col("item").cast(pl.Int32), *[pl.col(c).alias(f"_prev_{c}") for c in carried], pl.lit(True).alias("_prev"))
    found = found.with_columns(pl.col("item").cast(pl.Int32)).join(old, on="item", how="left", maintain_order="left")
    for source, fs in sources.items():
        if not fs:
            continue
        missing = pl.col(_FROM[source]).is_null() & pl.col("_prev").fill_null(False)
        found = found.with_columns(
            pl.when(missing).then(pl.col(f"_prev_{c}")).otherwise(pl.col(c)).alias(c)
            for f in fs
            for c in (f, *([f"{f}_values"] if f in multi else []))
        )
    return found


def encode_values(lists: pl.Series, vocab: pl.DataFrame) -> pl.Series:
    """Each list of raw values as a list of vocabulary indices (1 = OOV), order kept.

    `replace_strict` inside the lists: fine for the small vocabularies of
    multi-valued features (genres, tags), unlike item ids (see encode).
    """
    raw = vocab.get_column("raw").cast(pl.String)
    return lists.list.eval(
        pl.element().replace_strict(raw, vocab.get_column("index"), default=1, return_dtype=pl.Int32)
    )
