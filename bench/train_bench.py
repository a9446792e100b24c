"""Training throughput on CPU: loader vs model step vs end to end, per-variant epoch
time, and time to the best validation HR@50 with default settings.

    python bench/train_bench.py                      # MovieLens-100K from ../shared (sessionized here)
    python bench/train_bench.py --data runs/data     # any shard directory

All rates are samples per second (a sample is one (prefix, next item) pair of SPEC
section 5). Machines here are noisy, so the verdicts are ratios measured in the same
run: end to end / model step alone (target >= 0.9: the loader is never the
bottleneck), and resident memory at the end of each loader epoch relative to the first
(target: flat). Results go to stdout (Markdown) and `bench/results/train.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import sdm  # noqa: F401  (sets OMP_WAIT_POLICY before torch starts)
import torch

from sdm.config import SessionizeConfig, TrainConfig
from sdm.model.loss import NegativeSampler
from sdm.pipeline.baselines import build_baseline
from sdm.pipeline.dataset import SessionDataset, read_manifest
from sdm.pipeline.ranking import evaluate_model
from sdm.pipeline.modelspec import build_model, build_model_config, model_features, resolve_loss
from sdm.pipeline.metrics import selection_value
from sdm.pipeline.tables import load_item_counts
from sdm.pipeline.train import train
from sdm.pipeline.trainstep import get_lr, train_step

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDM_SHARED", ROOT.parent / "shared"))
VARIANTS = ["SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS", "DNN"]


def rss_mb() -> float:
    """Resident set size of this process, MiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def samples(batch: dict) -> int:
    return int((batch["seq_len"] - 1).clamp(min=0).sum())


def ml100k_data(work: Path) -> Path:
    """Sessionize MovieLens-100K from ../shared/datasets into `work` (once)."""
    out = work / "ml100k"
    if (out / "manifest.json").exists():
        return out
    src = SHARED / "datasets" / "movielens_100k"
    if not src.is_dir():
        sys.exit(f"{src} is absent: pass --data DIR (a shard directory) instead")
    from sdm.sessionize import run

    cfg = SessionizeConfig(
        out=out, overwrite=True, users=src / "users.parquet", user_features=["age", "gender", "occupation"]
    )
    run(cfg, src / "interactions.parquet", progress=False)
    return out


class Setup:
    """A model, optimizer and sampler for one variant, as the trainer builds them."""

    def __init__(self, cfg: TrainConfig) -> None:
        m = read_manifest(cfg.data)
        self.cfg = cfg
        self.manifest = m
        mc = build_model_config(cfg, m)
        torch.manual_seed(cfg.seed)
        self.model = build_model(mc, cfg.data, m)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = NegativeSampler(load_item_counts(cfg.data, m), cfg.num_negatives, cfg.neg_power)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.items, self.users = model_features(m, cfg)
        self.loss = resolve_loss(cfg.loss, int(m["num_items"]), cfg.batch_size, int(m["max_session_len"]))

    def dataset(self) -> SessionDataset:
        c = self.cfg
        return SessionDataset(c.data, "train", c.batch_size, self.items, self.users, shuffle_buffer=c.shuffle_buffer)

    def step(self, batch: dict, step: int) -> None:
        train_step(self.model, self.model, self.opt, batch, self.sampler, self.gen, self.cfg,
                   get_lr(step, self.cfg, 10_000), nullcontext(), self.loss)  # fmt: skip


def loader_rate(setup: Setup, epochs: int) -> tuple[float, list[float]]:
    """(a) samples/s of the data loader alone, and RSS after each epoch."""
    ds, n, t, mem = setup.dataset(), 0, time.perf_counter(), []
    for e in range(epochs):
        ds.set_epoch(e)
        n += sum(samples(b) for b in ds)
        mem.append(rss_mb())
    return n / (time.perf_counter() - t), mem


def step_and_e2e(setup: Setup, n_batches: int, rounds: int = 2) -> tuple[float, float]:
    """(b) samples/s of train steps on batches already in memory, (c) the same steps fed
    by the loader. Both see the same batches (epoch 0), alternating `rounds` times; the
    best round of each counts, so a burst of load from other jobs hits neither alone."""
    ds = setup.dataset()
    ds.set_epoch(0)
    cached = [b for _, b in zip(range(n_batches), ds)]
    n = sum(samples(b) for b in cached)
    setup.step(cached[0], 0)  # warm-up (allocator, kernels)
    best_b = best_c = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for i, b in enumerate(cached):
            setup.step(b, i)
        best_b = max(best_b, n / (time.perf_counter() - t))
        t = time.perf_counter()
        for i, b in zip(range(n_batches), ds):  # a fresh pass over epoch 0: the same batches
            setup.step(b, i)
        best_c = max(best_c, n / (time.perf_counter() - t))
    return best_b, best_c


