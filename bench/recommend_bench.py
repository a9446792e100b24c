"""`sdm recommend` over every user of a log: users/s and peak memory, one bucket against several.

An `sdm synth` log (`--events`, `--items`) is sessionized with the defaults and an
untrained default model is checkpointed (speed and memory do not depend on the
weights). Then `sdm recommend` runs in a fresh process per setting, with
`--bucket-events` large (the whole log at once: the baseline) and small (users
hash-partitioned into buckets), and the process reports its own peak RSS
(`ru_maxrss`). Writes `bench/results/recommend.json`.

    python bench/recommend_bench.py            # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource  # noqa: F401 - used by the child script
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def prepare(work: Path, events: int, items: int, seed: int, users: int | None = None) -> tuple[Path, Path, Path]:
    from sdm.config import SessionizeConfig, SynthConfig, TrainConfig
    from sdm.pipeline.dataset import read_manifest
    from sdm.logs.synth import generate
    from sdm.pipeline.modelspec import build_model, build_model_config
    from sdm.sessionize import run as sessionize

    log, data, model = work / "synth" / "logs.parquet", work / "data", work / "model"
    if (model / "best.pt").is_file():
        return log, data, model
    generate(SynthConfig(out=log, events=events, items=items, users=users, seed=seed, overwrite=True), progress=False)
    sessionize(SessionizeConfig(out=data, overwrite=True, items=log.parent / "items.parquet",
                                users=log.parent / "users.parquet", item_features=["category", "brand"],
                                user_features=["age", "gender"]), log, progress=False)  # fmt: skip
    manifest = read_manifest(data)
    cfg = build_model_config(TrainConfig(data=data), manifest)
    torch.manual_seed(seed)
    m = build_model(cfg, data, manifest).eval()
    model.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "model_config": cfg.model_dump(mode="json"),
                "data_fingerprint": manifest["fingerprint"], "config": {}, "step": 0, "epoch": 0},
               model / "best.pt")  # fmt: skip
    return log, data, model


CHILD = """
import resource, runpy, sys
sys.argv = ["sdm"] + sys.argv[1:]
try:
    runpy.run_module("sdm.cli", run_name="__main__")
finally:
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_child(log: Path, data: Path, model: Path, out: Path, bucket_events: int, k: int) -> dict[str, Any]:
    """One `sdm recommend` in a fresh process; seconds and that process's own peak RSS."""
    cmd = [sys.executable, "-c", CHILD, "recommend", str(log), "--data", str(data), "--model", str(model),
           "--out", str(out), "--overwrite", "--k", str(k), "--bucket-events", str(bucket_events), "--device", "cpu",
           "-q"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    sec = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr)
    peak = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")))
    print(done.stdout.strip(), file=sys.stderr)
    return {"bucket_events": bucket_events, "seconds": round(sec, 1), "peak_rss_mib": round(peak / 1024, 1),
            "summary": done.stdout.strip()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=3_000_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=None, help="users of the synthetic log (default: synth's own rule)")
    p.add_argument("--bucketed-only", action="store_true", help="only the bucketed run (for logs too large for one bucket)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--small", type=int, default=300_000, help="bucket_events of the bucketed run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/sdm_recommend_bench"))
    p.add_argument("--out", type=Path, default=RESULTS / "recommend.json")
    args = p.parse_args(argv)
    log, data, model = prepare(args.work, args.events, args.items, args.seed, args.users)
    import polars as pl

    users = pl.scan_parquet(log).select(pl.col("user_id").n_unique()).collect().item()
    small = run_child(log, data, model, args.work / "recs_small.parquet", args.small, args.k)
    if args.bucketed_only:
        return _write(args.out, {
            "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
            "events": args.events, "items": args.items, "users": users, "k": args.k, "bucketed": small,
            "users_per_s_bucketed": round(users / small["seconds"], 1),
        })  # fmt: skip
    whole = run_child(log, data, model, args.work / "recs_whole.parquet", 10 * args.events, args.k)
    a = pl.read_parquet(args.work / "recs_small.parquet").sort("user_id")
    b = pl.read_parquet(args.work / "recs_whole.parquet").sort("user_id")
    result = {
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "events": args.events, "items": args.items, "users": users, "k": args.k,
        "one_bucket": whole, "bucketed": small,
        "identical_lists": sum(x == y for x, y in zip(a["items"].to_list(), b["items"].to_list())),
        "same_item_sets": sum(set(x) == set(y) for x, y in zip(a["items"].to_list(), b["items"].to_list())),
        "users_per_s_one_bucket": round(users / whole["seconds"], 1),
        "users_per_s_bucketed": round(users / small["seconds"], 1),
        "peak_ratio_bucketed_vs_one": round(small["peak_rss_mib"] / whole["peak_rss_mib"], 2),
    }  # fmt: skip
    return _write(args.out, result)


def _write(out: Path, result: dict[str, Any]) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
