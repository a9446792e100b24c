"""Popularity and item-CF on hand-made sessions whose neighbours can be checked by eye."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
import torch
from eval_shards import item_vocab, write_session_shards

from sdm.pipeline.baselines import (
    STAN,
    VSKNN,
    ItemCF,
    Popularity,
    build_baseline,
    cooccurrence_similarity,
    prefix_weights,
)
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


# -- session-kNN: STAN and V-SKNN --------------------------------------------------

# Training sessions S0 {a,b,c}, S1 {b,d}, S2 {e,a}, all starting at the same time, so the
# most recent is the one with the largest sess_id (S2, then S1, then S0).
KNN_SESSIONS = {
    "train": [("u1", [["a", "b", "c"]]), ("u2", [["b", "d"]]), ("u3", [["e", "a"]])],
    "valid": [],
    "test": [("u1", [["a", "b", "c"]])],
}
KV = item_vocab(KNN_SESSIONS)  # a, b: 2 events; c, d, e: 1 -> a=2, b=3, c=4, d=5, e=6


@pytest.fixture()
def knn_data(tmp_path: Path) -> Path:
    return write_session_shards(tmp_path / "knn", KNN_SESSIONS)


def _knn_scores(scorer, prefix_raw: list[str]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Neighbour scores (in (0, 1]) of one query; items of no neighbour are left out."""
    prefix = torch.tensor([[KV.get(r, 1) for r in prefix_raw]])
    entries = scorer.query_scores(torch.tensor([len(prefix_raw) - 1]), prefix)
    inv = {i: r for r, i in KV.items()}
    return {inv[int(c)]: float(v) for c, v in zip(entries.cols, entries.vals, strict=True)}


def _knn_rank(scorer, prefix_raw: list[str], k: int = 5) -> list[str]:  # type: ignore[no-untyped-def]
    prefix = torch.tensor([[KV.get(r, 1) for r in prefix_raw]])
    fn = scorer.score_fn(None, torch.zeros(1, dtype=torch.long), torch.tensor([len(prefix_raw) - 1]), prefix)
    inv = {i: r for r, i in KV.items()}
    return [inv[i] for i in chunked_topk(fn, len(KV) + 2, k, chunk_items=3)[0].tolist()]


def test_vsknn_by_hand(knn_data: Path) -> None:
    vs = VSKNN.from_data(knn_data, idf_weighting=0)
    # Prefix [a, b]: w_a = 1/2, w_b = 2/2; sim = shared weight / 2 distinct items:
    # S0 (a, b) 0.75, S1 (b) 0.5, S2 (a) 0.25. Decay by the most recent shared prefix item:
    # S0, S1 hold b (d = 1), S2 only a (d = 2, 1/2) -> pair weights 0.75, 0.5, 0.125.
    # a: 0.75 + 0.125, b: 0.75 + 0.5, c: 0.75, d: 0.5, e: 0.125; divided by the best (1.25).
    expected = {"a": 0.7, "b": 1.0, "c": 0.6, "d": 0.4, "e": 0.1}
    assert _knn_scores(vs, ["a", "b"]) == pytest.approx(expected)
    assert _knn_rank(vs, ["a", "b"]) == ["b", "a", "c", "d", "e"]
    # k = 2: S2 (0.25) is no neighbour, e falls back to its popularity (below every neighbour item).
    vs2 = VSKNN.from_data(knn_data, k=2, idf_weighting=0)
    assert _knn_scores(vs2, ["a", "b"]) == pytest.approx({"a": 0.6, "b": 1.0, "c": 0.6, "d": 0.4})


def test_vsknn_idf_boost(knn_data: Path) -> None:
    vs = VSKNN.from_data(knn_data, idf_weighting=1)
    # idf = log(3 sessions / events): a, b log(3/2); c, d, e log 3; item factor 1 + idf.
    raw = {"a": 0.875, "b": 1.25, "c": 0.75, "d": 0.5, "e": 0.125}
    f = {i: 1 + math.log(3 / (2 if i in "ab" else 1)) for i in raw}
    best = max(raw[i] * f[i] for i in raw)
    assert _knn_scores(vs, ["a", "b"]) == pytest.approx({i: raw[i] * f[i] / best for i in raw})


