"""Top-K retrieval metrics (SPEC section 6) and memory-bounded exact top-K.

Every metric is a pure function of a (Q, K) tensor of recommended item indices
(rank order, best first) and the query's targets, and returns one value per
query (Q,); the evaluator averages them. Conventions (docs/FORMAT.md):
index 0 is padding and 1 is out-of-vocabulary (OOV). Neither is ever
recommended, so an OOV next item never counts as a hit. A target set G is a
(Q, M) tensor padded with 0; duplicates are allowed (G is de-duplicated here).
OOV targets stay in G, so |G| counts them: they lower recall but can never be
retrieved, matching "OOV targets count as misses". The evaluator gives each
distinct unknown raw item its own negative key (from the shards' `seq_oov`), so
two different OOV items count twice; with index 1 alone they would count once.

In `topk`, index 0 means "no candidate" (fewer than K items were left after
masking); it never matches a target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

PAD, OOV = 0, 1


# -- helpers shared by the metrics ---------------------------------------------


def _next_item_hits(topk: Tensor, target: Tensor) -> Tensor:
    """(Q, K) bool: topk[q, r] == y_q (at most one True per row: topk rows are distinct)."""
    return (topk == target.unsqueeze(1)) & (topk != PAD)


def _hit_ranks(topk: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(hits (Q, K) float, ranks (K,) = 1..K) for the rank-based metrics."""
    ranks = torch.arange(1, topk.shape[1] + 1, device=topk.device, dtype=torch.float32)
    return _next_item_hits(topk, target).float(), ranks


def _set_hits(topk: Tensor, targets: Tensor) -> Tensor:
    """(Q, K) bool: topk[q, r] in G_q, by binary search in the sorted target rows.

    Memory O(Q * (K + M)), not O(Q * K * M).
    """
    g = targets.sort(dim=1).values.contiguous()  # padding 0 sorts first
    pos = torch.searchsorted(g, topk.contiguous()).clamp_(max=g.shape[1] - 1)
    return (g.gather(1, pos) == topk) & (topk != PAD)


def target_set_size(targets: Tensor) -> Tensor:
    """|G| per query: number of distinct non-padding values of each row of `targets` (Q, M)."""
    g = targets.sort(dim=1).values
    new = torch.ones_like(g, dtype=torch.bool)
    new[:, 1:] = g[:, 1:] != g[:, :-1]
    return (new & (g != PAD)).sum(1)


# -- the metrics ----------------------------------------------------------------


def hit_rate_at_k(topk: Tensor, target: Tensor) -> Tensor:
    """HitRate@K = 1[y in P].

    Args:
        topk: (Q, K) recommended item indices P, best first.
        target: (Q,) next item y.

    Returns:
        (Q,) float.
    """
    return _next_item_hits(topk, target).any(1).float()


def recall_at_k(topk: Tensor, targets: Tensor) -> Tensor:
    """Recall@K = |P ∩ G| / |G|, G = distinct(i_t .. i_m) (OOV counted in |G|, never hit).

    Args:
        topk: (Q, K) recommended item indices P.
        targets: (Q, M) target set G, padded with 0, duplicates allowed.

    Returns:
        (Q,) float; 0 for an empty G.
    """
    hits = _set_hits(topk, targets).sum(1).float()
    return hits / target_set_size(targets).clamp(min=1).float()


def precision_at_k(topk: Tensor, targets: Tensor) -> Tensor:
    """Precision@K = |P ∩ G| / K.

    Args:
        topk: (Q, K) recommended item indices P.
        targets: (Q, M) target set G, padded with 0.

    Returns:
        (Q,) float.
    """
    return _set_hits(topk, targets).sum(1).float() / topk.shape[1]


def f1_at_k(topk: Tensor, targets: Tensor) -> Tensor:
    """F1@K = 2 P R / (P + R), 0 where P = R = 0 (P = Precision@K, R = Recall@K).

    Args:
        topk: (Q, K) recommended item indices.
        targets: (Q, M) target set G, padded with 0.

    Returns:
        (Q,) float.
    """
    return _f1(precision_at_k(topk, targets), recall_at_k(topk, targets))


def _f1(p: Tensor, r: Tensor) -> Tensor:
    s = p + r
    return torch.where(s > 0, 2 * p * r / s.clamp(min=1e-30), torch.zeros_like(s))


