"""Metrics on a hand-computed 4x3 example (RecBole-style) and exact chunked top-K."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from sdm.errors import SdmError
from sdm.pipeline.metrics import (
    chunked_topk,
    f1_at_k,
    hit_rate_at_k,
    metric_sums,
    mrr_at_k,
    ndcg_at_k,
    overlap_at_k,
    precision_at_k,
    recall_at_k,
    target_set_size,
    topk_scores,
)
from sdm.retrieval.index import FaissIndex, import_faiss

# 4 queries, K = 3. Item 1 is OOV, 0 pads the target sets.
TOPK = torch.tensor([[2, 3, 4], [5, 6, 7], [9, 2, 3], [4, 5, 6]])
Y = torch.tensor([3, 8, 9, 1])
G = torch.tensor([[3, 5, 0, 0], [8, 1, 0, 0], [9, 2, 9, 3], [1, 6, 0, 0]])
# q0: y at rank 2; G = {3, 5}, 1 hit.   q1: miss; G = {8, OOV}, 0 hits.
# q2: y at rank 1; G = {9, 2, 3}, 3 hits. q3: y is OOV (never a hit); G = {OOV, 6}, 1 hit.
EXPECTED = {
    "hr": [1, 0, 1, 0],
    "ndcg": [1 / math.log2(3), 0, 1, 0],
    "mrr": [0.5, 0, 1, 0],
    "recall": [1 / 2, 0, 1, 1 / 2],
    "precision": [1 / 3, 0, 1, 1 / 3],
    "f1": [0.4, 0, 1, 0.4],  # 2 * (1/3) * (1/2) / (1/3 + 1/2) = 0.4
}


def test_each_metric_on_hand_computed_example() -> None:
    got = {
        "hr": hit_rate_at_k(TOPK, Y),
        "ndcg": ndcg_at_k(TOPK, Y),
        "mrr": mrr_at_k(TOPK, Y),
        "recall": recall_at_k(TOPK, G),
        "precision": precision_at_k(TOPK, G),
        "f1": f1_at_k(TOPK, G),
    }
    for name, values in got.items():
        assert values.tolist() == pytest.approx(EXPECTED[name]), name


def test_target_set_size_counts_distinct_including_oov() -> None:
    assert target_set_size(G).tolist() == [2, 2, 3, 2]


def test_metric_sums_equal_per_k_metrics() -> None:
    sums = metric_sums(TOPK, Y, G, [1, 2, 3])
    for k in (1, 2, 3):
        p = TOPK[:, :k]
        assert sums[f"hr@{k}"] == pytest.approx(float(hit_rate_at_k(p, Y).sum()))
        assert sums[f"ndcg@{k}"] == pytest.approx(float(ndcg_at_k(p, Y).sum()))
        assert sums[f"mrr@{k}"] == pytest.approx(float(mrr_at_k(p, Y).sum()))
        assert sums[f"recall@{k}"] == pytest.approx(float(recall_at_k(p, G).sum()))
        assert sums[f"precision@{k}"] == pytest.approx(float(precision_at_k(p, G).sum()))
        assert sums[f"f1@{k}"] == pytest.approx(float(f1_at_k(p, G).sum()))
    assert sums["hr@1"] == 1  # only q2 has y first


def test_padding_in_topk_never_hits() -> None:
    topk = torch.tensor([[0, 0]])
    assert hit_rate_at_k(topk, torch.tensor([0])).item() == 0
    assert recall_at_k(topk, torch.tensor([[4, 0]])).item() == 0


def _full_topk(u: torch.Tensor, v: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    s = u @ v.T
    s[:, :2] = float("-inf")
    if exclude is not None:
        s.scatter_(1, exclude, float("-inf"))
    return s.topk(k, dim=1).indices


@pytest.mark.parametrize("chunk", [1, 7, 16, 103, 500])
def test_chunked_topk_equals_full_topk(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(9, 5, generator=g), torch.randn(103, 5, generator=g)
    got = topk_scores(u, v, 10, chunk_items=chunk)
    assert torch.equal(got, _full_topk(u, v, 10))


def test_padding_and_oov_never_returned_even_when_best() -> None:
    u = torch.ones(3, 2)
    v = torch.tensor([[100.0, 100.0], [50.0, 50.0], [1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    got = topk_scores(u, v, 3, chunk_items=2)
    assert got.tolist() == [[3, 2, 4]] * 3


def test_exclude_seen_masks_given_items_per_query() -> None:
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(6, 4, generator=g), torch.randn(40, 4, generator=g)
    exclude = torch.randint(2, 40, (6, 5), generator=g)
    exclude[:, -1] = 0  # padding in the exclusion list is harmless
    got = topk_scores(u, v, 8, chunk_items=9, exclude=exclude)
    assert torch.equal(got, _full_topk(u, v, 8, exclude))
    assert not (got.unsqueeze(2) == exclude.unsqueeze(1)).any()


def test_k_beyond_unmasked_items_pads_with_zero() -> None:
    v = torch.randn(5, 3)  # 3 real items
    got = topk_scores(torch.randn(2, 3), v, 4, chunk_items=2, exclude=torch.tensor([[2], [0]]))
    assert got[0, 2:].tolist() == [0, 0] and sorted(got[0, :2].tolist()) == [3, 4]
    assert got[1, 3].item() == 0 and sorted(got[1, :3].tolist()) == [2, 3, 4]


def test_chunked_topk_takes_any_score_function() -> None:
    scores = torch.tensor([[0.0, 0.0, 1.0, 3.0, 2.0]])
    got = chunked_topk(lambda s, e: scores[:, s:e].clone(), 5, 2, chunk_items=2)
    assert got.tolist() == [[3, 4]]


def test_faiss_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(SdmError, match=r"--index faiss needs faiss: pip install 'sdm\[faiss\]'"):
        import_faiss()


def test_faiss_index_agrees_with_exact_search() -> None:
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(20, 8, generator=g), torch.randn(300, 8, generator=g)
    exact = topk_scores(u, v, 10)
    approx = FaissIndex(v).search(u, 10)
    assert not ((approx == 0) | (approx == 1)).any()
    assert overlap_at_k(approx, exact).mean().item() >= 0.9
    exclude = exact[:, :3]
    approx_ex = FaissIndex(v).search(u, 10, exclude)
    assert not (approx_ex.unsqueeze(2) == exclude.unsqueeze(1)).any()
