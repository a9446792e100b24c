"""Convert well-known public interaction logs to the SDM log schema (`sdm convert`).

Every converter writes the log `out` (SPEC section 1: `user_id`, `item_id`,
`timestamp` as timestamp[us, UTC], and `session_id` / `behavior` where the data
has them) and, when the format has side info, `items.parquet` (keyed by
`item_id`) and `users.parquet` (keyed by `user_id`) next to it. The matching
`data/<format>.toml` points `sdm sessionize` at those default paths
(`runs/<format>/logs.parquet`, `runs/<format>/items.parquet`, ...).

Behaviors are renamed to one vocabulary across formats: page views / clicks
-> `click`, carts -> `cart`, purchases / orders -> `buy`; others (`fav`,
`remove_from_cart`) keep their names.

Formats and their choices:

* ``taobao`` -- UserBehavior.csv (no header: user, item, category, behavior,
  epoch seconds). Rows outside the documented period 2017-11-25 .. 2017-12-03
  (UTC) are dropped and counted, as is customary. Items table: the item's
  (most frequent) category.
* ``diginetica`` -- train-item-views.csv (``sessionId;userId;itemId;timeframe;
  eventdate``, or SR-GNN's ``session_id;user_id;...`` header); optional
  train-purchases.csv (as ``buy`` events) and product-categories.csv (items
  table). timestamp = eventdate 00:00 UTC + timeframe ms (the data has no
  clock time). Anonymous sessions (userId NA) get the user id ``-sessionId``,
  so each is its own user instead of being dropped.
* ``yoochoose`` -- yoochoose-clicks.dat / yoochoose-buys.dat (no header,
  ISO timestamps), or session-rec's prepared TSV (``SessionId ItemId Time``,
  epoch seconds). No users: the sessionizer treats each session as a user.
  Items table (from clicks.dat only): the item's most frequent category code.
* ``movielens`` -- ml-100k (u.data, u.item, u.user), ml-1m (ratings.dat,
  movies.dat, users.dat; ``::`` or tab separated), ml-20m/25m/latest
  (ratings.csv, movies.csv), RecBole atomic files (*.inter, *.item, *.user),
  or one joined CSV with a header (DeepMatch's sample). A directory is read as
  the files in it. Every rating is an interaction; `rating` is kept as a column.
  Items: title, genres, genre (the first genre), release_year. Users: age,
  gender, occupation, zip_code.
* ``rees46`` -- the multi-category store CSVs (event_time, event_type,
  product_id, category_id, category_code, brand, price, user_id,
  user_session). Items: category (id), category_l1 (first part of
  category_code), category_code, brand, price (median).
* ``otto`` -- OTTO JSONL (``{"session", "events": [{"aid", "ts", "type"}]}``).
  OTTO sessions are browser sessions spanning up to four weeks, so the OTTO
  session becomes `user_id` and no `session_id` is written: the 10-minute gap
  rule cuts short-term sessions inside it. ``ts`` is in ms (seconds, as in
  the Kaggle test files, are detected).

Large inputs are read lazily and written with `sink_parquet` (streaming).
Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from sdm.errors import OutputError, SdmError
from sdm.logs.synth import claim_targets, side_paths
from sdm.outputs import scratch_name

FORMATS = ("taobao", "diginetica", "yoochoose", "movielens", "rees46", "otto")

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
ML_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


@dataclass
class Tables:
    """What a format reader produces: lazy frames plus counts of dropped rows."""

    log: pl.LazyFrame
    items: pl.LazyFrame | None = None
    users: pl.LazyFrame | None = None
    raw_rows: pl.LazyFrame | None = None
    """Lazy count of input rows, when rows may be filtered (dropped = raw - written)."""
    notes: dict[str, Any] = field(default_factory=dict)


def _behavior(col: str | pl.Expr) -> pl.Expr:
    expr = pl.col(col) if isinstance(col, str) else col
    return expr.str.to_lowercase().replace(BEHAVIORS).alias("behavior")


def _first_line(path: Path) -> str:
    with open(path, "rb") as fh:
        line = fh.readline(1 << 16)
    return line.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")


def _read_text(path: Path) -> str:
    """UTF-8, falling back to Latin-1 (the original MovieLens files)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _mode(col: str) -> pl.Expr:
    """Most frequent non-null value (ties: the smallest), for per-item side info."""
    return pl.col(col).drop_nulls().mode().min().alias(col)


