"""`sdm train`: one plain training loop over the streaming dataset.

Reads top to bottom: set up (distributed, device, data, model), then per
epoch: batches -> lr from `get_lr(step)` -> forward/loss -> backward -> clip ->
step -> log; after each epoch validate HR@K with the same code as
`sdm evaluate`, keep the best checkpoint, stop early when validation stops
improving. Runs in one process or under `torchrun` (DDP: gloo on CPU, NCCL on
GPU; each rank reads its own shards; rank 0 alone validates and writes).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sdm.config import TrainConfig, save_config
from sdm.errors import SdmError
from sdm.model.loss import NegativeSampler, sdm_loss
from sdm.model.sdm import SDM, ModelConfig
from sdm.pipeline.device import pick_device
from sdm.pipeline.dataset import (
    SessionDataset,
    load_item_counts,
    load_item_table,
    move_batch,
    read_manifest,
)

CHECKPOINT_VERSION = 1
NO_SIDE_INFO_VARIANTS = ("PSDMMAL-NoS",)


def get_lr(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of `lr` at `total_steps`.

    The warmup is `warmup_steps`, but at most a tenth of the run, so a small
    dataset does not spend its first epochs warming up.
    """
    warmup = max(1, min(cfg.warmup_steps, total_steps // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _pick(kind: str, wanted: list[str] | None, have: list[str], default: list[str], data: Path) -> list[str]:
    """`wanted` (default: `default`), checked against the data; SdmError naming what it lacks."""
    if wanted is None:
        return default
    missing = [f for f in wanted if f not in have]
    if missing:
        raise SdmError(
            f"{data}: {kind} feature(s) {missing} are not in the data (it has: {have}); "
            f"sessionize with --{kind}-features to add them"
        )
    return wanted


def model_features(manifest: dict[str, Any], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Item and user features the run reads.

    Items: the item id plus `--item-features` (default: every side feature in the data).
    Users: `--user-features` (default: the profile features, not the user id: SPEC 7's
    e_u is the profile, and a user-id embedding memorises training users and is only the
    OOV vector for new ones; `--user-features user,...` adds it). The NoS variant reads
    the item id and the user id only, as SPEC 7 defines it.

    Raises:
        SdmError: a requested feature the data does not have (the message names it).
    """
    have_items, have_users = list(manifest["item_features"]), list(manifest["user_features"])
    side = _pick("item", cfg.item_features, have_items, have_items, cfg.data)
    items = ["item"] + [f for f in side if f != "item"]
    users = _pick("user", cfg.user_features, have_users, [u for u in have_users if u != "user"], cfg.data)
    if cfg.variant in NO_SIDE_INFO_VARIANTS:
        items, users = ["item"], [u for u in have_users if u == "user"]
    return items, users


def build_model_config(cfg: TrainConfig, manifest: dict[str, Any]) -> ModelConfig:
    """The model's typed config from the run config and the data manifest."""
    items, users = model_features(manifest, cfg)
    sizes = manifest["vocab_sizes"]
    return ModelConfig(
        variant=cfg.variant,
        item_vocab={f: int(sizes[f]) for f in items},
        user_vocab={f: int(sizes[f]) for f in users},
        embedding_dim=cfg.embedding_dim,
        lstm_layers=cfg.lstm_layers,
        num_heads=cfg.num_heads,
        dropout=cfg.dropout,
        num_targets=cfg.num_targets if cfg.variant == "PSDMMAL-N" else 1,
        max_session_len=int(manifest["max_session_len"]),
        max_long_len=int(manifest["max_long_len"]),
        repeat=cfg.repeat,
    )


FULL_SOFTMAX_MAX_ITEMS = 20_000


def resolve_loss(loss: str, num_items: int) -> str:
    """`auto`: the full softmax for catalogues up to 20,000 items (exact, and it
    learned better than 1,000 sampled negatives on MovieLens-100K), else sampled
    softmax with log-Q correction (the paper's choice, memory independent of the
    catalogue)."""
    if loss != "auto":
        return loss
    return "full" if num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"


def train_step(
    model: SDM,
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, Any],
    sampler: NegativeSampler,
    gen: torch.Generator,
    cfg: TrainConfig,
    lr: float,
    autocast: Any,
    loss_kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch already on the device; (loss, grad norm).

    `net` is `model` or its DDP wrapper. The step is skipped (no update) when the
    gradient norm is not finite; DDP has all-reduced the gradients by then, so
    every rank sees the same norm and they all stop together.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast:
        user_vecs, history = net(batch, with_history=True)
        loss = sdm_loss(
            model, batch, user_vecs, loss=loss_kind, sampler=sampler, generator=gen, target_decay=cfg.target_decay,
            history=history,
        )  # fmt: skip
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if torch.isfinite(grad_norm):
        opt.step()
    return loss.detach(), grad_norm


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log(fh: Any, record: dict[str, Any]) -> None:
    if fh is not None:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _setup_distributed(device_name: str) -> tuple[int, int]:
    """Join the process group when launched by torchrun; (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _load_resume(cfg: TrainConfig, manifest: dict[str, Any], model_cfg: ModelConfig) -> dict[str, Any] | None:
    if not cfg.resume:
        return None
    path = cfg.out / "last.pt"
    if not path.is_file():
        raise SdmError(f"{path}: --resume given but there is no checkpoint to resume from")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("data_fingerprint") != manifest["fingerprint"]:
        raise SdmError(f"{path}: checkpoint was trained on another data manifest than {cfg.data}")
    if ckpt.get("model_config") != model_cfg.model_dump(mode="json"):
        raise SdmError(f"{path}: checkpoint has another model config (variant/dimensions) than this run")
    return ckpt


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a model; returns a summary (steps, epochs, best metric, checkpoint path).

    Raises:
        SdmError: bad data directory, incompatible checkpoint, unusable device.
    """
    from sdm.pipeline.evaluate import evaluate_model  # shares the full-ranking protocol

    t0 = time.time()
    rank, world = _setup_distributed(cfg.device)
    try:
        manifest = read_manifest(cfg.data)
        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        model_cfg = build_model_config(cfg, manifest)
        if rank == 0 and cfg.variant not in NO_SIDE_INFO_VARIANTS and len(model_cfg.item_vocab) == 1:
            print(f"note: {cfg.data} has no item side info; {cfg.variant} uses item ids only", file=sys.stderr)
        resume = _load_resume(cfg, manifest, model_cfg)
        if rank == 0:
            cfg.out.mkdir(parents=True, exist_ok=True)
            if resume is None:  # a fresh run replaces an earlier run's files, never mixes with them
                for name in ("best.pt", "last.pt", "train_log.jsonl"):
                    (cfg.out / name).unlink(missing_ok=True)
            save_config(cfg, cfg.out / "config.json")

        item_table = load_item_table(cfg.data, manifest, list(model_cfg.item_vocab))
        counts = load_item_counts(cfg.data, manifest)
        model = SDM(model_cfg, item_table).to(device)
        loss_kind = resolve_loss(cfg.loss, int(manifest["num_items"]))
        sampler = NegativeSampler(counts, num_negatives=cfg.num_negatives, power=cfg.neg_power).to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed * 1000 + rank)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else None
        net = ddp if ddp is not None else model

        items, users = model_features(manifest, cfg)
        ds = SessionDataset(
            cfg.data, "train", cfg.batch_size, items, users, shuffle=True, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed, rank=rank, world_size=world, manifest=manifest,
        )  # fmt: skip
        # A private generator: creating a DataLoader iterator otherwise draws from the
        # global RNG, which would shift dropout masks after a resume.
        loader_gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, generator=loader_gen)
        train_sessions = manifest["splits"]["train"]["sessions"]
        steps_per_epoch = max(1, math.ceil(train_sessions / (cfg.batch_size * world)))
        total_steps = cfg.epochs * steps_per_epoch  # the schedule ignores max_steps, so resume is exact

        step, epoch, skip, best, bad_epochs = 0, 0, 0, -1.0, 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            step, epoch, skip = resume["step"], resume["epoch"], resume["batch_in_epoch"]
            best, bad_epochs = resume["best_metric"], resume["bad_epochs"]
            torch.set_rng_state(resume["rng"]["torch"])
            if device.type == "cuda" and "cuda" in resume["rng"]:
                torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
            gen.set_state(resume["rng"]["sampler"])

        def checkpoint(batch_in_epoch: int, ep: int) -> dict[str, Any]:
            return {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "model_config": model_cfg.model_dump(mode="json"),
                "config": cfg.model_dump(mode="json"),
                "data_fingerprint": manifest["fingerprint"],
                "step": step,
                "epoch": ep,
                "batch_in_epoch": batch_in_epoch,
                "best_metric": best,
                "bad_epochs": bad_epochs,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "sampler": gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                },
            }

        log_fh = open(cfg.out / "train_log.jsonl", "a") if rank == 0 else None
        amp = cfg.amp and device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps or total_steps, initial=step, unit="step", dynamic_ncols=True)

        def validate() -> float:
            """Validation HR@eval_k on rank 0, shared with every rank."""
            value = [0.0]
            if rank == 0:
                model.eval()
                with torch.no_grad():
                    m = evaluate_model(model, cfg.data, "valid", [cfg.eval_k], 512, device)
                model.train()
                value = [m.get(f"hr@{cfg.eval_k}", 0.0) if m["queries"] else 0.0]
                valid = {k: v for k, v in m.items() if k != "table"}
                _log(log_fh, {"step": step, "epoch": epoch, "seconds": time.time() - t0, "valid": valid})
            if world > 1:
                dist.broadcast_object_list(value, src=0)
            return float(value[0])

        stop, reason, nan = False, "epochs", False
        window_samples, window_t = 0, time.time()
        while epoch < cfg.epochs and not stop:
            ds.set_epoch(epoch)
            model.train()
            batch_in_epoch = 0
            with Join([ddp]) if ddp is not None else nullcontext():
                for batch in loader:
                    if batch_in_epoch < skip:  # resuming inside an epoch: replay the data position
                        batch_in_epoch += 1
                        continue
                    lr = get_lr(step, cfg, total_steps)
                    batch = move_batch(batch, device)
                    loss, grad_norm = train_step(model, net, opt, batch, sampler, gen, cfg, lr, autocast, loss_kind)
                    if not torch.isfinite(grad_norm):
                        nan, stop, reason = True, True, "nan"
                        break
                    step += 1
                    batch_in_epoch += 1
                    window_samples += int((batch["seq_len"] - 1).clamp(min=0).sum())
                    if step % cfg.log_every == 0:
                        sps = window_samples * world / max(time.time() - window_t, 1e-9)
                        _log(log_fh, {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "samples_per_s": sps})
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{sps:,.0f}")
                        window_samples, window_t = 0, time.time()
                    if bar is not None:
                        bar.update(1)
                    if rank == 0 and cfg.max_steps is not None and step >= cfg.max_steps:
                        _atomic_save(checkpoint(batch_in_epoch, epoch), cfg.out / "last.pt")
                    if cfg.max_steps is not None and step >= cfg.max_steps:
                        stop, reason = True, "max_steps"
                        break
                    if cfg.eval_every and step % cfg.eval_every == 0:
                        validate()
            skip = 0
            if nan:
                break
            if reason == "max_steps":
                break
            epoch += 1
            hr = validate()
            if hr > best:
                best, bad_epochs = hr, 0
                if rank == 0:
                    _atomic_save(checkpoint(0, epoch), cfg.out / "best.pt")
            else:
                bad_epochs += 1
            if rank == 0:
                _atomic_save(checkpoint(0, epoch), cfg.out / "last.pt")
            if bad_epochs >= cfg.patience:
                stop, reason = True, "early_stop"
        if reason == "max_steps":
            # A run cut by max_steps is validated too, so best.pt is its best model.
            hr = validate()
            if hr > best or not (cfg.out / "best.pt").exists():
                best = max(hr, best)
                if rank == 0:
                    _atomic_save(checkpoint(0, epoch), cfg.out / "best.pt")
        if bar is not None:
            bar.close()
        summary = {
            "rank": rank,
            "steps": step,
            "epochs": epoch,
            "best_metric": max(best, 0.0),
            "stopped": reason,
            "seconds": time.time() - t0,
            "checkpoint": str(cfg.out / "best.pt"),
        }
        _log(log_fh, {"summary": summary})
        if log_fh is not None:
            log_fh.close()
        if nan:
            raise SdmError(
                f"loss became NaN at step {step}; stopped. The last good checkpoint is {cfg.out / 'last.pt'} "
                "(try a lower --lr)"
            )
        return summary
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
