"""Partitioned sessionizing for batch schedulers: plan, partitions, combine.

A log too large for one machine's time budget runs in three steps, all with the
same config (same polars version too: buckets are a polars hash of the user):

1. `sdm sessionize LOG --buckets N --plan-only --out P` runs the first pass
   over the whole log (bucket by bucket, bounded memory) and writes `P/plan/`:
   cutoffs, vocabularies, the users' global sess_id offsets, the shard layout
   and the item/user tables.
2. `sdm sessionize LOG --bucket i/N --plan P/plan --out PART_i`, for every
   i in 0..N-1, on any machine that can read LOG and P/plan: sessionizes user
   partition i and writes its shards (already under their final names) and a
   `partial-manifest.json` (never `manifest.json`: a partition is not a
   complete shard directory).
3. `sdm sessionize-combine --plan P/plan --out DATA PART_0 ... PART_{N-1}`
   checks that every partition is there exactly once and comes from this plan,
   moves (hard-links, or copies across file systems) the shards into DATA and
   writes the vocabularies, tables and, last, `manifest.json`. DATA then equals
   a one-machine `sdm sessionize LOG --buckets N` run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl

from sdm.config import SessionizeConfig, save_config
from sdm.errors import SdmError
from sdm.sessionize import core, write

PLAN_DIR = "plan"
PLAN_FILE = "plan.json"
PARTIAL = "partial-manifest.json"
# fields that do not change what a partition computes
_RUN_FIELDS = {"out", "overwrite", "bucket", "plan", "plan_only", "workers", "buckets"}


def _output_config(cfg: SessionizeConfig) -> dict[str, Any]:
    """The config fields that decide the output (for checking that partitions match their plan)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RUN_FIELDS}


def write_plan(cfg: SessionizeConfig, log: Path, plan: Any, out: Path, seconds: float) -> dict[str, Any]:
    """Write `plan` to `out/plan/` (plan.json last) and return plan.json's content."""
    d = out / PLAN_DIR
    for name, vocab in plan.vocabs.items():
        write.write_table(vocab, d / "vocab" / f"{name}.parquet")
    write.write_table(plan.offsets, d / "offsets.parquet")
    write.write_table(plan.items_table, d / "items.parquet")
    write.write_table(plan.users_table, d / "users.parquet")
    save_config(cfg, d / "config.json")
    meta = {
        "format": "sdm-sessionize-plan",
        "version": 1,
        "log": str(log),
        "buckets": plan.buckets,
        "cutoffs": {"valid_start": plan.cut.valid_start, "test_start": plan.cut.test_start},
        "rows_in": plan.rows_in,
        "dropped": plan.dropped,
        "shards": plan.shards,
        "item_features": plan.item_features,
        "user_features": plan.user_features,
        "vocabs": list(plan.vocabs),
        "warnings": plan.warnings,
        "side_tables": plan.side_tables,
        "notes": plan.notes,
        "config": _output_config(cfg),
        "seconds": round(seconds, 3),
    }
    tmp = d / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, d / PLAN_FILE)
    return meta


def _plan_id(plan_dir: Path) -> str:
    return hashlib.sha256((plan_dir / PLAN_FILE).read_bytes()).hexdigest()


