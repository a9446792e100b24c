"""Output side of the sessionizer: the shard directory of docs/FORMAT.md.

Shards, vocabularies, item/user tables and config.json are written first;
`manifest.json` last, through a temporary file and `os.replace`, so a crashed
run leaves no manifest and a reader can tell the directory is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import polars as pl

from sdm.errors import SdmError

MANIFEST = "manifest.json"
COMPRESSION = "zstd"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless `overwrite` (nothing is deleted here).

    Raises:
        SdmError: `out` is a file, or a non-empty directory without overwrite.
    """
    if out.exists() and not out.is_dir():
        raise SdmError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SdmError(f"{out}: output directory is not empty; pass --overwrite to replace it")


def clear_out_dir(out: Path) -> None:
    """Empty `out`, deleting the old manifest FIRST so a half-deleted directory never looks complete."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def shard_bounds(n_rows: int, rows_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges: about `rows_per_shard` rows each, at least min(min_shards, n_rows) ranges.

    An empty split has no shards.
    """
    if n_rows == 0:
        return []
    n = max(math.ceil(n_rows / rows_per_shard), min(min_shards, n_rows))
    cuts = [i * n_rows // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _stats(df: pl.DataFrame) -> dict[str, int]:
    """Row, session, event and sample counts of a block of shard rows."""
    if df.height == 0:
        return {"rows": 0, "sessions": 0, "events": 0, "samples": 0}
    lens = df.select(pl.col("sess_len").explode())["sess_len"]
    return {
        "rows": df.height,
        "sessions": int(lens.len()),
        "events": int(lens.sum()),
        "samples": int((lens - 1).clip(lower_bound=0).sum()),
    }


def write_split(out: Path, split: str, rows: pl.DataFrame, rows_per_shard: int, min_shards: int) -> dict[str, Any]:
    """Write one split's rows as `split/part-NNNNN.parquet` and return its manifest entry."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, (lo, hi) in enumerate(shard_bounds(rows.height, rows_per_shard, min_shards)):
        part = rows.slice(lo, hi - lo)
        rel = f"{split}/part-{k:05d}.parquet"
        part.write_parquet(out / rel, compression=COMPRESSION)
        shards.append({"path": rel, **_stats(part)})
    total = _stats(rows)
    return {
        "users": total["rows"],
        "sessions": total["sessions"],
        "events": total["events"],
        "samples": total["samples"],
        "shards": shards,
    }


def write_table(df: pl.DataFrame, path: Path) -> None:
    """Write a Parquet table (vocabulary, items, users)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path, compression=COMPRESSION)


def fingerprint(out: Path, splits: dict[str, Any], vocab_sizes: dict[str, int], config: dict[str, Any]) -> str:
    """sha256 over shard names, sizes and row counts, the vocabulary sizes and the config JSON."""
    shards = [
        [s["path"], (out / s["path"]).stat().st_size, s["rows"]]
        for name in sorted(splits)
        for s in splits[name]["shards"]
    ]
    blob = json.dumps({"shards": shards, "vocab_sizes": vocab_sizes, "config": config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (temp file + os.replace): the last file of a run."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
