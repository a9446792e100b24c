"""The neighbour term (item-CF's scores added to the model's): its arithmetic against brute
force, the weight rule, what `sdm train` writes, and that evaluate, `sdm recommend`, faiss
and the serving API (torch and ONNX) rank with it alike.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from conftest import read_sessions, us
from test_recommend import build_pipeline
from typer.testing import CliRunner

import sdm.pipeline.ranking as ranking
from sdm.cli import app
from sdm.config import EvaluateConfig, ExportConfig, RecommendConfig, TrainConfig
from sdm.errors import ConfigError, DataError
from sdm.model.neighbours import merge_candidates, neighbour_bonus
from sdm.model.repeat import NO_COPY
from sdm.pipeline.baselines.itemcf import ItemCF, NeighbourCounts, neighbour_table
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.evaluate import evaluate
from sdm.pipeline.scoring import ModelScorer
from sdm.pipeline.neighbourweight import GRID, choose_neighbour_weight
from sdm.pipeline.train import train
from sdm.retrieval.index import ExactIndex
from sdm.retrieval.rank import rank
from sdm.serve import Recommender
from sdm.serve.export import export
from sdm.serve.recommend import recommend

# -- the arithmetic -------------------------------------------------------------------


def _brute_bonus(items: torch.Tensor, sims: torch.Tensor, weight: float, prefix: list[int], p: int,
                 decay: float = 0.8) -> dict[int, float]:  # fmt: skip
    """B_j of one query by the formula, with dicts."""
    V = items.shape[0]
    w = {q: decay ** (p - q) for q in range(p + 1) if prefix[q] != 0}
    total = sum(w.values())
    out: dict[int, float] = {}
    for q, wq in w.items():
        x = prefix[q]
        if not 1 < x < V:
            continue
        for j, s in zip(items[x].tolist(), sims[x].tolist()):
            if j > 1:
                out[j] = out.get(j, 0.0) + weight * wq / total * s
    return {j: b for j, b in out.items() if b > 0}


@pytest.mark.parametrize("seed", range(5))
def test_bonus_equals_the_formula(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    V, N, Q, T = 15, 4, 9, 6
    items = torch.randint(0, V, (V, N), generator=g, dtype=torch.int32)  # repeats, padding and OOV among them
    sims = torch.rand(V, N, generator=g)
    prefix = torch.randint(0, V + 3, (Q, T), generator=g)  # >= V: cold items, no neighbours
    qp = torch.randint(0, T, (Q,), generator=g)
    prefix[torch.arange(T).unsqueeze(0) > qp.unsqueeze(1)] = 0
    got_items, got_bonus = neighbour_bonus(items, sims, 2.5, prefix, qp)
    for q in range(Q):
        want = _brute_bonus(items, sims, 2.5, prefix[q].tolist(), int(qp[q]))
        got = {int(j): float(b) for j, b in zip(got_items[q], got_bonus[q]) if j > 0}
        assert got.keys() == want.keys() and (got_items[q] > 0).sum() == len(want)  # each item once
        for j in want:
            assert got[j] == pytest.approx(want[j], rel=1e-5)


def test_bonus_equals_item_cf_scores_times_the_weight(tmp_path: Path) -> None:
    """The term is item-CF's classic score (the baseline's own code, from its CSR table) times the weight."""
    p = build_pipeline(tmp_path, seed=4)
    manifest = read_manifest(p["data"])
    items, sims, _, _ = neighbour_table(p["data"], manifest, 7)
    cf = ItemCF.from_data(p["data"], neighbours=7, manifest=manifest)
    prefix = torch.tensor([[5, 9, 3, 0, 0], [1, 7, 7, 12, 4], [0, 0, 0, 0, 0]])
    qp = torch.tensor([2, 4, 0])
    got_items, got_bonus = neighbour_bonus(items, sims, 3.0, prefix, qp)
    entries, _ = cf.query_scores(qp, prefix)
    rows, cols, vals = entries.rows, entries.cols, entries.vals
    want = {(int(r), int(c)): 3.0 * float(v) for r, c, v in zip(rows, cols, vals) if v > 0}
    got = {(q, int(j)): float(b) for q in range(3) for j, b in zip(got_items[q], got_bonus[q]) if j > 0}
    assert got.keys() == want.keys() and len(want) > 5
    for key, b in want.items():
        assert got[key] == pytest.approx(b, rel=1e-5)


def test_merge_gives_history_items_their_bonus_once() -> None:
    hist = torch.tensor([[4, 6, 0]])
    logits = torch.tensor([[0.5, -1.0, NO_COPY]])
    items, r, b = merge_candidates(hist, logits, torch.tensor([[6, 8, 0]]), torch.tensor([[0.3, 0.2, 0.0]]), NO_COPY)
    entries = {int(i): (float(x), float(y)) for i, x, y in zip(items[0], r[0], b[0]) if i > 0}
    assert entries == {4: (0.5, 0.0), 6: (-1.0, pytest.approx(0.3)), 8: (NO_COPY, pytest.approx(0.2))}
    alone = merge_candidates(None, None, torch.tensor([[6, 8]]), torch.tensor([[0.3, 0.2]]), NO_COPY)
    assert alone[1].eq(NO_COPY).all() and alone[2][0].tolist() == pytest.approx([0.3, 0.2])


def test_rank_with_a_bonus_equals_scoring_every_item() -> None:
    g = torch.Generator().manual_seed(0)
    V, D, Q = 40, 8, 6
    vecs = torch.randn(V, D, generator=g)
    vecs[:2] = 0
    u = torch.randn(Q, D, generator=g)
    hist = torch.randint(0, V, (Q, 5), generator=g)
    logits = torch.randn(Q, 5, generator=g)
    bonus_items = torch.randint(0, V, (Q, 30), generator=g)
    bonus = torch.rand(Q, 30, generator=g) * 3
    # distinct lists, as copy_scores and neighbour_bonus give them
    for t, v in ((hist, logits), (bonus_items, bonus)):
        for q in range(Q):
            seen: set[int] = set()
            for c in range(t.shape[1]):
                if int(t[q, c]) in seen:
                    t[q, c] = 0
                seen.add(int(t[q, c]))
    items, r, b = merge_candidates(hist, logits, bonus_items, bonus, NO_COPY)
    exclude = torch.randint(0, V, (Q, 3), generator=g)
    got_s, got_i = rank(u, ExactIndex(vecs.numpy()), 10, exclude, items, r, vecs, candidate_bonus=b)
    dense = u @ vecs.T  # (Q, V)
    for q in range(Q):
        for i, x in zip(hist[q].tolist(), logits[q].tolist()):
            if i > 1:
                dense[q, i] = torch.logaddexp(dense[q, i], torch.tensor(x))
        for i, x in zip(bonus_items[q].tolist(), bonus[q].tolist()):
            if i > 1:
                dense[q, i] += x
        dense[q, :2] = float("-inf")
        dense[q, exclude[q]] = float("-inf")
    want_s, want_i = dense.topk(10, dim=1)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s)


# -- the weight rule --------------------------------------------------------------------


class _Table(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from sdm.model.neighbours import NeighbourTable

        self.neighbours = NeighbourTable()


def _rule(monkeypatch: pytest.MonkeyPatch, curve: dict[float, float]) -> tuple[Any, list[Any]]:
    asked: list[Any] = []

    def fake(model: Any, data: Path, split: str, ks: list[int], *a: Any, bonus_weights: tuple[float, ...] = (),
             **k: Any) -> dict[str, Any]:  # fmt: skip
        asked.append((float(model.neighbours.weight), bonus_weights))
        one = {"queries": 10, "hr@50": curve[float(model.neighbours.weight)], "ndcg@50": 0.0}
        return {**one, "bonus_weights": [{"weight": w, "queries": 10, "hr@50": curve[w], "ndcg@50": 0.0} for w in bonus_weights]}

    monkeypatch.setattr(ranking, "evaluate_model", fake)
    monkeypatch.setattr("sdm.pipeline.neighbourweight.read_manifest", lambda data: {})
    table = NeighbourCounts(torch.full((4, 2), 2, dtype=torch.int32), torch.ones(4, 2), torch.ones(4, 2), torch.ones(4))
    monkeypatch.setattr("sdm.pipeline.neighbourweight.neighbour_table", lambda *a: table)
    model = _Table()
    return choose_neighbour_weight(model, Path("d"), 2, 50, "hr")[0], asked


def test_the_rule_stops_at_the_first_drop_and_ties_go_to_the_smaller_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    choice, asked = _rule(monkeypatch, {0.0: 0.1, 1.0: 0.2, 2.0: 0.3, 4.0: 0.3, 8.0: 0.25, 16.0: 0.9, 32.0: 1, 64.0: 1})
    # one validation pass: the table at weight 1, every other weight of the grid from the same user vectors
    assert asked == [(1.0, tuple(w for w in GRID if w != 1.0))]
    assert choice.weight == 2.0  # 16 and above lie past the first drop (8)
    assert [r["weight"] for r in choice.rows] == list(GRID) and "weight 2 chosen" in choice.summary()
    assert choice.chosen() == {"queries": 10, "hr@50": 0.3, "ndcg@50": 0.0}


def test_a_term_that_does_not_help_is_off_and_its_table_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    choice, _ = _rule(monkeypatch, dict.fromkeys(GRID, 0.5) | {1.0: 0.4})
    assert choice.weight == 0.0
    # the model the rule leaves behind: no table, a plain dot product
    model = _Table()
    model.neighbours.fill(torch.ones(3, 2, dtype=torch.int32), torch.ones(3, 2), 0.0)
    assert model.neighbours.items.numel() == 0 and not model.neighbours.active


# -- training, evaluation and serving ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The recommend tests' pipeline, its untrained model given a neighbour term of weight 3."""
    p = build_pipeline(tmp_path_factory.mktemp("neighbours"), seed=6)
    path = p["model"] / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    items, sims, _, _ = neighbour_table(p["data"], p["manifest"], 10)
    ckpt["model"].update({"neighbours.items": items, "neighbours.sims": sims, "neighbours.weight": torch.tensor(3.0)})
    torch.save(ckpt, path)
    return p