def test_stan_by_hand(knn_data: Path) -> None:
    stan = STAN.from_data(knn_data, lambda_spw=1.0, lambda_inh=1.0, matching="neighbour")
    # Prefix [a, b]: w_a = e^-1, w_b = 1, norm sqrt(1 + e^-2).
    e1 = math.exp(-1)
    norm = math.sqrt(1 + e1 * e1)
    s0 = (1 + e1) / (norm * math.sqrt(3))
    s1 = 1 / (norm * math.sqrt(2))
    s2 = e1 / (norm * math.sqrt(2))
    # Matching item = shared item occurring last in the neighbour: b in S0 (position 2), b in
    # S1 (1), a in S2 (2); an item at distance d from it weighs e^-d.
    raw = {"a": s0 * e1 + s2, "b": s0 + s1, "c": s0 * e1, "d": s1 * e1, "e": s2 * e1}
    best = max(raw.values())
    # Every neighbour started at the same time: the recency decay is the same for all.
    assert _knn_scores(stan, ["a", "b"]) == pytest.approx({i: v / best for i, v in raw.items()})
    assert _knn_rank(stan, ["a", "b"]) == ["b", "a", "c", "d", "e"]
    # The paper's matching item (the most recent prefix item the neighbour holds) is the same here
    # (b, b, a); with prefix [b, a] it is a in S0 (position 1): b, c move one step further from it.
    paper = STAN.from_data(knn_data, lambda_spw=1.0, lambda_inh=1.0, matching="session")
    assert _knn_scores(paper, ["a", "b"]) == pytest.approx({i: v / best for i, v in raw.items()})
    t0 = (1 + e1) / (norm * math.sqrt(3))  # [b, a]: w_b = e^-1, w_a = 1
    t1, t2 = e1 / (norm * math.sqrt(2)), 1 / (norm * math.sqrt(2))
    raw = {"a": t0 + t2, "b": t0 * e1 + t1, "c": t0 * e1 * e1, "d": t1 * e1, "e": t2 * e1}
    best = max(raw.values())
    assert _knn_scores(paper, ["b", "a"]) == pytest.approx({i: v / best for i, v in raw.items()})


def test_knn_samples_the_most_recent_sessions(knn_data: Path) -> None:
    # sample_size 1: of S0, S1, S2 (all share an item with [a, b]) only the most recent, S2 {e, a}.
    for scorer in (STAN.from_data(knn_data, sample_size=1), VSKNN.from_data(knn_data, sample_size=1)):
        assert set(_knn_scores(scorer, ["a", "b"])) == {"a", "e"}
        assert set(_knn_scores(scorer, ["d"])) == {"b", "d"}  # S1 is the only session with d


def test_knn_unknown_prefix_falls_back_to_popularity(knn_data: Path) -> None:
    for name in ("stan", "vsknn"):
        scorer = build_baseline(name, knn_data)
        assert scorer.name == name
        assert _knn_scores(scorer, ["zz"]) == {}  # OOV only: no neighbour
        assert _knn_rank(scorer, ["zz"]) == ["a", "b", "c", "d", "e"]  # popularity order


def test_knn_evaluate_end_to_end(knn_data: Path, tmp_path: Path) -> None:
    from sdm.config import EvaluateConfig
    from sdm.pipeline.evaluate import evaluate

    # Test session [a, b, c]: queries [a] -> b and [a, b] -> c, defaults throughout.
    # V-SKNN after [a]: S0, S2 (sim 1, d = 1); with 1 + idf (a, b: 1 + log 1.5; c, e: 1 + log 3)
    # a 2.81 > c = e 2.10 > b 1.41: miss. After [a, b] (test_vsknn_idf_boost): b 1.76, c 1.57: hit at 2.
    # STAN after [a]: a, then e (S2 is shorter than S0): miss; after [a, b]: b 1.41, a 0.70, c 0.46: miss.
    expected = {"vsknn": 0.5, "stan": 0.0}
    for name, hr2 in expected.items():
        m = evaluate(EvaluateConfig(data=knn_data, out=tmp_path / name, k=[1, 2], baseline=name))
        assert (m["name"], m["queries"], m["hr@1"], m["hr@2"]) == (name, 2, 0.0, hr2)


# -- brute force: a plain-Python transcription of the definitions -------------------------


