"""The item and user tables: items.parquet and users.parquet, every item and user of the vocabularies encoded.

`users_table` encodes the users table's profile features (`profiles`),
`items_table` each item's features from the items table or its last
training event, kept from `--vocab-from` where this run has no source
(`carry_items`). `side_tables` measures how well the items and users tables
cover the log.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from sdm.config import SessionizeConfig
from sdm.sessionize.columns import ITEM, ROW, TS, USER, feat_col, value_list, values_col
from sdm.sessionize.encode import encode, encode_values, fill_empty
from sdm.sessionize.io import collect as _collect
from sdm.sessionize.vocab import Tally


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
