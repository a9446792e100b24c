"""The final ranking of serving, in one function: index top-K merged with re-scored history candidates.

SDM scores item j for user vector u by u . v_j. A repeat ("copy") head adds,
for the user's own history items only, a copy logit R_j: their score becomes
logaddexp(u . v_j, R_j), every other item keeps u . v_j. So the top-K over the
whole catalogue is the top-K of (the index's best K + C non-candidates) merged
with (the C candidates, re-scored) — one index search, whatever the repeat head
does. The neighbour term (`model/neighbours.py`) adds a bonus B_j >= 0 to its
candidates only (the session's items' neighbours), so they join the same list and
are re-scored to logaddexp(u . v_j, R_j) + B_j. `rank` is that merge; the API (`serve.api`) and `sdm recommend --index faiss`
call it, so a change of the repeat term only has to reach the candidate scores.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


class ItemIndex(Protocol):
    """What `rank` needs from an index (`retrieval.index.ExactIndex`, `retrieval.index.FaissIndex`)."""

    def search_scores(self, user_vecs: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


def _search(index: ItemIndex, u: Tensor, k: int, exclude: Tensor | None, allowed: Any) -> tuple[Tensor, Tensor]:
    """`index.search_scores`, with `allowed` passed only when given (an index need not know it)."""
    if allowed is None:
        return index.search_scores(u, k, exclude)
    return index.search_scores(u, k, exclude, allowed=allowed)  # type: ignore[call-arg]


def rank(
    user_vecs: Tensor | np.ndarray,
    index: ItemIndex,
    k: int,
    exclude: Tensor | None = None,
    candidates: Tensor | None = None,
    candidate_logits: Tensor | None = None,
    item_vecs: Tensor | None = None,
    allowed: Any = None,
    candidate_bonus: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k items per query: u . v_j for every item, logaddexp(u . v_j, R_j) + B_j for candidates.

    Args:
        user_vecs: (Q, D) user vectors.
        index: item index over items 2..V-1 (`search_scores`).
        k: list length.
        exclude: (Q, X) item indices never to return (0 = nothing), e.g. the session with
            `--exclude-seen`.
        candidates: (Q, C) item indices whose score changes (0 = none; repeats are
            merged, the first kept), or None for a plain dot-product ranking.
        candidate_logits: (Q, C) copy logits R of the candidates (a very negative value,
            e.g. `NO_COPY`, leaves the dot product); needs `item_vecs`.
        item_vecs: (V, D) item vectors, rows indexed by item index, to re-score candidates.
        allowed: the index rows the search may return (`retrieval.index.Allowed`: None = all, an
            int n = the first n, a bool array); the candidates are always allowed
            (they are items of the vocabulary).
        candidate_bonus: (Q, C) B >= 0 added to the candidates' scores (the neighbour term,
            `model/neighbours.py`), or None.

    Returns:
        (scores (Q, k) float32, items (Q, k) long), best first; (-inf, 0) where fewer
        than k items are left.
    """
    u = torch.as_tensor(user_vecs).float()
    if candidates is None:
        return _search(index, u, k, exclude, allowed)
    if candidate_logits is None or item_vecs is None:
        raise ValueError("candidates need candidate_logits and item_vecs")
    cand = candidates.long().cpu()
    C = cand.shape[1]
    # K + C from the index: after dropping up to C candidates, K non-candidates remain.
    s_idx, i_idx = _search(index, u, k + C, exclude, allowed)
    valid = (cand > 1) & ~_repeats(cand)  # padding and OOV are never recommended; a repeat counts once
    if exclude is not None:
        valid &= ~_member(cand, exclude.long().cpu())
    s_idx = s_idx.masked_fill(_member(i_idx, torch.where(valid, cand, -1)), float("-inf"))
    vecs = item_vecs.float().cpu()[cand.clamp(0, item_vecs.shape[0] - 1)]  # (Q, C, D)
    dot = torch.einsum("qd,qcd->qc", u, vecs)
    s_cand = torch.logaddexp(dot, candidate_logits.float().cpu())
    if candidate_bonus is not None:
        s_cand = s_cand + candidate_bonus.float().cpu()
    s_cand = s_cand.masked_fill(~valid, float("-inf"))
    scores = torch.cat([s_idx, s_cand], 1)
    items = torch.cat([i_idx, cand], 1)
    top_s, pos = scores.topk(min(k, scores.shape[1]), dim=1)
    top_i = torch.where(torch.isneginf(top_s), 0, items.gather(1, pos))
    return top_s, top_i


def _repeats(items: Tensor) -> Tensor:
    """(Q, C) bool: the entry repeats an earlier entry of its row (by sorting: C may be large)."""
    ordered, order = items.sort(dim=1, stable=True)
    again = torch.zeros_like(ordered, dtype=torch.bool)
    again[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.zeros_like(again).scatter(1, order, again)


def _member(items: Tensor, of: Tensor) -> Tensor:
    """(Q, A) bool: items[q, a] is among of[q, :] (by a sorted search: both may be large)."""
    if of.shape[1] == 0:
        return torch.zeros_like(items, dtype=torch.bool)
    ordered = of.sort(dim=1).values.contiguous()
    pos = torch.searchsorted(ordered, items.contiguous()).clamp(max=of.shape[1] - 1)
    return ordered.gather(1, pos) == items