def _bad(path: Path, why: str) -> SdmError:
    return SdmError(f"{path}: {why}")


def _expand(raw_paths: Sequence[Path]) -> list[Path]:
    """Files named, with directories replaced by the (non-hidden) files in them."""
    files: list[Path] = []
    for p in map(Path, raw_paths):
        if not p.exists():
            raise SdmError(f"{p}: raw file not found")
        if p.is_dir():
            inside = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
            if not inside:
                raise SdmError(f"{p}: directory has no files")
            files.extend(inside)
        else:
            files.append(p)
    if not files:
        raise SdmError("no raw files given")
    return files


# --------------------------------------------------------------------- taobao


def _taobao(files: list[Path]) -> Tables:
    schema = {
        "user_id": pl.Int64,
        "item_id": pl.Int64,
        "category": pl.Int64,
        "behavior_type": pl.String,
        "ts": pl.Int64,
    }
    frames = []
    for f in files:
        parts = _first_line(f).split(",")
        if len(parts) != 5:
            raise _bad(f, f"expected 5 comma-separated fields (user,item,category,behavior,timestamp), got {len(parts)}")
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


def _diginetica(files: list[Path]) -> Tables:
    events, items = [], None
    for f in files:
        head = _norm_header(_first_line(f), ";")
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
            raise _bad(
                f,
                "not a Diginetica file: expected a ';'-separated header with "
                "sessionId;userId;itemId;timeframe;eventdate (views/purchases) or itemId;categoryId",
            )
    if not events:
        raise SdmError(f"{files[0]}: no Diginetica views or purchases file among the inputs (e.g. train-item-views.csv)")
    return Tables(log=pl.concat(events), items=items)


# ------------------------------------------------------------------ yoochoose


def _yoochoose(files: list[Path]) -> Tables:
    events, cats = [], []
    for f in files:
        line = _first_line(f)
        if "\t" in line:
            head = line.split("\t")
            if not {"SessionId", "ItemId", "Time"} <= set(head):
                raise _bad(f, f"tab-separated file without the columns SessionId, ItemId, Time; found {head}")
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
            raise _bad(f, "expected yoochoose-clicks.dat (session,timestamp,item,category), yoochoose-buys.dat (session,timestamp,item,price,quantity) or session-rec's SessionId<TAB>ItemId<TAB>Time")
        names = ["session_id", "ts", "item_id", "category"] if n == 4 else ["session_id", "ts", "item_id", "price", "quantity"]
        lf = pl.scan_csv(f, has_header=False, new_columns=names, schema_overrides={"session_id": pl.Int64, "item_id": pl.Int64, "ts": pl.String, "category": pl.String})
        ts = pl.col("ts").str.strptime(UTC, "%Y-%m-%dT%H:%M:%S%.fZ").alias("timestamp")
        events.append(lf.select("session_id", "item_id", ts, pl.lit("click" if n == 4 else "buy").alias("behavior")))
        if n == 4:
            cats.append(lf.select("item_id", "category"))
    items = pl.concat(cats).group_by("item_id").agg(_mode("category")).sort("item_id") if cats else None
    return Tables(log=pl.concat(events), items=items)


# ------------------------------------------------------------------ movielens


def _split_lines(path: Path, sep: str, names: list[str]) -> pl.DataFrame:
    """A delimited text file with a multi-character separator (`::`) as string columns."""
    lines = [ln for ln in _read_text(path).splitlines() if ln.strip()]
    parts = pl.Series("line", lines).str.split(sep)
    if parts.list.len().min() < len(names):
        raise _bad(path, f"expected {len(names)} {sep!r}-separated fields ({', '.join(names)}) on every line")
    return pl.DataFrame({n: parts.list.get(i) for i, n in enumerate(names)})


