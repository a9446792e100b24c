"""`--distill-weight`: a warm start keeps the scores of the model it starts from.

Fine-tuning yesterday's model on the newest day moves it toward that day's sessions and
away from what it knew of the days before. With a weight w > 0 every training step adds

    w * mean over the step's positions of KL(p_prev || p_new)

to the loss (learning without forgetting, Li and Hoiem 2016). p_prev and p_new are the
softmax of the previous model's and this model's scores u . v_j over the step's
candidates: every item with the full softmax (padding and OOV left out), otherwise a
sample of items the term draws for the step as the sampled softmax draws its negatives
(its own draw, from the step's random source), log-Q corrected as the sampled softmax's
logits are. The
positions are those with a next item in the vocabulary, as the loss's.

The previous model is the warm start itself before any step: `--init-from`'s weights
grown to the new vocabularies (`pipeline/warmstart.py`), frozen, in eval mode (no
dropout). Only the dot-product scores are kept: the repeat head's copy scores and the
neighbour term are not part of the term. It is built the same way on every rank and
again on `--resume`, from the `init_from` record of last.pt (path, step and data
fingerprint must still match). It costs one more copy of the weights and the previous
model's forward pass on every step; with the full softmax the previous model's item
vectors are computed once, on the first step, since its weights never change, and the
trained model's are those its loss scores (`pipeline/trainstep.py`: one pass a step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdm.config import TrainConfig
from sdm.errors import SdmError
from sdm.model.embeddings import OOV
from sdm.model.loss import NegativeSampler, target_pairs
from sdm.model.sdm import SDM, ModelConfig
from sdm.pipeline.modelspec import build_model
from sdm.pipeline.warmstart import warm_start

FIRST_ITEM = OOV + 1
"""Index of the first real item (after padding and out-of-vocabulary)."""


def build_teacher(
    cfg: TrainConfig, model_cfg: ModelConfig, manifest: dict[str, Any], record: dict[str, Any] | None,
    device: torch.device,
) -> SDM | None:  # fmt: skip
    """The previous model, frozen (module docs); None when `distill_weight` is 0.

    Args:
        record: the run's `init_from` record ({"path", "step", "data_fingerprint"}): the warm
            start of a fresh run, or the one last.pt carries on `--resume`.

    Raises:
        SdmError: a resumed run that was not warm-started, or whose previous model changed.
    """
    if cfg.distill_weight == 0:
        return None
    if record is None:
        raise SdmError(f"{cfg.out / 'last.pt'}: --distill-weight needs the model the run started from, "
                       "but this run was not started with --init-from")  # fmt: skip
    path = Path(record["path"])
    # Rank 0's initial weights (DDP gives every rank those): the new rows the warm start
    # does not fill come out the same, and the run's own random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        teacher = build_model(model_cfg, cfg.data, manifest)
    warm = warm_start(teacher, path, manifest, cfg.data, moments=False)
    if (warm.step, warm.data_fingerprint) != (record.get("step"), record.get("data_fingerprint")):
        raise SdmError(
            f"{warm.path}: no longer the model this run started from (step {warm.step} on data "
            f"{warm.data_fingerprint[:12]}, the run recorded step {record.get('step')} on data "
            f"{str(record.get('data_fingerprint'))[:12]}); --distill-weight 0 trains without it"
        )
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def distill_loss(
    model: SDM,
    teacher: SDM,
    batch: dict[str, Any],
    user_vecs: Tensor,
    loss_kind: str,
    sampler: NegativeSampler,
    generator: torch.Generator | None,
    all_items: Tensor | None = None,
) -> Tensor:
    """Mean KL(p_prev || p_new) over the batch's positions with a next item (module docs).

    Args:
        model: the model being trained (not a DDP wrapper).
        teacher: the frozen previous model (`build_teacher`).
        batch: the batch `user_vecs` was computed from.
        user_vecs: (B, T, D) = model(batch), in training mode.
        loss_kind: "full" scores every item; otherwise `sampler` draws the candidates.
        sampler, generator: the step's negative sampler and its random source.
        all_items: with the full softmax, `model.all_item_vectors()` of this step, shared with
            the loss (one item-tower pass for both); None computes them.

    Returns:
        scalar; 0 (with a graph) when the batch has no such position.
    """
    rows, cols, _, _ = target_pairs(batch, 1)
    if rows.numel() == 0:
        return user_vecs.sum() * 0.0
    key = rows * user_vecs.shape[1] + cols
    positions = torch.unique(key)
    user = user_vecs.reshape(-1, user_vecs.shape[-1])[positions].float()  # (U, D)
    with torch.no_grad():
        prev_vecs = teacher(batch)
        prev_user = prev_vecs.reshape(-1, prev_vecs.shape[-1])[positions].float()
    if loss_kind == "full":
        new_items = (model.all_item_vectors() if all_items is None else all_items)[FIRST_ITEM:].float()
        new, prev = user @ new_items.T, prev_user @ frozen_item_vectors(teacher).T
    else:
        items = sampler.sample(generator)
        log_q = sampler.log_q[items]
        with torch.no_grad():
            prev_items = teacher.item_vectors(items).float()
        new = user @ model.item_vectors(items).float().T - log_q
        prev = prev_user @ prev_items.T - log_q
    return F.kl_div(F.log_softmax(new, 1), F.log_softmax(prev, 1), log_target=True, reduction="batchmean")


def frozen_item_vectors(teacher: SDM) -> Tensor:
    """Every real item's vector of the frozen previous model, (V - FIRST_ITEM, D) float32.

    Computed on the first call and kept on the teacher, since its weights never change.
    Every full-softmax step held these vectors at its peak before, so keeping them does not
    raise the run's peak memory.
    """
    cached = getattr(teacher, "_frozen_items", None)
    if cached is None:
        with torch.no_grad():
            cached = teacher.all_item_vectors()[FIRST_ITEM:].float()
        teacher._frozen_items = cached  # a plain attribute: not a buffer, never saved
    return cached
