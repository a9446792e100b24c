"""`sdm train`: one plain training loop over the streaming dataset.

`train` reads as its named steps: `build_run` (distributed, device, data,
model, with `--init-from` the previous model's weights, optimizer, step plan),
`start` (a fresh run clears the old files; a resumed one loads last.pt; with
`--distill-weight` the frozen previous model is built), then
per epoch `train_epoch` (batches -> lr from `get_lr(step)` -> forward/loss ->
backward -> clip -> step -> log, last.pt every `checkpoint_every` steps) and
`end_epoch` (validate HR@K with the same code as `sdm evaluate`, keep best.pt,
early stop), and `summarise`.

Runs in one process or under `torchrun` (DDP: gloo on CPU, NCCL on GPU). Each
rank reads its own shards; every rank runs the same number of steps per epoch
(the smallest rank's, from `plan_epoch_steps`), so no rank waits for or
diverges from another; rank 0 alone validates and writes.

The parts live beside this loop: the optimisation step (`get_lr`, `train_step`,
`WeightAverage`) in `sdm.pipeline.trainstep`, the ranks and the step plan in
`sdm.pipeline.stepplan`, and the run's state and its files in --out (`Run`,
`Progress`, `claim_out`, `save`, `resume`) in `sdm.pipeline.runstate`, and the term that
keeps the previous model's scores in `sdm.pipeline.distill`.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sdm.config import TrainConfig
from sdm.configfile import save_config
from sdm.errors import ConfigError, DataError, SdmError
from sdm.model.loss import NegativeSampler
from sdm.model.sdm import SDM
from sdm.pipeline.checkpoint import atomic_save, read_checkpoint
from sdm.pipeline.dataset import (
    SessionDataset,
    move_batch,
    read_manifest,
)
from sdm.pipeline.choices import check_choice_flags, choose_after_training, needs_choices
from sdm.pipeline.device import pick_device
from sdm.pipeline.distill import build_teacher
from sdm.pipeline.newrows import new_item_pace
from sdm.manifest import oov_warnings, verify_files
from sdm.pipeline.trainlog import TrainLog, check_tensorboard
from sdm.outputs import OutputDir, atomic_path
from sdm.pipeline.metrics import selection_value
from sdm.pipeline.modelspec import NO_SIDE_INFO_VARIANTS, build_model, build_model_config, model_features, resolve_loss
from sdm.pipeline.runstate import Progress, Run, claim_out, resume, save
from sdm.pipeline.stepplan import plan_epoch_steps, setup_distributed, trainable_sessions
from sdm.pipeline.tables import load_item_counts
from sdm.pipeline.trainstep import WeightAverage, get_lr, train_step
from sdm.pipeline.warmstart import WarmStart, check_warm_only, load_moments, warm_start


# -- building the run ------------------------------------------------------------------


def check_eval_k(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """Validation ranks the whole catalogue: an --eval-k the user set must not exceed it.

    The default (50) on a smaller catalogue is kept: every item is then in the top K,
    as `sdm evaluate` reports it.

    Raises:
        ConfigError: an explicit --eval-k larger than the number of items.
    """
    catalogue = int(manifest["num_items"]) - 2
    if "eval_k" in cfg.model_fields_set and cfg.eval_k > catalogue:
        raise ConfigError(f"--eval-k {cfg.eval_k} is larger than the catalogue of {cfg.data} ({catalogue} items)")


def build_run(cfg: TrainConfig, rank: int, world: int, t0: float) -> Run:
    """Data, model, optimizer, loader and step plan, after checking that training can start.

    Raises:
        SdmError: an empty training or validation split, more loader workers than shards.
    """
    manifest = read_manifest(cfg.data)
    if cfg.verify and rank == 0:
        verify_files(cfg.data, manifest)
    check_eval_k(cfg, manifest)
    check_choice_flags(cfg, manifest)
    check_warm_only(cfg)
    if rank == 0:
        for line in oov_warnings({"valid": manifest["splits"]["valid"]}):
            print(f"warning: {line}; validation (best.pt, early stopping) sees the rest", file=sys.stderr)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    model_cfg = build_model_config(cfg, manifest)
    if rank == 0 and cfg.variant not in NO_SIDE_INFO_VARIANTS and len(model_cfg.item_vocab) == 1:
        print(f"note: {cfg.data} has no item side info; {cfg.variant} uses item ids only", file=sys.stderr)
    counts = trainable_sessions(cfg.data, manifest)
    if not sum(counts):
        raise SdmError(
            f"{cfg.data}: the training split has no session of 2 or more events, so there is nothing to learn "
            "(check the split cutoffs and --max-session-len of sessionize)"
        )
    if not manifest["splits"]["valid"]["shards"] or not manifest["splits"]["valid"].get("samples", 1):
        raise DataError(
            f"{cfg.data}: the validation split is empty; sdm train chooses best.pt, early stopping and the "
            "neighbour weight on it: sessionize with --valid-days (or --valid-start / --valid-fraction)"
        )
    workers = world * max(cfg.num_workers, 1)
    if len(counts) < workers:
        raise SdmError(
            f"{cfg.data}: {len(counts)} training shards for {world} rank(s) x {max(cfg.num_workers, 1)} loader "
            f"worker(s); use --num-workers {max(len(counts) // world - 1, 0)} or sessionize with --min-shards {workers}"
        )
    epoch_steps = [plan_epoch_steps(counts, cfg.batch_size, world, cfg.num_workers, cfg.seed, e) for e in range(cfg.epochs)]
    if not sum(epoch_steps):
        raise SdmError(f"{cfg.data}: some rank gets no training batch; sessionize with more --min-shards")

    model = build_model(model_cfg, cfg.data, manifest).to(device)
    warm = init_weights(cfg, model, manifest)  # every rank, before the DDP wrapper
    sampler = NegativeSampler(load_item_counts(cfg.data, manifest), cfg.num_negatives, cfg.neg_power).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1000 + rank)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if warm is not None and warm.moments is not None:
        load_moments(opt, warm.moments)
    net = DistributedDataParallel(model, broadcast_buffers=False) if dist.is_initialized() else model
    items, users = model_features(manifest, cfg)
    dataset = SessionDataset(
        cfg.data, "train", cfg.batch_size, items, users, shuffle=True, shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed, rank=rank, world_size=world, manifest=manifest,
    )  # fmt: skip
    # A private generator: creating a DataLoader iterator otherwise draws from the
    # global RNG, which would shift dropout masks after a resume.
    # pinned host memory lets move_batch's non_blocking copies overlap the GPU's work
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    return Run(
        cfg, rank, world, device, manifest, model_cfg, model, net, opt, sampler, gen,
        resolve_loss(cfg.loss, int(manifest["num_items"]), cfg.batch_size, int(manifest["max_session_len"])),
        dataset, loader, epoch_steps, t0, ema=WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None,
        warm=warm, init_from=warm.record(cfg.init_from) if warm is not None else None,
    )  # fmt: skip


def init_weights(cfg: TrainConfig, model: SDM, manifest: dict[str, Any]) -> WarmStart | None:
    """`--init-from` on a fresh run: the previous model's weights, tables grown (`sdm.pipeline.warmstart`).

    A resumed run continues last.pt instead. AdamW's moments come along (`--no-init-moments`:
    a fresh optimizer), grown like the tables.

    Raises:
        ConfigError: `init_moments` set without `init_from`.
    """
    if cfg.init_from is None and "init_moments" in cfg.model_fields_set:
        raise ConfigError("--init-moments / --no-init-moments act only with --init-from (the moments of the model it names)")
    if cfg.init_from is None or cfg.resume:
        return None
    return warm_start(model, cfg.init_from, manifest, cfg.data, moments=cfg.init_moments)


def start(run: Run, guard: OutputDir | None) -> Progress:
    """A fresh run (an earlier run's files replaced only with `overwrite`) or, with `resume`, the state of last.pt.

    Raises:
        SdmError: an earlier run without --overwrite (from `claim_out`), no or unreadable last.pt,
            another model config or dataset, changed data-order settings.
    """
    state = resume(run) if run.cfg.resume else Progress()
    run.teacher = build_teacher(run.cfg, run.model_cfg, run.manifest, run.init_from, run.device)  # before any file goes
    if run.cfg.resume:
        say(run, f"[train] resuming {run.cfg.out / 'last.pt'}: epoch {state.epoch}, step {state.step:,} "
                 f"({state.batch_in_epoch} batches into the epoch), best so far {max(state.best, 0.0):.4f}")  # fmt: skip
        if run.cfg.init_from is not None and run.rank == 0:
            print(f"note: --resume continues {run.cfg.out / 'last.pt'}; --init-from {run.cfg.init_from} is ignored",
                  file=sys.stderr)  # fmt: skip
    elif run.warm is not None:
        say(run, run.warm.line())
    if run.teacher is not None:
        say(run, f"[train] keeping the scores of {run.init_from['path']} (--distill-weight {run.cfg.distill_weight:g})")
    run.pace = new_item_pace(run.cfg, run.model, run.init_from)
    if run.pace is not None:
        say(run, f"[train] the {run.pace.rows:,} new items' id embeddings learn at {run.pace.scale:g}x the learning rate")
    elif run.cfg.new_item_lr_scale != 1 and run.rank == 0:  # a day without new items: the daily command still runs
        print(f"note: --new-item-lr-scale {run.cfg.new_item_lr_scale:g}: no item is new since the previous model; "
              "every id embedding learns at the learning rate", file=sys.stderr)  # fmt: skip
    if guard is not None:
        guard.prepare(first=["best.pt"], clear=not run.cfg.resume)
    if run.world > 1:
        dist.barrier()  # rank 0 has cleared the old files before any rank goes on
    if run.rank == 0:
        with atomic_path(run.cfg.out / "config.json") as tmp:
            save_config(run.cfg, tmp)
    return state


# -- the loop -------------------------------------------------------------------------


def _log(run: Run, record: dict[str, Any]) -> None:
    if run.log is not None:
        run.log.write(record)


@torch.no_grad()
def validate(run: Run, state: Progress) -> float:
    """Validation `select_metric` at eval_k, computed on rank 0 with `sdm evaluate`'s code and shared with every rank."""
    from sdm.pipeline.ranking import evaluate_model

    value = [0.0]
    if run.rank == 0:
        run.model.eval()
        m = evaluate_model(run.model, run.cfg.data, "valid", [run.cfg.eval_k], 512, run.device)
        run.model.train()
        value = [selection_value(m, run.cfg.select_metric, run.cfg.eval_k)]
        valid = {k: v for k, v in m.items() if k != "table"}
        run.last_valid = valid
        _log(run, {"step": state.step, "epoch": state.epoch, "seconds": time.time() - run.t0, "valid": valid})
    if run.world > 1:
        dist.broadcast_object_list(value, src=0)
    return float(value[0])


def train_epoch(run: Run, state: Progress) -> str | None:
    """Train the rest of epoch `state.epoch`; returns "nan" or "max_steps" when the run must stop there."""
    cfg = run.cfg
    run.dataset.set_epoch(state.epoch)
    run.model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and run.device.type == "cuda" else nullcontext()
    planned = run.epoch_steps[state.epoch]
    seen = 0
    for batch in run.loader:
        if seen >= planned:
            break  # the planned steps are done (DDP: a larger rank drops its extra batches)
        seen += 1
        if seen <= state.batch_in_epoch:  # resuming inside the epoch: replay the data position
            continue
        lr = get_lr(state.step, cfg, run.total_steps)
        batch = move_batch(batch, run.device)
        loss, grad_norm = train_step(run.model, run.net, run.opt, batch, run.sampler, run.gen, cfg, lr, autocast,
                                     run.loss_kind, run.teacher, run.pace)  # fmt: skip
        if not torch.isfinite(grad_norm):
            return "nan"
        if run.ema is not None:
            run.ema.update(run.model, state.step)
        state.step += 1
        state.batch_in_epoch = seen
        _report(run, state, batch, loss, lr)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            save(run, state, "last.pt")
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            return "max_steps"
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            with averaged(run):
                validate(run, state)
    return None


def _report(run: Run, state: Progress, batch: dict[str, Any], loss: torch.Tensor, lr: float) -> None:
    """Log every `log_every` steps, and move the progress bar."""
    w = run.window
    w["samples"] = w.get("samples", 0) + int((batch["seq_len"] - 1).clamp(min=0).sum())
    w.setdefault("t", time.time())
    run.last_loss = loss.detach()  # read (a device sync) by the epoch line only
    if state.step % run.cfg.log_every == 0:
        sps = w["samples"] * run.world / max(time.time() - w["t"], 1e-9)
        _log(run, {"step": state.step, "epoch": state.epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps})
        if run.bar is not None:
            run.bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{sps:,.0f}")
        run.window = {}
    if run.bar is not None:
        run.bar.update(1)


def averaged(run: Run) -> AbstractContextManager[None]:
    """The weights validation and best.pt see: the moving average with `--ema-decay`, else the trained ones."""
    return run.ema.swapped_in(run.model) if run.ema is not None else nullcontext()


def end_epoch(run: Run, state: Progress) -> bool:
    """Validate, keep best.pt, write last.pt; True when early stopping says stop."""
    with averaged(run):
        value = validate(run, state)
        if value > state.best:
            state.best, state.bad_epochs = value, 0
            save(run, state, "best.pt")
        else:
            state.bad_epochs += 1
    save(run, state, "last.pt")
    say_validated(run, state, value)
    return state.bad_epochs >= run.cfg.patience


def end_cut_run(run: Run, state: Progress) -> None:
    """A run cut by max_steps is validated too, and last.pt is written after best.pt so
    that it carries the best metric a resumed run must beat."""
    with averaged(run):
        value = validate(run, state)
        if value > state.best or not (run.cfg.out / "best.pt").exists():
            state.best = max(value, state.best)
            save(run, state, "best.pt")
    save(run, state, "last.pt")
    say_validated(run, state, value)


def store_choices(run: Run) -> None:
    """Write what is chosen after training into best.pt (rank 0, `pipeline/choices.py`): the
    neighbour term and, for data with cold items, their scale."""
    cfg, path = run.cfg, run.cfg.out / "best.pt"
    if run.rank != 0 or not needs_choices(cfg, run.manifest) or not path.exists():
        return
    ckpt = read_checkpoint(path)
    run.model.load_state_dict(ckpt["model"])  # training is over: the model becomes best.pt
    run.model.eval()
    previous = None
    if cfg.init_from is not None:  # a warm start adds its split's neighbour counts to the previous model's
        previous = run.warm.previous if run.warm is not None else read_checkpoint(Path(cfg.init_from) / "best.pt")
    choose_after_training(cfg, run.model, run.manifest, run.device, ckpt, lambda line: say(run, line),
                          lambda record: _log(run, record), previous)  # fmt: skip
    atomic_save(ckpt, path)


def say(run: Run, line: str) -> None:
    """One line on stderr, above the progress bar when there is one (rank 0 and not --quiet only)."""
    if not run.talk:
        return
    if run.bar is not None:
        run.bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def say_interrupted(run: Run, state: Progress) -> None:
    """What Ctrl-C leaves behind and how to continue (printed even with --quiet)."""
    out, cfg = run.cfg.out, run.cfg
    if run.bar is not None:
        run.bar.close()
        run.bar = None
    best = f"; {out / 'best.pt'} is the best validated model" if (out / "best.pt").exists() else ""
    if run.saved_step is not None:
        then = f"{out / 'last.pt'} holds step {run.saved_step:,}{best}; continue with `sdm train --resume"
    else:  # nothing to resume from: only starting over works
        then = f"no last.pt was written yet{best}; start again with `sdm train --overwrite"
    print(f"[train] interrupted at step {state.step:,}: {then} --data {cfg.data} --out {out}`", file=sys.stderr, flush=True)


def say_validated(run: Run, state: Progress, value: float) -> None:
    """The epoch line: where the run is, its loss, what validation measured and the best so far."""
    k, v = run.cfg.eval_k, run.last_valid
    metrics = " ".join(f"{name}@{k} {v[f'{name}@{k}']:.4f}" for name in ("hr", "ndcg") if f"{name}@{k}" in v)
    mark = " (new best)" if value >= state.best and state.bad_epochs == 0 else f" (best {state.best:.4f})"
    say(
        run,
        f"[train] epoch {state.epoch}/{run.cfg.epochs} step {state.step:,} loss {float(run.last_loss):.4f} "
        f"valid {metrics} on {v.get('queries', 0):,} queries{mark} {time.time() - run.t0:.1f}s",
    )


def summarise(run: Run, state: Progress, reason: str) -> dict[str, Any]:
    summary = {
        "rank": run.rank,
        "steps": state.step,
        "epochs": state.epoch,
        "best_metric": max(state.best, 0.0),
        "stopped": reason,
        "seconds": time.time() - run.t0,
        "checkpoint": str(run.cfg.out / "best.pt"),
    }
    _log(run, {"summary": summary})
    return summary


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a model; returns a summary (steps, epochs, best metric, checkpoint path).

    Raises:
        SdmError: bad data directory, incompatible checkpoint, unusable device, NaN loss.
    """
    t0 = time.time()
    rank, world = setup_distributed(cfg.device)
    # Bit-identical runs whatever the thread count and load: the backward of an index with
    # repeated rows (the N targets share a position's row; the copy logits of a position are
    # read once per target) otherwise accumulates in thread order on CPU.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        check_tensorboard(cfg.tensorboard, cfg.out, {"data directory": cfg.data, "--init-from model": cfg.init_from})
        with claim_out(cfg, rank) as guard:
            return _train(cfg, rank, world, t0, guard, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, t0: float, guard: OutputDir | None, progress: bool) -> dict[str, Any]:
    """The run itself, with --out held by `guard` on rank 0."""
    run = None
    try:
        run = build_run(cfg, rank, world, t0)
        run.talk = progress and rank == 0
        state = Progress()
        state = start(run, guard)
        run.saved_step = state.step if cfg.resume else None
        if rank == 0:
            run.log = TrainLog(cfg.out / "train_log.jsonl", cfg.tensorboard,
                               {"data directory": cfg.data, "--init-from model": cfg.init_from})  # fmt: skip
            if progress:
                from tqdm import tqdm

                total = min(cfg.max_steps or run.total_steps, run.total_steps)
                run.bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True)
        reason = "epochs"
        while state.epoch < cfg.epochs:
            stop = train_epoch(run, state)
            if stop == "nan":
                raise SdmError(
                    f"loss became NaN at step {state.step}; stopped. The last good checkpoint is "
                    f"{cfg.out / 'last.pt'} (try a lower --lr)"
                )
            if stop == "max_steps":
                reason = "max_steps"
                end_cut_run(run, state)
                break
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if end_epoch(run, state):
                reason = "early_stop"
                break
        store_choices(run)
        summary = summarise(run, state, reason)
        if world > 1:
            dist.barrier()  # no rank tears the group down while another still talks to it
        return summary
    except KeyboardInterrupt:
        if run is not None and rank == 0:
            say_interrupted(run, state)
        raise
    finally:
        if run is not None and run.bar is not None:
            run.bar.close()
        if run is not None and run.log is not None:
            run.log.close()
