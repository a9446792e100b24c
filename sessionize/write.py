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
ROW_GROUP = 8192
"""Shard rows (user timelines) per Parquet row group."""


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


def _stats(df: pl.DataFrame) -> dict[str, int]:
    """Row, session, event and sample counts of a block of shard rows."""
    if df.height == 0:
        return {"rows": 0, "sessions": 0, "events": 0, "samples": 0}
    lens = df.get_column("sess_len")
    return {
        "rows": df.height,
        "sessions": int(lens.list.len().sum()),
        "events": int(lens.list.sum().sum()),
        "samples": int(lens.list.eval((pl.element() - 1).clip(lower_bound=0)).list.sum().sum()),
    }


def even_bounds(n_rows: int, count: int) -> list[tuple[int, int]]:
    """`count` contiguous row ranges of near-equal size covering `n_rows`."""
    cuts = [i * n_rows // count for i in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def write_shards(out: Path, split: str, rows: pl.DataFrame, first: int, count: int) -> list[dict[str, Any]]:
    """Write `rows` as `count` shards `split/part-NNNNN.parquet` numbered from `first`; return their entries.

    Row groups of ROW_GROUP rows let a reader stream a shard in bounded memory.
    """
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    if rows.height == 0:
        return []
    shards = []
    for k, (lo, hi) in enumerate(even_bounds(rows.height, count)):
        part = rows.slice(lo, hi - lo)
        rel = f"{split}/part-{first + k:05d}.parquet"
        part.write_parquet(out / rel, compression=COMPRESSION, row_group_size=ROW_GROUP)
        shards.append({"path": rel, **_stats(part)})
    return shards


def split_entry(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's manifest entry from its shard entries (totals + the list)."""
    return {
        "users": sum(s["rows"] for s in shards),
        "sessions": sum(s["sessions"] for s in shards),
        "events": sum(s["events"] for s in shards),
        "samples": sum(s["samples"] for s in shards),
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