def test_evaluate_with_the_term_equals_the_model_plus_item_cf(pipe: dict[str, Any]) -> None:
    """An independent blend: the model without the term, plus 3 x the item-CF baseline's scores."""
    model = load_model(pipe["model"], pipe["data"], pipe["manifest"], torch.device("cpu"))
    assert model.neighbours.active and float(model.neighbours.weight) == 3.0
    got = ranking.evaluate_model(model, pipe["data"], "test", [5, 20], 64)
    cf = ItemCF.from_data(pipe["data"], neighbours=10)
    model.neighbours.fill(model.neighbours.items, model.neighbours.sims, 0.0)
    plain = ranking.evaluate_model(model, pipe["data"], "test", [5, 20], 64)

    class Blend(ModelScorer):
        def score_fn(self, state: Any, qb: torch.Tensor, qp: torch.Tensor, prefix: torch.Tensor) -> Any:
            base = super().score_fn(state, qb, qp, prefix)
            entries, _ = cf.query_scores(qp, prefix)
            r, c, v = entries.rows, entries.cols, entries.vals

            def score(start: int, end: int) -> torch.Tensor:
                out = base(start, end).clone()
                keep = (c >= start) & (c < end)
                out[r[keep], c[keep] - start] += 3.0 * v[keep]
                return out

            return score

    blend = ranking.evaluate_model(Blend(model.eval()), pipe["data"], "test", [5, 20], 64)
    for key in ("hr@5", "hr@20", "ndcg@20", "mrr@20"):
        assert got[key] == pytest.approx(blend[key], abs=1e-9), key
    assert (got["hr@20"], got["ndcg@20"]) != (plain["hr@20"], plain["ndcg@20"])  # the term changes the ranking


