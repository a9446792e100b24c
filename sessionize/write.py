"""Output side of the sessionizer: the shard directory of docs/FORMAT.md.

Shards, vocabularies, item/user tables and config.json are written first;
`manifest.json` last, so a crashed run leaves no manifest and a reader can
tell the directory is unfinished. Every file goes through
`outputs.atomic_path` (a scratch name, renamed when complete): no reader sees
half a file, and a failed write (no space left, read-only) is one
`StorageError` line naming the file. Which directory may be written at all,
and what of it may be replaced, is `outputs.OutputDir`'s (see `OWNS`).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import storage_error
from sdm.manifest import MANIFEST, file_table, fingerprint, oov_warnings
from sdm.names import vocab_file
from sdm.outputs import atomic_path, write_json, write_text
from sdm.sessionize import numeric
from sdm.sessionize.times import from_us
from sdm.sessionize.split import SPLITS

COMPRESSION = "zstd"
LEVEL = 1
"""zstd level 1: at 10M events the shards are about 13-20% larger than at level 3 (polars' default) and written about 1.3x faster."""
ROW_GROUP = 8192
"""Shard rows (user timelines) per Parquet row group."""


WORK_PREFIX = ".sdm-work-"
"""Spill folders of a bucketed run live inside the output directory under this prefix."""
ITEMS_RAW = "items_raw.parquet"
"""The items table as the sessionizer read it (`normalise.raw_item_rows`: its item column and the item
features it gave, raw values), when one was given; export copies it into the export directory. Serving
reads this file, never the path recorded in the config, which may be relative to another working directory."""
CATALOGUE = "catalogue.parquet"
"""The cold catalogue (`catalogue.build`), written always (possibly with no row)."""
OWNS = (
    MANIFEST, "config.json", "vocab", "items.parquet", "users.parquet", ITEMS_RAW, CATALOGUE, "train", "valid", "test",
    "vocab/*.parquet", "train/*.parquet", "valid/*.parquet", "test/*.parquet",
)  # fmt: skip
"""The entries `sdm sessionize` writes, and the files inside its folders (`outputs.OutputDir` replaces only these)."""


def _stats(df: pl.DataFrame, held_out: bool = False) -> dict[str, int]:
    """Row, session, event and sample counts of a block of shard rows (and, for a held-out
    split, `oov_samples`: samples whose target item training never saw, a guaranteed miss)."""
    if df.height == 0:
        return {"rows": 0, "sessions": 0, "events": 0, "samples": 0, **({"oov_samples": 0} if held_out else {})}
    lens = df.get_column("sess_len").explode().drop_nulls()
    # a session of n >= 1 events has n - 1 samples (length 0 is only a hand-made block)
    stats = {
        "rows": df.height,
        "sessions": len(lens),
        "events": int(lens.sum()),
        "samples": int((lens.cast(pl.Int64) - 1).clip(lower_bound=0).sum()),
    }
    if held_out:
        stats["oov_samples"] = oov_targets(df)
    return stats


def oov_targets(df: pl.DataFrame) -> int:
    """Targets (session positions 1..n-1) whose item is OOV (index 1), over a block of shard rows."""
    items = df.get_column("seq_item").to_arrow()
    flat = np.asarray(items.flatten())
    offsets = np.asarray(items.offsets)
    row_start = offsets[:-1] - offsets[0]  # a sliced array's offsets start past 0; flatten() does not
    per_row = np.asarray(df.get_column("sess_start").list.len())
    starts = np.asarray(df.get_column("sess_start").to_arrow().flatten(), dtype=np.int64) + np.repeat(row_start, per_row)
    lens = np.asarray(df.get_column("sess_len").to_arrow().flatten(), dtype=np.int64)
    keep = lens >= 2
    edge = np.zeros(len(flat) + 1, dtype=np.int64)  # +1 where a session's targets start, -1 past its end
    np.add.at(edge, starts[keep] + 1, 1)
    np.add.at(edge, starts[keep] + lens[keep], -1)
    return int(((flat == 1) & (np.cumsum(edge)[:-1] > 0)).sum())


def even_bounds(n_rows: int, count: int) -> list[tuple[int, int]]:
    """`count` contiguous row ranges of near-equal size covering `n_rows`."""
    cuts = [i * n_rows // count for i in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def write_shards(
    out: Path,
    split: str,
    rows: pl.DataFrame,
    first: int,
    count: int,
    build: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
) -> list[dict[str, Any]]:
    """Write `rows` as `count` shards `split/part-NNNNN.parquet` numbered from `first`; return their entries.

    `build` turns a shard's block of rows into what is written (the
    sessionizer attaches the event lists there, one shard at a time). Row
    groups of ROW_GROUP rows let a reader stream a shard in bounded memory.
    """
    folder = out / split
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, folder) from None
    if rows.height == 0:
        return []
    shards = []
    for k, (lo, hi) in enumerate(even_bounds(rows.height, count)):
        part = rows.slice(lo, hi - lo)
        if build is not None:
            part = build(part)
        rel = f"{split}/part-{first + k:05d}.parquet"
        # no column statistics: nothing reads shards by predicate, and they cost ~10% of the write
        with atomic_path(out / rel) as tmp:
            part.write_parquet(
                tmp, compression=COMPRESSION, compression_level=LEVEL, row_group_size=ROW_GROUP, statistics=False
            )
        shards.append({"path": rel, **_stats(part, held_out=split != "train")})
    return shards


