"""The MovieLens reader of `sdm convert`.

ml-100k, ml-1m / ml-10m, the ml-20m / 25m / latest CSVs, RecBole atomic files
or one joined CSV, to a log with ratings plus items (title, genres, release
year) and users (age, gender, occupation, zip code) tables.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from sdm.errors import SdmError
from sdm.logs.reading import Tables, bad, read_first_line

ML_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def _read_text(path: Path) -> str:
    """UTF-8, falling back to Latin-1 (the original MovieLens files)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _split_lines(path: Path, sep: str, names: list[str]) -> pl.DataFrame:
    """A delimited text file with a multi-character separator (`::`) as string columns."""
    lines = [ln for ln in _read_text(path).splitlines() if ln.strip()]
    parts = pl.Series("line", lines).str.split(sep)
    if parts.list.len().min() < len(names):
        raise bad(path, f"expected {len(names)} {sep!r}-separated fields ({', '.join(names)}) on every line")
    return pl.DataFrame({n: parts.list.get(i) for i, n in enumerate(names)})


def _ml_sep(path: Path) -> str:
    line = read_first_line(path)
    for sep in ("::", "\t", "|"):
        if sep in line:
            return sep
    raise bad(path, "expected '::', tab or '|' separated fields")


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


_Frames = tuple[pl.DataFrame | None, pl.DataFrame | None, pl.DataFrame | None]
"""(ratings, items, users), each None when the files lack it."""


def movielens(files: list[Path]) -> Tables:
    """The log, items and users tables of a MovieLens release, whichever of its layouts `files` hold."""
    by_name = {f.name.lower(): f for f in files}
    ext = {f.suffix.lower(): f for f in files}
    ratings = items = users = None
    if ".inter" in ext:
        ratings, items, users = _recbole_files(ext)
    elif "u.data" in by_name:
        ratings, items, users = _ml100k_files(by_name)
    elif "ratings.dat" in by_name or "movies.dat" in by_name or "users.dat" in by_name:
        ratings, items, users = _dat_files(by_name)
    ratings, items, users = _csv_files(files, ratings, items, users)
    if ratings is None:
        names = ", ".join(f.name for f in files)
        raise SdmError(
            f"{files[0].parent}: no MovieLens ratings among {names} "
            "(expected u.data, ratings.dat, ratings.csv or a RecBole .inter file)"
        )
    return Tables(log=ratings.lazy(), items=items.lazy() if items is not None else None, users=users.lazy() if users is not None else None)


def _recbole_files(ext: dict[str, Path]) -> _Frames:
    """(ratings, items, users) of RecBole atomic files (.inter, .item, .user)."""
    items = users = None
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
    return ratings, items, users


def _ml100k_files(by_name: dict[str, Path]) -> _Frames:
    """(ratings, items, users) of ml-100k (u.data, u.item, u.user)."""
    items = users = None
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
    return ratings, items, users


def _dat_files(by_name: dict[str, Path]) -> _Frames:
    """(ratings, items, users) of ml-1m / ml-10m (ratings.dat, movies.dat, users.dat)."""
    ratings = items = users = None
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
    return ratings, items, users


def _csv_files(
    files: list[Path], ratings: pl.DataFrame | None, items: pl.DataFrame | None, users: pl.DataFrame | None
) -> _Frames:
    """CSVs with a header (ml-20m/25m/latest, or one joined file) over what the other files gave."""
    for f in files:  # CSVs with a header: ml-20m/25m/latest, or one joined file
        head = read_first_line(f).lower().replace("_", "")
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
    return ratings, items, users
