"""Training losses for SDM, kept outside the model (as torchrec's TwoTowerTrainTask does).

Three softmax flavours over the item vocabulary, all returning the mean over
(user vector, target item) pairs:

- `sampled_softmax_loss`: the true item against S negatives drawn by a
  `NegativeSampler`, with TensorFlow's log-Q correction (the paper's choice);
- `inbatch_softmax_loss`: the other targets of the batch are the negatives;
- `full_softmax_loss`: every item (small catalogues).

`sdm_loss` builds the pairs from a batch and the model's per-position user
vectors (SPEC section 5) and dispatches to one of them.

Logits are computed, masked and normalised in float32, so masking with -inf is
safe under bf16 autocast. Indices 0 (padding) and 1 (OOV) are never a negative
and never a target.

Id dropout (`ModelConfig.id_dropout` = p) happens in the item tower the losses call
(`SDM.item_vectors`, `SDM.all_item_vectors`), in training mode only: with probability
p each target occurrence (P pairs) and each sampled negative (S) of the sampled and
in-batch losses, and each catalogue item once per batch of the full softmax, is
scored by its side-feature vector with a zero id embedding, the vector a cold item
gets at evaluation. The session input side keeps its ids.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sdm.model.embeddings import OOV, PAD, Batch
from sdm.model.repeat import NO_COPY, History
from sdm.model.sdm import SDM

LossKind = Literal["sampled", "inbatch", "full"]


class NegativeSampler:
    """Draws negatives with probability q_j proportional to count_j ** power (with replacement).

    Padding (0) and OOV (1) have probability 0. An item with count 0 is never drawn;
    its log-Q is floored at that of the rarest drawable item, so a rare target is not
    given an unbounded bonus.

    Args:
        counts: (V,) training occurrences of each item index (entries 0 and 1 ignored).
        num_negatives: S, negatives per batch (shared by every row of the batch).
        power: exponent on counts; 0.75 as word2vec, 0 = uniform, 1 = unigram.

    Attributes:
        probs: (V,) q_j.
        log_q: (V,) log of the expected number of times j is among the S draws,
            log(S * q_j): what `sampled_softmax_loss` subtracts from logits.
        log_freq: (V,) log of the item's share of training events (power 1): the
            log-Q of in-batch negatives, which appear as often as the item is a target.
    """

    def __init__(self, counts: Tensor, num_negatives: int = 1000, power: float = 0.75) -> None:
        if counts.dim() != 1 or counts.numel() < 3:
            raise ValueError(f"counts must be 1-D with at least 3 entries (padding, OOV, an item), got shape {tuple(counts.shape)}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        counts = counts.detach().double().clamp_min(0)
        counts[[PAD, OOV]] = 0
        if not (counts > 0).any():
            raise ValueError("counts has no positive entry at an item index >= 2: nothing to sample")
        self.num_negatives = num_negatives
        self.power = power
        self.probs = _normalise(torch.where(counts > 0, counts**power, 0.0))
        self.log_q = (_log_floored(self.probs) + torch.log(torch.tensor(float(num_negatives), dtype=torch.float64))).float()
        self.log_freq = _log_floored(_normalise(counts)).float()
        self.probs = self.probs.float()

    def to(self, device: torch.device | str) -> NegativeSampler:
        """Move the tables to `device` (in place); returns self."""
        self.probs, self.log_q, self.log_freq = (t.to(device) for t in (self.probs, self.log_q, self.log_freq))
        return self

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Returns: LongTensor (S,) of item indices >= 2, on the sampler's device."""
        return torch.multinomial(self.probs, self.num_negatives, replacement=True, generator=generator)


def _normalise(x: Tensor) -> Tensor:
    return x / x.sum()


def _log_floored(p: Tensor) -> Tensor:
    """log p, with p == 0 replaced by the smallest positive p."""
    floor = p[p > 0].min()
    return torch.log(torch.where(p > 0, p, floor))


def sampled_softmax_logits(
    user: Tensor,
    targets: Tensor,
    target_vecs: Tensor,
    negatives: Tensor,
    negative_vecs: Tensor,
    log_q: Tensor,
    row: Tensor | None = None,
) -> Tensor:
    """Logits of the true item (column 0) and of the S negatives, as TensorFlow's
    `sampled_softmax_loss(remove_accidental_hits=True, subtract_log_q=True)` builds them.

    Every logit, true and sampled, is user . item - log(expected count of the item
    under the sampler); a negative equal to the row's true item gets -inf.

    Args:
        user: (P, D) user vectors.
        targets: LongTensor (P,) true items.
        target_vecs: (P, D) item vectors of `targets`.
        negatives: LongTensor (S,) sampled items.
        negative_vecs: (S, D) item vectors of `negatives`.
        log_q: (V,) log expected count of each item (`NegativeSampler.log_q`).
        row: optional LongTensor (P,): pair i uses user vector user[row[i]]. Several
            targets of one position (PSDMMAL-N) then share one (S,) row of negative
            logits instead of recomputing it per target; user is then (U, D).

    Returns:
        float32 (P, 1 + S).
    """
    user = user.float()
    neg_logits = user @ negative_vecs.float().T - log_q[negatives]  # (U, S)
    if row is not None:
        user, neg_logits = user[row], neg_logits[row]  # (P, D), (P, S)
    true_logit = (user * target_vecs.float()).sum(-1, keepdim=True) - log_q[targets].unsqueeze(-1)  # (P, 1)
    hits = targets.unsqueeze(1) == negatives.unsqueeze(0)  # (P, S)
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    return torch.cat([true_logit, neg_logits], dim=1)  # (P, 1 + S)


