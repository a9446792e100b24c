"""Session-kNN baselines (STAN, V-SKNN): build and evaluation time, and quality on the shared logs.

    python bench/knn_bench.py                       # synth 1M events -> sessionize -> time on the test split
    python bench/knn_bench.py --data runs/data      # time on an existing shard directory
    python bench/knn_bench.py --quality             # the five shared logs (test split) next to TARGETS.md
    python bench/knn_bench.py --quality --split valid

Speed: builds each baseline from the training shards (`build_baseline`) and runs
`evaluate_model` on `--split` (full ranking, SPEC 6), timing both; prints
seconds and queries per second. The synthetic log is generated once under
`bench/out/knn/` (reused).

Quality: sessionizes each dataset of `shared/benchmarks/quality.toml` with
`bench/quality.py`'s `sessionize_dataset` (into `bench/out/knn_quality/`),
evaluates stan and vsknn with their defaults and prints HR@20/50/100, NDCG@50
and MRR@50 beside the "STAN" and "V-SKNN" rows of `TARGETS.md` (an independent
implementation on the same splits) with the relative HR@50 difference.

Results are merged into `bench/results/knn.json` ("speed" keyed by data
directory, "quality_<split>" keyed by dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results" / "knn.json"
METHODS = ("stan", "vsknn")
KS = [20, 50, 100]
COLUMNS = ("hr@20", "hr@50", "hr@100", "ndcg@50", "mrr@50")
TARGET_ROWS = {"stan": "STAN", "vsknn": "V-SKNN"}


def synth_shards(events: int) -> Path:
    """Shards of a synthetic log of `events` events (default sessionize rules), built once."""
    from sdm.config import SessionizeConfig, SynthConfig
    from sdm.logs.synth import generate
    from sdm.sessionize import run

    root = OUT / "knn" / f"synth_{events}"
    data = root / "data"
    if not (data / "manifest.json").exists():
        log = root / "log.parquet"
        if not log.exists():
            generate(SynthConfig(out=log, events=events, overwrite=True), progress=False)
        run(SessionizeConfig(out=data, overwrite=True), log, progress=False)
    return data


def time_baseline(name: str, data: Path, split: str) -> dict[str, Any]:
    """Build + evaluate one baseline; seconds of each and the headline metrics."""
    from sdm.pipeline.baselines import build_baseline
    from sdm.pipeline.dataset import read_manifest
    from sdm.pipeline.ranking import evaluate_model

    manifest = read_manifest(data)
    t0 = time.perf_counter()
    scorer = build_baseline(name, data, manifest)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = evaluate_model(scorer, data, split, KS, device="cpu")
    evaluate = time.perf_counter() - t0
    return {
        "baseline": name,
        "build_s": round(build, 2),
        "evaluate_s": round(evaluate, 2),
        "queries": m["queries"],
        "queries_per_s": round(m["queries"] / evaluate) if evaluate else None,
        **{c: round(m[c], 4) for c in COLUMNS},
    }


def quality(split: str, datasets: list[str] | None) -> dict[str, Any]:
    """Evaluate stan and vsknn on the shared logs; print the table beside TARGETS.md."""
    sys.path.insert(0, str(HERE))
    from quality import load_benchmarks, sessionize_dataset, shared_dir, target_rows

    shared = shared_dir()
    toml = shared / "benchmarks" / "quality.toml"
    if not toml.exists():
        print(f"{toml} not found (set SDM_SHARED); nothing to do")
        return {}
    sets = load_benchmarks(toml)
    targets = target_rows(shared / "benchmarks" / "TARGETS.md") if split == "test" else {}
    results: dict[str, Any] = {}
    lines = [
        f"split: {split}",
        "",
        "| dataset | method | " + " | ".join(c.upper() for c in COLUMNS) + " | TARGETS HR@50 | diff | seconds |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 3),
    ]
    for name in datasets or list(sets):
        data = sessionize_dataset(name, sets[name], OUT / "knn_quality")
        results[name] = {}
        for method in METHODS:
            r = time_baseline(method, data, split)
            results[name][method] = r
            t = targets.get(name, {}).get(TARGET_ROWS[method], {})
            ref = t.get("hr@50")
            diff = f"{100 * (r['hr@50'] - ref) / ref:+.1f}%" if ref else "-"
            lines.append(
                f"| {name} | {method} | " + " | ".join(f"{r[c]:.4f}" for c in COLUMNS)
                + f" | {ref if ref is not None else '-'} | {diff} | {r['build_s'] + r['evaluate_s']:.1f} |"
            )  # fmt: skip
            if t:
                lines.append(
                    f"| {name} | {TARGET_ROWS[method]} (TARGETS) | "
                    + " | ".join(f"{t[c]:.4f}" if c in t else "-" for c in COLUMNS) + " | | | |"
                )  # fmt: skip
            print(lines[-2] if t else lines[-1], flush=True)
    print("\n".join(lines))
    return results


def merge_results(key: str, value: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old.setdefault(key, {}).update(value)
    RESULTS.write_text(json.dumps(old, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="shard directory to time on (default: a synthetic log)")
    ap.add_argument("--events", type=int, default=1_000_000, help="events of the synthetic log")
    ap.add_argument("--split", default="test", choices=["test", "valid"])
    ap.add_argument("--baselines", default=",".join(METHODS), help="comma-separated, for the speed run")
    ap.add_argument("--quality", action="store_true", help="evaluate on the shared logs instead")
    ap.add_argument("--datasets", help="comma-separated subset of quality.toml (with --quality)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        res = quality(args.split, args.datasets.split(",") if args.datasets else None)
        if res:
            merge_results(f"quality_{args.split}", res)
        return 0
    data = args.data or synth_shards(args.events)
    from sdm.pipeline.dataset import read_manifest

    m = read_manifest(data)
    info = {s: {k: m["splits"][s][k] for k in ("sessions", "events", "samples")} for s in ("train", args.split)}
    print(f"{data}: {m['num_items'] - 2:,} items; " + "; ".join(
        f"{s} {v['sessions']:,} sessions, {v['events']:,} events" for s, v in info.items()
    ), flush=True)  # fmt: skip
    rows = []
    for name in args.baselines.split(","):
        r = time_baseline(name, data, args.split)
        rows.append(r)
        print(
            f"{name:>14}: build {r['build_s']:7.2f} s   evaluate {r['evaluate_s']:7.2f} s   "
            f"{r['queries']:,} queries ({r['queries_per_s']:,}/s)   HR@50 {r['hr@50']:.4f}",
            flush=True,
        )
    merge_results("speed", {str(data): {"split": args.split, "splits": info, "threads": torch.get_num_threads(),
                                       "cpus": os.cpu_count(), "baselines": rows}})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