def _reference_knn(method: str, sessions, prefix, t_q, params):  # type: ignore[no-untyped-def]
    """{item: score / best} of one query, one session at a time (STAN / V-SKNN docstrings)."""
    import numpy as np

    order = sorted(range(len(sessions)), key=lambda s: (-sessions[s][1], -sessions[s][0]))
    rank = {s: r for r, s in enumerate(order)}
    L = len(prefix)
    last = {it: p + 1 for p, it in enumerate(prefix)}  # 1-based last position, OOV (1) included
    if method == "stan":
        w = {it: math.exp((p - L) / params["lambda_spw"]) for it, p in last.items()}
    else:
        w = {it: p / L for it, p in last.items()}
    shared = [s for s in order if set(sessions[s][2]) & set(prefix)]
    if params["sample_size"]:
        shared = shared[: params["sample_size"]]
    sims = {}
    for s in shared:
        items = sessions[s][2]
        common = set(items) & set(prefix)
        if method == "stan":
            sim = sum(w[i] for i in common) / (math.sqrt(sum(x * x for x in w.values())) * math.sqrt(len(set(items))))
            if params["lambda_snh"] is not None:
                sim *= math.exp(-max(t_q - sessions[s][1], 0) / (params["lambda_snh"] * 86_400e6))
        else:
            sim = sum(w[i] for i in common) / len(w)
        sims[s] = sim
    if not sims:
        return {}
    best = max(sims.values())
    neighbours = sorted(sims, key=lambda s: (-np.float32(sims[s] / best), rank[s]))[: params["k"]]
    scores: dict[int, float] = {}
    for s in neighbours:
        items = sessions[s][2]
        pos = {it: p + 1 for p, it in enumerate(items)}  # last position in the neighbour
        if method == "stan" and params["matching"] == "neighbour":  # shared item occurring last in n
            star = max(pos[i] for i in set(items) & set(prefix))
        elif method == "stan":  # position in n of the most recent prefix item that n holds
            star = pos[next(it for it in reversed(prefix) if it in pos)]
        if method == "stan":
            for it, p in pos.items():
                scores[it] = scores.get(it, 0.0) + sims[s] * math.exp(-abs(p - star) / params["lambda_inh"])
        else:
            d = next(step for step, it in enumerate(reversed(prefix), 1) if it in pos)
            for it in pos:
                scores[it] = scores.get(it, 0.0) + sims[s] / d
    if method == "vsknn":
        n_events: dict[int, int] = {}
        for _, _, items in sessions:
            for it in items:
                n_events[it] = n_events.get(it, 0) + 1
        for it in scores:
            scores[it] *= 1 + params["idf_weighting"] * max(math.log(len(sessions) / n_events[it]), 0)
    top = max(scores.values())
    return {it: v / top for it, v in scores.items()}


@pytest.mark.parametrize("method", ["stan", "vsknn"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_knn_matches_brute_force(method: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import sdm.pipeline.baselines.sessionknn as bl  # the module whose budgets are patched below
    from sdm.pipeline.baselines.sessionindex import SessionIndex

    rng = random.Random(seed)
    n_items = 14  # indices 2..13
    sessions = []  # (sess_id, start_ts, items)
    for s in range(40):
        length = rng.randint(1, 7)
        start = rng.choice([0, 1, 2, 3, 5, 8]) * 3_600_000_000  # ties in start time too
        sessions.append((s, start, [rng.randint(2, 13) for _ in range(length)]))
    events = pl.DataFrame(
        [(s, t, it, p) for s, t, items in sessions for p, it in enumerate(items)],
        schema=["sess_id", "start_ts", "item", "pos"],
        orient="row",
    )
    sample_size = rng.choice([None, 6, 15])
    k = rng.choice([3, 8, 100])
    if method == "stan":
        params = {"k": k, "sample_size": sample_size, "lambda_spw": 1.3, "lambda_snh": rng.choice([None, 0.2]),
                  "lambda_inh": 0.9, "matching": rng.choice(["neighbour", "session"])}  # fmt: skip
    else:
        params = {"k": k, "sample_size": sample_size, "idf_weighting": rng.choice([0, 1, 2])}
    index = SessionIndex(events, n_items, sample_size)
    counts = torch.arange(n_items)
    scorer = bl.STAN(index, counts, **params) if method == "stan" else bl.VSKNN(index, counts, **params)
    # Queries: random prefixes with repeats and OOV (1), right-padded with 0.
    T, Q = 6, 30
    prefix = torch.zeros(Q, T, dtype=torch.long)
    qp = torch.zeros(Q, dtype=torch.long)
    t_q = torch.zeros(Q, dtype=torch.long)
    for q in range(Q):
        n = rng.randint(1, T)
        prefix[q, :n] = torch.tensor([rng.choice([1] + list(range(2, n_items))) for _ in range(n)])
        qp[q] = n - 1
        t_q[q] = rng.choice([6, 9, 30]) * 3_600_000_000
    # Small budgets: queries are scored in several groups.
    monkeypatch.setattr(bl, "PAIR_BUDGET", 40)
    monkeypatch.setattr(bl, "TRIPLE_BUDGET", 400)
    monkeypatch.setattr(bl, "DENSE_BUDGET", 60)
    entries = scorer.query_scores(qp, prefix, t_q)
    got: dict[int, dict[int, float]] = {}
    for r, c, v in zip(entries.rows.tolist(), entries.cols.tolist(), entries.vals.tolist(), strict=True):
        assert c not in got.setdefault(r, {})  # each (query, item) once
        got[r][c] = v
    for q in range(Q):
        want = _reference_knn(method, sessions, prefix[q, : qp[q] + 1].tolist(), int(t_q[q]), params)
        assert got.get(q, {}) == pytest.approx(want, rel=1e-5), (q, prefix[q].tolist())