def _ml_sep(path: Path) -> str:
    line = _first_line(path)
    for sep in ("::", "\t", "|"):
        if sep in line:
            return sep
    raise _bad(path, "expected '::', tab or '|' separated fields")


def _year_from_title(title: pl.Expr) -> pl.Expr:
    return title.str.extract(r"\((\d{4})\)\s*$", 1).cast(pl.Int64).alias("release_year")


def _ml_items(title: pl.Expr, genres: pl.Expr) -> list[pl.Expr]:
    """Title, genres ('|'-joined), first genre, release year from a MovieLens-style title."""
    return [
        title.str.strip_chars().alias("title"),
        genres.alias("genres"),
        genres.str.split("|").list.first().alias("genre"),
        _year_from_title(title),
    ]


def _recbole(path: Path) -> pl.DataFrame:
    """A RecBole atomic file: tab-separated, header `name:type`."""
    df = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    return df.rename({c: c.split(":")[0] for c in df.columns})


def ts_s(col: str) -> pl.Expr:
    """Epoch seconds (int or float text) -> timestamp[us, UTC]."""
    return pl.from_epoch(pl.col(col).cast(pl.Float64).cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC")


def _movielens(files: list[Path]) -> Tables:
    by_name = {f.name.lower(): f for f in files}
    ext = {f.suffix.lower(): f for f in files}
    ratings = items = users = None

    if ".inter" in ext:  # RecBole atomic files
        r = _recbole(ext[".inter"])
        ratings = r.select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("item_id").cast(pl.Int64),
            ts_s("timestamp").alias("timestamp"),
            pl.col("rating").cast(pl.Float64),
        )
        if ".item" in ext:
            it = _recbole(ext[".item"])
            gcol = "genre" if "genre" in it.columns else "class"
            title = "movie_title" if "movie_title" in it.columns else "title"
            genres = pl.col(gcol).str.replace_all(" ", "|")
            items = it.select(
                pl.col("item_id").cast(pl.Int64),
                pl.col(title).alias("title"),
                genres.alias("genres"),
                genres.str.split("|").list.first().alias("genre"),
                (pl.col("release_year").cast(pl.Int64, strict=False) if "release_year" in it.columns else _year_from_title(pl.col(title))).alias("release_year"),
            )
        if ".user" in ext:
            us = _recbole(ext[".user"])
            users = us.select(
                pl.col("user_id").cast(pl.Int64),
                *[pl.col(c) for c in ("age", "gender", "occupation", "zip_code") if c in us.columns],
            )
            if "age" in users.columns:
                users = users.with_columns(pl.col("age").cast(pl.Int64, strict=False))
    elif "u.data" in by_name:  # ml-100k
        r = _split_lines(by_name["u.data"], "\t", ["user_id", "item_id", "rating", "ts"])
        ratings = r.select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64), ts_s("ts").alias("timestamp"), pl.col("rating").cast(pl.Float64))
        if "u.item" in by_name:
            it = _split_lines(by_name["u.item"], "|", ["item_id", "title", "release_date", "video", "url", *ML_GENRES])
            flags = pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in ML_GENRES]).list.drop_nulls()
            items = it.select(
                pl.col("item_id").cast(pl.Int64),
                pl.col("title").str.replace(r"\s*\(\d{4}\)\s*$", "").alias("title"),
                flags.list.join("|").alias("genres"),
                flags.list.first().alias("genre"),
                pl.col("release_date").str.extract(r"(\d{4})$", 1).cast(pl.Int64).alias("release_year"),
            )
        if "u.user" in by_name:
            us = _split_lines(by_name["u.user"], "|", ["user_id", "age", "gender", "occupation", "zip_code"])
            users = us.with_columns(pl.col("user_id").cast(pl.Int64), pl.col("age").cast(pl.Int64))
    elif "ratings.dat" in by_name or "movies.dat" in by_name or "users.dat" in by_name:  # ml-1m / ml-10m
        if "ratings.dat" in by_name:
            f = by_name["ratings.dat"]
            r = _split_lines(f, _ml_sep(f), ["user_id", "item_id", "rating", "ts"])
            ratings = r.select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64), ts_s("ts").alias("timestamp"), pl.col("rating").cast(pl.Float64))
        if "movies.dat" in by_name:
            f = by_name["movies.dat"]
            it = _split_lines(f, _ml_sep(f), ["item_id", "title", "genres"])
            items = it.select(pl.col("item_id").cast(pl.Int64), *_ml_items(pl.col("title"), pl.col("genres")))
        if "users.dat" in by_name:
            f = by_name["users.dat"]
            us = _split_lines(f, _ml_sep(f), ["user_id", "gender", "age", "occupation", "zip_code"])
            users = us.select(pl.col("user_id").cast(pl.Int64), pl.col("age").cast(pl.Int64), "gender", "occupation", "zip_code")
    for f in files:  # CSVs with a header: ml-20m/25m/latest, or one joined file
        head = _first_line(f).lower().replace("_", "")
        if f.suffix.lower() not in (".csv", ".txt") or "," not in head or not ("userid" in head or "movieid" in head):
            continue  # README.txt, links.csv, tags.csv, ...
        df = pl.read_csv(f, infer_schema=False)
        cols = {c.lower().replace("_", ""): c for c in df.columns}
        uid, iid = cols.get("userid"), cols.get("movieid") or cols.get("itemid")
        if uid and iid and "timestamp" in cols:
            ratings = df.select(
                pl.col(uid).cast(pl.Int64).alias("user_id"),
                pl.col(iid).cast(pl.Int64).alias("item_id"),
                ts_s(cols["timestamp"]).alias("timestamp"),
                pl.col(cols["rating"]).cast(pl.Float64).alias("rating") if "rating" in cols else pl.lit(None, pl.Float64).alias("rating"),
            )
        if iid and "title" in cols and "genres" in cols and items is None:
            items = df.select(pl.col(iid).cast(pl.Int64).alias("item_id"), *_ml_items(pl.col(cols["title"]), pl.col(cols["genres"]))).unique("item_id", maintain_order=True)
        if uid and "gender" in cols and users is None:
            prof = [pl.col(cols[k]).alias(k) for k in ("gender", "age", "occupation") if k in cols]
            zip_col = cols.get("zip") or cols.get("zipcode")
            if zip_col:
                prof.append(pl.col(zip_col).alias("zip_code"))
            users = df.select(pl.col(uid).cast(pl.Int64).alias("user_id"), *prof).unique("user_id", maintain_order=True)
            if "age" in users.columns:
                users = users.with_columns(pl.col("age").cast(pl.Int64))
    if ratings is None:
        names = ", ".join(f.name for f in files)
        raise SdmError(
            f"{files[0].parent}: no MovieLens ratings among {names} "
            "(expected u.data, ratings.dat, ratings.csv or a RecBole .inter file)"
        )
    return Tables(log=ratings.lazy(), items=items.lazy() if items is not None else None, users=users.lazy() if users is not None else None)