def split_entry(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's manifest entry from its shard entries (totals + the list)."""
    entry = {
        "users": sum(s["rows"] for s in shards),
        "sessions": sum(s["sessions"] for s in shards),
        "events": sum(s["events"] for s in shards),
        "samples": sum(s["samples"] for s in shards),
    }
    if any("oov_samples" in s for s in shards):
        entry["oov_samples"] = sum(s.get("oov_samples", 0) for s in shards)
    return {**entry, "shards": shards}


def write_table(df: pl.DataFrame, path: Path) -> None:
    """Write a Parquet table (vocabulary, items, users) atomically; an OSError is one line naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, path.parent) from None
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression=COMPRESSION)


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (`outputs.write_json`): the last file of a run."""
    write_json(out / MANIFEST, manifest)


FORMAT_NAME = "sdm-shards"
FORMAT_VERSION = 2
"""2: features of the items table are read from items.parquet by item index (+ `oov_<f>`), not stored per event."""


def multi_valued_entry(cfg: SessionizeConfig, users: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """The manifest's `multi_valued`: per feature its separator and the column of its value
    lists, in items.parquet (an item feature) or users.parquet (a user feature, with the
    number S of value-set indices 0 .. S - 1 its `f` column uses, `tables.users_table`)."""
    out: dict[str, dict[str, Any]] = {}
    for f in cfg.multi_valued:
        if f in cfg.user_features:
            top = users.get_column(f).max() if users.height else None
            out[f] = {"sep": cfg.value_sep, "users_column": f"{f}_values", "sets": max(2, int(top or 0) + 1)}
        else:
            out[f] = {"sep": cfg.value_sep, "items_column": f"{f}_values"}
    return out


def finish(
    cfg: SessionizeConfig,
    plan: Any,
    out: Path,
    shards: dict[str, list[dict[str, Any]]],
    t0: float,
    say: Callable[[str], None],
    catalogue: pl.DataFrame,
) -> dict[str, Any]:
    """Write vocabularies, side tables, the cold `catalogue`, config and (last) the manifest of a shard directory."""
    splits = {name: split_entry(sorted(shards[name], key=lambda s: s["path"])) for name in SPLITS}
    for name in SPLITS:
        say(f"{name}: {splits[name]['sessions']} sessions in {len(splits[name]['shards'])} shards")
    for name, vocab in plan.vocabs.items():
        # a feature's name never becomes a path of its own: `vocab_file` keeps it inside vocab/
        write_table(vocab, out / vocab_file(name))
    write_table(plan.items_table, out / "items.parquet")
    write_table(plan.users_table.drop("_user"), out / "users.parquet")
    if plan.items_raw is not None:
        write_table(plan.items_raw, out / ITEMS_RAW)
    write_table(catalogue, out / CATALOGUE)
    write_text(out / "config.json", cfg.model_dump_json(indent=2) + "\n")
    files = file_table(out)

    config = cfg.model_dump(mode="json")
    vocab_sizes = {name: vocab.height + 2 for name, vocab in plan.vocabs.items()}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint(out, splits, vocab_sizes, config),
        "item_features": ["item", *plan.item_features],
        "table_features": list(plan.codes),
        "user_features": ["user", *plan.user_features],
        "vocab_sizes": vocab_sizes,
        "num_items": vocab_sizes["item"],
        "max_session_len": cfg.max_session_len,
        "max_long_len": cfg.max_long_len,
        "cutoffs": {
            **({} if plan.cut.train_start is None else {"train_start": from_us(plan.cut.train_start)}),
            "valid_start": from_us(plan.cut.valid_start),
            "test_start": from_us(plan.cut.test_start),
        },
        "history": plan.history,
        "rows_in": plan.rows_in,
        "rows_kept": plan.rows_in - sum(plan.dropped.values()),
        "dropped": plan.dropped,
        "splits": splits,
        "side_tables": plan.side_tables,
        "items_raw": None if plan.items_raw is None else {"path": ITEMS_RAW, "item_col": cfg.item_col, "features": list(plan.items_raw.columns[1:])},
        "multi_valued": multi_valued_entry(cfg, plan.users_table),
        "numeric": numeric.manifest_entry(plan.vocabs),
        "catalogue": {"path": CATALOGUE, "items": catalogue.height},
        "vocab_from": plan.vocab_from,
        "notes": plan.notes,
        "warnings": plan.warnings + oov_warnings(splits),
        "files": files,
        "config": config,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_manifest(out, manifest)
    say(f"wrote {out} in {manifest['seconds']:.1f}s")
    return manifest
