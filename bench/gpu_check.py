"""One-shot check of the pipeline on a GPU (or, scaled down, on a CPU): does every stage run
on the device, does bf16 training on it agree with fp32 training on the CPU, and what would
feed the GPU faster.

    python bench/gpu_check.py --device cuda --out runs/gpu_check    # on a GPU machine: < 8 min
    python bench/gpu_check.py --device cpu --small --out /tmp/gc    # everything, tiny: < 1 min (the test)

Flags: --device cpu|cuda|auto (auto: cuda when available), --small, --out DIR, --steps N
(training steps of both runs), --tolerance T, --ddp-procs P. One line per check, `ok` or
`FAIL`, then its numbers; everything in `OUT/gpu_check.json`; exit code 1 when any check
fails (a failed subprocess, metrics beyond the tolerance, a NaN loss, a crash).

Checks, in order (the ones of a group run side by side, as subprocesses):

1. environment: device, torch, CUDA, cuDNN and NCCL versions, GPU name and memory ("cpu").
2. synth, sessionize: `sdm synth` and `sdm sessionize` of the installed CLI
   (`python -m sdm.cli`), on a log large enough to matter on a GPU (cuda: 2M events,
   ~250k items in the vocabulary, half-day valid and test splits; cpu: 200k events,
   ~18k items; --small: 4k events, ~290 items).
3. train | train_cpu_reference: `sdm train --device DEVICE --loss sampled --max-steps N`
   (N = 300 on cuda; bf16 autocast there, as `--amp` defaults) and the same command, same
   seed and steps, with `--device cpu` (fp32). Each train_log.jsonl must hold N steps of
   finite loss and a validation.
4. evaluate | evaluate_cpu_reference | export | torchrun: `sdm evaluate` of each model on
   the test split (the device model on the device), metrics.json; `sdm export` of the
   device model; `python -m torch.distributed.run --standalone --nproc_per_node=P -m sdm.cli
   train ...` for a few steps (P = --ddp-procs, default 1; the trainer picks nccl on cuda,
   gloo on cpu). The trainer joins the process group whenever torchrun launched it, so
   P = 1 already runs the DDP wrapper and its collectives (NCCL on one GPU); P >= 2 needs P GPUs.
5. agreement: |HR@50 difference| and |NDCG@50 difference| between the device run and the
   CPU run on the validation split (last validation of train_log.jsonl) and the test split
   (metrics.json), each <= 0.02 absolute (--tolerance). Why 0.02: bf16 autocast rounds to
   an 8-bit mantissa where the CPU run keeps fp32, and the CUDA generator draws other
   negatives and dropout masks, so the two runs drift apart like two seeds, whose spread
   was measured far below 0.02 (CPU, 200 steps, 18.5k items, seeds 0-2: HR@50 within
   0.0022, NDCG@50 within 0.0052), while a broken CUDA path (a wrong mask, a bf16 overflow,
   a device mix-up) costs more than that. On a CPU both runs are the same fp32 computation
   and agree exactly.
6. throughput (alone, in this process, with the trainer's own `build_run` objects and
   `--loss sampled`; cuda: ~1.07M items, cpu: ~26k, --small: ~5k): training samples/s end
   to end (the trainer's loader, copy, step), model-step samples/s (forward, backward,
   optimizer and the weight average, on batches already on the device: no loader), and
   the share of an end-to-end step spent in `next(loader)` and in the copy to the device.
   From those measured times it says what would feed the device faster: loader workers
   (k >= loader time / rest of the step), pinned memory (copy share >= 5%), prefetch.

The train checks' samples/s run beside the other run; the throughput check's are the ones
to quote. A sample is one (prefix, next item) pair (SPEC section 5), as in train_bench.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import sdm  # noqa: F401  (sets OMP_WAIT_POLICY before torch starts)
import torch

TOLERANCE = 0.02
"""Largest |HR@50| and |NDCG@50| difference between the device and the CPU run (absolute)."""
AGREE_METRICS = ("hr@50", "ndcg@50")
LOADER_SHARE_OK = 0.10
"""Below this share of step time waiting for the loader, the loader is not the bottleneck."""
COPY_SHARE_OK = 0.05
"""Below this share of step time copying batches to the GPU, pinned memory would not pay."""
ITEM_FEATURES = "category,category_l1,brand,shop"
USER_FEATURES = "age,gender,life_stage"


@dataclass(frozen=True)
class Sizes:
    """How big each part of the check is."""

    events: int  # the pipeline's log
    items: int
    valid_days: float
    test_days: float
    steps: int  # training steps of the device run and of the CPU run
    batch_size: int
    embedding_dim: int
    num_negatives: int
    ddp_steps: int
    bench_events: int  # the throughput log: bench_items items, flat popularity so most are seen
    bench_items: int
    bench_zipf: float
    bench_warmup: int
    bench_steps: int


SIZES = {
    # cuda: 2M events -> ~250k items in the vocabulary; 4M events of 1.2M items at zipf 0.3 -> ~1.07M
    "cuda": Sizes(2_000_000, 300_000, 0.5, 0.5, 300, 64, 64, 1000, 5, 4_000_000, 1_200_000, 0.3, 10, 100),
    "cpu": Sizes(200_000, 20_000, 2, 2, 200, 64, 64, 1000, 5, 100_000, 30_000, 0.3, 3, 30),
    "small": Sizes(4_000, 300, 3, 3, 30, 32, 16, 64, 3, 12_000, 8_000, 0.3, 2, 10),
}

COMMANDS: list[str] = []
"""Every command line run, in the order they started (for the JSON)."""
_current = threading.local()
"""The command lines of the check running in this thread."""


class CheckFailed(Exception):
    """A check's verdict is FAIL; `numbers` are what it measured before failing."""

    def __init__(self, message: str, numbers: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.numbers = numbers or {}


# -- running things ---------------------------------------------------------------------


def run_command(cmd: list[str], log: Path, timeout: float = 600) -> float:
    """Run one command line, its output to `log`; seconds taken. A non-zero exit is a CheckFailed."""
    line = shlex.join(cmd)
    COMMANDS.append(line)
    getattr(_current, "commands", []).append(line)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"timed out after {timeout:.0f}s: {line}") from None
    seconds = time.perf_counter() - t
    log.write_text(f"$ {line}\n# exit {r.returncode}, {seconds:.1f}s\n{r.stdout}{r.stderr}")
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        raise CheckFailed(f"exit {r.returncode} ({last}); see {log}", {"seconds": seconds})
    return seconds