def read_plan(plan_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load a plan directory written by `write_plan`.

    Raises:
        SdmError: no finished plan there.
    """
    from sdm.sessionize import Plan

    plan_dir = Path(plan_dir)
    if not (plan_dir / PLAN_FILE).is_file():
        raise SdmError(f"{plan_dir}: no {PLAN_FILE}; run `sdm sessionize LOG --plan-only` first")
    meta = json.loads((plan_dir / PLAN_FILE).read_text())
    plan = Plan(
        buckets=meta["buckets"],
        cut=core.Cutoffs(**meta["cutoffs"]),
        rows_in=meta["rows_in"],
        dropped=meta["dropped"],
        vocabs={name: pl.read_parquet(plan_dir / "vocab" / f"{name}.parquet") for name in meta["vocabs"]},
        offsets=pl.read_parquet(plan_dir / "offsets.parquet"),
        shards={k: [tuple(x) for x in v] for k, v in meta["shards"].items()},
        items_table=pl.read_parquet(plan_dir / "items.parquet"),
        users_table=pl.read_parquet(plan_dir / "users.parquet"),
        item_features=meta["item_features"],
        user_features=meta["user_features"],
        warnings=meta.get("warnings", []),
        side_tables=meta.get("side_tables", {}),
        notes=meta.get("notes", []),
    )
    return plan, meta


def run_partition(cfg: SessionizeConfig, log: Path, progress: bool = True) -> dict[str, Any]:
    """Sessionize user partition `cfg.bucket` = "i/N" with the plan `cfg.plan` into `cfg.out`.

    Returns:
        The partial manifest (also written, last, as `partial-manifest.json`).

    Raises:
        SdmError: the plan is missing, was made for another N or another config.
    """
    from sdm.sessionize import _first_pass, _open, _second_pass, _stage_printer

    t0 = time.perf_counter()
    say = _stage_printer(progress, t0)
    i, n = cfg.bucket_of  # type: ignore[misc]
    plan, meta = read_plan(cfg.plan)  # type: ignore[arg-type]
    if meta["buckets"] != n:
        raise SdmError(f"{cfg.plan}: the plan has {meta['buckets']} buckets, --bucket asks for {cfg.bucket}")
    out = Path(cfg.out)
    write.check_inputs_outside(out, {"log": log, "items table": cfg.items, "users table": cfg.users, "plan": cfg.plan})
    write.check_out_dir(out, cfg.overwrite)
    inp = _open(cfg, log)
    cfg = inp.cfg  # side features defaulted as in the plan's run
    if meta["config"] != _output_config(cfg):
        diff = sorted(k for k, v in _output_config(cfg).items() if meta["config"].get(k) != v)
        raise SdmError(f"{cfg.plan}: the plan was made with another config (differs in {', '.join(diff)})")
    say(f"partition {i}/{n} of {inp.log}")
    part = _first_pass(inp, i, n, None)
    write.clear_out_dir(out)
    shards = _second_pass(inp, plan, i, part, out)
    manifest = {
        "format": "sdm-shards-partial",
        "version": 1,
        "bucket": i,
        "buckets": n,
        "plan_id": _plan_id(Path(cfg.plan)),  # type: ignore[arg-type]
        "rows_in": part.rows_in,
        "shards": shards,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    # the shards are written; the partial manifest comes last
    tmp = out / (PARTIAL + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / PARTIAL)
    say(f"wrote partition {i}/{n} to {out} in {manifest['seconds']:.1f}s")
    return manifest


def _place(src: Path, dst: Path) -> None:
    """Put a shard file at dst: a hard link when possible (same file system), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def combine(plan_dir: Path, parts: list[Path], out: Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Merge the partial outputs of every partition of a plan into one shard directory.

    Returns:
        The manifest of `out` (written last).

    Raises:
        SdmError: a partition missing, repeated, unfinished or from another plan.
    """
    from sdm.sessionize import _stage_printer, finish

    t0 = time.perf_counter()
    say = _stage_printer(progress, t0)
    plan_dir, out = Path(plan_dir), Path(out)
    write.check_inputs_outside(out, {"plan": plan_dir, **{f"partition {d}": Path(d) for d in parts}})
    plan, meta = read_plan(plan_dir)
    pid = _plan_id(plan_dir)
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for d in map(Path, parts):
        if not (d / PARTIAL).is_file():
            raise SdmError(f"{d}: no {PARTIAL}; that partition did not finish")
        m = json.loads((d / PARTIAL).read_text())
        if m.get("plan_id") != pid:
            raise SdmError(f"{d}: partition made with another plan than {plan_dir}")
        if m["bucket"] in found:
            raise SdmError(f"{d}: partition {m['bucket']} given twice (also {found[m['bucket']][0]})")
        found[m["bucket"]] = (d, m)
    missing = sorted(set(range(plan.buckets)) - set(found))
    if missing:
        raise SdmError(f"missing partition(s) {missing} of {plan.buckets}")
    if sum(m["rows_in"] for _, m in found.values()) != plan.rows_in:
        raise SdmError(f"partitions hold {sum(m['rows_in'] for _, m in found.values())} input rows, plan {plan.rows_in}")
    write.check_out_dir(out, overwrite)
    write.clear_out_dir(out)
    shards: dict[str, list[dict[str, Any]]] = {name: [] for name in core.SPLITS}
    for b in range(plan.buckets):
        d, m = found[b]
        for name in core.SPLITS:
            (out / name).mkdir(parents=True, exist_ok=True)
            for s in m["shards"][name]:
                _place(d / s["path"], out / s["path"])
                shards[name].append(s)
    saved = json.loads((plan_dir / "config.json").read_text())
    cfg = SessionizeConfig(**{**saved, "out": out, "plan_only": False, "overwrite": overwrite})
    say(f"combined {plan.buckets} partitions")
    return finish(cfg, plan, out, shards, t0, say)


__all__ = ["combine", "read_plan", "run_partition", "write_plan"]