def ndcg_at_k(topk: Tensor, target: Tensor) -> Tensor:
    """NDCG@K = 1 / log2(rank(y) + 1) if y in P (rank from 1), else 0.

    With a single relevant item the ideal DCG is 1, so this is also the DCG.

    Args:
        topk: (Q, K) recommended item indices, best first.
        target: (Q,) next item y.

    Returns:
        (Q,) float.
    """
    hits, ranks = _hit_ranks(topk, target)
    return (hits / torch.log2(ranks + 1)).sum(1)


def mrr_at_k(topk: Tensor, target: Tensor) -> Tensor:
    """MRR@K = 1 / rank(y) if y in P (rank from 1), else 0.

    Args:
        topk: (Q, K) recommended item indices, best first.
        target: (Q,) next item y.

    Returns:
        (Q,) float.
    """
    hits, ranks = _hit_ranks(topk, target)
    return (hits / ranks).sum(1)


METRICS = ("hr", "recall", "precision", "f1", "ndcg", "mrr")


def metric_sums(topk: Tensor, target: Tensor, targets: Tensor, ks: list[int]) -> dict[str, float]:
    """Sum over queries of every metric at every K in `ks` (callers divide by the query count).

    Computes the hit matrices once for the largest K and reads each smaller K
    off the prefix of the ranking; equal to calling each metric on `topk[:, :k]`.

    Args:
        topk: (Q, K_max) recommended item indices, K_max >= max(ks).
        target: (Q,) next item y.
        targets: (Q, M) target set G, padded with 0.
        ks: cut-offs.

    Returns:
        {"hr@20": sum, "recall@20": sum, ...}.
    """
    y_hit = _next_item_hits(topk, target).float()  # (Q, K)
    g_hit = _set_hits(topk, targets).float().cumsum(1)  # (Q, K): |P_k ∩ G| for every prefix k
    g_size = target_set_size(targets).clamp(min=1).float()
    ranks = torch.arange(1, topk.shape[1] + 1, device=topk.device, dtype=torch.float32)
    out: dict[str, float] = {}
    for k in ks:
        yk = y_hit[:, :k]
        p = g_hit[:, k - 1] / k
        r = g_hit[:, k - 1] / g_size
        out[f"hr@{k}"] = float(yk.sum())
        out[f"recall@{k}"] = float(r.sum())
        out[f"precision@{k}"] = float(p.sum())
        out[f"f1@{k}"] = float(_f1(p, r).sum())
        out[f"ndcg@{k}"] = float((yk / torch.log2(ranks[:k] + 1)).sum())
        out[f"mrr@{k}"] = float((yk / ranks[:k]).sum())
    return out


# -- retrieval --------------------------------------------------------------------


def chunked_topk(
    score_chunk: Callable[[int, int], Tensor],
    num_items: int,
    k: int,
    chunk_items: int,
    exclude: Tensor | None = None,
) -> Tensor:
    """Exact top-k over items [0, num_items) from scores computed one item chunk at a time.

    Items 0 (padding) and 1 (OOV) and, per query, the indices in `exclude` get
    score -inf. A running (Q, k) best list is merged with each chunk's own top-k,
    so at most Q x chunk_items scores exist at once. Ties keep no particular order.

    Args:
        score_chunk: (start, end) -> (Q, end - start) scores of items start..end-1.
        num_items: catalogue size including padding and OOV.
        k: list length.
        chunk_items: items scored per step.
        exclude: (Q, X) item indices to mask per query (0 = nothing).

    Returns:
        (Q, k) long item indices, best first; 0 where fewer than k items are unmasked.
    """
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    for start in range(0, num_items, chunk_items):
        end = min(start + chunk_items, num_items)
        s = score_chunk(start, end).float()  # (Q, C), a fresh tensor we may modify
        if start < 2:
            s[:, : 2 - start] = float("-inf")
        if exclude is not None:
            local = exclude.to(s.device) - start
            inside = (local >= 0) & (local < end - start)
            # Scatter-min of -inf at the excluded columns and +inf elsewhere: a
            # no-op for out-of-chunk entries whatever column they clamp to.
            src = torch.where(inside, float("-inf"), float("inf")).to(s.dtype)
            s.scatter_reduce_(1, local.clamp(0, end - start - 1), src, reduce="amin")
        top_s, top_i = s.topk(min(k, end - start), dim=1)
        top_i = top_i + start
        if best_s is None:
            best_s, best_i = top_s, top_i
        else:
            cat_s = torch.cat([best_s, top_s], 1)
            cat_i = torch.cat([best_i, top_i], 1)
            best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
            best_i = cat_i.gather(1, pos)
    if best_s is None or best_i is None:
        raise ValueError("num_items must be >= 1")
    best_i = torch.where(torch.isneginf(best_s), torch.zeros_like(best_i), best_i)
    if best_i.shape[1] < k:  # catalogue smaller than k
        best_i = torch.cat([best_i, best_i.new_zeros(best_i.shape[0], k - best_i.shape[1])], 1)
    return best_i