def test_one_pass_over_bonus_weights_equals_one_evaluation_per_weight(pipe: dict[str, Any]) -> None:
    model = load_model(pipe["model"], pipe["data"], pipe["manifest"], torch.device("cpu"))
    items, sims = model.neighbours.items.clone(), model.neighbours.sims.clone()
    model.neighbours.fill(items, sims, 1.0)
    weights = (0.0, 0.5, 4.0, 64.0)
    together = ranking.evaluate_model(model, pipe["data"], "test", [5, 20], 64, bonus_weights=weights)
    assert [r["weight"] for r in together["bonus_weights"]] == list(weights)
    for one in together["bonus_weights"]:
        model.neighbours.fill(items, sims, one["weight"])
        alone = ranking.evaluate_model(model, pipe["data"], "test", [5, 20], 64)
        for key in ("hr@5", "hr@20", "ndcg@20", "mrr@20", "queries"):
            assert one[key] == alone[key], (one["weight"], key)  # powers of two and 0 scale exactly
    model.neighbours.fill(items, sims, 1.0)
    assert {k: v for k, v in together.items() if k != "bonus_weights"} == ranking.evaluate_model(
        model, pipe["data"], "test", [5, 20], 64)  # fmt: skip
    assert len({round(r["ndcg@20"], 9) for r in together["bonus_weights"]}) > 1  # the weights rank differently
    model.neighbours.fill(items, sims, 0.0)
    with pytest.raises(ConfigError, match="neighbour term"):
        ranking.evaluate_model(model, pipe["data"], "test", [5], 64, bonus_weights=weights)


