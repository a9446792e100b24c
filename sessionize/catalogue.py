"""The cold catalogue: catalogue.parquet, the items a consumer may recommend that training never saw.

An item with side info but no training event has no row in the item
vocabulary, yet the item tower can embed it from its side features. The
catalogue lists every such item sdm knows of, one row each:

- every item of the items table (`--items`) outside the vocabulary: known
  at all times (`known_from` null);
- every item of a kept event of the log (any split; rows dropped as invalid
  are not events) outside the vocabulary: known from its first event.

Its side features follow the shards' rule: a log feature is the value at
the item's first event, a feature of the items table the table's value
(`encode.feature_codes`, as `oov_<f>` of the shards); values training never
saw are 1. A numeric feature is bucketised by the training buckets, and no
value at all is its missing bucket (`numeric`). A multi-valued feature f is
its first value there, and `<f>_values` lists the indices of all its values
(from the same event or table row; `encode.encode_values`), so the model
pools them as it does a vocabulary item's. `oov_hash` is `seq_oov`'s
number for the item (`encode.oov_hash`).

No pass of its own: each second pass keeps its bucket's OOV events, which
the encoding found anyway, reduced to one row per item (`bucket_cold`), and
`build` combines the buckets' rows with the items table in the driver.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from sdm.sessionize import encode, numeric
from sdm.sessionize.columns import ITEM, ROW, TS, values_col
from sdm.sessionize.io import collect

KEY = "catalogue"
"""Key of a second pass's result (`passes.second_pass`) that holds its bucket's `bucket_cold` rows."""


def bucket_cold(ev: pl.DataFrame, enc: pl.DataFrame, features: list[str]) -> pl.DataFrame:
    """A bucket's items outside the vocabulary, one row each: `ITEM`, `TS` (+ `ROW`) of the first event, log features.

    Args:
        ev: the bucket's sessionized events (`ITEM`, `TS`, and `ROW` when the
            log has item features: input order breaks ties in time; a
            multi-valued feature's raw value lists `_m_<f>`, kept as they are:
            `build` encodes them).
        enc: `encode.encode_events` of them (`seq_item`, `seq_<f>`), same order.
        features: the log's item features (encoded at each event as `seq_<f>`).
    """
    pos = (enc.get_column("seq_item") == 1).arg_true()
    cols = [ev.get_column(ITEM).gather(pos), ev.get_column(TS).gather(pos)]
    if ROW in ev.columns:
        cols.append(ev.get_column(ROW).gather(pos))
    cols += [enc.get_column(f"seq_{f}").gather(pos).alias(f) for f in features]
    cols += [ev.get_column(values_col(f)).gather(pos) for f in features if values_col(f) in ev.columns]
    return first_events(pl.DataFrame(cols))


def first_events(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per `ITEM`: its first by (time, input row); the buckets' rows combine by the same rule.

    Two window minima, as `tables.items_table` finds last events: 72 ms
    against 209 ms for a sort by (time, row) and a `unique` (600k OOV
    events of 450k items, 2 cores).
    Without `ROW` (a log without item features) a row is the item and its
    time: ties in time are copies.
    """
    lf = frame.lazy()
    for key in (TS, ROW) if ROW in frame.columns else (TS,):
        lf = lf.filter(pl.col(key) == pl.col(key).min().over(ITEM))
    if ROW not in frame.columns:
        lf = lf.unique(subset=[ITEM], keep="any")
    return collect(lf, "the cold catalogue")


def build(plan: Any, colds: list[pl.DataFrame]) -> pl.DataFrame:
    """catalogue.parquet from the buckets' `bucket_cold` rows and the items table (`plan.items_raw`).

    Columns: `item_id` (raw, the log's type), `oov_hash` (int64), `known_from`
    (timestamp[us, UTC], null for an item of the items table), then each item
    side feature (int32, in `plan.item_features` order), then `<f>_values`
    (list<int32>) of each multi-valued feature, in the same order. Sorted by
    (`known_from` nulls first, `oov_hash`, `item_id`): row j is cold item j.
    """
    events = first_events(pl.concat(colds, how="vertical_relaxed"))
    known = plan.vocabs["item"].select(pl.col("raw").alias(ITEM))
    frame = events.lazy()
    if plan.items_raw is not None:
        key = plan.items_raw.columns[0]
        static = (
            plan.items_raw.lazy()
            .select(pl.col(key).cast(events.schema[ITEM]).alias(ITEM), pl.lit(True).alias("_static"))
            .join(known.lazy().with_columns(pl.col(ITEM).cast(events.schema[ITEM])), on=ITEM, how="anti")
        )
        frame = frame.join(static, on=ITEM, how="full", coalesce=True)
    else:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Boolean).alias("_static"))
    frame = frame.with_columns(
        pl.when(pl.col("_static").fill_null(False)).then(None).otherwise(pl.col(TS)).cast(pl.Datetime("us", "UTC")).alias("known_from")
    )
    multi = []
    for f in plan.item_features:
        # a table feature as `oov_<f>` has it; a log feature at the first event (none for a table-only
        # item: 1, or a numeric feature's missing bucket, as for an item the table lacks)
        none = numeric.null_index(plan.vocabs[f])
        if f in plan.codes:
            frame = encode.encode(frame, ITEM, plan.codes[f], f, none)
        else:
            frame = frame.with_columns(pl.col(f).fill_null(none))
        if f in plan.codes and "values" in plan.codes[f].columns:
            # a table feature's value lists (already indices), by item
            lists = plan.codes[f].lazy().select(
                pl.col("raw").cast(events.schema[ITEM]).alias(ITEM), pl.col("values").alias(values_col(f))
            )
            frame = frame.join(lists, on=ITEM, how="left", maintain_order="left")
            multi.append(f)
        elif values_col(f) in events.columns:
            multi.append(f)
    cold = collect(frame, "the cold catalogue")
    return (
        cold.select(
            pl.col(ITEM).alias("item_id"),
            encode.oov_hash(cold.get_column(ITEM)).alias("oov_hash"),
            pl.col("known_from"),
            *[pl.col(f).cast(pl.Int32) for f in plan.item_features],
            *[value_lists(plan, cold, f).cast(pl.List(pl.Int32)).alias(f"{f}_values") for f in multi],
        )
        .sort(["known_from", "oov_hash", "item_id"], nulls_last=False)
    )


def value_lists(plan: Any, cold: pl.DataFrame, f: str) -> pl.Series:
    """`<f>_values` of the cold items: a table feature's lists are indices already
    (`encode.feature_codes`), a log feature's raw values at the first event are encoded;
    an item with no value at all (a table-only item, one the table lacks) gets []."""
    lists = encode.fill_empty(cold.get_column(values_col(f)))
    return lists if f in plan.codes else encode.encode_values(lists, plan.vocabs[f])
