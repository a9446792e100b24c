"""Cold items on the shared logs: what ranking the catalogue adds, and what it costs warm targets.

    python bench/quality.py --datasets diginetica_views_sample rees46_sample --seeds 0 1 2   # trains the models
    python bench/cold_bench.py                                                               # then this

For each dataset and seed it takes the model `bench/quality.py` trained
(bench/out/quality/<dataset>/sdm-<seed>/best.pt), chooses the cold scale on the
validation split exactly as `sdm train` does after training
(`pipeline/coldscale.py`, budget `--budget`), and evaluates on the test split:

    vocabulary     the training vocabulary alone (cold targets are misses)
    catalogue@1    vocabulary + cold items, cold vectors unscaled
    catalogue      vocabulary + cold items at the scale chosen on validation
    cold-category  the cold baseline (popular recent items of the session's categories)

with HR@50 / NDCG@50 on all, warm (in the vocabulary) and cold targets, and per
dataset the means over seeds with the ratios that the targets name: all-target
HR@50 of catalogue / vocabulary (> 1), warm-target HR@50 of catalogue / vocabulary
(>= 0.99), cold-target HR@50 of catalogue against cold-category. Results go to
bench/results/cold.json and cold.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
QUALITY = HERE / "out" / "quality"
RESULTS = HERE / "results"
K = 50


def _row(m: dict[str, Any]) -> dict[str, float]:
    """HR / NDCG @K on all targets, and on warm and cold ones when the metrics have them."""
    row = {"hr": m[f"hr@{K}"], "ndcg": m[f"ndcg@{K}"]}
    for kind in ("warm", "cold"):
        if "targets" in m:
            row[f"{kind}_hr"] = m["targets"][kind][f"hr@{K}"]
            row[f"{kind}_ndcg"] = m["targets"][kind][f"ndcg@{K}"]
    return row


def measure(dataset: str, seed: int, budget: float) -> dict[str, Any] | None:
    from sdm.manifest import read_manifest
    from sdm.pipeline.baselines import build_baseline
    from sdm.pipeline.coldscale import choose_cold_scale
    from sdm.pipeline.checkpoint import load_model
    from sdm.pipeline.ranking import evaluate_model

    data, model_dir = QUALITY / dataset / "data", QUALITY / dataset / f"sdm-{seed}"
    if not (model_dir / "best.pt").exists():
        print(f"skipped {dataset} seed {seed}: no {model_dir / 'best.pt'} (run bench/quality.py first)", file=sys.stderr)
        return None
    manifest = read_manifest(data)
    model = load_model(model_dir, data, manifest, torch.device("cpu"))
    train_cfg = json.loads((model_dir / "config.json").read_text())
    choice = choose_cold_scale(model, data, K, budget, train_cfg.get("select_metric", "hr+ndcg"))
    if choice is None:
        print(f"skipped {dataset} seed {seed}: no cold items or no validation query", file=sys.stderr)
        return None
    test = evaluate_model(model, data, "test", [K])
    with_cold = evaluate_model(model, data, "test", [K], candidates="catalogue")
    model.cold_scale.fill_(1.0)
    unscaled = _row(evaluate_model(model, data, "test", [K], candidates="catalogue"))
    # ranked over the vocabulary alone, every hit is a warm target's
    vocabulary, warm = _row(test), with_cold["targets"]["warm"]["queries"]
    vocabulary["warm_hr"] = vocabulary["hr"] * test["queries"] / warm if warm else 0.0
    vocabulary["warm_ndcg"] = vocabulary["ndcg"] * test["queries"] / warm if warm else 0.0
    chosen = _row(with_cold)
    baseline = build_baseline("cold-category", data, manifest)
    cold_category = _row(evaluate_model(baseline, data, "test", [K], candidates="catalogue"))
    return {"dataset": dataset, "seed": seed, "scale": choice.scale, "valid": choice.as_dict(),
            "vocabulary": vocabulary, "catalogue@1": unscaled, "catalogue": chosen, "cold-category": cold_category}  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of every number, and the three ratios of the targets."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "scales": [r["scale"] for r in runs]}
    for method in ("vocabulary", "catalogue@1", "catalogue", "cold-category"):
        keys = runs[0][method].keys()
        out[method] = {k: statistics.fmean(r[method][k] for r in runs) for k in keys}
    out["all_hr_ratio"] = out["catalogue"]["hr"] / out["vocabulary"]["hr"]
    out["warm_hr_ratio"] = out["catalogue"]["warm_hr"] / out["vocabulary"]["warm_hr"]
    out["cold_hr_vs_cold_category"] = out["catalogue"]["cold_hr"] - out["cold-category"]["cold_hr"]
    return out


def table(dataset: str, s: dict[str, Any]) -> str:
    lines = [
        f"**{dataset}** (test, seeds {s['seeds']}, scales chosen on validation {s['scales']})", "",
        f"| method | HR@{K} all | NDCG@{K} all | HR@{K} warm | HR@{K} cold | NDCG@{K} cold |", "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for method in ("vocabulary", "catalogue@1", "catalogue", "cold-category"):
        r = s[method]
        cold = f"{r['cold_hr']:.4f} | {r['cold_ndcg']:.4f}" if "cold_hr" in r else "0 | 0"
        lines.append(f"| {method} | {r['hr']:.4f} | {r['ndcg']:.4f} | {r['warm_hr']:.4f} | {cold} |")
    lines += ["", f"all-target HR@{K} catalogue / vocabulary {s['all_hr_ratio']:.3f}x; warm-target HR@{K} "
              f"{s['warm_hr_ratio']:.3f}x; cold-target HR@{K} catalogue - cold-category {s['cold_hr_vs_cold_category']:+.4f}", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["diginetica_views_sample", "rees46_sample"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=0.01)
    args = ap.parse_args(argv)
    report, text = {}, []
    for dataset in args.datasets:
        runs = [r for seed in args.seeds if (r := measure(dataset, seed, args.budget)) is not None]
        if not runs:
            continue
        report[dataset] = {"runs": runs, "summary": summarise(runs)}
        text.append(table(dataset, report[dataset]["summary"]))
        print(text[-1], flush=True)
    if report:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cold.json").write_text(json.dumps({"budget": args.budget, "k": K, "datasets": report}, indent=1))
        (RESULTS / "cold.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