def test_recommend_faiss_and_the_api_rank_like_evaluate(pipe: dict[str, Any], tmp_path: Path) -> None:
    k = 15
    evaluate(EvaluateConfig(data=pipe["data"], model=pipe["model"], out=tmp_path / "eval", k=[k], device="cpu"))
    exact, approx = tmp_path / "exact.parquet", tmp_path / "faiss.parquet"
    base = dict(data=pipe["data"], model=pipe["model"], k=k, device="cpu")
    recommend(RecommendConfig(**base, out=exact), pipe["log"])
    a = pl.read_parquet(exact).sort("user_id")
    if _has("faiss"):
        recommend(RecommendConfig(**base, out=approx, index="faiss"), pipe["log"])
        b = pl.read_parquet(approx).sort("user_id")
        assert a["items"].to_list() == b["items"].to_list()  # index top K + bonus candidates = every item scored
    export(ExportConfig(data=pipe["data"], model=pipe["model"], out=tmp_path / "export"))
    spec = json.loads((tmp_path / "export" / "user_tower.json").read_text())
    assert spec["neighbours"]["weight"] == 3.0
    table = pl.read_parquet(tmp_path / "export" / "neighbours.parquet")
    assert table.height > 0 and set(table.columns) == {"index", "neighbours", "sims"}
    want_items, want_sims, _, _ = neighbour_table(pipe["data"], pipe["manifest"], 10)
    for i, nbrs, sims in table.iter_rows():  # each listed item's neighbours, best first, padding left out
        kept = want_items[i] > 1
        assert nbrs == want_items[i][kept].tolist() and sims == pytest.approx(want_sims[i][kept].tolist())
    assert table.height == int((want_items > 1).any(1).sum())
    runtimes = ["torch"] + (["onnx"] if _has("onnxruntime") else [])
    for runtime in runtimes:
        rec = Recommender.load(tmp_path / "export", runtime=runtime, index="exact")
        assert rec.neighbours is not None and rec.neighbours[2] == 3.0
        got = rec.recommend(pl.read_parquet(pipe["log"]), k=k).sort("user_id")
        same = sum(x == y for x, y in zip(got["items"].to_list(), a["items"].to_list()))
        assert same >= 0.97 * got.height, f"{runtime}: {same}/{got.height} lists identical"
        for x, y in zip(got["scores"].to_list(), a["scores"].to_list()):
            assert abs(x[0] - y[0]) < 1e-3


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_damaged_table_in_an_export_is_refused(pipe: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "export"
    export(ExportConfig(data=pipe["data"], model=pipe["model"], out=out, onnx=False, faiss=False))
    path = out / "user_tower.weights.pt"
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["neighbours.items"][3, 0] = 10**6  # an item index past the vocabulary
    torch.save(blob, path)
    with pytest.raises(DataError, match="neighbour table"):
        Recommender.load(out, runtime="torch", index="exact")


def test_train_chooses_the_weight_and_best_pt_carries_the_table(pipe: dict[str, Any], tmp_path: Path) -> None:
    cfg = TrainConfig(data=pipe["data"], out=tmp_path / "m", epochs=1, batch_size=16, embedding_dim=16,
                      num_negatives=16, neighbours=5)  # fmt: skip
    train(cfg, progress=False)
    records = [json.loads(x) for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    chosen = [r["neighbours"] for r in records if "neighbours" in r]
    assert len(chosen) == 1 and chosen[0]["rows"][0]["weight"] == 0.0 and chosen[0]["neighbours"] == 5
    model = load_model(tmp_path / "m", pipe["data"], pipe["manifest"], torch.device("cpu"))
    assert float(model.neighbours.weight) == chosen[0]["weight"]
    assert model.neighbours.items.shape == ((pipe["manifest"]["num_items"], 5) if chosen[0]["weight"] else (0, 0))
    best = next(r for r in chosen[0]["rows"] if r["weight"] == chosen[0]["weight"])
    again = ranking.evaluate_model(model, pipe["data"], "valid", [50], 512)
    assert again["hr@50"] + again["ndcg@50"] == pytest.approx(best["select"])
    # an explicit weight is written as given, nothing is chosen
    train(cfg.model_copy(update={"out": tmp_path / "w", "neighbour_weight": 0.5}), progress=False)
    model = load_model(tmp_path / "w", pipe["data"], pipe["manifest"], torch.device("cpu"))
    assert float(model.neighbours.weight) == 0.5 and model.neighbours.items.shape[1] == 5
    assert '"neighbours"' not in (tmp_path / "w" / "train_log.jsonl").read_text()


def test_off_is_off_and_a_weight_without_neighbours_is_refused(pipe: dict[str, Any], tmp_path: Path) -> None:
    cfg = TrainConfig(data=pipe["data"], out=tmp_path / "m", epochs=1, batch_size=16, embedding_dim=16,
                      num_negatives=16, neighbours=0)  # fmt: skip
    train(cfg, progress=False)
    best = torch.load(tmp_path / "m" / "best.pt", weights_only=True)["model"]
    assert best["neighbours.items"].numel() == 0 and float(best["neighbours.weight"]) == 0
    with pytest.raises(ConfigError, match="--neighbours 0"):
        train(cfg.model_copy(update={"out": tmp_path / "x", "neighbour_weight": 2.0}), progress=False)
    r = CliRunner().invoke(app, ["train", "--data", str(pipe["data"]), "--out", str(tmp_path / "y"),
                                 "--neighbours", "0", "--neighbour-weight", "2"])  # fmt: skip
    assert r.exit_code == 1 and "--neighbours 0" in r.output and "Traceback" not in r.output


def test_a_model_saved_before_the_term_loads_without_it(pipe: dict[str, Any], tmp_path: Path) -> None:
    ckpt = torch.load(pipe["model"] / "best.pt", weights_only=True)
    for name in ("items", "sims", "weight"):
        del ckpt["model"][f"neighbours.{name}"]
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "best.pt")
    model = load_model(tmp_path / "old", pipe["data"], pipe["manifest"], torch.device("cpu"))
    assert not model.neighbours.active and model.neighbours.items.numel() == 0
    assert math.isclose(float(model.neighbours.weight), 0.0)


def test_a_previous_table_adds_its_counts(pipe: dict[str, Any]) -> None:
    """Adding a table's own counts doubles every listed c_ij and n_i: the cosines, and so
    the neighbours, stay; a pair it did not list would start at half the cosine."""
    one = neighbour_table(pipe["data"], pipe["manifest"], 6)
    two = neighbour_table(pipe["data"], pipe["manifest"], 6, previous=one)
    assert int((one.items > 1).sum()) > 20
    assert torch.equal(two.items, one.items)
    torch.testing.assert_close(two.sims, one.sims)
    torch.testing.assert_close(two.counts, 2 * one.counts)
    torch.testing.assert_close(two.n, 2 * one.n)


def test_counts_since_a_time_add_only_the_sessions_from_then_on(pipe: dict[str, Any]) -> None:
    """n_i after `since` = the previous n_i + the training sessions starting from `since` that
    hold item i, counted here from the shards' sessions."""
    one = neighbour_table(pipe["data"], pipe["manifest"], 6)
    train_sessions = [s for s in read_sessions(pipe["data"]) if s["split"] == "train"]
    starts = sorted(s["ts"][0] for s in train_sessions)
    for since in (starts[0], starts[len(starts) // 2], starts[-1] + 1):
        later = torch.zeros_like(one.n)
        for s in train_sessions:
            if s["ts"][0] >= since:
                for i in set(s["items"]) - {0, 1}:
                    later[i] += 1
        two = neighbour_table(pipe["data"], pipe["manifest"], 6, previous=one, since=since)
        torch.testing.assert_close(two.n, one.n + later)
    assert later.sum() == 0  # after the last session: nothing added


def test_a_warm_start_adds_todays_counts_to_the_previous_models(pipe: dict[str, Any], tmp_path: Path) -> None:
    cfg = TrainConfig(data=pipe["data"], out=tmp_path / "m1", epochs=1, batch_size=16, embedding_dim=16,
                      num_negatives=16, neighbours=6, neighbour_weight=1.0)  # fmt: skip
    train(cfg, progress=False)
    first = torch.load(tmp_path / "m1" / "best.pt", weights_only=True)["neighbour_counts"]
    valid_start = dt.datetime.fromisoformat(pipe["manifest"]["cutoffs"]["valid_start"])
    assert int(first["until"]) == us(valid_start)  # the counts run up to the validation start
    # the same data again: every training session is counted already, nothing is added
    train(cfg.model_copy(update={"out": tmp_path / "m2", "init_from": tmp_path / "m1"}), progress=False)
    second = torch.load(tmp_path / "m2" / "best.pt", weights_only=True)["neighbour_counts"]
    assert torch.equal(second["items"], first["items"]) and first["counts"].sum() > 0
    torch.testing.assert_close(second["counts"], first["counts"])
    torch.testing.assert_close(second["n"], first["n"])
    # a checkpoint that does not say how far its counts run: the new split's are all added
    ckpt = torch.load(tmp_path / "m1" / "best.pt", weights_only=True)
    del ckpt["neighbour_counts"]["until"]
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "best.pt")
    train(cfg.model_copy(update={"out": tmp_path / "m4", "init_from": tmp_path / "old"}), progress=False)
    fourth = torch.load(tmp_path / "m4" / "best.pt", weights_only=True)["neighbour_counts"]
    torch.testing.assert_close(fourth["counts"], 2 * first["counts"])
    torch.testing.assert_close(fourth["n"], 2 * first["n"])
    # counts of another --neighbours do not fit: the warm run starts from its own split's
    train(cfg.model_copy(update={"out": tmp_path / "m3", "init_from": tmp_path / "m1", "neighbours": 4}), progress=False)
    third = torch.load(tmp_path / "m3" / "best.pt", weights_only=True)["neighbour_counts"]
    assert third["items"].shape[1] == 4
    torch.testing.assert_close(third["n"], first["n"])
