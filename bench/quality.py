"""Model quality on the shared real logs, next to the independently measured targets.

Reads `shared/benchmarks/quality.toml` (five public logs with FIXED time splits,
column mappings and side features) and, for each dataset:

1. sessionizes the log with the default rules (SPEC 2-4: 10-minute gap, 50-item
   cut, 7-day window of 50), the file's cutoffs and features, exact duplicate
   rows kept as events (the protocol of `TARGETS.md`); a dataset without
   `user_col` treats each session as its own user, so its log is read without
   any user column;
2. trains every model of `--methods` for every seed: `sdm` is `sdm train` with
   its defaults, `sdm-paper` the paper's PSDMMAL-N (no repeat head, no user
   residual), the paper's other variants (SDMMA ... DNN) likewise as the paper
   has them, and `SASRec` (full-softmax CE, the same trainer); `--train-args`
   goes on top of each;
3. evaluates `best.pt` (chosen on the validation split by the trainer) on
   `--split` (test by default; `valid` for choosing defaults) with the SPEC-6
   protocol, and the baselines of `--methods` (popularity, itemcf,
   itemcf-repeat, stan, vsknn) on the same split;
4. prints mean and spread (min..max) over the seeds of HR@50 and NDCG@50 beside
   the best row of `TARGETS.md` for that dataset and column, with the training
   time of each run.

    python bench/quality.py                          # all five, 3 seeds, test split, the default model
    python bench/quality.py --split valid --datasets movielens_100k --train-args '{"epochs": 20}'
    python bench/quality.py --seeds 0 --methods sdm,sdm-paper,SDMMA,PSDMMA,PSDMMAL,SASRec,stan,vsknn,itemcf-repeat

`shared/` is found at `$SDM_SHARED` or `../shared` beside the repository; when
absent the script says so and exits 0 without running anything. Writes
`bench/results/quality_<split>.md` and `.json` (every metric of every run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/bootstrap.py beside this script

from sdm.config import SessionizeConfig, TrainConfig
from sdm.pipeline.baselines import BASELINES, build_baseline
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.device import pick_device
from sdm.pipeline.ranking import evaluate_model

HERE = Path(__file__).resolve().parent
KS = [20, 50, 100]
HEADLINE = ("hr@50", "ndcg@50")
PAPER = {"repeat": False, "user_residual": False, "state_query": False, "target_decay": 1.0}
"""What makes a variant the paper's own: none of the changes beyond the paper."""
PRESETS: dict[str, dict[str, Any]] = {
    "sdm": {},
    "sdm-no-repeat": {"repeat": False},
    "sdm-no-residual": {"user_residual": False},
    "sdm-no-state-query": {"state_query": False},
    "sdm-paper": PAPER,
    **{v: {"variant": v, **PAPER} for v in ("SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-NoS", "DNN")},
    "SASRec": {"variant": "SASRec", "repeat": False},
    "SASRec+repeat": {"variant": "SASRec"},
}
"""Model rows of the table: training settings over the defaults."""


def shared_dir() -> Path:
    """`$SDM_SHARED`, else `../shared` beside the repository root."""
    return Path(os.environ.get("SDM_SHARED") or HERE.parent.parent / "shared")


def load_benchmarks(path: Path) -> dict[str, dict[str, Any]]:
    """Datasets of quality.toml with paths made absolute."""
    with open(path, "rb") as fh:
        sets = tomllib.load(fh)["datasets"]
    for spec in sets.values():
        for key in ("log", "items", "users"):
            if key in spec:
                spec[key] = (path.parent / spec[key]).resolve()
    return sets


