"""Serving latency and throughput of `Recommender` (the Python API) on CPU.

Builds a catalogue of `--items` (default 100,000) items: an `sdm synth` log with
that many items, sessionized with the default settings, and the default model
(PSDMMAL-N, D = 64, repeat head) checkpointed untrained — latency does not depend
on the weights — then `sdm export`s it (torch.export + ONNX + faiss index).

Measured, after `Recommender.load` (timed once):

* single-user latency: `recommend(one user's events, k=100)` for `--calls` users
  drawn at random (their whole history in the log), p50 / p90 / p99 in ms, for
  each runtime (ONNX Runtime, torch.export) and index (exact, faiss IVF), and the
  time split into sessions (the sessionizer's stages), tower and ranking;
* batch throughput: one `recommend` call over `--batch` users, users/s, against
  the single-user calls' users/s (the ratio is what batching buys);
* `sdm recommend` over every user of the log (users/s).

Writes `bench/results/serve.json`.

    python bench/serve_bench.py                 # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def build_export(work: Path, events: int, items: int, seed: int) -> tuple[Path, Path]:
    """synth -> sessionize -> untrained default model -> export; returns (export dir, log)."""
    from sdm.config import ExportConfig, SessionizeConfig, SynthConfig, TrainConfig
    from sdm.pipeline.dataset import read_manifest
    from sdm.logs.synth import generate
    from sdm.pipeline.modelspec import build_model, build_model_config
    from sdm.serve.export import export
    from sdm.sessionize import run as sessionize

    log = work / "synth" / "logs.parquet"
    if not (work / "export" / "config.json").is_file():
        generate(SynthConfig(out=log, events=events, items=items, seed=seed, overwrite=True), progress=False)
        data = work / "data"
        sessionize(
            SessionizeConfig(out=data, overwrite=True, items=log.parent / "items.parquet",
                             users=log.parent / "users.parquet", item_features=["category", "brand"],
                             user_features=["age", "gender"]),
            log, progress=False,
        )  # fmt: skip
        manifest = read_manifest(data)
        cfg = build_model_config(TrainConfig(data=data), manifest)
        torch.manual_seed(seed)
        model = build_model(cfg, data, manifest).eval()
        (work / "model").mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "model_config": cfg.model_dump(mode="json"),
                    "data_fingerprint": manifest["fingerprint"], "config": {}, "step": 0, "epoch": 0},
                   work / "model" / "best.pt")  # fmt: skip
        t0 = time.perf_counter()
        export(ExportConfig(data=data, model=work / "model", out=work / "export", overwrite=True), progress=True)
        print(f"export: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return work / "export", log


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2)}  # fmt: skip


def time_single(rec: Any, frames: list[pl.DataFrame], k: int) -> dict[str, Any]:
    """Latency of one-user calls, and where the time goes (sessions / tower / rank)."""
    import sdm.serve.api as api

    parts: dict[str, list[float]] = {"sessions": [], "tower": [], "rank": []}
    orig_latest, orig_rank, orig_tower = api.latest_sessions, api.rank, rec.tower

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = fn(*a, **kw)
            parts[name].append((time.perf_counter() - t) * 1e3)
            return out

        return wrapper

    for f in frames[:20]:  # warm-up
        rec.recommend(f, k=k)
    total = []
    api.latest_sessions, api.rank, rec.tower = timed("sessions", orig_latest), timed("rank", orig_rank), timed("tower", orig_tower)
    try:
        for f in frames:
            t = time.perf_counter()
            rec.recommend(f, k=k)
            total.append((time.perf_counter() - t) * 1e3)
    finally:
        api.latest_sessions, api.rank, rec.tower = orig_latest, orig_rank, orig_tower
    return {**percentiles(total), "users_per_s": round(1e3 / float(np.mean(total)), 1),
            "split_p50_ms": {k2: round(float(np.median(v)), 2) for k2, v in parts.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=300, help="single-user calls per configuration")
    p.add_argument("--batch", type=int, default=2000, help="users in the batch call")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/sdm_serve_bench"))
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args(argv)

    from sdm.serve import Recommender

    export_dir, log_path = build_export(args.work, args.events, args.items, args.seed)
    log = pl.read_parquet(log_path)
    users = log.get_column("user_id").unique().sort().to_numpy()
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(users, min(args.calls, len(users)), replace=False)
    by_user = {u: f for (u,), f in log.filter(pl.col("user_id").is_in(pick)).partition_by("user_id", as_dict=True).items()}
    frames = [by_user[u] for u in pick]
    batch_users = rng.choice(users, min(args.batch, len(users)), replace=False)
    batch = log.filter(pl.col("user_id").is_in(batch_users))

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": 1,
                    "load_average": os.getloadavg()},
        "items": int(json.loads((export_dir / "index.json").read_text())["items"]),
        "index_params": json.loads((export_dir / "index.json").read_text()),
        "k": args.k,
        "events_per_user_median": float(np.median([f.height for f in frames])),
        "configs": [],
    }  # fmt: skip
    for runtime in ("onnx", "torch"):
        for index in ("faiss", "exact"):
            t0 = time.perf_counter()
            rec = Recommender.load(export_dir, runtime=runtime, index=index)
            load_s = time.perf_counter() - t0
            single = time_single(rec, frames, args.k)
            t0 = time.perf_counter()
            out = rec.recommend(batch, k=args.k)
            batch_s = time.perf_counter() - t0
            row = {"runtime": runtime, "index": index, "load_s": round(load_s, 2), "single": single,
                   "batch_users": out.height, "batch_s": round(batch_s, 2),
                   "batch_users_per_s": round(out.height / batch_s, 1),
                   "batch_vs_single_throughput": round(out.height / batch_s / single["users_per_s"], 2)}  # fmt: skip
            print(json.dumps(row), file=sys.stderr)
            results["configs"].append(row)
    # `sdm recommend` over every user of the log (exact scoring, evaluate's code path).
    from sdm.config import RecommendConfig
    from sdm.serve.recommend import recommend

    t0 = time.perf_counter()
    s = recommend(RecommendConfig(data=args.work / "data", model=args.work / "model", out=args.work / "recs.parquet",
                                  overwrite=True, k=args.k, device="cpu"), log_path)  # fmt: skip
    sec = time.perf_counter() - t0
    results["sdm_recommend"] = {"users": s["users"], "events": log.height, "seconds": round(sec, 1),
                                "users_per_s": round(s["users"] / sec, 1), "buckets": s["buckets"]}  # fmt: skip
    print(json.dumps(results["sdm_recommend"]), file=sys.stderr)
    base = results["configs"][0]["single"]["p50_ms"]
    for row in results["configs"]:
        row["p50_vs_onnx_faiss"] = round(row["single"]["p50_ms"] / base, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
