"""Item indexes for top-k inner-product retrieval: exact, and faiss with automatic parameters.

Both take the item table as the model returns it, (V, D) with rows 0 (padding)
and 1 (OOV) included, index items 2..V-1 only, and return item *indices*
(2..V-1; 0 = "no item") with their scores. `search_scores(u, k, exclude, allowed)` is
what `retrieval.rank.rank` calls; `search(u, k, exclude)` returns the indices only
(what `sdm evaluate --index faiss` calls).

`allowed` restricts a search to some rows (row i = item index i + 2): None = every
row, an int n = the first n rows, or an (N,) bool array. Serving uses it to keep
the cold rows of an export (after the vocabulary's) out of a "vocabulary" request,
and cold items not yet known at the request's time out of a "catalogue" one
(`serve.api`). `add(vecs)` appends rows (items added after export, `Recommender.add_items`).

`FaissIndex(kind="auto")` picks the index from the catalogue size N:

- N < `FLAT_BELOW` (50,000): exact `IndexFlatIP` — brute force over so few items
  is already fast, and an approximate index would only lose recall.
- otherwise IVF-Flat over the vectors made L2-searchable by the standard
  MIPS-to-nearest-neighbour transform (each item gets one extra coordinate
  sqrt(M^2 - |v|^2), M = the largest norm, and queries a 0: the item with the
  largest u . v is then the nearest in L2), with nlist = 4 sqrt(N) rounded to a
  power of two (clamped to 64..65536), k-means on at most 64 vectors per list,
  and nprobe the smallest power of two whose recall@100 against exact search on
  `tune_queries` (default: 512 item vectors as queries) reaches
  `target_recall` + 0.01. If that takes more than 1/8 of the lists (vectors with
  little cluster structure, e.g. random ones), IVF would scan so much of the
  catalogue that it is no faster than exact search: "auto" then falls back to the
  exact `IndexFlatIP` and says so in `params["fallback"]`. The choice is in
  `params` (callers print it).

`kind="hnsw"` keeps the older HNSW graph (M = `m`, efSearch = `ef_search`).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from sdm.errors import SdmError

FLAT_BELOW = 50_000
TUNE_K = 100
Allowed = Union[int, np.ndarray, None]
"""Rows a search may return: None = all, an int n = rows 0..n-1, an (N,) bool array = its True rows."""


def import_faiss():  # type: ignore[no-untyped-def]
    """The faiss module, or the one-line error naming the extra to install."""
    try:
        import faiss
    except ImportError:
        raise SdmError("--index faiss needs faiss: pip install 'sdm[faiss]'") from None
    return faiss


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _finish(
    scores: np.ndarray, ids: np.ndarray, k: int, exclude: Tensor | np.ndarray | None
) -> tuple[Tensor, Tensor]:
    """Index rows -> item indices (+2), drop excluded items, keep the best k; pad with (-inf, 0)."""
    scores_t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    ids_t = torch.from_numpy(np.ascontiguousarray(ids)).long()
    found = ids_t >= 0
    ids_t = torch.where(found, ids_t + 2, torch.zeros_like(ids_t))
    scores_t = torch.where(found, scores_t, torch.full_like(scores_t, float("-inf")))
    if exclude is not None:
        ex = torch.as_tensor(exclude).long().cpu()
        drop = (ids_t.unsqueeze(2) == ex.unsqueeze(1)).any(2) & (ids_t != 0)  # (Q, k_search)
        scores_t = scores_t.masked_fill(drop, float("-inf"))
    top_s, pos = scores_t.topk(min(k, scores_t.shape[1]), dim=1)
    out = torch.where(torch.isneginf(top_s), 0, ids_t.gather(1, pos))
    if out.shape[1] < k:
        pad = k - out.shape[1]
        out = torch.cat([out, out.new_zeros(out.shape[0], pad)], 1)
        top_s = torch.cat([top_s, top_s.new_full((top_s.shape[0], pad), float("-inf"))], 1)
    return top_s, out


class ExactIndex:
    """Exact top-k by one matrix product, for serving small and medium catalogues.

    Args:
        item_vecs: (V, D), rows 0 and 1 (padding, OOV) are never returned.
    """

    def __init__(self, item_vecs: Tensor | np.ndarray) -> None:
        self.vecs = _np(item_vecs)[2:]  # (N, D)
        self._vecs_t = torch.from_numpy(self.vecs)
        self.num_items = self.vecs.shape[0] + 2
        self.params: dict[str, Any] = {"kind": "exact", "items": self.vecs.shape[0]}

    def search_scores(
        self, user_vecs: Tensor | np.ndarray, k: int, exclude: Tensor | np.ndarray | None = None,
        allowed: Allowed = None,
    ) -> tuple[Tensor, Tensor]:
        """(scores, item indices), each (Q, k), best first; (-inf, 0) where fewer than k items are left.

        `allowed` (see `Allowed`): an int scores only the first rows, so a search over them
        is the very computation an index of those rows alone does.
        """
        u = torch.from_numpy(_np(user_vecs))
        vecs = self._vecs_t[:allowed] if isinstance(allowed, int) else self._vecs_t
        # torch, not numpy BLAS: it honours torch.set_num_threads (a service sets 1 per request).
        scores = u @ vecs.T  # (Q, n)
        n = vecs.shape[0]
        if isinstance(allowed, np.ndarray):
            scores.masked_fill_(~torch.from_numpy(np.asarray(allowed[:n], dtype=bool)), float("-inf"))
            n = int(np.count_nonzero(allowed[:n]))
        k_search = min(k + (0 if exclude is None else exclude.shape[1]), n)
        s, part = scores.topk(k_search, dim=1)  # (Q, k_search)
        return _finish(s.numpy(), part.numpy(), k, exclude)

    def add(self, item_vecs: Tensor | np.ndarray) -> None:
        """Append (A, D) vectors as rows N..N+A-1 (item indices N+2..)."""
        self.vecs = np.concatenate([self.vecs, _np(item_vecs)])
        self._vecs_t = torch.from_numpy(self.vecs)
        self.num_items = self.vecs.shape[0] + 2
        self.params["items"] = self.vecs.shape[0]

    def search(self, user_vecs: Tensor | np.ndarray, k: int, exclude: Tensor | np.ndarray | None = None) -> Tensor:
        """(Q, k) item indices, best first."""
        return self.search_scores(user_vecs, k, exclude)[1]


def auto_nlist(n: int) -> int:
    """IVF lists for a catalogue of n items: 4 sqrt(n) rounded to a power of two, in 64..65536."""
    return int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


class FaissIndex:
    """Approximate (or, for small catalogues, exact) inner-product top-k with faiss.

    Args:
        item_vecs: (V, D), rows 0 and 1 (padding, OOV) are left out of the index.
        kind: "auto" (by catalogue size, see the module docstring), "flat", "ivf" or "hnsw".
        nlist: IVF lists (default `auto_nlist(N)`).
        nprobe: IVF lists searched (default: tuned to `target_recall`).
        m: HNSW neighbours per node.
        ef_search: HNSW search breadth (raised to 2k per search when smaller).
        target_recall: recall@100 against exact search that the nprobe tuning aims for.
        tune_queries: (Q, D) query vectors to tune nprobe on (default: item vectors).
        seed: k-means and sampling seed.
        announce: print the chosen parameters on stderr.
    """

    def __init__(
        self,
        item_vecs: Tensor | np.ndarray,
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        m: int = 32,
        ef_search: int = 256,
        target_recall: float = 0.95,
        tune_queries: Tensor | np.ndarray | None = None,
        seed: int = 0,
        announce: bool = False,
    ) -> None:
        faiss = import_faiss()
        self.faiss = faiss
        vecs = _np(item_vecs)[2:]  # (N, D)
        n, d = vecs.shape
        if n < 1:
            raise SdmError("cannot index an empty catalogue")
        self.num_items = n + 2
        auto = kind == "auto"
        if auto:
            kind = "flat" if n < FLAT_BELOW else "ivf"
        self.kind = kind
        self.ef_search = ef_search
        self.max_norm = 0.0
        self._no_tail(d)
        self.params: dict[str, Any] = {"kind": kind, "items": n}
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
            self.index.add(vecs)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            self.index.add(vecs)
            self.params.update(m=m, ef_search=ef_search)
        elif kind == "ivf":
            self._build_ivf(vecs, nlist, seed)
            limit = max(1, int(self.index.nlist) // 8) if auto else None
            if nprobe is None:
                nprobe = self._tune(vecs, tune_queries, target_recall, seed, limit)
            if nprobe is None:  # auto, and IVF would need more than 1/8 of the lists
                self.kind = "flat"
                self.params = {"kind": "flat", "items": n, "fallback": (
                    f"IVF with {int(self.index.nlist)} lists needs nprobe > {limit} for recall@100 "
                    f">= {target_recall + 0.01:.2f}; exact search is as fast")}  # fmt: skip
                self.index = faiss.IndexFlatIP(d)
                self.index.add(vecs)
            else:
                self.index.nprobe = nprobe
                self.params.update(nlist=int(self.index.nlist), nprobe=int(nprobe), max_norm=self.max_norm)
        else:
            raise SdmError(f"unknown faiss index kind {kind!r}; expected auto, flat, ivf or hnsw")
        if announce:
            print(f"[index] faiss {describe(self.params)}", file=sys.stderr, flush=True)

    def _no_tail(self, d: int) -> None:
        """No vector kept aside yet (IVF's `add` of vectors longer than the build's, see `add`)."""
        self.tail_rows = np.zeros(0, dtype=np.int64)
        self.tail_vecs = np.zeros((0, d), dtype=np.float32)

    # -- IVF ----------------------------------------------------------------------

    def _build_ivf(self, vecs: np.ndarray, nlist: int | None, seed: int) -> None:
        faiss = self.faiss
        n, d = vecs.shape
        nlist = max(1, min(nlist or auto_nlist(n), n))
        norms = np.linalg.norm(vecs, axis=1)
        self.max_norm = float(norms.max())
        extra = np.sqrt(np.maximum(self.max_norm**2 - norms**2, 0.0)).astype(np.float32)
        aug = np.ascontiguousarray(np.concatenate([vecs, extra[:, None]], axis=1))  # (N, D + 1)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d + 1), d + 1, nlist, faiss.METRIC_L2)
        # 10 k-means iterations on <= 64 points per list: the lists only need to be
        # roughly right, nprobe is tuned on the result (the faiss defaults cost ~6x more).
        index.cp.niter = 10
        index.cp.seed = seed
        index.cp.max_points_per_centroid = 64
        sample = aug
        if n > 64 * nlist:
            sample = aug[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
        index.train(sample)
        index.add(aug)
        self.index = index

    def _tune(
        self, vecs: np.ndarray, queries: Tensor | np.ndarray | None, target: float, seed: int, limit: int | None
    ) -> int | None:
        """Smallest power-of-two nprobe with mean recall@100 >= target + 0.01 on the tuning queries.

        None when `limit` is given and that needs more than `limit` lists.
        """
        if queries is None:
            rng = np.random.default_rng(seed + 1)
            queries = vecs[rng.choice(len(vecs), min(512, len(vecs)), replace=False)]
        q = _np(queries)
        k = min(TUNE_K, len(vecs))
        exact = self.faiss.IndexFlatIP(vecs.shape[1])
        exact.add(vecs)
        _, truth = exact.search(q, k)
        nprobe = 1
        while True:
            self.index.nprobe = nprobe
            _, got = self.index.search(_augment_queries(q), k)
            recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, truth)]))
            if recall >= target + 0.01 or nprobe >= self.index.nlist:
                self.params["tuned_recall@100"] = round(recall, 4)
                return min(nprobe, int(self.index.nlist))
            if limit is not None and nprobe * 2 > limit:
                return None
            nprobe *= 2

    # -- search -------------------------------------------------------------------

    def search_scores(
        self, user_vecs: Tensor | np.ndarray, k: int, exclude: Tensor | np.ndarray | None = None,
        allowed: Allowed = None,
    ) -> tuple[Tensor, Tensor]:
        """(scores u . v, item indices), each (Q, k), best first; (-inf, 0) where fewer than k were found.

        `allowed` (see `Allowed`) becomes a faiss ID selector: the search itself skips the other
        rows. An exact ("flat") index searches the first n rows (an int) as an index of them alone
        would, bit for bit; IVF and HNSW stay approximate, their lists / graph built over all rows.
        """
        u = _np(user_vecs)
        extra = 0 if exclude is None else exclude.shape[1]
        k_search = max(1, min(k + extra, self.num_items - 2))
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, 2 * k_search)
        bitmap, params = self._search_params(allowed)  # the bitmap must live while faiss reads it
        if self.kind == "ivf":
            dist, ids = self.index.search(_augment_queries(u), k_search, params=params)
            # |(u, 0) - (v, e)|^2 = |u|^2 + M^2 - 2 u.v: the L2 order is the u.v order,
            # and u.v = (|u|^2 + M^2 - dist) / 2 up to float32 rounding.
            scores = ((u * u).sum(1, keepdims=True) + self.max_norm**2 - dist) / 2
            scores[ids < 0] = -np.inf
            if len(self.tail_rows):
                t_scores, t_ids = self._tail(u, allowed)
                scores, ids = np.concatenate([scores, t_scores], 1), np.concatenate([ids, t_ids], 1)
        elif self.kind == "flat" and isinstance(allowed, int):
            scores, ids = self._flat_prefix(u, k_search, allowed)
        else:
            scores, ids = self.index.search(u, k_search, params=params)
        del bitmap
        return _finish(scores, ids, k, exclude)

    def _flat_prefix(self, u: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """An exact index's search over its first n rows: the very call (`knn_inner_product`, same
        kernel, same tie order) an `IndexFlatIP` of those rows alone makes, on a view of its vectors."""
        xb = self.faiss.rev_swig_ptr(self.index.get_xb(), int(self.index.ntotal) * int(self.index.d))
        xb = xb.reshape(int(self.index.ntotal), int(self.index.d))[:n]
        if n == 0:
            return np.full((len(u), k), -np.inf, dtype=np.float32), np.full((len(u), k), -1, dtype=np.int64)
        return self.faiss.knn(u, xb, min(k, n), metric=self.faiss.METRIC_INNER_PRODUCT)

    def _search_params(self, allowed: Allowed) -> tuple[np.ndarray | None, Any]:
        """(bitmap, faiss search parameters) that restrict a search to the `allowed` rows; (None, None) for all."""
        if allowed is None:
            return None, None
        faiss = self.faiss
        bitmap = None
        if isinstance(allowed, np.ndarray):
            bitmap = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        else:
            sel = faiss.IDSelectorRange(0, int(allowed))
        if self.kind == "ivf":
            return bitmap, faiss.SearchParametersIVF(sel=sel, nprobe=int(self.index.nprobe))
        if self.kind == "hnsw":
            return bitmap, faiss.SearchParametersHNSW(sel=sel, efSearch=int(self.index.hnsw.efSearch))
        return bitmap, faiss.SearchParameters(sel=sel)

    def add(self, item_vecs: Tensor | np.ndarray) -> None:
        """Append (A, D) vectors as rows N..N+A-1 (item indices N+2..), without retraining the index.

        IVF: each goes to its nearest list by the same MIPS-to-L2 transform, which needs
        |v| <= M, the build's largest norm; a longer vector is kept aside (`tail`) and
        scored exactly at every search instead, so it is never missed.
        """
        vecs = _np(item_vecs)
        rows = np.arange(self.num_items - 2, self.num_items - 2 + len(vecs), dtype=np.int64)
        if self.kind != "ivf":
            self.index.add(vecs)
        else:
            norm2 = (vecs.astype(np.float64) ** 2).sum(1)
            fits = norm2 <= self.max_norm**2
            extra = np.sqrt(np.maximum(self.max_norm**2 - norm2[fits], 0.0)).astype(np.float32)
            aug = np.ascontiguousarray(np.concatenate([vecs[fits], extra[:, None]], axis=1))
            self.index.add_with_ids(aug, rows[fits])
            self.tail_rows = np.concatenate([self.tail_rows, rows[~fits]])
            self.tail_vecs = np.concatenate([self.tail_vecs, vecs[~fits]])
        self.num_items += len(vecs)
        self.params["items"] = self.num_items - 2

    def _tail(self, u: np.ndarray, allowed: Allowed) -> tuple[np.ndarray, np.ndarray]:
        """(Q, T) exact scores and row ids (-1 where not allowed) of the vectors `add` kept aside."""
        rows = self.tail_rows
        if isinstance(allowed, np.ndarray):
            ok = allowed[rows]
        else:
            ok = np.ones(len(rows), dtype=bool) if allowed is None else rows < allowed
        scores = np.where(ok, u @ self.tail_vecs.T, -np.inf).astype(np.float32)
        return scores, np.broadcast_to(np.where(ok, rows, -1), scores.shape)

    def search(self, user_vecs: Tensor | np.ndarray, k: int, exclude: Tensor | np.ndarray | None = None) -> Tensor:
        """(Q, k) approximate top-k item indices; 0 where the index found fewer than k."""
        return self.search_scores(user_vecs, k, exclude)[1]

    # -- files --------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write the faiss index (`faiss.write_index`); `FaissIndex.read` restores it with `params`."""
        self.faiss.write_index(self.index, str(path))

    @classmethod
    def read(cls, path: str, params: dict[str, Any]) -> FaissIndex:
        """An index written by `save`, with the `params` recorded next to it (export's index.json)."""
        faiss = import_faiss()
        self = cls.__new__(cls)
        self.faiss = faiss
        self.index = faiss.read_index(str(path))
        self.kind = params["kind"]
        self.params = dict(params)
        self.num_items = int(params["items"]) + 2
        self.ef_search = int(params.get("ef_search", 256))
        self.max_norm = float(params.get("max_norm", 0.0))
        self._no_tail(int(self.index.d) - (1 if self.kind == "ivf" else 0))
        if self.kind == "ivf":
            self.index.nprobe = int(params["nprobe"])
        return self


def _augment_queries(u: np.ndarray) -> np.ndarray:
    """Queries of the MIPS-to-L2 transform: a 0 appended."""
    return np.ascontiguousarray(np.concatenate([u, np.zeros((u.shape[0], 1), np.float32)], axis=1))


def describe(params: dict[str, Any]) -> str:
    """One line naming an index and its parameters, e.g. `ivf over 1,000,000 items: nlist 4096, nprobe 32`."""
    rest = ", ".join(f"{k} {v}" for k, v in params.items() if k not in ("kind", "items", "max_norm"))
    items = params.get("items")
    count = f"{items:,}" if isinstance(items, int) else "?"  # `sdm inspect` of a damaged index.json
    return f"{params.get('kind', '?')} over {count} items" + (f": {rest}" if rest else "")