def target_rows(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Every number of `TARGETS.md`: {dataset: {method row: {column: value}}} (bold marks dropped)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    dataset, cols = None, []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            dataset, cols = line[3:].strip(), []
        elif dataset and line.startswith("| method"):
            cols = [c.strip().lower() for c in line.strip("|").split("|")]
        elif dataset and cols and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            values = {col: float(v) for col, v in zip(cols[1:], cells[1:], strict=False) if re.fullmatch(r"[0-9.]+", v)}
            out.setdefault(dataset, {})[cells[0]] = values
    return out


def parse_targets(path: Path) -> dict[str, dict[str, tuple[float, str]]]:
    """Best value and method of each `TARGETS.md` column, per dataset: {ds: {"hr@50": (v, method)}}."""
    best: dict[str, dict[str, tuple[float, str]]] = {}
    for dataset, rows in target_rows(path).items():
        for method, values in rows.items():
            for col, v in values.items():
                if col not in best.setdefault(dataset, {}) or v > best[dataset][col][0]:
                    best[dataset][col] = (v, method)
    return best


def sessionize_dataset(name: str, spec: dict[str, Any], work: Path, extra: dict[str, Any] | None = None) -> Path:
    """Shards of one dataset in `work/<name>/data` (rebuilt every run: it takes seconds); `extra`
    sessionize settings go over quality.toml's (e.g. more item features, numeric features)."""
    from sdm.sessionize import run

    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    log = root / "log.parquet"
    df = pl.read_parquet(spec["log"])
    if "user_col" not in spec:  # "each session its own user": hide any user column the log has
        df = df.drop([c for c in ("user_id",) if c in df.columns])
    df.write_parquet(log)
    values: dict[str, Any] = {
        "out": root / "data",
        "overwrite": True,
        "keep_duplicates": True,
        "valid_start": spec["valid_start"],
        "test_start": spec["test_start"],
        "item_features": spec.get("item_features", []),
        "user_features": spec.get("user_features", []),
    }
    for key in ("user_col", "session_col", "items", "users"):
        if key in spec:
            values[key] = spec[key]
    values.update(extra or {})
    run(SessionizeConfig(**values), log, progress=False)
    return root / "data"


def run_model(data: Path, out: Path, seed: int, split: str, train_args: dict[str, Any],
              dump: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train with the defaults over `train_args`, evaluate best.pt on `split` (top-K per query to `dump`)."""
    from sdm.pipeline.train import train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(**{**train_args, "data": data, "out": out, "seed": seed})
    summary = train(cfg, progress=False)
    device = pick_device(cfg.device)
    model = load_model(out, data, read_manifest(data), device)
    m = evaluate_model(model, data, split, KS, device=device, dump_topk=dump, dump_k=max(KS))
    return {**m, "seed": seed, "train_seconds": summary["seconds"], "steps": summary["steps"],
            "epochs": summary["epochs"], "best_valid": summary["best_metric"]}  # fmt: skip


def run_baseline(data: Path, name: str, split: str, dump: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    scorer = build_baseline(name, data, read_manifest(data))
    fit = time.perf_counter() - t0
    m = evaluate_model(scorer, data, split, KS, device="cpu", dump_topk=dump, dump_k=max(KS))
    return {**m, "train_seconds": fit}


def intervals(dumps: dict[str, list[Path]], results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method and headline metric: the paired, user-clustered bootstrap interval of its
    difference to the best OTHER method of the same log (best by mean; seeds averaged per query)."""
    from bootstrap import mean_of_runs, paired_interval, per_query

    out: dict[str, dict[str, Any]] = {}
    for key in HEADLINE:
        metric, k = key.split("@")
        scores = {m: mean_of_runs([per_query(p, int(k)) for p in paths]) for m, paths in dumps.items()}
        means = {m: statistics.fmean(r[key] for r in runs) for m, runs in results.items()}
        for method in dumps:
            others = [m for m in dumps if m != method]
            if not others:
                continue
            best = max(others, key=lambda m: means[m])
            ci = paired_interval(scores[method], scores[best], metric)
            out.setdefault(method, {})[key] = {"vs": best, **ci}
    return out


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ({min(values):.4f}..{max(values):.4f})"


def _delta(ci: dict[str, Any] | None) -> str:
    if not ci:
        return "-"
    return f"{ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] vs {ci['vs']}"


def table(results: dict[str, Any], targets: dict[str, Any], split: str, cis: dict[str, Any] | None = None) -> str:
    """One row per dataset and method: HR@50 and NDCG@50 (mean, min..max over seeds) vs the targets."""
    lines = [
        f"Split: {split}. sdm: mean (min..max) over seeds; target: best row of TARGETS.md (test split).",
        "",
        "Δ: mean difference to the best other method run on the same log, with its paired bootstrap 95% interval",
        "(users resampled, 1000 draws); an interval above 0 is a win beyond noise.",
        "",
        "| dataset | method | HR@50 | target HR@50 | Δ HR@50 [95% CI] | NDCG@50 | target NDCG@50 | Δ NDCG@50 [95% CI] | train s |",
        "|---|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for ds, methods in results.items():
        tgt = targets.get(ds, {})
        for method, runs in methods.items():
            cells = []
            for key in HEADLINE:
                vals = [r[key] for r in runs]
                best = tgt.get(key)
                mark = "" if best is None else (" >=" if statistics.fmean(vals) >= best[0] else " <")
                cells += [spread(vals) + mark, f"{best[0]:.4f} ({best[1]})" if best else "-",
                          _delta(((cis or {}).get(ds) or {}).get(method, {}).get(key))]  # fmt: skip
            secs = statistics.fmean(r["train_seconds"] for r in runs)
            lines.append(f"| {ds} | {method} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="", help="comma list (default: every dataset of quality.toml)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--train-args", type=json.loads, default={}, help='JSON over the training defaults, e.g. \'{"epochs": 20}\'')
    p.add_argument("--methods", default="sdm", help=f"comma list of models ({', '.join(PRESETS)}) and baselines "
                   f"({', '.join(BASELINES)}); default sdm")  # fmt: skip
    p.add_argument("--sessionize-args", type=json.loads, default={},
                   help='JSON over each dataset\'s sessionize settings, e.g. \'{"numeric_features": ["release_year"]}\'')
    p.add_argument("--tag", default="", help="suffix of the result files (quality_<split>_<tag>.md)")
    p.add_argument("--work", type=Path, default=HERE / "out" / "quality")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    shared = shared_dir()
    bench_file = shared / "benchmarks" / "quality.toml"
    if not bench_file.is_file():
        print(f"skipped: {bench_file} not found (set SDM_SHARED to the shared folder)", file=sys.stderr)
        return 0
    sets = load_benchmarks(bench_file)
    targets = parse_targets(shared / "benchmarks" / "TARGETS.md")
    names = [n for n in args.datasets.split(",") if n] or list(sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        print(f"error: unknown dataset(s) {unknown}; quality.toml has {list(sets)}", file=sys.stderr)
        return 1
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in PRESETS and m not in BASELINES]
    if bad:
        print(f"error: unknown method(s) {bad}; models: {list(PRESETS)}; baselines: {list(BASELINES)}", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    cis: dict[str, Any] = {}
    for name in names:
        data = sessionize_dataset(name, sets[name], args.work, args.sessionize_args)
        results[name], dumps = {}, {}
        for method in methods:
            if method in BASELINES:
                dumps[method] = [args.work / name / "dumps" / f"{method}.parquet"]
                results[name][method] = [run_baseline(data, method, args.split, dumps[method][0])]
                continue
            runs = results[name][method] = []
            for seed in seeds:
                out = args.work / name / f"{method}-{seed}"
                dumps.setdefault(method, []).append(args.work / name / "dumps" / f"{method}-{seed}.parquet")
                runs.append(run_model(data, out, seed, args.split, {**PRESETS[method], **args.train_args},
                                      dumps[method][-1]))  # fmt: skip
                r = runs[-1]
                print(f"{name} {method} seed {seed}: hr@50 {r['hr@50']:.4f} ndcg@50 {r['ndcg@50']:.4f} "
                      f"({r['train_seconds']:.0f}s, {r['epochs']} epochs)", file=sys.stderr, flush=True)  # fmt: skip
        cis[name] = intervals(dumps, results[name])
    md = table(results, targets, args.split, cis)
    print(md)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / (f"quality_{args.split}" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".md").write_text(md + "\n")
    meta = {"split": args.split, "seeds": seeds, "methods": methods, "train_args": args.train_args,
            "sessionize_args": args.sessionize_args,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "intervals": cis}, indent=2,
                                                    default=str) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
