"""The optimisation step of `sdm train`: what one step does and what shapes it over the run.

`get_lr` is the learning-rate schedule (linear warmup, cosine decay), `train_step`
one optimizer step on a batch (forward, loss, backward, clip, update), and
`WeightAverage` the moving average of the weights that `--ema-decay` keeps for
validation and best.pt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from sdm.config import TrainConfig
from sdm.model.loss import NegativeSampler, sdm_loss
from sdm.model.sdm import SDM
from sdm.pipeline.distill import distill_loss
from sdm.pipeline.newrows import NewItemPace


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
    teacher: SDM | None = None,
    pace: NewItemPace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch already on the device; (loss, grad norm).

    `net` is `model` or its DDP wrapper. With a `teacher` (`--distill-weight`), the loss
    adds `cfg.distill_weight` times `distill_loss`; with a `pace` (`--new-item-lr-scale`), the
    new items' rows move that many times as far. The step is skipped (no update) when the
    gradient norm is not finite; DDP has all-reduced the gradients by then, so
    every rank sees the same norm and they all stop together.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast:
        user_vecs, history = net(batch, with_history=True)
        # The full softmax and the distillation term score the same item vectors: one pass.
        all_items = model.all_item_vectors() if loss_kind == "full" and teacher is not None else None
        loss = sdm_loss(
            model, batch, user_vecs, loss=loss_kind, sampler=sampler, generator=gen, target_decay=cfg.target_decay,
            history=history, all_items=all_items,
        )  # fmt: skip
        if teacher is not None:
            term = distill_loss(model, teacher, batch, user_vecs, loss_kind, sampler, gen, all_items)
            loss = loss + cfg.distill_weight * term
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if torch.isfinite(grad_norm):
        with pace.step() if pace is not None else nullcontext():
            opt.step()
    return loss.detach(), grad_norm


class WeightAverage:
    """An exponential moving average of a model's floating-point weights (`--ema-decay`).

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so the first
    steps' weights do not linger. `swapped_in` puts the average into the model
    for validation and best.pt; last.pt keeps the trained weights and the average.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in self.avg:
                    self.avg[k].lerp_(v, 1.0 - d)

    def load(self, avg: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's average (copied in place, onto this average's devices)."""
        with torch.no_grad():
            for k, v in self.avg.items():
                v.copy_(avg[k])

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        trained = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.avg}
        model.load_state_dict(self.avg, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(trained, strict=False)
