"""What a ranking scores: a model as a scorer (`ModelScorer`), the queries of a batch
(`Queries`, `session_queries`) and which items each query may be given (`Candidates`).

A *scorer* is anything with `name`, `begin_batch(batch) -> state` and
`score_fn(state, qb, qp, prefix) -> (start, end) -> (Q, end - start) scores`:
the model (wrapped in `ModelScorer`) and the baselines (`pipeline/baselines`) go
through the same top-K, masking, metric and dump code (`pipeline/ranking.py`,
`serve/recommend.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from sdm.errors import SdmError
from sdm.model.neighbours import merge_candidates
from sdm.model.repeat import NO_COPY, History, copy_scores
from sdm.pipeline.catalogue import Catalogue, ColdIndex, cold_item_vectors
from sdm.pipeline.metrics import add_bonus, add_copy_scores

ScoreFn = Callable[[int, int], Tensor]


class Scorer(Protocol):
    """What the evaluator needs from a model or a baseline."""

    name: str

    def begin_batch(self, batch: dict[str, Any]) -> Any: ...

    def score_fn(self, state: Any, qb: Tensor, qp: Tensor, prefix: Tensor) -> ScoreFn: ...


class ModelScorer:
    """Dot-product scorer around an SDM-like model (`model(batch) -> (B, T, D)`, `all_item_vectors()`).

    Args:
        model: the model, already on its device and in eval mode.
        name: shown in reports (default: the model config's variant).
        catalogue: cold items to score after the vocabulary (their side-feature vectors).
    """

    def __init__(self, model: torch.nn.Module, name: str | None = None, catalogue: Catalogue | None = None) -> None:
        self.model = model
        cfg = getattr(model, "config", None)
        self.name = name or str(getattr(cfg, "variant", type(model).__name__))
        self.scores_cold = catalogue is not None
        with torch.no_grad():
            self.items = model.all_item_vectors().float()  # (V, D)
            self.num_warm = len(self.items)
            if catalogue is not None:
                self.items = torch.cat([self.items, cold_item_vectors(model, catalogue)])  # (V + C, D)
        self._cold: Tensor | None = None  # the cold vectors as built, kept by the first `rescale_cold`
        self.bonus_scale = 1.0
        """Multiplier of the neighbour bonus (one pass, several weights: `evaluate_model(bonus_weights=...)`)."""

    @property
    def has_bonus(self) -> bool:
        """Whether the model's neighbour term is active (its bonus changes scores)."""
        table = getattr(self.model, "neighbours", None)
        return table is not None and table.active

    def rescale_cold(self, factor: float) -> None:
        """Score the cold items with their vectors as built times `factor` (one pass, several cold scales)."""
        if self._cold is None:
            self._cold = self.items[self.num_warm :].clone()
        torch.mul(self._cold, factor, out=self.items[self.num_warm :])

    def as_built(self) -> None:
        """Undo `rescale_cold` and `bonus_scale`."""
        if self._cold is not None:
            self.rescale_cold(1.0)
        self.bonus_scale = 1.0

    def begin_batch(self, batch: dict[str, Any]) -> tuple[Tensor, History | None]:
        """User vectors of every session position (B, T, D), and the repeat head's history (or None)."""
        if not getattr(self.model, "repeat", None):
            return self.model(batch).float(), None
        vecs, history = self.model(batch, with_history=True)
        return vecs.float(), history

    def query_vectors(self, state: tuple[Tensor, History | None], qb: Tensor, qp: Tensor) -> Tensor:
        """(Q, D) user vector of each query."""
        return state[0][qb, qp]

    def index_rank(self, index: Any, state: tuple[Tensor, History | None], qb: Tensor, qp: Tensor, prefix: Tensor,
                   k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(scores, items), each (Q, k): the top-k from an item index, merged with the repeat
        head's and the neighbour term's candidates as serving does (`retrieval.rank.rank`)."""
        from sdm.retrieval.rank import rank

        u = self.query_vectors(state, qb, qp)
        cands = self.candidates(state, qb, qp, prefix)
        if cands is None:
            return rank(u, index, k, exclude)
        items, logits, bonus = cands
        return rank(u, index, k, exclude, items, logits, self.items, candidate_bonus=bonus)

    def index_topk(self, index: Any, state: tuple[Tensor, History | None], q: Queries, k: int,
                   exclude: Tensor | None) -> Tensor:  # fmt: skip
        """(Q, k) items of `index_rank` for the queries `q`."""
        return self.index_rank(index, state, q.qb, q.qp, q.prefix, k, exclude)[1]

    def candidates(self, state: tuple[Tensor, History | None], qb: Tensor, qp: Tensor,
                   prefix: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:  # fmt: skip
        """The items whose score is more than u . v_j, for `retrieval.rank.rank`: (items, copy
        logits R, bonus B or None), or None for a plain dot product."""
        history = copy_scores(state[1], qb, qp) if state[1] is not None else None
        if not self.has_bonus:
            return None if history is None else (*history, None)
        hist_items, hist_logits = history if history is not None else (None, None)
        return merge_candidates(hist_items, hist_logits, *self.model.neighbours.bonus(prefix, qp), NO_COPY)

    def score_fn(self, state: tuple[Tensor, History | None], qb: Tensor, qp: Tensor, prefix: Tensor) -> ScoreFn:
        """Scores u_q · v_j of an item chunk; with a repeat head, the query's history items
        get logaddexp(u_q · v_j, R_qj) (`copy_scores`); with a neighbour term, its bonus
        items get + B_qj (`model/neighbours.py`) times `bonus_scale`, read when called."""
        u = self.query_vectors(state, qb, qp)  # (Q, D)
        history = copy_scores(state[1], qb, qp) if state[1] is not None else None  # (Q, H) each
        bonus = self.model.neighbours.bonus(prefix, qp) if self.has_bonus else None  # (Q, T * N) each

        def score(start: int, end: int) -> Tensor:
            out = u @ self.items[start:end].T  # (Q, C)
            if history is not None:
                out = add_copy_scores(out, start, *history)
            if bonus is not None:
                items, b = bonus
                out = add_bonus(out, start, items, b if self.bonus_scale == 1.0 else b * self.bonus_scale)
            return out

        return score


@dataclass
class Queries:
    """The SPEC-6 queries of a batch of sessions.

    Attributes:
        qb: (Q,) session (row of the batch) of each query.
        qp: (Q,) 0-based position of the user vector (last prefix item); t = qp + 2.
        target: (Q,) next item y = item at qp + 1.
        targets: (Q, T) target set G: items at positions qp+1 .. len-1, 0 elsewhere.
        prefix: (Q, T) prefix items at positions 0 .. qp, 0 elsewhere.
        target_oov: (Q,) raw-identity hash of an OOV next item (0 when known or not recorded;
            also set when the item is a cold candidate).
    """

    qb: Tensor
    qp: Tensor
    target: Tensor
    targets: Tensor
    prefix: Tensor
    target_oov: Tensor

    def __len__(self) -> int:
        return int(self.qb.shape[0])

    def take(self, sl: slice) -> Queries:
        """The queries in `sl`."""
        return Queries(self.qb[sl], self.qp[sl], self.target[sl], self.targets[sl], self.prefix[sl], self.target_oov[sl])


def session_queries(items: Tensor, seq_len: Tensor, oov: Tensor | None = None, cold: Tensor | None = None) -> Queries:
    """Every query of a batch, vectorised (no Python loop over sessions or positions).

    Args:
        items: (B, T) item indices, right-padded with 0.
        seq_len: (B,) session lengths.
        oov: optional (B, T) raw-identity hash of OOV events (0 elsewhere; the shards'
            `seq_oov`): distinct unknown items then stay distinct in the target set G
            (as negative keys, which no top-K list holds), instead of all being index 1.
        cold: optional (B, T) candidate index of the events of cold items (0 elsewhere,
            `ColdIndex.lookup`): such an event is that index in target, targets and prefix.

    Returns:
        The batch's `Queries`, ordered by session then position.
    """
    T = items.shape[1]
    pos = torch.arange(T, device=items.device)
    qb, qp = (pos.unsqueeze(0) < (seq_len - 1).unsqueeze(1)).nonzero(as_tuple=True)  # p + 1 < len
    keyed = items if oov is None else torch.where(oov > 0, -oov, items.long())  # (B, T)
    target_oov = (-keyed[qb, qp + 1]).clamp(min=0)
    if cold is not None:
        items = torch.where(cold > 0, cold, items.long())
        keyed = torch.where(cold > 0, cold, keyed.long())
    rows = keyed[qb]  # (Q, T)
    in_session = pos.unsqueeze(0) < seq_len[qb].unsqueeze(1)
    after = pos.unsqueeze(0) > qp.unsqueeze(1)
    zero = torch.zeros_like(rows)
    return Queries(
        qb=qb,
        qp=qp,
        target=items[qb, qp + 1],
        targets=torch.where(after & in_session, rows, zero),
        prefix=torch.where(~after, items[qb], torch.zeros_like(items[qb])),
        target_oov=target_oov,
    )


class Candidates:
    """Which items a query may be recommended, and which are masked for it.

    `vocabulary`: the items of the training vocabulary, 2 .. V-1. With a catalogue, also
    its cold items V .. V+C-1, each only while the catalogue knows it at the query's
    time (`pipeline/catalogue.py`); OOV events of cold items become their indices.
    `exclude_seen` masks the session prefix, `exclude_history` also the long-term window.

    Args:
        num_items: V.
        catalogue: the cold items, or None (vocabulary only).
        device: where the batches (and so the lookups) live.
        exclude_seen: mask each query's prefix items.
        exclude_history: mask each query's long-term window items too (implies exclude_seen).
    """

    def __init__(self, num_items: int, catalogue: Catalogue | None = None, device: torch.device | str = "cpu",
                 exclude_seen: bool = False, exclude_history: bool = False) -> None:  # fmt: skip
        self.num_items = num_items
        self.catalogue = catalogue
        self.cold = ColdIndex(catalogue, device) if catalogue is not None else None
        self.total = catalogue.candidates if catalogue is not None else num_items
        self.exclude_seen = exclude_seen or exclude_history
        self.exclude_history = exclude_history

    def prepare(self, batch: dict[str, Any]) -> None:
        """Add the cold indices of the batch's events: "seq_cold" (B, T), "long_cold" (B, L), and
        "copy_items" for the model's repeat head (so it can copy a cold item); nothing without a catalogue."""
        if self.cold is None:
            return
        if "seq_oov" not in batch:
            raise SdmError(
                "--candidates catalogue needs shards with seq_oov (the raw identity of OOV events); "
                "rerun `sdm sessionize`"
            )
        batch["seq_cold"] = self.cold.lookup(batch["seq_oov"])
        batch["long_cold"] = self.cold.lookup(batch["long_oov"])
        seq, long = batch["seq"]["item"], batch["long"]["item"]
        batch["copy_items"] = {
            "seq": torch.where(batch["seq_cold"] > 0, batch["seq_cold"], seq.long()),
            "long": torch.where(batch["long_cold"] > 0, batch["long_cold"], long.long()),
        }

    def queries(self, batch: dict[str, Any]) -> Queries:
        """The batch's queries (after `prepare`)."""
        return session_queries(batch["seq"]["item"], batch["seq_len"], batch.get("seq_oov"), batch.get("seq_cold"))

    def exclude(self, batch: dict[str, Any], q: Queries) -> Tensor | None:
        """(Q, X) items to mask per query (0 = nothing), or None."""
        if not self.exclude_seen:
            return None
        if not self.exclude_history:
            return q.prefix
        long = batch["copy_items"]["long"] if "copy_items" in batch else batch["long"]["item"]
        return torch.cat([q.prefix, long[q.qb].to(q.prefix.dtype)], dim=1)

    def score_fn(self, scorer: Scorer, state: Any, q: Queries, batch: dict[str, Any]) -> ScoreFn:
        """The scorer's scores of any candidate range. Without a catalogue: the scorer's own.
        With one, a scorer that does not know cold items (`scores_cold`) sees prefixes as
        before (cold events are OOV, 1) and its cold scores are -inf; unavailable cold items
        get -inf for every scorer."""
        if self.cold is None:
            return scorer.score_fn(state, q.qb, q.qp, q.prefix)
        if getattr(scorer, "scores_cold", False):
            fn = scorer.score_fn(state, q.qb, q.qp, q.prefix)
        else:
            vocab_prefix = torch.where(q.prefix >= self.num_items, torch.ones_like(q.prefix), q.prefix)
            fn = _vocabulary_only(scorer.score_fn(state, q.qb, q.qp, vocab_prefix), self.num_items, len(q))
        return _available_only(fn, self.cold, batch["seq_ts"][q.qb, q.qp])

    def out_of_vocabulary(self, q: Queries) -> Tensor:
        """(Q,) bool: the target is not in the training vocabulary (OOV, or a cold item)."""
        return (q.target == 1) | (q.target >= self.num_items)

    def target_kinds(self, q: Queries) -> dict[str, Tensor]:
        """With a catalogue, {"cold": target is a cold item, "warm": target is in the vocabulary} (Q,) masks."""
        if self.cold is None:
            return {}
        return {"cold": q.target >= self.num_items, "warm": (q.target > 1) & (q.target < self.num_items)}


def _vocabulary_only(fn: ScoreFn, num_items: int, n_queries: int) -> ScoreFn:
    """`fn` over vocabulary indices, -inf for the cold candidates from `num_items` on."""

    def score(start: int, end: int) -> Tensor:
        parts = [fn(start, min(end, num_items)).float()] if start < num_items else []
        if end > num_items:
            device = parts[0].device if parts else "cpu"
            parts.append(torch.full((n_queries, end - max(start, num_items)), float("-inf"), device=device))
        return torch.cat(parts, dim=1)

    return score


def _available_only(fn: ScoreFn, cold: ColdIndex, query_time: Tensor) -> ScoreFn:
    """`fn` with -inf for the cold candidates that are not yet known at each query's time (Q,)."""

    def score(start: int, end: int) -> Tensor:
        s = fn(start, end).float()
        lo = max(start, cold.num_items)
        if end > lo:
            ok = cold.available(lo, end, query_time.to(cold.known_from.device)).to(s.device)
            s[:, lo - start :].masked_fill_(~ok, float("-inf"))
        return s

    return score