# --------------------------------------------------------------------- rees46

REES46_COLUMNS = ["event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price", "user_id", "user_session"]


def _rees46(files: list[Path]) -> Tables:
    frames = []
    for f in files:
        head = [h.strip() for h in next(csv.reader([_first_line(f)]))]
        missing = [c for c in REES46_COLUMNS if c not in head]
        if missing:
            raise _bad(f, f"not a REES46 events CSV: missing column(s) {', '.join(missing)}; found {', '.join(head)}")
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


def _otto(files: list[Path]) -> Tables:
    frames = []
    for f in files:
        line = _first_line(f)
        if not (line.startswith("{") and '"session"' in line and '"events"' in line):
            raise _bad(f, 'not OTTO JSONL: expected lines like {"session": 0, "events": [{"aid": .., "ts": .., "type": ..}]}')
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


READERS: dict[str, Callable[[list[Path]], Tables]] = {
    "taobao": _taobao,
    "diginetica": _diginetica,
    "yoochoose": _yoochoose,
    "movielens": _movielens,
    "rees46": _rees46,
    "otto": _otto,
}


def default_out(fmt: str) -> Path:
    """Where `sdm convert FMT` writes by default (what `data/FMT.toml` expects)."""
    return Path("runs") / fmt / "logs.parquet"