def epoch_seconds(data: Path, variant: str, args: argparse.Namespace) -> tuple[float, int]:
    """Wall time of one full training epoch (loader + steps) of a variant."""
    setup = Setup(TrainConfig(data=data, variant=variant, **args.train_args))
    ds = setup.dataset()
    t, n = time.perf_counter(), 0
    for i, b in enumerate(ds):
        setup.step(b, i)
        n += samples(b)
    return time.perf_counter() - t, n


def time_to_best(data: Path, work: Path, args: argparse.Namespace) -> dict:
    """`sdm train` with default settings: wall time to the validation the trainer kept as best.pt, against item-CF."""
    out = work / "model_default"
    cfg = TrainConfig(data=data, out=out, overwrite=True, **args.train_args)
    summary = train(cfg, progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    vals = [x for x in log if "valid" in x]
    # the first validation with the best value, as the trainer keeps it
    best = max(vals, key=lambda x: (selection_value(x["valid"], cfg.select_metric, cfg.eval_k), -x["step"]))
    cf = evaluate_model(build_baseline("itemcf", data), data, "valid", [50])
    cfr = evaluate_model(build_baseline("itemcf-repeat", data), data, "valid", [50])
    return {
        "best_valid_hr@50": best["valid"]["hr@50"],
        "best_valid_ndcg@50": best["valid"]["ndcg@50"],
        "best_epoch": best["epoch"],
        "seconds_to_best": best["seconds"],
        "total_seconds": summary["seconds"],
        "epochs_run": summary["epochs"],
        "itemcf_valid_hr@50": cf["hr@50"],
        "itemcf_repeat_valid_hr@50": cfr["hr@50"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="shard directory (default: MovieLens-100K sessionized here)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "train")
    ap.add_argument("--batches", type=int, default=40, help="batches timed for (b) and (c)")
    ap.add_argument("--loader-epochs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--train-args", type=json.loads, default={}, help='JSON overrides, e.g. \'{"batch_size": 64}\'')
    ap.add_argument("--skip-time-to-best", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data or ml100k_data(args.work)
    res: dict = {"data": str(data), "threads": torch.get_num_threads(), "train_args": args.train_args}

    setup = Setup(TrainConfig(data=data, **args.train_args))
    res["loader_samples_per_s"], mem = loader_rate(setup, args.loader_epochs)
    res["rss_mb_per_loader_epoch"] = mem
    res["step_samples_per_s"], res["e2e_samples_per_s"] = step_and_e2e(setup, args.batches)
    res["e2e_over_step"] = res["e2e_samples_per_s"] / res["step_samples_per_s"]
    res["rss_last_over_first"] = mem[-1] / mem[0]
    res["variants"] = {}
    for v in args.variants.split(","):
        sec, n = epoch_seconds(data, v, args)
        res["variants"][v] = {"epoch_seconds": sec, "samples": n, "samples_per_s": n / sec}
    base = res["variants"].get("PSDMMAL-N", next(iter(res["variants"].values())))["epoch_seconds"]
    for v in res["variants"].values():
        v["relative_to_full"] = v["epoch_seconds"] / base
    if not args.skip_time_to_best:
        res["time_to_best"] = time_to_best(data, args.work, args)

    print(f"data {data}, {res['threads']} torch threads, overrides {args.train_args or 'none'}\n")
    print("| measure | samples/s | ratio |\n|---|---:|---:|")
    print(f"| (a) loader alone | {res['loader_samples_per_s']:,.0f} | {res['loader_samples_per_s'] / res['step_samples_per_s']:.1f}x step |")
    print(f"| (b) train step, batches in memory | {res['step_samples_per_s']:,.0f} | 1.00 |")
    print(f"| (c) end to end | {res['e2e_samples_per_s']:,.0f} | {res['e2e_over_step']:.2f} of step |")
    print(f"\nRSS after each loader epoch (MiB): {', '.join(f'{m:.0f}' for m in mem)} "
          f"(last / first {res['rss_last_over_first']:.3f})\n")  # fmt: skip
    print("| variant | epoch s | samples/s | epoch time / PSDMMAL-N |\n|---|---:|---:|---:|")
    for name, v in res["variants"].items():
        print(f"| {name} | {v['epoch_seconds']:.1f} | {v['samples_per_s']:,.0f} | {v['relative_to_full']:.2f} |")
    if "time_to_best" in res:
        t = res["time_to_best"]
        print(
            f"\ndefault `sdm train`: best.pt's valid HR@50 {t['best_valid_hr@50']:.4f} / NDCG@50 "
            f"{t['best_valid_ndcg@50']:.4f} at epoch {t['best_epoch']} after "
            f"{t['seconds_to_best']:.0f}s ({t['epochs_run']} epochs, {t['total_seconds']:.0f}s in all); "
            f"item-CF {t['itemcf_valid_hr@50']:.4f}, repeat-aware item-CF {t['itemcf_repeat_valid_hr@50']:.4f}"
        )
    out = ROOT / "bench" / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