def add_copy_scores(scores: Tensor, start: int, items: Tensor, extra: Tensor) -> Tensor:
    """Merge the repeat head's scores into an item chunk: score_qj -> logaddexp(score_qj, R_qj).

    Only the query's own history items change, so the rest of the catalogue keeps its
    plain dot-product score (and an index search over it stays exact for them).

    Args:
        scores: (Q, C) scores of items start .. start + C - 1.
        start: first item index of the chunk.
        items: (Q, H) distinct history items per query (0 = none), as `copy_scores` gives.
        extra: (Q, H) their copy scores R.

    Returns:
        (Q, C) new tensor.
    """
    padded, col, _ = _chunk_columns(scores, start, items)
    merged = torch.logaddexp(padded.gather(1, col), extra.float())
    return padded.scatter(1, col, merged)[:, : scores.shape[1]]


def add_bonus(scores: Tensor, start: int, items: Tensor, bonus: Tensor) -> Tensor:
    """Add the neighbour term's bonus to an item chunk: score_qj -> score_qj + B_qj.

    Args:
        scores: (Q, C) scores of items start .. start + C - 1.
        start: first item index of the chunk.
        items: (Q, H) distinct bonus items per query (0 = none), as `neighbour_bonus` gives.
        bonus: (Q, H) their bonus B.

    Returns:
        (Q, C) new tensor.
    """
    padded, col, inside = _chunk_columns(scores, start, items)
    added = torch.where(inside, bonus.float(), torch.zeros_like(bonus, dtype=torch.float32))
    return padded.scatter_add(1, col, added)[:, : scores.shape[1]]


def _chunk_columns(scores: Tensor, start: int, items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scores as float with a scratch column C appended (Q, C + 1), each item's column in the
    chunk (Q, H), C for items outside it or padding / OOV, and whether it is inside (Q, H))."""
    C = scores.shape[1]
    local = items - start
    inside = (local >= 0) & (local < C) & (items > OOV)
    return F.pad(scores.float(), (0, 1)), torch.where(inside, local, torch.full_like(local, C)), inside


def topk_scores(
    user_vecs: Tensor,
    item_vecs: Tensor,
    k: int,
    chunk_items: int = 65536,
    exclude: Tensor | None = None,
) -> Tensor:
    """Exact top-k items by dot product u · v, never holding more than Q x chunk_items scores.

    Args:
        user_vecs: (Q, D).
        item_vecs: (V, D), rows 0 (padding) and 1 (OOV) included (they are masked).
        k: list length.
        chunk_items: items per matrix product.
        exclude: (Q, X) item indices never to return for each query (0 = nothing).

    Returns:
        (Q, k) long item indices, best first.
    """

    def score(start: int, end: int) -> Tensor:
        return user_vecs @ item_vecs[start:end].T  # (Q, C)

    return chunked_topk(score, item_vecs.shape[0], k, chunk_items, exclude)


def overlap_at_k(approx: Tensor, exact: Tensor) -> Tensor:
    """Recall of an approximate top-k against exact top-k: |A ∩ E| / |E| per query (0 entries ignored).

    Args:
        approx: (Q, K) item indices.
        exact: (Q, K) item indices.

    Returns:
        (Q,) float.
    """
    return _set_hits(approx, exact).sum(1).float() / target_set_size(exact).clamp(min=1).float()


def selection_value(metrics: dict[str, Any], select: str, k: int) -> float:
    """The number best.pt and early stopping follow: HR@k, NDCG@k or their sum (0 without queries)."""
    if not metrics["queries"]:
        return 0.0
    return sum(metrics[f"{name}@{k}"] for name in select.split("+"))
