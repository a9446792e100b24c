"""The neighbour term on the shared logs: the model with and without item-CF's scores added.

    python bench/quality.py --seeds 0 1 2      # trains the models (their best.pt, before the term)
    python bench/neighbour_bench.py            # then this

For each dataset and seed it takes a model `bench/quality.py` trained
(bench/out/quality/<dataset>/<prefix>-<seed>/best.pt), chooses the neighbour weight
on the validation split exactly as `sdm train` does after training
(`pipeline/neighbourweight.py`, `--neighbours` per item), and evaluates the test
split with the term (the chosen weight) and without it (weight 0), dumping the
top 50 of every query. Per dataset: the means over seeds, the weights chosen, and
the paired user-clustered bootstrap interval of (with - without) on the per-query
scores averaged over seeds (`bench/bootstrap.py`). `--prefix SDMMA --root
bench/out/quality_sdmma` does the same for another variant's runs. Results go to
bench/results/neighbours_<prefix>.json and .md (`_n<N>` added for another `--neighbours`).
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
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
K = 50
DATASETS = ["movielens_100k", "yoochoose_rsc15_100k", "taobao_time_slice", "diginetica_views_sample", "rees46_sample"]


def measure(root: Path, dataset: str, prefix: str, seed: int, neighbours: int, work: Path) -> dict[str, Any] | None:
    from sdm.manifest import read_manifest
    from sdm.pipeline.checkpoint import load_model
    from sdm.pipeline.ranking import evaluate_model
    from sdm.pipeline.neighbourweight import choose_neighbour_weight

    model_dir = root / dataset / f"{prefix}-{seed}"
    data = root / dataset / "data"  # the shards bench/quality.py trained on
    if not (model_dir / "best.pt").exists():
        print(f"skipped {dataset} seed {seed}: no {model_dir / 'best.pt'} (run bench/quality.py first)", file=sys.stderr)
        return None
    manifest = read_manifest(data)
    model = load_model(model_dir, data, manifest, torch.device("cpu"))
    select = json.loads((model_dir / "config.json").read_text()).get("select_metric", "hr+ndcg")
    choice, _ = choose_neighbour_weight(model, data, neighbours, K, select)
    if choice is None:
        return None
    out = work / dataset
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, weight in (("with", choice.weight), ("without", 0.0)):
        model.neighbours.weight.fill_(weight)
        m = evaluate_model(model, data, "test", [K], dump_topk=out / f"{name}-{seed}.parquet")
        rows[name] = {"hr": m[f"hr@{K}"], "ndcg": m[f"ndcg@{K}"]}
    print(f"{dataset} seed {seed}: weight {choice.weight:g}; test HR@{K}/NDCG@{K} with "
          f"{rows['with']['hr']:.4f}/{rows['with']['ndcg']:.4f}, without {rows['without']['hr']:.4f}/"
          f"{rows['without']['ndcg']:.4f}", flush=True)  # fmt: skip
    return {"seed": seed, "weight": choice.weight, "valid": choice.as_dict(), **rows}


def summarise(runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    from bootstrap import mean_of_runs, paired_interval, per_query

    s: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "weights": [r["weight"] for r in runs]}
    for name in ("with", "without"):
        s[name] = {m: statistics.fmean(r[name][m] for r in runs) for m in ("hr", "ndcg")}
    per = {n: mean_of_runs([per_query(out / f"{n}-{r['seed']}.parquet", K) for r in runs]) for n in ("with", "without")}
    s["interval"] = {m: paired_interval(per["with"], per["without"], m) for m in ("hr", "ndcg")}
    return s


def table(dataset: str, s: dict[str, Any]) -> str:
    i = s["interval"]
    return (
        f"| {dataset} | {', '.join(f'{w:g}' for w in s['weights'])} | {s['without']['hr']:.4f} | {s['with']['hr']:.4f} | "
        f"{i['hr']['diff']:+.4f} [{i['hr']['low']:+.4f}, {i['hr']['high']:+.4f}] | {s['without']['ndcg']:.4f} | "
        f"{s['with']['ndcg']:.4f} | {i['ndcg']['diff']:+.4f} [{i['ndcg']['low']:+.4f}, {i['ndcg']['high']:+.4f}] |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--prefix", default="sdm", help="the runs' directory prefix: <prefix>-<seed>")
    ap.add_argument("--root", type=Path, default=HERE / "out" / "quality", help="where <dataset>/<prefix>-<seed> are")
    ap.add_argument("--neighbours", type=int, default=20, help="neighbours per item (sdm train --neighbours)")
    args = ap.parse_args(argv)
    work = HERE / "out" / "neighbours" / (args.prefix + (f"_n{args.neighbours}" if args.neighbours != 20 else ""))
    report, lines = {}, [
        f"| log | weights chosen | HR@{K} without | HR@{K} with | with - without, 95% | NDCG@{K} without | "
        f"NDCG@{K} with | with - without, 95% |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]  # fmt: skip
    for dataset in args.datasets:
        runs = [r for seed in args.seeds if (r := measure(args.root, dataset, args.prefix, seed, args.neighbours, work))]
        if not runs:
            continue
        report[dataset] = {"runs": runs, "summary": summarise(runs, work / dataset)}
        lines.append(table(dataset, report[dataset]["summary"]))
        print(lines[-1], flush=True)
    if report:
        RESULTS.mkdir(exist_ok=True)
        name = f"neighbours_{args.prefix}" + (f"_n{args.neighbours}" if args.neighbours != 20 else "")
        meta = {"k": K, "neighbours": args.neighbours, "prefix": args.prefix, "datasets": report}
        (RESULTS / f"{name}.json").write_text(json.dumps(meta, indent=1))
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
