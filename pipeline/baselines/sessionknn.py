"""Session-kNN baselines, STAN and V-SKNN.

The shared scorer `_SessionKNN` with its work budgets, and the two methods.
The training sessions they search: `sessionindex.py`; sparse helpers: `sparse.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdm.pipeline.baselines.popularity import popularity_scores
from sdm.pipeline.baselines.scoring import ScoreFn, _Entries
from sdm.pipeline.baselines.sessionindex import SessionIndex, training_session_events
from sdm.pipeline.baselines.sparse import coo, group_max, ranges, spmm, top_per_row
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.tables import load_item_counts

DAY_US = 86_400 * 1_000_000
# Bounds on the work of one group of queries (memory stays O(budget), whatever the batch).
PAIR_BUDGET = 1 << 22  # (query, prefix item, candidate session) triples before grouping
TRIPLE_BUDGET = 1 << 23  # (query, neighbour session, item) triples scored at once
DENSE_BUDGET = 1 << 24  # queries x widest candidate row: the padded top-k matrices


def distinct_prefix_items(qp: Tensor, prefix: Tensor, num_items: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each query's distinct prefix items (OOV included) and the position of their last occurrence.

    Returns:
        (query, item, last position), sorted by query then item.
    """
    pos = torch.arange(prefix.shape[1])
    valid = (pos.unsqueeze(0) <= qp.unsqueeze(1)) & (prefix != 0)
    q, p = valid.nonzero(as_tuple=True)
    key, inv = torch.unique(q * num_items + prefix[q, p].long(), return_inverse=True)
    last = torch.full((key.shape[0],), -1, dtype=torch.long).scatter_reduce_(0, inv, p, "amax")
    return key // num_items, key % num_items, last


