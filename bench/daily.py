"""Daily retraining, replayed: from scratch every day against a warm start on the newest day.

    python bench/daily.py --dataset yoochoose_rsc15_100k           # a shared 7-day log
    python bench/daily.py --dataset synth --synth-days 14           # a synthetic 14-day log with an items table

A retriever is retrained every day. For each day d of the log (from
`--first-day` on, the day before the last), with day d as validation and day
d+1 as the test:

    (a) scratch   `sdm sessionize` of every day <= d+1, `sdm train` from random weights
                  on every day before d;
    (b) warm      `sdm sessionize` of the last 7 days before d plus d and d+1 with
                  `--train-start` d-1 (training samples from the newest day only,
                  `--history-days` widens it; the earlier days only fill long-term
                  windows) and `--vocab-from` yesterday's (b) data, then
                  `sdm train --init-from` yesterday's (b) model (day one: (a)'s);

With `--full-every N` every Nth day of the chain is a full day instead: (b)
sessionizes every day (training samples from all of them) and trains from
yesterday's model with `--full-train-args`, as a periodic pass over the whole
history would. `--last-day` ends the replay early.

Both are evaluated on day d+1 (`sdm evaluate --candidates catalogue` when the
data has a catalogue: HR@50 / NDCG@50 over all targets and over cold targets,
items training never saw). Each day prints both rows, the training seconds and
the ratios (b)/(a); the last lines average the days. The targets: (b) reaches
at least 99% of (a)'s HR@50 and NDCG@50 averaged over days, in at most a third
of its training time. Results go to bench/results/daily_<dataset>.json.

`shared/` is found at `$SDM_SHARED` or `../shared` beside the repository;
without it a shared dataset is skipped with a message (synth needs nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "daily"
DAY = dt.timedelta(days=1)
WINDOW = dt.timedelta(days=7)
"""The long-term window: the warm run's log reaches this far before its first training day."""
SHARED_LOGS = {
    "yoochoose_rsc15_100k": {"log": "datasets/yoochoose_rsc15_100k/interactions.parquet", "session_col": "session_id",
                             "user_col": "none"},
    "rees46_sample": {"log": "datasets/rees46_ecommerce_sample/interactions.parquet", "user_col": "user_id",
                      "session_col": "session_id", "item_features": ["category_id", "brand"]},
}  # fmt: skip


