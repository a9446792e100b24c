"""A sparser rating log: MovieLens-100K with a random share of its users, the model against item-CF.

    python bench/sparse_ml.py                    # 60% of the users, seeds 0 1 2
    python bench/sparse_ml.py --users 0.4

Plain item-CF beats sequence models on small, sparse rating logs with long
histories. This keeps a random `--users` share of MovieLens-100K's users (drawn
with `--draw`), sessionizes it with the quality benchmark's MovieLens settings and
split (`quality.toml`), trains the full model with its defaults per seed, and
evaluates the test split with the neighbour term as training chose it and without
it (weight 0), next to item-CF and repeat-aware item-CF. Per method: mean HR@50 /
NDCG@50 over seeds and the paired user-clustered bootstrap interval of the model
(with the term) minus the best item-CF (`bench/bootstrap.py`). Results go to
bench/results/sparse_ml_<share>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import polars as pl
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
K = 50


def main(argv: list[str] | None = None) -> int:
    from bootstrap import mean_of_runs, paired_interval, per_query
    from quality import load_benchmarks, run_baseline, sessionize_dataset, shared_dir

    from sdm.config import TrainConfig
    from sdm.manifest import read_manifest
    from sdm.pipeline.checkpoint import load_model
    from sdm.pipeline.ranking import evaluate_model
    from sdm.pipeline.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=float, default=0.6, help="share of the users kept")
    ap.add_argument("--draw", type=int, default=0, help="seed of the user draw")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args(argv)
    shared = shared_dir()
    spec = load_benchmarks(shared / "benchmarks" / "quality.toml")["movielens_100k"]
    tag = f"{round(args.users * 100)}"
    work = HERE / "out" / "sparse_ml" / tag
    work.mkdir(parents=True, exist_ok=True)
    log = pl.read_parquet(spec["log"])
    users = log.select("user_id").unique().sort("user_id").sample(fraction=args.users, seed=args.draw)
    sub = work / "interactions.parquet"
    log.join(users, on="user_id", how="semi").write_parquet(sub)
    data = sessionize_dataset("ml", {**spec, "log": sub}, work)
    manifest = read_manifest(data)
    dumps: dict[str, list[Path]] = {"with": [], "without": []}
    rows: dict[str, list[dict[str, float]]] = {"with": [], "without": [], "itemcf": [], "itemcf-repeat": []}
    weights = []
    for seed in args.seeds:
        out = work / f"sdm-{seed}"
        train(TrainConfig(data=data, out=out, seed=seed, overwrite=True), progress=False)
        model = load_model(out, data, manifest, torch.device("cpu"))
        weights.append(float(model.neighbours.weight))
        chosen = float(model.neighbours.weight)
        for name, w in (("with", chosen), ("without", 0.0)):
            model.neighbours.weight.fill_(w)
            dump = work / f"{name}-{seed}.parquet"
            m = evaluate_model(model, data, "test", [K], dump_topk=dump)
            dumps[name].append(dump)
            rows[name].append({"hr": m[f"hr@{K}"], "ndcg": m[f"ndcg@{K}"]})
        print(f"seed {seed}: weight {chosen:g}; with {rows['with'][-1]}, without {rows['without'][-1]}", flush=True)
    for base in ("itemcf", "itemcf-repeat"):
        m = run_baseline(data, base, "test", dump=work / f"{base}.parquet")
        rows[base].append({"hr": m[f"hr@{K}"], "ndcg": m[f"ndcg@{K}"]})
    means = {n: {k: statistics.fmean(r[k] for r in v) for k in ("hr", "ndcg")} for n, v in rows.items()}
    best = max(("itemcf", "itemcf-repeat"), key=lambda b: means[b]["hr"] + means[b]["ndcg"])
    model_q = mean_of_runs([per_query(p, K) for p in dumps["with"]])
    base_q = per_query(work / f"{best}.parquet", K)
    ci = {m: paired_interval(model_q, base_q, m) for m in ("hr", "ndcg")}
    lines = [
        f"MovieLens-100K, {tag}% of the users (draw {args.draw}), test split, seeds {args.seeds}; "
        f"neighbour weights chosen {weights}; {manifest['splits']['test'].get('sessions')} test sessions",
        "",
        f"| method | HR@{K} | NDCG@{K} |",
        "|---|---:|---:|",
        *[f"| {n} | {v['hr']:.4f} | {v['ndcg']:.4f} |" for n, v in means.items()],
        "",
        f"sdm (with the term) - {best}: HR@{K} {ci['hr']['diff']:+.4f} [{ci['hr']['low']:+.4f}, {ci['hr']['high']:+.4f}], "
        f"NDCG@{K} {ci['ndcg']['diff']:+.4f} [{ci['ndcg']['low']:+.4f}, {ci['ndcg']['high']:+.4f}]",
    ]  # fmt: skip
    print("\n".join(lines))
    results = HERE / "results"
    (results / f"sparse_ml_{tag}.json").write_text(json.dumps(
        {"users": args.users, "draw": args.draw, "seeds": args.seeds, "weights": weights, "rows": rows,
         "means": means, "best_itemcf": best, "interval": ci}, indent=1))  # fmt: skip
    (results / f"sparse_ml_{tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
