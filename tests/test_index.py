"""Item indexes (`retrieval.index`) and the ranking merge (`retrieval.rank.rank`) against brute force."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdm.pipeline.metrics import overlap_at_k, topk_scores
from sdm.retrieval.index import ExactIndex, FaissIndex, auto_nlist, describe
from sdm.retrieval.rank import rank


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    """(n + 2, d) item vectors in 20 clusters (rows 0, 1: padding and OOV), like trained ones."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(20, d, generator=g)
    v = centers[torch.randint(0, 20, (n + 2,), generator=g)] + 0.3 * torch.randn(n + 2, d, generator=g)
    return v


def test_exact_index_is_brute_force_with_scores_and_exclude() -> None:
    v = clustered(500, 8, 0)
    u = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    s, i = ExactIndex(v).search_scores(u, 10)
    assert torch.equal(i, topk_scores(u, v, 10))
    torch.testing.assert_close(s, (u @ v.T).gather(1, i), atol=1e-5, rtol=0)
    ex = i[:, :3]
    i2 = ExactIndex(v).search(u, 10, ex)
    assert torch.equal(i2[:, :7], i[:, 3:]) and not (i2.unsqueeze(2) == ex.unsqueeze(1)).any()
    # fewer items than k: padded with (-inf, 0)
    s3, i3 = ExactIndex(v[:5]).search_scores(u, 5)
    assert (i3[:, 3:] == 0).all() and torch.isneginf(s3[:, 3:]).all()


def test_auto_parameters_from_catalogue_size() -> None:
    assert auto_nlist(1_000_000) == 4096 and auto_nlist(100_000) == 1024 and auto_nlist(10) == 64
    pytest.importorskip("faiss")
    small = FaissIndex(clustered(300, 8, 2))
    assert small.params == {"kind": "flat", "items": 300}
    assert describe(small.params) == "flat over 300 items"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_scores_and_exclude(kind: str) -> None:
    pytest.importorskip("faiss")
    v = clustered(4000, 16, 3)
    u = clustered(200, 16, 4)[2:]
    index = FaissIndex(v, kind=kind, nlist=64 if kind == "ivf" else None, tune_queries=u)
    exact = topk_scores(u, v, 50)
    s, approx = index.search_scores(u, 50)
    assert not ((approx == 0) | (approx == 1)).any()
    assert overlap_at_k(approx, exact).mean().item() >= 0.95
    # scores are u . v of the returned items, best first (IVF recovers them from L2 distances)
    torch.testing.assert_close(s, (u @ v.T).gather(1, approx), atol=1e-3, rtol=1e-4)
    assert (s[:, :-1] >= s[:, 1:] - 1e-5).all()
    if kind == "ivf":
        assert index.params["nlist"] == 64 and 1 <= index.params["nprobe"] <= 64
        assert index.params["tuned_recall@100"] >= 0.96
    ex = exact[:, :5]
    got = index.search(u, 20, ex)
    assert not (got.unsqueeze(2) == ex.unsqueeze(1)).any()


def test_faiss_index_save_and_read(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    v = clustered(3000, 8, 5)
    u = clustered(50, 8, 6)[2:]
    index = FaissIndex(v, kind="ivf", nlist=32)
    index.save(str(tmp_path / "i.faiss"))
    back = FaissIndex.read(str(tmp_path / "i.faiss"), index.params)
    a, b = index.search_scores(u, 10), back.search_scores(u, 10)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0])


def test_rank_merges_candidates_like_brute_force() -> None:
    """rank() = brute force over the catalogue with logaddexp(u.v, R) for candidate items."""
    v = clustered(300, 8, 7)
    g = torch.Generator().manual_seed(8)
    u = torch.randn(6, 8, generator=g)
    cand = torch.randint(2, 302, (6, 9), generator=g)
    cand[:, 0] = cand[:, 1]  # a repeated candidate counts once
    cand[:, -1] = 0  # padding
    logits = 3 * torch.randn(6, 9, generator=g)
    logits[:, 1] = logits[:, 0]
    full = u @ v.T  # (Q, V)
    for q in range(6):
        for c in range(9):
            j = int(cand[q, c])
            if j > 1 and c != 0:
                full[q, j] = torch.logaddexp(u[q] @ v[j], logits[q, c])
    full[:, :2] = float("-inf")
    want_s, want_i = full.topk(12, dim=1)
    for index in (ExactIndex(v), *([FaissIndex(v)] if _has_faiss() else [])):
        s, i = rank(u, index, 12, candidates=cand, candidate_logits=logits, item_vecs=v)
        assert torch.equal(i, want_i)
        torch.testing.assert_close(s, want_s, atol=1e-4, rtol=0)
    # exclude: neither index results nor candidates come back
    ex = want_i[:, :2]
    _, i = rank(u, ExactIndex(v), 12, exclude=ex, candidates=cand, candidate_logits=logits, item_vecs=v)
    assert not (i.unsqueeze(2) == ex.unsqueeze(1)).any()
    assert torch.equal(i[:, :10], want_i[:, 2:])
    with pytest.raises(ValueError, match="candidate_logits and item_vecs"):
        rank(u, ExactIndex(v), 3, candidates=cand)


def _has_faiss() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def test_auto_falls_back_to_exact_when_ivf_would_scan_too_much(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random vectors (no clusters) need most IVF lists for recall: "auto" keeps exact search."""
    pytest.importorskip("faiss")
    monkeypatch.setattr("sdm.retrieval.index.FLAT_BELOW", 1000)  # small catalogues, same rule
    g = torch.Generator().manual_seed(9)
    rand = torch.randn(5002, 32, generator=g)
    index = FaissIndex(rand)
    assert index.params["kind"] == "flat" and "exact search is as fast" in index.params["fallback"]
    u = torch.randn(20, 32, generator=g)
    assert torch.equal(index.search(u, 10), topk_scores(u, rand, 10))
    kept = FaissIndex(clustered(5000, 32, 10))
    assert kept.params["kind"] == "ivf" and kept.params["nprobe"] <= kept.params["nlist"] // 8