def sdm_cli(*args: Any) -> list[str]:
    """The installed CLI, as this interpreter runs it."""
    return [sys.executable, "-m", "sdm.cli", *map(str, args)]


class Checks:
    """Runs checks, prints one line each (in the order started), keeps their results for the JSON.

    `start` runs a check in a thread, so the checks started before a `wait` run side by
    side (their subprocesses do the work); `run` is `start` + `wait`. A check whose
    `needs` did not pass is a FAIL without running.
    """

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.pending: list[tuple[str, Future]] = []
        self.pool = ThreadPoolExecutor(max_workers=4)

    def ok(self, name: str) -> bool:
        return self.results.get(name, {}).get("ok", False)

    def start(self, name: str, fn: Callable[..., dict[str, Any]], *args: Any, needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if not self.ok(n)]
        self.pending.append((name, self.pool.submit(self._one, fn, args, missing)))

    def wait(self) -> None:
        for name, future in self.pending:
            self.results[name] = result = future.result()
            numbers = {k: v for k, v in result.items() if k not in ("ok", "seconds", "detail", "commands", "advice")}
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in numbers.items() if isinstance(v, (int, float, str)))
            print(f"{'ok  ' if result['ok'] else 'FAIL'} {name:22s} {shown} ({result['seconds']:.1f}s)"
                  + (f"  {result['detail']}" if result["detail"] else ""), flush=True)  # fmt: skip
            for line in result.get("advice", []):
                print(f"     {line}", flush=True)
        self.pending = []

    def run(self, name: str, fn: Callable[..., dict[str, Any]], *args: Any, needs: tuple[str, ...] = ()) -> dict[str, Any]:
        self.start(name, fn, *args, needs=needs)
        self.wait()
        return self.results[name]

    @staticmethod
    def _one(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], missing: list[str]) -> dict[str, Any]:
        t = time.perf_counter()
        _current.commands = commands = []
        if missing:
            ok, numbers, detail = False, {}, f"not run: needs {', '.join(missing)}"
        else:
            try:
                ok, numbers, detail = True, fn(*args), ""
            except CheckFailed as exc:
                ok, numbers, detail = False, exc.numbers, str(exc)
            except Exception as exc:  # a crash in the check itself is a failure too, with where it was
                where = traceback.extract_tb(exc.__traceback__)[-1]
                ok, numbers, detail = False, {}, f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
        return {"ok": ok, "seconds": round(time.perf_counter() - t, 2), **numbers, "detail": detail, "commands": commands}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