def _mean(losses: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of per-row losses (P,), weighted when `weight` (P,) is given."""
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum()


def sampled_softmax_loss(
    user: Tensor,
    targets: Tensor,
    target_vecs: Tensor,
    negatives: Tensor,
    negative_vecs: Tensor,
    log_q: Tensor,
    weight: Tensor | None = None,
    row: Tensor | None = None,
    copy: Copy | None = None,
) -> Tensor:
    """Sampled softmax cross-entropy with log-Q correction; arguments as `sampled_softmax_logits`,
    `copy` as `_with_copy`.

    Returns:
        scalar, the mean over the P rows (weighted by `weight` (P,) when given).
    """
    logits = sampled_softmax_logits(user, targets, target_vecs, negatives, negative_vecs, log_q, row)  # (P, 1 + S)
    if copy is not None:
        return _mean(_with_copy(logits, logits[:, 0], copy), weight)
    return _mean(F.cross_entropy(logits, torch.zeros_like(targets), reduction="none"), weight)


Copy = tuple[Tensor, Tensor]
"""The repeat head's part of a loss: (copy logits (P, C), match (P, C) bool: candidate c is
the pair's target item). Every candidate is enumerated, so it is in the softmax exactly
(no sampling, no log-Q)."""


def _with_copy(logits: Tensor, true_logit: Tensor, copy: Copy) -> Tensor:
    """-log P(target) of the mixture softmax: the explore logits (P, K) of which `true_logit` (P,)
    is the target's, plus every copy candidate; the target's mass is its explore term plus
    its copy terms. Returns (P,)."""
    r, match = copy
    denominator = torch.logsumexp(torch.cat([logits, r], dim=1), dim=1)  # (P,)
    numerator = torch.logsumexp(torch.cat([true_logit.unsqueeze(1), r.masked_fill(~match, NO_COPY)], dim=1), dim=1)
    return denominator - numerator


def inbatch_softmax_loss(
    user: Tensor,
    targets: Tensor,
    target_vecs: Tensor,
    log_q: Tensor,
    weight: Tensor | None = None,
    copy: Copy | None = None,
) -> Tensor:
    """Softmax over the batch's targets: row i's positive is target i, the other rows'
    targets are its negatives. An item shows up as a target in proportion to its
    frequency, so every logit gets -log(frequency) (`NegativeSampler.log_freq`); columns
    holding row i's own item (other than i) are accidental hits and get -inf.

    Args:
        user: (P, D).
        targets: LongTensor (P,).
        target_vecs: (P, D) item vectors of `targets`.
        log_q: (V,) log frequency of each item.

    Returns:
        scalar, the mean over the P rows.
    """
    logits = user.float() @ target_vecs.float().T - log_q[targets]  # (P, P)
    same = targets.unsqueeze(1) == targets.unsqueeze(0)  # (P, P)
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    if copy is not None:
        return _mean(_with_copy(logits, logits.diagonal(), copy), weight)
    return _mean(F.cross_entropy(logits, torch.arange(len(targets), device=targets.device), reduction="none"), weight)


def full_softmax_loss(
    user: Tensor,
    targets: Tensor,
    item_vecs: Tensor,
    weight: Tensor | None = None,
    row: Tensor | None = None,
    copy: Copy | None = None,
) -> Tensor:
    """Cross-entropy over every item of the vocabulary, padding (0) and OOV (1) excluded.

    Args:
        user: (P, D), or (U, D) with `row`.
        targets: LongTensor (P,), all >= 2.
        item_vecs: (V, D), rows 0 and 1 included (they are masked here).
        weight: optional (P,) pair weights.
        row: optional LongTensor (P,): pair i uses user[row[i]], so the log-softmax over
            the catalogue is computed once per position, not once per target.

    Returns:
        scalar, the mean over the P rows.
    """
    logits = user.float() @ item_vecs.float().T  # (U, V)
    special = torch.arange(logits.shape[1], device=logits.device) <= OOV  # (V,) padding and OOV columns
    logits = logits.masked_fill(special, float("-inf"))
    if row is None:
        row = torch.arange(len(targets), device=targets.device)
    if copy is None:
        return _mean(-torch.log_softmax(logits, dim=1)[row, targets], weight)
    r, match = copy  # (P, C) each
    explore = torch.logsumexp(logits, dim=1)[row]  # (P,) the normaliser's explore part, once per position
    denominator = torch.logaddexp(explore, torch.logsumexp(r, dim=1))  # (P,)
    numerator = torch.logaddexp(logits[row, targets], torch.logsumexp(r.masked_fill(~match, NO_COPY), dim=1))
    return _mean(denominator - numerator, weight)


def target_pairs(batch: Batch, num_targets: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (position, target) pairs of SPEC section 5, in one causal pass.

    The user vector at position p (it has read items 0..p) predicts items
    p+1 .. p+num_targets of the same session, those inside the session only.
    Targets that are OOV (index 1) cannot be learned and are left out.

    Args:
        batch: needs "seq"["item"] (B, T) and "seq_len" (B,).
        num_targets: N.

    Returns:
        (rows, cols, targets, ahead): LongTensors (P,), the batch row and position of
        each pair's user vector, its target item, and how far ahead the target is
        (0 = the next item).
    """
    items, seq_len = batch["seq"]["item"], batch["seq_len"]
    B, T = items.shape
    pos = torch.arange(T, device=items.device)  # (T,)
    offsets = torch.arange(1, num_targets + 1, device=items.device)  # (N,)
    tpos = pos.view(T, 1) + offsets.view(1, -1)  # (T, N) target position of each pair
    padded = F.pad(items, (0, num_targets))  # (B, T + N) so tpos is always a valid index
    tgt = padded[:, tpos]  # (B, T, N)
    valid = (tpos.unsqueeze(0) < seq_len.view(B, 1, 1)) & (tgt > OOV)  # (B, T, N)
    rows, cols, ahead = valid.nonzero(as_tuple=True)  # (P,) each
    return rows, cols, tgt[valid], ahead


def sdm_loss(
    model: SDM,
    batch: Batch,
    user_vecs: Tensor,
    *,
    loss: LossKind = "sampled",
    sampler: NegativeSampler | None = None,
    generator: torch.Generator | None = None,
    target_decay: float = 1.0,
    history: History | None = None,
    all_items: Tensor | None = None,
) -> Tensor:
    """Mean loss over the batch's (position, target) pairs.

    N = config.num_targets for PSDMMAL-N, 1 for every other variant. The pair whose
    target is k items ahead (k = 0 for the next item) has weight target_decay ** k:
    1.0 weighs the N targets alike, as the paper's PSDMMAL-N; below 1 the next item
    counts most and the later ones regularise.

    Args:
        model: the SDM, or a DDP wrapper of it (only `item_vectors` and `config` are used).
        batch: the batch `user_vecs` was computed from.
        user_vecs: (B, T, D) = model(batch).
        loss: "sampled" (needs sampler), "inbatch" (needs sampler, for log_freq) or "full".
        sampler: draws the negatives and holds log-Q; moved to user_vecs' device if elsewhere.
        generator: random source for the negatives, on the same device as the sampler.
        target_decay: weight ratio between consecutive targets, in (0, 1].
        history: the repeat head's output for the batch (`model(batch, with_history=True)`);
            each pair's softmax then also holds the copy candidates of its position.
        all_items: the full softmax's `model.all_item_vectors()` when the caller computed them
            for another term of the same step (one item-tower pass for both); None computes them.

    Returns:
        scalar; 0 (with a graph) when the batch has no pair.
    """
    model = getattr(model, "module", model)  # accept a DDP-wrapped model too
    cfg = model.config
    if not 0 < target_decay <= 1:
        raise ValueError(f"target_decay must be in (0, 1], got {target_decay}")
    rows, cols, targets, ahead = target_pairs(batch, cfg.num_targets if cfg.variant == "PSDMMAL-N" else 1)
    if targets.numel() == 0:
        return user_vecs.sum() * 0.0
    weight = None if target_decay == 1.0 else torch.pow(target_decay, ahead.float())  # (P,)
    # Each position with a target once (U <= P): its N targets share its logits.
    key = rows * user_vecs.shape[1] + cols
    positions, row = torch.unique(key, return_inverse=True)  # (U,), (P,)
    user = user_vecs.reshape(-1, user_vecs.shape[-1])[positions]  # (U, D)
    copy = None
    if history is not None:
        r = history.logits[rows, cols]  # (P, C)
        copy = (r, history.items[rows] == targets.unsqueeze(1))
    if loss == "full":
        items = model.all_item_vectors() if all_items is None else all_items
        return full_softmax_loss(user, targets, items, weight, row, copy)
    if sampler is None:
        raise ValueError(f"loss {loss!r} needs a NegativeSampler")
    if sampler.probs.device != user_vecs.device:
        sampler.to(user_vecs.device)  # once: later calls find it there
    target_vecs = model.item_vectors(targets)  # (P, D)
    if loss == "inbatch":
        return inbatch_softmax_loss(user[row], targets, target_vecs, sampler.log_freq, weight, copy)
    if loss == "sampled":
        negatives = sampler.sample(generator)  # (S,)
        negative_vecs = model.item_vectors(negatives)  # (S, D)
        return sampled_softmax_loss(
            user, targets, target_vecs, negatives, negative_vecs, sampler.log_q, weight, row, copy
        )
    raise ValueError(f"unknown loss {loss!r}, expected one of 'sampled', 'inbatch', 'full'")