class _SessionKNN:
    """Shared machinery of STAN and V-SKNN (module docs of each).

    For a query (the prefix of a held-out session) the candidate neighbours are
    the `sample_size` most recent training sessions that share an item with the
    prefix; each gets a similarity (`_similarity`), the `k` most similar are the
    neighbours (ties: the more recent first), and every item j of a neighbour n
    scores sum_n pair_weight(n) * item_weight(n, j) (`_pair_weight`,
    `_item_weight`), times `_item_factor(j)`. Scores are divided by the query's
    largest, so they lie in (0, 1]; items of no neighbour get a popularity score
    in (-1, 0) (ranked below every neighbour item, among themselves by
    training count, like item-CF's fallback).

    Vectorised over queries, on CPU: for a group of queries the candidate
    (query, session) pairs and their similarity sums are one sparse product of
    the (G, V) prefix weights with the (V, N) item -> sessions map (sorted by
    recency, so the most recent candidates are the first of each row); the most
    similar are a top-k over a padded (G, widest row) matrix; the item scores
    are a second sparse product of the
    (G, pairs) neighbour weights with the (pairs, V) item weights of each
    neighbour. No Python loop over queries or sessions; the group size bounds
    memory (`PAIR_BUDGET`, `TRIPLE_BUDGET`, `DENSE_BUDGET`). Maxima over shared
    items (the most recent shared prefix position) are read from the binary
    exponent of sums of distinct powers of two: exact for sessions of up to 53
    events (the default cut is 50); beyond, a contrived case could be one
    position off.
    """

    name = "session-knn"
    uses_q_pos = False  # needs the most recent prefix position shared with each candidate
    uses_n_pos = False  # needs the last position in each candidate of a shared item
    uses_match = False  # needs the position in each neighbour of its most recent prefix item

    def __init__(self, index: SessionIndex, counts: Tensor, k: int, sample_size: int | None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if sample_size is not None and sample_size < 0:
            raise ValueError(f"sample_size must be >= 0 (0: all), got {sample_size}")
        if index.sample_size is not None and (sample_size is None or sample_size > index.sample_size):
            raise ValueError(f"the index keeps {index.sample_size} sessions per item, fewer than sample_size")
        self.index = index
        self.num_items = index.num_items
        self.k = k
        self.sample_size = sample_size or None
        self.fallback = popularity_scores(counts.cpu())

    # Hooks: position weights of the prefix, similarity, neighbour and item weights.
    def _prefix_weights(self, last: Tensor, qp: Tensor) -> Tensor:
        raise NotImplementedError

    def _similarity(self, raw: Tensor, q: Tensor, rank: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _pair_weight(self, sim: Tensor, q: Tensor, pairs: dict[str, Tensor], ctx: dict[str, Tensor]) -> Tensor:
        return sim

    def _item_weight(self, pos: Tensor, owner: Tensor, pairs: dict[str, Tensor]) -> Tensor | None:
        return None

    def _item_factor(self, items: Tensor) -> Tensor | None:
        return None

    def begin_batch(self, batch: dict[str, Any]) -> Tensor | None:
        """Session start times (B,) of the batch (STAN's recency), or None."""
        ts = batch.get("start_ts")
        return ts.cpu() if ts is not None else None

    def score_fn(self, state: Tensor | None, qb: Tensor, qp: Tensor, prefix: Tensor) -> ScoreFn:
        """Scores of an item chunk for Q queries (dense only per chunk)."""
        t_q = state[qb.cpu()] if state is not None else None
        entries = self.query_scores(qp, prefix, t_q)
        q = prefix.shape[0]

        def score(start: int, end: int) -> Tensor:
            out = self.fallback[start:end].expand(q, end - start).clone()  # (Q, C)
            r, c, v = entries.in_range(start, end)
            out[r, c - start] = v
            return out

        return score

    def query_scores(self, qp: Tensor, prefix: Tensor, t_q: Tensor | None = None) -> _Entries:
        """Sparse neighbour scores (rows, cols, values in (0, 1]) of Q queries, each (row, col) once.

        Args:
            qp: (Q,) last prefix position.
            prefix: (Q, T) prefix item indices, 0 after qp.
            t_q: (Q,) start time of each query's session (us), or None (no recency decay).
        """
        qp, prefix = qp.cpu().long(), prefix.cpu()
        ix = self.index
        uq, ui, last = distinct_prefix_items(qp, prefix, self.num_items)
        lens = ix.item_ptr[ui + 1] - ix.item_ptr[ui]
        per_query = torch.zeros(qp.shape[0], dtype=torch.long).index_add_(0, uq, lens)
        cum = torch.cumsum(per_query, 0)
        mean_size = float(ix.size.double().mean()) if ix.num_sessions else 1.0
        max_queries = max(1, int(TRIPLE_BUDGET // (self.k * max(mean_size, 1.0))))
        rows, cols, vals = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
        q0, n = 0, qp.shape[0]
        while q0 < n:
            done = int(cum[q0 - 1]) if q0 else 0
            q1 = int(torch.searchsorted(cum, done + PAIR_BUDGET, right=True))
            q1 = min(max(q1, q0 + 1), q0 + max_queries, n)
            while q1 - q0 > 1 and (q1 - q0) * int(per_query[q0:q1].max()) > DENSE_BUDGET:
                q1 = q0 + max(1, DENSE_BUDGET // int(per_query[q0:q1].max()))
            e0, e1 = torch.searchsorted(uq, torch.tensor([q0, q1])).tolist()
            t = None if t_q is None else t_q[q0:q1].cpu().long()
            r, c, v = self._group_scores(uq[e0:e1] - q0, ui[e0:e1], last[e0:e1], qp[q0:q1], t, prefix[q0:q1])
            rows.append(r + q0)
            cols.append(c)
            vals.append(v)
            q0 = q1
        return _Entries(torch.cat(rows), torch.cat(cols), torch.cat(vals))

    def _group_scores(
        self, uq: Tensor, ui: Tensor, last: Tensor, qp: Tensor, t_q: Tensor | None, prefix: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(local query, item, score) of one group of G queries; `uq` local query of each prefix item."""
        ix = self.index
        g, v = qp.shape[0], self.num_items
        n_sess = max(ix.num_sessions, 1)
        w = self._prefix_weights(last, qp[uq])  # (E,) float64
        ctx = {
            "qp": qp,
            "t_q": t_q if t_q is not None else torch.empty(0, dtype=torch.long),
            "w2": torch.zeros(g, dtype=torch.float64).index_add_(0, uq, w * w),
            "distinct": torch.bincount(uq, minlength=g),
        }

        def prefix_rows(values: Tensor) -> Tensor:  # (G, V) over the distinct prefix items
            return coo(uq, ui, values, (g, v))

        # Candidates: the sessions sharing an item with the prefix, by sparse products with
        # the item -> sessions map, in (query, rank) order. Sums of distinct powers of two
        # carry maxima: the binary exponent of sum 2^(p_i - L) is the most recent shared
        # prefix position, that of sum 2^pos_n(i) the last position in n of a shared item
        # (distinct items have distinct last positions, so the sums are exact for sessions
        # of up to 53 events).
        mats = [(prefix_rows(w), ix.post_one)]
        if self.uses_q_pos:
            back = (last - qp[uq]).clamp(min=-1000).double()  # no underflow to 0
            mats.append((prefix_rows(torch.exp2(back)), ix.post_one))
        if self.uses_n_pos:
            mats.append((prefix_rows(torch.ones_like(w)), ix.post_exp2))
        cq, rank, vals = spmm(mats)
        raw = vals[0]
        pairs: dict[str, Tensor] = {}
        if self.uses_q_pos:
            pairs["q_pos"] = qp[cq] + torch.frexp(vals[1]).exponent.long() - 1
        if self.uses_n_pos:
            pairs["n_pos"] = torch.frexp(vals[-1]).exponent.long() - 1
        # The sample_size most recent candidates of each query: the first of its row.
        if self.sample_size is not None:
            counts = torch.bincount(cq, minlength=g)
            keep = torch.arange(cq.shape[0]) - (torch.cumsum(counts, 0) - counts)[cq] < self.sample_size
            cq, rank, raw = cq[keep], rank[keep], raw[keep]
            pairs = {name: x[keep] for name, x in pairs.items()}
        sim = self._similarity(raw, cq, rank, ctx)
        # The k most similar: similarities compared at float32 precision relative to the query's
        # best (sums taken in another order stay ties), ties -> the more recent session.
        rel = (sim / group_max(sim, cq, g)[cq]).float().clamp(min=0)
        key = (rel.view(torch.int32).long() << n_sess.bit_length()) | (n_sess - 1 - rank)
        sel = top_per_row(key, cq, g, self.k)
        nq, nrank = cq[sel], rank[sel]
        pairs = {name: x[sel] for name, x in pairs.items()}
        if self.uses_match:
            # Position in the neighbour of the most recent prefix item it holds.
            star = prefix[nq, pairs["q_pos"]].long()
            at = torch.searchsorted(ix.sess_key, nrank * v + star)
            pairs["n_pos"] = ix.sess_pos[at]
        nw = self._pair_weight(sim[sel], nq, pairs, ctx)
        # Neighbours -> (query, item) scores: (G, pairs) x (pairs, V), a pair's row holding
        # its session's items with their item weights.
        sizes = ix.sess_ptr[nrank + 1] - ix.sess_ptr[nrank]
        owner, idx = ranges(ix.sess_ptr[nrank], sizes)
        iw = self._item_weight(ix.sess_pos[idx], owner, pairs)
        n_pairs = nq.shape[0]
        left = coo(nq, torch.arange(n_pairs), nw, (g, n_pairs))
        p_val = iw if iw is not None else torch.ones(idx.shape[0], dtype=torch.float64)
        right = coo(owner, ix.sess_item[idx], p_val, (n_pairs, v))
        rq, item, (score,) = spmm([(left, right)])
        factor = self._item_factor(item)
        if factor is not None:
            score = score * factor
        score = score / group_max(score, rq, g)[rq]
        return rq, item, score.float()


class STAN(_SessionKNN):
    """STAN, Sequence and Time Aware Neighbourhood (Garg et al., SIGIR 2019), full ranking.

    For a query with prefix i_1 .. i_L (L = t - 1 events, repeats and OOV
    included) and each distinct prefix item i with last position p_i (1-based):

        w_i = exp((p_i - L) / lambda_spw)                           (lambda 1)

    A candidate neighbour n (one of the `sample_size` most recent training
    sessions sharing an item with the prefix; distinct items I_n) has

        sim(s, n) = sum_{i in s & I_n} w_i / (sqrt(sum_{i in s} w_i^2) sqrt(|I_n|))
                    * exp(-(t_s - t_n) / lambda_snh)                (lambda 2)

    with t_s, t_n the start times of the query's and the neighbour's sessions
    (t_s - t_n clamped at 0; lambda_snh in days). The `k` most similar are the
    neighbours, and item j scores

        score(j) = sum_{n: j in n} sim(s, n) * exp(-|pos_n(j) - pos_n(i*)| / lambda_inh)   (lambda 3)

    where pos_n(x) is the last position of x in n and i* the matching item:
    with `matching="session"` (default, the paper's definition) the most recent
    prefix item that n holds; with "neighbour" the shared item occurring last in
    n (session-rec's reference code). Prefix items are scored too ("reminders":
    re-visits are common).

    Defaults: sample_size, lambda 1 and lambda 3 are session-rec's STAN defaults,
    k = 500 one of its tuned values; lambda 2 = 100 days and the paper's matching
    item were chosen on the validation splits of the five shared logs
    (`bench/knn_bench.py --quality --split valid` reports them): with lambda 2 = 5 days
    and session-rec's matching item MovieLens-100K's validation HR@50 was 0.269
    against 0.384 (its training sessions span months, so a 5-day decay keeps only
    the last week's sessions as neighbours); on the four short logs (hours) both
    choices move HR@50 by less than 0.002.

    Args:
        index: the training sessions (`SessionIndex`).
        counts: (V,) training counts (fallback order).
        k: neighbours (default 500).
        sample_size: most recent candidate sessions per query (default 5000; 0/None: all).
        lambda_spw: lambda 1, position decay in the query session (events; default 1.02).
        lambda_snh: lambda 2, recency decay of the neighbour session (days; default 100; None: off).
        lambda_inh: lambda 3, decay around the matching item in the neighbour (events; default 2.05).
        matching: "session" (default) or "neighbour": which item i* is (above).
    """

    name = "stan"
    uses_n_pos = True

    def __init__(
        self,
        index: SessionIndex,
        counts: Tensor,
        k: int = 500,
        sample_size: int | None = 5000,
        lambda_spw: float = 1.02,
        lambda_snh: float | None = 100.0,
        lambda_inh: float = 2.05,
        matching: str = "session",
    ) -> None:
        super().__init__(index, counts, k, sample_size)
        if matching not in ("neighbour", "session"):
            raise ValueError(f"matching must be 'neighbour' or 'session', got {matching!r}")
        self.matching = matching
        self.uses_match = self.uses_q_pos = matching == "session"
        self.uses_n_pos = matching == "neighbour"
        for what, v in (("lambda_spw", lambda_spw), ("lambda_inh", lambda_inh), ("lambda_snh", lambda_snh or 1)):
            if not v > 0:
                raise ValueError(f"{what} must be > 0, got {v}")
        self.lambda_spw, self.lambda_snh, self.lambda_inh = lambda_spw, lambda_snh, lambda_inh

    @classmethod
    def from_data(cls, data_dir: Path, manifest: dict[str, Any] | None = None, **params: Any) -> STAN:
        """Build from the training shards of a shard directory; `params` as the constructor's."""
        manifest = manifest or read_manifest(data_dir)
        events = training_session_events(data_dir, manifest)
        index = SessionIndex(events, int(manifest["num_items"]), params.get("sample_size", 5000))
        return cls(index, load_item_counts(data_dir, manifest), **params)

    def _prefix_weights(self, last: Tensor, qp: Tensor) -> Tensor:
        return torch.exp((last - qp).double() / self.lambda_spw)

    def _similarity(self, raw: Tensor, q: Tensor, rank: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        sim = raw / (ctx["w2"][q].sqrt() * self.index.size[rank].double().sqrt())
        if self.lambda_snh is not None and ctx["t_q"].numel():
            dt = (ctx["t_q"][q] - self.index.start_ts[rank]).clamp(min=0).double()
            sim = sim * torch.exp(-dt / (self.lambda_snh * DAY_US))
        return sim

    def _item_weight(self, pos: Tensor, owner: Tensor, pairs: dict[str, Tensor]) -> Tensor:
        return torch.exp(-(pos - pairs["n_pos"][owner]).abs().double() / self.lambda_inh)


class VSKNN(_SessionKNN):
    """V-SKNN, vector multiplication session-kNN (Ludewig & Jannach 2018; session-rec's VMContextKNN).

    For a query with prefix i_1 .. i_L and each distinct prefix item i with last
    position p_i (1-based), the position weight (`weighting`) is

        div (linear decay, default): p_i / L;   same: 1;   quadratic: (p_i / L)^2;
        log: 1 / log10(L - p_i + 1.7)

    A candidate neighbour n (one of the `sample_size` most recent training
    sessions sharing an item with the prefix) has the dot product

        sim(s, n) = sum_{i in s & n} w_i / |distinct items of s|

    and the `k` most similar are the neighbours. With d(n) = 1 + L - max{p_i: i in n}
    (1 = the last prefix item is in n) and the score decay (`weighting_score`)
    div: 1/d (default), same: 1, quadratic: 1/d^2, log: 1/log10(d + 1.7), item j scores

        score(j) = (1 + idf_weighting * idf(j)) * sum_{n: j in n} sim(s, n) * decay(d(n))

    with idf(j) = max(log(N / n_j), 0), N training sessions and n_j training
    events of j. Prefix items are scored too (reminders).

    Args:
        index: the training sessions (`SessionIndex`).
        counts: (V,) training counts (fallback order).
        k: neighbours (default 100).
        sample_size: most recent candidate sessions per query (default 500; 0/None: all).
        weighting: position weight of prefix items (default "div").
        weighting_score: neighbour decay by its most recent match (default "div").
        idf_weighting: weight of the idf boost (default 1; 0: off).
    """

    name = "vsknn"
    uses_q_pos = True
    WEIGHTINGS = ("div", "same", "quadratic", "log")

    def __init__(
        self,
        index: SessionIndex,
        counts: Tensor,
        k: int = 100,
        sample_size: int | None = 500,
        weighting: str = "div",
        weighting_score: str = "div",
        idf_weighting: float = 1.0,
    ) -> None:
        super().__init__(index, counts, k, sample_size)
        for what, v in (("weighting", weighting), ("weighting_score", weighting_score)):
            if v not in self.WEIGHTINGS:
                raise ValueError(f"{what} must be one of {self.WEIGHTINGS}, got {v!r}")
        if idf_weighting < 0:
            raise ValueError(f"idf_weighting must be >= 0, got {idf_weighting}")
        self.weighting, self.weighting_score, self.idf_weighting = weighting, weighting_score, idf_weighting
        n = max(index.num_sessions, 1)
        idf = torch.log(n / index.item_events.clamp(min=1).double()).clamp(min=0)
        self.factor = 1 + idf_weighting * idf  # (V,)

    @classmethod
    def from_data(cls, data_dir: Path, manifest: dict[str, Any] | None = None, **params: Any) -> VSKNN:
        """Build from the training shards of a shard directory; `params` as the constructor's."""
        manifest = manifest or read_manifest(data_dir)
        events = training_session_events(data_dir, manifest)
        index = SessionIndex(events, int(manifest["num_items"]), params.get("sample_size", 500))
        return cls(index, load_item_counts(data_dir, manifest), **params)

    def _prefix_weights(self, last: Tensor, qp: Tensor) -> Tensor:
        p, n = (last + 1).double(), (qp + 1).double()
        if self.weighting == "div":
            return p / n
        if self.weighting == "quadratic":
            return (p / n) ** 2
        if self.weighting == "log":
            return 1 / torch.log10(n - p + 1.7)
        return torch.ones_like(p)

    def _similarity(self, raw: Tensor, q: Tensor, rank: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        return raw / ctx["distinct"][q].double()

    def _pair_weight(self, sim: Tensor, q: Tensor, pairs: dict[str, Tensor], ctx: dict[str, Tensor]) -> Tensor:
        d = (ctx["qp"][q] - pairs["q_pos"] + 1).double()
        if self.weighting_score == "div":
            return sim / d
        if self.weighting_score == "quadratic":
            return sim / (d * d)
        if self.weighting_score == "log":
            return sim / torch.log10(d + 1.7)
        return sim

    def _item_factor(self, items: Tensor) -> Tensor | None:
        return self.factor[items] if self.idf_weighting else None