# -- the checks -------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    """Versions and the device; FAIL when CUDA is asked for and absent, or bf16 is not supported."""
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "device": device,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
        "gpu": "cpu",
        "gpu_memory_gib": 0.0,
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "sdm": sdm.__version__,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                   bf16=torch.cuda.is_bf16_supported(), nccl=_nccl_version())  # fmt: skip
    if device == "cuda" and not cuda:
        raise CheckFailed("--device cuda but torch sees no CUDA device", env)
    if device == "cuda" and not env["bf16"]:
        raise CheckFailed(f"{env['gpu']} has no bf16: the trainer's autocast needs it (pass --no-amp to sdm train)", env)
    return env


def _nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
    except Exception as exc:  # a build without NCCL
        return f"none ({type(exc).__name__})"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def synth(size: Sizes, work: Path) -> dict[str, Any]:
    log = work / "synth" / "logs.parquet"
    s = run_command(sdm_cli("synth", "--out", log, "--events", size.events, "--items", size.items, "--seed", 0,
                            "--overwrite", "-q"), work / "logs" / "synth.log")  # fmt: skip
    return {"events": size.events, "items": size.items, "seconds_cli": s}


def sessionize(work: Path, size: Sizes) -> dict[str, Any]:
    src, data = work / "synth", work / "data"
    s = run_command(sdm_cli("sessionize", src / "logs.parquet", "--out", data, "--items", src / "items.parquet",
                            "--users", src / "users.parquet", "--item-features", ITEM_FEATURES,
                            "--user-features", USER_FEATURES, "--valid-days", size.valid_days,
                            "--test-days", size.test_days, "--overwrite", "-q"),
                    work / "logs" / "sessionize.log")  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    sessions = {k: manifest["splits"][k].get("sessions") for k in ("train", "valid", "test")}
    return {"vocab_items": int(manifest["num_items"]) - 2, **{f"{k}_sessions": v for k, v in sessions.items()}, "seconds_cli": s}


