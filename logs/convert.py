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

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from sdm.errors import OutputError, SdmError
from sdm.logs.formats import diginetica, otto, rees46, taobao, yoochoose
from sdm.logs.movielens import movielens
from sdm.logs.reading import Tables
from sdm.logs.targets import check_log_name, claim_targets, side_paths
from sdm.outputs import scratch_name

FORMATS = ("taobao", "diginetica", "yoochoose", "movielens", "rees46", "otto")

READERS: dict[str, Callable[[list[Path]], Tables]] = {
    "taobao": taobao,
    "diginetica": diginetica,
    "yoochoose": yoochoose,
    "movielens": movielens,
    "rees46": rees46,
    "otto": otto,
}


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
    check_log_name(out, "convert")  # before the raw files are read
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
