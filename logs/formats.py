"""The event-log readers of `sdm convert`: Taobao, Diginetica, YOOCHOOSE, REES46 and OTTO.

Each reads its raw files lazily into `Tables` (the choices per format: the
`sdm.logs.convert` docstring), renaming behaviors to one vocabulary
(`BEHAVIORS`). MovieLens, a ratings dataset: `movielens.py`.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import polars as pl

from sdm.errors import SdmError
from sdm.logs.reading import Tables, bad, read_first_line

BEHAVIORS = {
    "pv": "click",
    "view": "click",
    "views": "click",
    "click": "click",
    "clicks": "click",
    "cart": "cart",
    "carts": "cart",
    "buy": "buy",
    "purchase": "buy",
    "order": "buy",
    "orders": "buy",
}
UTC = pl.Datetime("us", "UTC")
TAOBAO_PERIOD = (dt.datetime(2017, 11, 25, tzinfo=dt.timezone.utc), dt.datetime(2017, 12, 4, tzinfo=dt.timezone.utc))


def _behavior(col: str | pl.Expr) -> pl.Expr:
    expr = pl.col(col) if isinstance(col, str) else col
    return expr.str.to_lowercase().replace(BEHAVIORS).alias("behavior")


def _mode(col: str) -> pl.Expr:
    """Most frequent non-null value (ties: the smallest), for per-item side info."""
    return pl.col(col).drop_nulls().mode().min().alias(col)


# --------------------------------------------------------------------- taobao


def taobao(files: list[Path]) -> Tables:
    schema = {
        "user_id": pl.Int64,
        "item_id": pl.Int64,
        "category": pl.Int64,
        "behavior_type": pl.String,
        "ts": pl.Int64,
    }
    frames = []
    for f in files:
        parts = read_first_line(f).split(",")
        if len(parts) != 5:
            raise bad(f, f"expected 5 comma-separated fields (user,item,category,behavior,timestamp), got {len(parts)}")
        header = not parts[0].strip().lstrip("-").isdigit()
        frames.append(pl.scan_csv(f, has_header=False, skip_rows=int(header), schema=schema))
    raw = pl.concat(frames)
    ts = pl.from_epoch("ts", time_unit="s").dt.replace_time_zone("UTC")
    lo, hi = TAOBAO_PERIOD
    rows = raw.with_columns(ts.alias("timestamp")).filter(pl.col("timestamp").is_between(lo, hi, closed="left"))
    log = rows.select("user_id", "item_id", "timestamp", _behavior("behavior_type"))
    items = rows.group_by("item_id").agg(_mode("category")).sort("item_id")
    return Tables(log=log, items=items, raw_rows=raw.select(pl.len()), notes={"dropped_reason": "outside 2017-11-25..2017-12-03"})


# ----------------------------------------------------------------- diginetica


def _norm_header(line: str, sep: str) -> list[str]:
    return [h.strip().lower().replace("_", "").replace(".", "") for h in line.split(sep)]


def diginetica(files: list[Path]) -> Tables:
    events, items = [], None
    for f in files:
        head = _norm_header(read_first_line(f), ";")
        if {"sessionid", "itemid", "timeframe", "eventdate"} <= set(head):
            lf = pl.scan_csv(f, separator=";", null_values=["NA", ""], infer_schema=False)
            lf = lf.rename(dict(zip(lf.collect_schema().names(), head)))
            behavior = "buy" if "ordernumber" in head else "click"
            date = pl.col("eventdate").str.to_date("%Y-%m-%d").cast(UTC)
            sid = pl.col("sessionid").cast(pl.Int64)
            user = pl.col("userid").cast(pl.Int64) if "userid" in head else pl.lit(None, pl.Int64)
            events.append(
                lf.select(
                    pl.coalesce(user, -sid).alias("user_id"),
                    pl.col("itemid").cast(pl.Int64).alias("item_id"),
                    (date + pl.duration(milliseconds=pl.col("timeframe").cast(pl.Int64))).alias("timestamp"),
                    sid.alias("session_id"),
                    pl.lit(behavior).alias("behavior"),
                )
            )
        elif {"itemid", "categoryid"} <= set(head):
            lf = pl.scan_csv(f, separator=";", infer_schema=False)
            lf = lf.rename(dict(zip(lf.collect_schema().names(), head)))
            items = lf.select(
                pl.col("itemid").cast(pl.Int64).alias("item_id"), pl.col("categoryid").cast(pl.Int64).alias("category")
            ).unique("item_id", keep="first", maintain_order=True)
        else:
            raise bad(
                f,
                "not a Diginetica file: expected a ';'-separated header with "
                "sessionId;userId;itemId;timeframe;eventdate (views/purchases) or itemId;categoryId",
            )
    if not events:
        raise SdmError(f"{files[0]}: no Diginetica views or purchases file among the inputs (e.g. train-item-views.csv)")
    return Tables(log=pl.concat(events), items=items)


# ------------------------------------------------------------------ yoochoose


def yoochoose(files: list[Path]) -> Tables:
    events, cats = [], []
    for f in files:
        line = read_first_line(f)
        if "\t" in line:
            head = line.split("\t")
            if not {"SessionId", "ItemId", "Time"} <= set(head):
                raise bad(f, f"tab-separated file without the columns SessionId, ItemId, Time; found {head}")
            lf = pl.scan_csv(f, separator="\t", schema_overrides={"SessionId": pl.Int64, "ItemId": pl.Int64, "Time": pl.Float64})
            events.append(
                lf.select(
                    pl.col("SessionId").alias("session_id"),
                    pl.col("ItemId").alias("item_id"),
                    pl.from_epoch((pl.col("Time") * 1e6).round().cast(pl.Int64), time_unit="us")
                    .dt.replace_time_zone("UTC")
                    .alias("timestamp"),
                    pl.lit("click").alias("behavior"),
                )
            )
            continue
        n = len(line.split(","))
        if n not in (4, 5) or "T" not in line.split(",")[1]:
            raise bad(f, "expected yoochoose-clicks.dat (session,timestamp,item,category), yoochoose-buys.dat (session,timestamp,item,price,quantity) or session-rec's SessionId<TAB>ItemId<TAB>Time")
        names = ["session_id", "ts", "item_id", "category"] if n == 4 else ["session_id", "ts", "item_id", "price", "quantity"]
        lf = pl.scan_csv(f, has_header=False, new_columns=names, schema_overrides={"session_id": pl.Int64, "item_id": pl.Int64, "ts": pl.String, "category": pl.String})
        ts = pl.col("ts").str.strptime(UTC, "%Y-%m-%dT%H:%M:%S%.fZ").alias("timestamp")
        events.append(lf.select("session_id", "item_id", ts, pl.lit("click" if n == 4 else "buy").alias("behavior")))
        if n == 4:
            cats.append(lf.select("item_id", "category"))
    items = pl.concat(cats).group_by("item_id").agg(_mode("category")).sort("item_id") if cats else None
    return Tables(log=pl.concat(events), items=items)


# --------------------------------------------------------------------- rees46

REES46_COLUMNS = ["event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price", "user_id", "user_session"]


def rees46(files: list[Path]) -> Tables:
    frames = []
    for f in files:
        head = [h.strip() for h in next(csv.reader([read_first_line(f)]))]
        missing = [c for c in REES46_COLUMNS if c not in head]
        if missing:
            raise bad(f, f"not a REES46 events CSV: missing column(s) {', '.join(missing)}; found {', '.join(head)}")
        lf = pl.scan_csv(
            f,
            schema_overrides={"product_id": pl.Int64, "category_id": pl.Int64, "user_id": pl.Int64, "price": pl.Float64, "category_code": pl.String, "brand": pl.String, "user_session": pl.String, "event_time": pl.String},
        )
        frames.append(lf.select(REES46_COLUMNS))
    raw = pl.concat(frames)
    log = raw.select(
        pl.col("user_id"),
        pl.col("product_id").alias("item_id"),
        pl.col("event_time").str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S UTC").dt.replace_time_zone("UTC").alias("timestamp"),
        pl.col("user_session").alias("session_id"),
        _behavior("event_type"),
    )
    items = (
        raw.select(
            pl.col("product_id").alias("item_id"),
            pl.col("category_id").alias("category"),
            pl.col("category_code").str.split(".").list.first().alias("category_l1"),
            "category_code",
            "brand",
            "price",
        )
        .group_by("item_id")
        .agg(_mode("category"), _mode("category_l1"), _mode("category_code"), _mode("brand"), pl.col("price").median())
        .sort("item_id")
    )
    return Tables(log=log, items=items)


# ----------------------------------------------------------------------- otto

OTTO_SCHEMA = {"session": pl.Int64, "events": pl.List(pl.Struct({"aid": pl.Int64, "ts": pl.Int64, "type": pl.String}))}


def otto(files: list[Path]) -> Tables:
    frames = []
    for f in files:
        line = read_first_line(f)
        if not (line.startswith("{") and '"session"' in line and '"events"' in line):
            raise bad(f, 'not OTTO JSONL: expected lines like {"session": 0, "events": [{"aid": .., "ts": .., "type": ..}]}')
        frames.append(pl.scan_ndjson(f, schema=OTTO_SCHEMA))
    events = pl.concat(frames).explode("events").unnest("events").drop_nulls("aid")
    # The official files use ms; Kaggle's test files use seconds. Epoch ms of
    # any date after 1973 exceed 1e11, epoch seconds stay below it until 5138.
    unit_ms = pl.col("ts").max() > 100_000_000_000
    ts_us = pl.when(unit_ms).then(pl.col("ts") * 1_000).otherwise(pl.col("ts") * 1_000_000)
    log = events.select(
        pl.col("session").alias("user_id"),
        pl.col("aid").alias("item_id"),
        pl.from_epoch(ts_us, time_unit="us").dt.replace_time_zone("UTC").alias("timestamp"),
        _behavior("type"),
    )
    return Tables(log=log)