def train_args(size: Sizes, data: Path, out: Path, device: str, steps: int) -> list[Any]:
    """`sdm train` flags shared by the device run, the CPU run and torchrun: only --device and --out differ."""
    return ["train", "--data", data, "--out", out, "--device", device, "--loss", "sampled", "--max-steps", steps,
            "--batch-size", size.batch_size, "--embedding-dim", size.embedding_dim,
            "--num-negatives", size.num_negatives, "--log-every", max(1, steps // 10), "--seed", 0,
            "--overwrite", "-q"]  # fmt: skip


def read_train_log(out: Path, steps: int) -> dict[str, Any]:
    """Steps, losses, rate and the last validation of a train_log.jsonl; CheckFailed on a non-finite loss,
    no validation, or a run that stopped before `steps` (early stopping, too few epochs)."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    valids = [r for r in records if "valid" in r]
    summary = next((r["summary"] for r in records if "summary" in r), {})
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    numbers: dict[str, Any] = {
        "steps": summary.get("steps", 0),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "samples_per_s": rates[-1] if rates else float("nan"),
        "train_seconds": summary.get("seconds", float("nan")),
    }
    if valids:
        numbers.update({f"valid_{m}": valids[-1]["valid"][m] for m in AGREE_METRICS})
        numbers["valid_queries"] = valids[-1]["valid"].get("queries")
    if not losses or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"non-finite loss in {out / 'train_log.jsonl'}", numbers)
    if not valids:
        raise CheckFailed(f"no validation in {out / 'train_log.jsonl'}", numbers)
    if numbers["steps"] != steps:  # the runs compared must have taken the same steps
        raise CheckFailed(f"{numbers['steps']} steps, expected {steps} (stopped: {summary.get('stopped')})", numbers)
    return numbers


def train(work: Path, size: Sizes, device: str, name: str) -> dict[str, Any]:
    out = work / name
    s = run_command(sdm_cli(*train_args(size, work / "data", out, device, size.steps)), work / "logs" / f"{name}.log")
    return {**read_train_log(out, size.steps), "seconds_cli": s}


def evaluate(work: Path, device: str, model: str, name: str) -> dict[str, Any]:
    out = work / name
    s = run_command(sdm_cli("evaluate", "--data", work / "data", "--model", work / model, "--out", out,
                            "--device", device, "--k", "20,50", "--overwrite", "-q"), work / "logs" / f"{name}.log")  # fmt: skip
    method = json.loads((out / "metrics.json").read_text())["methods"][0]
    return {**{f"test_{m}": method[m] for m in AGREE_METRICS}, "seconds_cli": s}


def agreement(device_run: dict[str, Any], cpu_run: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """|device - cpu| of each metric of AGREE_METRICS on valid and test; FAIL above `tolerance`."""
    numbers: dict[str, Any] = {"tolerance": tolerance}
    worse = []
    for split in ("valid", "test"):
        for m in AGREE_METRICS:
            key = f"{split}_{m}"
            diff = abs(device_run[key] - cpu_run[key])
            numbers[f"diff_{key}"] = diff
            if not diff <= tolerance:  # NaN fails too
                worse.append(f"|{key} {device_run[key]:.4f} - {cpu_run[key]:.4f}| = {diff:.4f}")
    if worse:
        raise CheckFailed(f"beyond tolerance {tolerance}: " + "; ".join(worse), numbers)
    return numbers


def export(work: Path) -> dict[str, Any]:
    out = work / "export"
    s = run_command(sdm_cli("export", "--data", work / "data", "--model", work / "train", "--out", out,
                            "--overwrite", "-q"), work / "logs" / "export.log")  # fmt: skip
    files = sorted(p.name for p in out.iterdir())
    if "item_vectors.parquet" not in files:
        raise CheckFailed(f"{out}: no item_vectors.parquet (has {files})")
    return {"files": len(files), "faiss": "items.faiss" in files, "onnx": "user_tower.onnx" in files, "seconds_cli": s}


def torchrun(work: Path, size: Sizes, device: str, procs: int) -> dict[str, Any]:
    out = work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "sdm.cli",
           *map(str, train_args(size, work / "data", out, device, size.ddp_steps))]  # fmt: skip
    s = run_command(cmd, work / "logs" / "torchrun.log", timeout=300)  # a hung process group must not eat the budget
    numbers = read_train_log(out, size.ddp_steps)
    backend = "nccl" if device == "cuda" else "gloo"
    return {"procs": procs, "process_group": backend,  # torchrun joins a group even with one process
            "steps": numbers["steps"], "last_loss": numbers["last_loss"], "seconds_cli": s}  # fmt: skip


def bench_data(work: Path, size: Sizes) -> Path:
    """The throughput log (about 1M items on cuda), made in this process with the library's synth and sessionize."""
    from sdm.config import SessionizeConfig, SynthConfig
    from sdm.logs.synth import generate
    from sdm.sessionize import run as run_sessionize

    src, data = work / "bench_synth" / "logs.parquet", work / "bench_data"
    generate(SynthConfig(out=src, overwrite=True, events=size.bench_events, items=size.bench_items,
                         zipf=size.bench_zipf), progress=False)  # fmt: skip
    run_sessionize(SessionizeConfig(out=data, overwrite=True, items=src.parent / "items.parquet",
                                    item_features=ITEM_FEATURES.split(","), valid_days=1, test_days=1),
                   src, progress=False)  # fmt: skip
    return data


def throughput(work: Path, size: Sizes, device: str) -> dict[str, Any]:
    """Samples/s end to end and of the model step alone, and where an end-to-end step's time goes."""
    from sdm.config import TrainConfig
    from sdm.pipeline.dataset import move_batch
    from sdm.pipeline.train import build_run
    from sdm.pipeline.trainstep import get_lr, train_step

    data = bench_data(work, size)
    cfg = TrainConfig(data=data, device=device, loss="sampled", batch_size=size.batch_size,
                      embedding_dim=size.embedding_dim, num_negatives=size.num_negatives)  # fmt: skip
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as `train` runs its steps
    try:
        run = build_run(cfg, 0, 1, time.time())
        dev = run.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and dev.type == "cuda" else nullcontext()

        def step(batch: dict[str, Any], i: int) -> None:  # what the trainer does per batch, less logging
            train_step(run.model, run.net, run.opt, batch, run.sampler, run.gen, cfg, get_lr(i, cfg, 10_000), autocast,
                       run.loss_kind)  # fmt: skip
            if run.ema is not None:
                run.ema.update(run.model, i)
            sync()

        # end to end: the trainer's loader, timing next() (the wait), the copy and the step apart
        run.dataset.set_epoch(0)
        it = iter(run.loader)
        wait = copy = work_s = 0.0
        n = steps = 0
        for i in range(size.bench_warmup + size.bench_steps):
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            batch = move_batch(batch, dev)
            sync()
            t2 = time.perf_counter()
            step(batch, i)
            t3 = time.perf_counter()
            if i >= size.bench_warmup:
                wait, copy, work_s = wait + t1 - t0, copy + t2 - t1, work_s + t3 - t2
                n, steps = n + samples(batch), steps + 1
        del it
        if not steps:
            raise CheckFailed(f"{data}: not a single timed batch (the training split has too few sessions)")
        total = wait + copy + work_s

        # model step alone: the same number of batches, already on the device
        run.dataset.set_epoch(1)
        cached = [move_batch(b, dev) for _, b in zip(range(steps), run.loader)]
        sync()
        m = sum(samples(b) for b in cached)
        t = time.perf_counter()
        for i, b in enumerate(cached):
            step(b, size.bench_warmup + steps + i)
        model_s = time.perf_counter() - t
    finally:
        torch.use_deterministic_algorithms(was_deterministic)

    shards = len(run.manifest["splits"]["train"]["shards"])
    numbers = {
        "vocab_items": int(run.manifest["num_items"]) - 2,
        "loss": run.loss_kind,
        "autocast": "bf16" if not isinstance(autocast, nullcontext) else "off",
        "timed_steps": steps,
        "train_samples_per_s": n / total,
        "model_step_samples_per_s": m / model_s,
        "loader_alone_samples_per_s": n / max(wait, 1e-9),
        "loader_share": wait / total,
        "copy_share": copy / total,
        "step_share": work_s / total,
    }
    if dev.type == "cuda":
        numbers["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    numbers["advice"] = feed_advice(wait, copy, work_s, dev.type, shards, cfg.num_workers)
    return numbers


def samples(batch: dict[str, Any]) -> int:
    """(prefix, next item) pairs of a batch."""
    return int((batch["seq_len"] - 1).clamp(min=0).sum())


def feed_advice(wait: float, copy: float, step: float, device: str, shards: int, workers: int) -> list[str]:
    """What would feed the device faster, from the measured seconds of waiting, copying and stepping.

    k loader workers produce k batches in the time one worker (what was measured, in this
    process) takes for one, so the loader keeps up once k >= wait / (copy + step).
    """
    total = wait + copy + step
    lines = []
    if wait / total < LOADER_SHARE_OK:
        lines.append(f"loader: {wait / total:.0%} of a step waiting for it (< {LOADER_SHARE_OK:.0%}): it keeps up; nothing to change")
    else:
        k = math.ceil(wait / max(copy + step, 1e-9)) + 1
        cores = max((os.cpu_count() or 2) - 1, 1)
        k = min(k, cores)
        lines.append(
            f"loader: {wait / total:.0%} of a step waiting for it (>= {LOADER_SHARE_OK:.0%}, num_workers={workers}): "
            f"`sdm train --num-workers {k}` (loader time / rest of the step = {wait / max(copy + step, 1e-9):.1f}, "
            f"+1 spare, at most {cores} cores); it needs >= {k} training shards per rank (this data has {shards}; "
            f"`sdm sessionize --min-shards`); each worker already prefetches 2 batches (DataLoader prefetch_factor), "
            "raise that only if the wait stays uneven"
        )
    if device == "cuda":
        if copy / total >= COPY_SHARE_OK:
            lines.append(
                f"copy: {copy / total:.0%} of a step copying the batch to the GPU (>= {COPY_SHARE_OK:.0%}): pinned memory "
                "(DataLoader(pin_memory=True), not a TrainConfig option: pipeline/train.py build_run would need it) "
                "makes move_batch's non_blocking copies asynchronous"
            )
        else:
            lines.append(f"copy: {copy / total:.0%} of a step copying to the GPU (< {COPY_SHARE_OK:.0%}): pinned memory would not pay")
    return lines


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    ap.add_argument("--small", action="store_true", help="tiny sizes: the whole check in well under a minute on a CPU")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="directory: gpu_check.json, logs/, the runs")
    ap.add_argument("--steps", type=int, help="training steps of the device and the CPU run (default: 300 cuda, 200 cpu, 30 small)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"largest |HR@50|, |NDCG@50| difference (default {TOLERANCE})")
    ap.add_argument("--ddp-procs", type=int, default=1, help="processes of the torchrun check (2+ runs DDP)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES["small" if args.small else device]
    if args.steps:
        size = Sizes(**{**asdict(size), "steps": args.steps})
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    COMMANDS.clear()
    print(f"gpu_check: device {device}, {'small' if args.small else 'full'} sizes, tolerance {args.tolerance} -> {args.out}", flush=True)

    c = Checks()
    env = c.run("environment", environment, device)
    if env["ok"]:
        c.run("synth", synth, size, work)
        c.run("sessionize", sessionize, work, size, needs=("synth",))
        # the device run and the CPU run side by side, then everything that reads their models
        c.start("train", train, work, size, device, "train", needs=("sessionize",))
        c.start("train_cpu_reference", train, work, size, "cpu", "train_cpu_reference", needs=("sessionize",))
        c.wait()
        c.start("evaluate", evaluate, work, device, "train", "evaluate", needs=("train",))
        c.start("evaluate_cpu_reference", evaluate, work, "cpu", "train_cpu_reference", "evaluate_cpu_reference",
                needs=("train_cpu_reference",))  # fmt: skip
        c.start("export", export, work, needs=("train",))
        c.start("torchrun", torchrun, work, size, device, args.ddp_procs, needs=("sessionize",))
        c.wait()
        c.run("agreement", agreement, {**c.results["train"], **c.results["evaluate"]},
              {**c.results["train_cpu_reference"], **c.results["evaluate_cpu_reference"]}, args.tolerance,
              needs=("evaluate", "evaluate_cpu_reference"))  # fmt: skip
        c.run("throughput", throughput, work, size, device)  # alone: nothing else competes for the device

    c.pool.shutdown()
    ok = all(r["ok"] for r in c.results.values())
    result = {
        "ok": ok,
        "device": device,
        "small": args.small,
        "environment": {k: v for k, v in env.items() if k not in ("ok", "seconds", "detail", "commands")},
        "sizes": asdict(size),
        "tolerance": {"abs": args.tolerance, "metrics": list(AGREE_METRICS), "splits": ["valid", "test"],
                      "why": "bf16 autocast vs fp32 numerics (and the CUDA generator's own negatives and dropout) make "
                             "the runs differ like two seeds, measured within 0.0022 HR@50 / 0.0052 NDCG@50 on CPU, far "
                             "below 0.02; a broken CUDA path costs more"},
        "checks": c.results,
        "commands": list(COMMANDS),
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    failed = [n for n, r in c.results.items() if not r["ok"]]
    print(f"{'ok' if ok else 'FAIL'}: {len(c.results) - len(failed)}/{len(c.results)} checks passed"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''} in {result['seconds']:.0f}s -> {path}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