def _sink(lf: pl.LazyFrame, path: Path, files: list[Path]) -> None:
    try:
        lf.sink_parquet(path, compression="zstd")
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
        raise SdmError(f"{where}: could not convert ({first})") from None


def convert(fmt: str, raw_paths: Sequence[Path], out: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert raw files of a public dataset to the SDM log (+ items / users tables).

    Args:
        fmt: one of FORMATS.
        raw_paths: the raw files (or directories holding them).
        out: the log's path; `items.parquet` / `users.parquet` go next to it.
            Default `runs/<fmt>/logs.parquet`.
        overwrite: replace existing output files.

    Returns:
        Summary: format, paths written, rows, users, items, dropped rows, seconds.

    Raises:
        SdmError: unknown format, missing or malformed raw file (named), or
            existing output without `overwrite`.
    """
    t0 = time.perf_counter()
    if fmt not in READERS:
        raise SdmError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out) if out is not None else default_out(fmt)
    files = _expand(raw_paths)
    try:
        tables = READERS[fmt](files)
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SdmError(f"{files[0]}: could not read as {fmt} ({first})") from None
    items_path, users_path = side_paths(out)
    targets = {out: tables.log, items_path: tables.items, users_path: tables.users}
    _refuse_stale_side_tables(targets)
    with claim_targets(list(targets), files, overwrite, "convert"):
        _write_targets(targets, files)
    return _summary(fmt, out, tables, files, items_path, users_path, t0)


def _refuse_stale_side_tables(targets: dict[Path, Any]) -> None:
    """A side table this dataset does not have must not sit beside the new log: a reader would
    take it for this log's, and sdm deletes only files it writes, so the user moves it.

    Raises:
        OutputError: naming the file.
    """
    for p, lf in targets.items():
        if lf is None and p.exists():
            raise OutputError(
                f"{p}: this dataset has no {p.stem} table, and a {p.name} from elsewhere sits beside the new log; "
                "sdm deletes only what it writes: move it away or choose another --out"
            )


def _write_targets(targets: dict[Path, Any], files: list[Path]) -> None:
    """Sink each table to a temporary name, then rename them all into place."""
    tmp = {p: scratch_name(p) for p in targets}
    try:
        for p, lf in targets.items():
            if lf is not None:
                _sink(lf, tmp[p], files)
        for p, lf in targets.items():
            if lf is not None:
                tmp[p].replace(p)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)


def _summary(fmt: str, out: Path, tables: Any, files: list[Path], items_path: Path, users_path: Path, t0: float) -> dict[str, Any]:
    """What `sdm convert` prints: rows, users, items and dropped rows of the written log."""
    stats = pl.scan_parquet(out).select(
        pl.len().alias("rows"),
        (pl.col("user_id").n_unique() if "user_id" in tables.log.collect_schema().names() else pl.lit(None)).alias("users"),
        pl.col("item_id").n_unique().alias("items"),
    ).collect().row(0, named=True)
    dropped = 0
    if tables.raw_rows is not None:
        dropped = int(tables.raw_rows.collect().item()) - stats["rows"]
    return {
        "format": fmt,
        "out": str(out),
        "items_path": str(items_path) if tables.items is not None else None,
        "users_path": str(users_path) if tables.users is not None else None,
        "rows": stats["rows"],
        "users": stats["users"],
        "items": stats["items"],
        "dropped": dropped,
        "files": [str(f) for f in files],
        "seconds": time.perf_counter() - t0,
        **tables.notes,
    }