def shared_dir() -> Path | None:
    for cand in (os.environ.get("SDM_SHARED"), HERE.parent.parent / "shared"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def source(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The log of the replay and its sessionize settings (columns, features, items table)."""
    if args.dataset == "synth":
        from sdm.config import SynthConfig
        from sdm.logs.synth import generate

        log = OUT / log_name(args) / "logs.parquet"
        if not log.exists():
            cfg = SynthConfig(out=log, events=args.synth_events, days=args.synth_days, users=args.synth_users,
                              items=args.synth_items, seed=0)  # fmt: skip
            generate(cfg, progress=False)
        return log, {"items": log.parent / "items.parquet"}
    shared = shared_dir()
    if shared is None:
        print(f"skipped: {args.dataset} needs shared/ ($SDM_SHARED or ../shared); it is not there", file=sys.stderr)
        sys.exit(0)
    spec = dict(SHARED_LOGS[args.dataset])
    log = shared / spec.pop("log")
    if spec.get("user_col") == "none":  # each session its own user: read the log without a user column
        spec.pop("user_col")
        plain = OUT / args.dataset / "log.parquet"
        if not plain.exists():
            plain.parent.mkdir(parents=True, exist_ok=True)
            pl.read_parquet(log).drop("user_id", strict=False).write_parquet(plain)
        log = plain
    return log, spec


def day_slice(log: Path, lo: dt.datetime, hi: dt.datetime, dest: Path, time_col: str = "timestamp") -> Path:
    """The events of [lo, hi) as their own Parquet file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    pl.scan_parquet(log).filter((pl.col(time_col) >= lo) & (pl.col(time_col) < hi)).sink_parquet(dest)
    return dest


def sessionize(log: Path, out: Path, spec: dict[str, Any], valid: dt.datetime, test: dt.datetime,
               vocab_from: Path | None, train_start: dt.datetime | None = None) -> dict[str, Any]:  # fmt: skip
    from sdm.config import SessionizeConfig
    from sdm.sessionize import run

    cfg = SessionizeConfig(out=out, overwrite=True, valid_start=valid, test_start=test, vocab_from=vocab_from,
                           train_start=train_start, **spec)  # fmt: skip
    return run(cfg, log, progress=False)


def train(data: Path, out: Path, args: argparse.Namespace, init_from: Path | None, full: bool = False) -> float:
    from sdm.config import TrainConfig
    from sdm.pipeline.train import train as run_train

    extra = json.loads(args.train_args)
    own = args.full_train_args if full else args.warm_train_args
    if init_from is not None and own:  # the warm (or full) run's own settings on top
        extra.update(json.loads(own))
    cfg = TrainConfig(data=data, out=out, overwrite=True, seed=args.seed, init_from=init_from, **extra)
    kept = kept_seconds(out, cfg) if init_from is None and args.keep_scratch else None
    if kept is not None:
        return kept
    t0 = time.perf_counter()
    run_train(cfg, progress=False)
    return time.perf_counter() - t0


def kept_seconds(out: Path, cfg: Any) -> float | None:
    """The training seconds of a finished scratch run in `out` with the same settings (`--keep-scratch`), else None."""
    try:
        saved = json.loads((out / "config.json").read_text())
        lines = (out / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return None
    now = json.loads(cfg.model_dump_json())
    defaults = json.loads(type(cfg)(data=cfg.data, out=cfg.out).model_dump_json())
    # a setting newer than the kept run counts as the same when this run leaves it at its default
    same = all(saved.get(k, defaults[k]) == v for k, v in now.items()) and saved.keys() <= now.keys()
    summary = json.loads(lines[-1]).get("summary") if lines else None
    return float(summary["seconds"]) if same and summary else None


def validation(model: Path) -> dict[str, float] | None:
    """HR@50 / NDCG@50 of a trained model on its validation split (day d), from its train_log:
    the row of the neighbour weight training chose, else the best validation. Recipes are
    compared on these, never on the test day."""
    try:
        records = [json.loads(x) for x in (model / "train_log.jsonl").read_text().splitlines() if x.strip()]
    except OSError:
        return None
    for r in records:
        if "neighbours" in r:
            chosen = next(row for row in r["neighbours"]["rows"] if row["weight"] == r["neighbours"]["weight"])
            return {"hr@50": chosen["hr"], "ndcg@50": chosen["ndcg"]}
    valid = [r["valid"] for r in records if "valid" in r]
    best = max(valid, key=lambda v: v["hr@50"] + v["ndcg@50"], default=None)
    return None if best is None else {"hr@50": best["hr@50"], "ndcg@50": best["ndcg@50"]}


def evaluate(data: Path, model: Path, out: Path) -> dict[str, float]:
    from sdm.config import EvaluateConfig
    from sdm.pipeline.dataset import read_manifest
    from sdm.pipeline.evaluate import evaluate as run_eval

    candidates = "catalogue" if read_manifest(data).get("catalogue") else "vocabulary"
    cfg = EvaluateConfig(data=data, model=model, out=out, overwrite=True, k=[50], candidates=candidates)
    report = run_eval(cfg)["report"]
    method = report["methods"][0]
    row = {"candidates": candidates, "queries": report.get("queries")}
    for key in ("hr@50", "ndcg@50"):
        row[key] = method.get(key)
        for part in ("cold", "warm"):
            row[f"{part}_{key}"] = ((method.get("targets") or {}).get(part) or {}).get(key)
    return row


def log_name(args: argparse.Namespace) -> str:
    """The replayed log's name: the shared dataset's, or the synthetic log's with every setting that shapes it."""
    if args.dataset != "synth":
        return args.dataset
    users = f"_{args.synth_users}u" if args.synth_users else ""
    items = f"_{args.synth_items}i" if args.synth_items else ""
    return f"synth_{args.synth_days}d_{args.synth_events}e{users}{items}"


def workdir(args: argparse.Namespace) -> Path:
    """Where a replay's days live: one folder per log and seed, so kept scratch runs of several seeds coexist."""
    return OUT / (log_name(args) if args.seed == 0 else f"{log_name(args)}_seed{args.seed}")


def replay(args: argparse.Namespace) -> list[dict[str, Any]]:
    log, spec = source(args)
    times = pl.scan_parquet(log).select(pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi"))
    lo, hi = times.collect().row(0)
    start = dt.datetime(lo.year, lo.month, lo.day, tzinfo=dt.timezone.utc)
    days = (hi - start) // DAY  # whole days: a partial last day would make a test of a few queries
    work = workdir(args)
    rows, prev_data, prev_model = [], None, None
    last = days - 2 if args.last_day is None else min(days - 2, args.last_day)
    for d in range(args.first_day, last + 1):  # the test day d + 1 is the last whole day at most
        valid, test, end = start + d * DAY, start + (d + 1) * DAY, start + (d + 2) * DAY
        a_log = day_slice(log, start, end, work / f"day{d}" / "a_log.parquet")
        a_data, a_model = work / f"day{d}" / "a_data", work / f"day{d}" / "a_model"
        if not (args.keep_scratch and (a_data / "manifest.json").exists()):
            sessionize(a_log, a_data, spec, valid, test, None)
        a_s = train(a_data, a_model, args, None)
        a = evaluate(a_data, a_model, work / f"day{d}" / "a_eval")
        if prev_data is None:  # day one: the warm chain starts from the scratch run
            prev_data, prev_model = a_data, a_model
            rows.append({"day": d, "scratch": a, "scratch_s": a_s})
            print(f"day {d}: scratch hr@50 {a['hr@50']:.4f} ndcg@50 {a['ndcg@50']:.4f} ({a_s:.1f}s); warm chain starts here")
            continue
        full = bool(args.full_every) and len(rows) % args.full_every == 0  # len(rows): the chain's days so far
        train_start = start if full else valid - args.history_days * DAY
        b_log = day_slice(log, max(start, train_start - WINDOW), end, work / f"day{d}" / "b_log.parquet")
        b_data, b_model = work / f"day{d}" / "b_data", work / f"day{d}" / "b_model"
        sessionize(b_log, b_data, spec, valid, test, prev_data, train_start)
        b_s = train(b_data, b_model, args, prev_model, full)
        b = evaluate(b_data, b_model, work / f"day{d}" / "b_eval")
        prev_data, prev_model = b_data, b_model
        row = {"day": d, "recipe": "full" if full else "warm", "scratch": a, "scratch_s": a_s, "warm": b, "warm_s": b_s,
               "valid": {"scratch": validation(a_model), "warm": validation(b_model)},
               "ratio": {k: (b[k] / a[k] if a[k] else None) for k in ("hr@50", "ndcg@50")}, "time_ratio": b_s / a_s}  # fmt: skip
        rows.append(row)
        print(
            f"day {d}: scratch hr@50 {a['hr@50']:.4f} ndcg@50 {a['ndcg@50']:.4f} ({a_s:.1f}s) | {row['recipe']} hr@50 "
            f"{b['hr@50']:.4f} ndcg@50 {b['ndcg@50']:.4f} ({b_s:.1f}s) | ratios {row['ratio']['hr@50']:.3f} "
            f"{row['ratio']['ndcg@50']:.3f} time {row['time_ratio']:.2f}"
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Averages over the days that have both runs: the metrics, their ratio and the time ratio."""
    both = [r for r in rows if "warm" in r]
    if not both:
        return {}
    out: dict[str, Any] = {"days": len(both)}
    for key in ("hr@50", "ndcg@50", "cold_hr@50", "cold_ndcg@50"):
        a = [r["scratch"][key] for r in both if r["scratch"].get(key) is not None]
        b = [r["warm"][key] for r in both if r["warm"].get(key) is not None]
        if a and b:
            out[key] = {"scratch": statistics.mean(a), "warm": statistics.mean(b), "ratio": statistics.mean(b) / statistics.mean(a) if statistics.mean(a) else None}  # fmt: skip
    vs = [r["valid"] for r in both if (r.get("valid") or {}).get("scratch") and r["valid"].get("warm")]
    if vs:  # the ratios on the validation days, which recipes are chosen on
        out["valid_ratio"] = {
            k: statistics.mean(v["warm"][k] for v in vs) / statistics.mean(v["scratch"][k] for v in vs) for k in ("hr@50", "ndcg@50")
        }  # fmt: skip
    out["scratch_s"] = statistics.mean(r["scratch_s"] for r in both)
    out["warm_s"] = statistics.mean(r["warm_s"] for r in both)
    out["time_ratio"] = out["warm_s"] / out["scratch_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="yoochoose_rsc15_100k", choices=[*SHARED_LOGS, "synth"])
    parser.add_argument("--first-day", type=int, default=3, help="the first day d replayed (days before it only train)")
    parser.add_argument("--history-days", type=int, default=1, help="training days the warm run reads (1: the newest only)")
    parser.add_argument("--train-args", default="{}", help="TrainConfig fields as JSON, for both runs (default: sdm's defaults)")
    parser.add_argument("--warm-train-args", default="", help="TrainConfig fields as JSON over --train-args, warm runs only")
    parser.add_argument("--last-day", type=int, default=None, help="the last day d replayed (default: the day before the last whole day)")
    parser.add_argument("--full-every", type=int, default=0,
                        help="every Nth day of the warm chain reads every day with --full-train-args (0: never)")
    parser.add_argument("--full-train-args", default="", help="TrainConfig fields as JSON over --train-args, those full days only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synth-days", type=int, default=14)
    parser.add_argument("--synth-events", type=int, default=300_000)
    parser.add_argument("--synth-users", type=int, default=None, help="synthetic users (default: sdm synth's, events // 50)")
    parser.add_argument("--synth-items", type=int, default=None, help="synthetic items (default: sdm synth's, events // 25)")
    parser.add_argument("--keep-scratch", action="store_true",
                        help="reuse the scratch runs of an earlier replay with the same settings (their measured seconds)")
    parser.add_argument("--tag", default="", help="suffix of the results file (daily_<dataset>_<tag>.json)")
    args = parser.parse_args()
    if args.last_day is not None and args.last_day < args.first_day:
        parser.error(f"--last-day {args.last_day} is before --first-day {args.first_day}")
    if args.full_every < 0:
        parser.error(f"--full-every {args.full_every} must be 0 (never) or more")

    if not args.keep_scratch:
        shutil.rmtree(workdir(args), ignore_errors=True)
    rows = replay(args)
    s = summary(rows)
    if s:
        print(
            f"mean over {s['days']} days: hr@50 scratch {s['hr@50']['scratch']:.4f} warm {s['hr@50']['warm']:.4f} "
            f"({s['hr@50']['ratio']:.3f}x); ndcg@50 scratch {s['ndcg@50']['scratch']:.4f} warm "
            f"{s['ndcg@50']['warm']:.4f} ({s['ndcg@50']['ratio']:.3f}x); training {s['warm_s']:.1f}s vs "
            f"{s['scratch_s']:.1f}s ({s['time_ratio']:.2f}x)"
        )
        if "valid_ratio" in s:
            print(f"validation days: hr@50 {s['valid_ratio']['hr@50']:.3f}x, ndcg@50 {s['valid_ratio']['ndcg@50']:.3f}x")
    result = {"dataset": args.dataset, "args": vars(args), "days": rows, "summary": s}
    path = HERE / "results" / f"daily_{args.dataset}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
