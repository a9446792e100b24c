"""Popularity and item-CF on hand-made sessions whose neighbours can be checked by eye."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
import torch
from eval_shards import item_vocab, write_session_shards

from sdm.pipeline.baselines import ItemCF, Popularity, build_baseline, cooccurrence_similarity, prefix_weights
from sdm.pipeline.metrics import chunked_topk

# Training sessions: {a,b,c} {a,b} {a,d} {b,c} {e}  (b repeated in the first: counted once per session)
# n: a 3, b 3, c 2, d 1, e 1;  c_ab 2, c_ac 1, c_bc 2, c_ad 1
# sim(a,b) = 2/3, sim(a,d) = 1/sqrt(3), sim(a,c) = 1/sqrt(6), sim(b,c) = 2/sqrt(6)
SESSIONS = {
    "train": [("u1", [["a", "b", "c", "b"], ["a", "b"]]), ("u2", [["a", "d"], ["b", "c"], ["e"]])],
    "valid": [],
    "test": [("u1", [["b", "a"]])],
}
V = item_vocab(SESSIONS)  # b: 4 events, a: 3, c: 2, d, e: 1 -> b=2, a=3, c=4, d=5, e=6


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_session_shards(tmp_path / "data", SESSIONS)


def _rank(scorer, prefix_raw: list[str], k: int = 5) -> list[str]:  # type: ignore[no-untyped-def]
    prefix = torch.tensor([[V[r] for r in prefix_raw]])
    qp = torch.tensor([len(prefix_raw) - 1])
    fn = scorer.score_fn(None, torch.zeros(1, dtype=torch.long), qp, prefix)
    inv = {i: r for r, i in V.items()}
    return [inv[i] for i in chunked_topk(fn, len(V) + 2, k, chunk_items=3)[0].tolist()]


def test_vocab_order_is_as_documented() -> None:
    assert V == {"b": 2, "a": 3, "c": 4, "d": 5, "e": 6}


def test_cosine_similarity_by_hand() -> None:
    sessions = pl.LazyFrame({"sess_id": [0, 0, 0, 1, 1, 2, 2, 3, 3, 4], "item": [3, 2, 4, 3, 2, 3, 5, 2, 4, 6]})
    sim = cooccurrence_similarity(sessions, 7).to_dense()
    expected = torch.zeros(7, 7)
    for i, j, s in [(3, 2, 2 / 3), (3, 5, 1 / math.sqrt(3)), (3, 4, 1 / math.sqrt(6)), (2, 4, 2 / math.sqrt(6))]:
        expected[i, j] = expected[j, i] = s
    assert torch.allclose(sim, expected)
    assert torch.diagonal(sim).eq(0).all()  # an item is not its own neighbour


def test_neighbour_cap_keeps_most_similar() -> None:
    sessions = pl.LazyFrame({"sess_id": [0, 0, 0, 1, 1, 2, 2, 3, 3, 4], "item": [3, 2, 4, 3, 2, 3, 5, 2, 4, 6]})
    sim = cooccurrence_similarity(sessions, 7, neighbours=1).to_dense()
    assert sim[3].nonzero().flatten().tolist() == [2]  # a's best neighbour is b (2/3)
    assert sim[2].nonzero().flatten().tolist() == [4]  # b's best neighbour is c (0.816)


def test_popularity_order(data: Path) -> None:
    assert _rank(Popularity.from_data(data), ["e"]) == ["b", "a", "c", "d", "e"]


def test_itemcf_classic_ranks_neighbours_then_popular(data: Path) -> None:
    cf = build_baseline("itemcf", data)
    # a's neighbours: b (0.667) > d (0.577) > c (0.408); then unscored items by popularity: a, e
    assert _rank(cf, ["a"]) == ["b", "d", "c", "a", "e"]


def test_itemcf_weights_recent_prefix_items_more(data: Path) -> None:
    cf = ItemCF.from_data(data, decay=0.5)
    # prefix [d, b]: weights d 1/3, b 2/3. a: (1/3)(0.577) + (2/3)(0.667) = 0.64; c: (2/3)(0.816) = 0.54
    assert _rank(cf, ["d", "b"], 2) == ["a", "c"]


def test_repeat_aware_ranks_prefix_items_first(data: Path) -> None:
    rep = build_baseline("itemcf-repeat", data)
    assert rep.name == "itemcf-repeat"
    # Most recent prefix item first, then the older one, then classic neighbours.
    assert _rank(rep, ["b", "a"], 4) == ["a", "b", "c", "d"]
    assert _rank(rep, ["a"], 2) == ["a", "b"]


def test_prefix_weights_decay_and_normalise() -> None:
    w = prefix_weights(torch.tensor([2, 0]), torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]]), 0.5)
    assert w[0].tolist() == pytest.approx([0.25 / 1.75, 0.5 / 1.75, 1 / 1.75, 0])
    assert w[1].tolist() == pytest.approx([1, 0, 0, 0])
