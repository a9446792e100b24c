"""The cold items' scale: the selection rule, what `sdm train` writes into best.pt, and that
evaluate and export use it.

The rule is checked on hand-made validation numbers (evaluate_model replaced); the
training run on a small synth pipeline whose items table leaves items without a
training event (cold items in the catalogue).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from shard_builder import build_shards
from typer.testing import CliRunner

import sdm.pipeline.ranking as ranking
from sdm.cli import app
from sdm.config import SessionizeConfig, SynthConfig, TrainConfig
from sdm.errors import ConfigError
from sdm.pipeline.catalogue import cold_item_vectors, read_catalogue
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.coldscale import GRID, choose_cold_scale
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.train import train
from sdm.sessionize import run as sessionize
from sdm.logs.synth import generate


class _Fake(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cold_scale", torch.tensor(1.0))


def _validation(monkeypatch: pytest.MonkeyPatch, table: dict[float, tuple[float, float]], vocab_hr: float) -> None:
    """evaluate_model answers from `table`: scale -> (HR@50 on all 100 queries, HR@50 on the 60 warm ones);
    ranked over the vocabulary alone, HR@50 is `vocab_hr` (its hits are all warm targets')."""

    def one(hr: float, warm: float) -> dict[str, Any]:
        return {
            "queries": 100, "hr@50": hr, "ndcg@50": 0.0,
            "targets": {"warm": {"queries": 60, "hr@50": warm}, "cold": {"queries": 40, "hr@50": (100 * hr - 60 * warm) / 40}},
        }  # fmt: skip

    def fake(model: Any, data: Path, split: str, ks: list[int], *args: Any, candidates: str = "vocabulary",
             cold_factors: tuple[float, ...] = (), **kw: Any) -> dict[str, Any]:  # fmt: skip
        assert split == "valid" and ks == [50]
        if candidates == "vocabulary":
            return {"queries": 100, "hr@50": vocab_hr, "ndcg@50": 0.0}
        assert float(model.cold_scale) == 1.0 and cold_factors == tuple(s for s in GRID if s != 1.0)
        return {**one(*table[1.0]), "cold_factors": [{"factor": f, **one(*table[f])} for f in cold_factors]}

    monkeypatch.setattr(ranking, "evaluate_model", fake)
    monkeypatch.setattr("sdm.pipeline.coldscale.read_manifest", lambda data: {"catalogue": {"items": 3}})


def test_largest_all_target_hr_within_the_warm_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # vocabulary alone: 0.48 of 100 queries = 48 hits = 0.8 of the 60 warm queries
    table = {0.0: (0.50, 0.80), 0.2: (0.52, 0.80), 0.4: (0.55, 0.795), 0.6: (0.58, 0.7921), 0.8: (0.60, 0.78), 1.0: (0.59, 0.70)}
    _validation(monkeypatch, table, 0.48)
    model = _Fake()
    choice = choose_cold_scale(model, Path("d"), 50, 0.01, "hr")
    assert choice is not None and choice.scale == 0.6 and float(model.cold_scale) == pytest.approx(0.6)  # 0.8 loses 2.5% of warm HR
    assert choice.warm_vocabulary == pytest.approx(0.8)
    assert [r["within_budget"] for r in choice.rows] == [True, True, True, True, False, False]
    assert [r["scale"] for r in choice.rows] == list(GRID)
    assert "scale 0.6" in choice.summary(0.01) and "0.8000 ranking the vocabulary alone" in choice.summary(0.01)
    # a looser budget lets 0.8 in; a budget of 0 keeps only the scales that lose nothing
    assert choose_cold_scale(_Fake(), Path("d"), 50, 0.05, "hr").scale == 0.8
    assert choose_cold_scale(_Fake(), Path("d"), 50, 0.0, "hr").scale == 0.2


def test_a_vocabulary_ranking_already_measured_is_not_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {0.0: (0.50, 0.80), 0.2: (0.52, 0.80), 0.4: (0.55, 0.795), 0.6: (0.58, 0.7921), 0.8: (0.60, 0.78), 1.0: (0.59, 0.70)}
    _validation(monkeypatch, table, 0.0)  # the vocabulary pass here would say 0: not asked
    choice = choose_cold_scale(_Fake(), Path("d"), 50, 0.01, "hr", vocabulary={"queries": 100, "hr@50": 0.48})
    assert choice is not None and choice.scale == 0.6 and choice.warm_vocabulary == pytest.approx(0.8)


def test_ties_go_to_the_smaller_scale_and_no_scale_within_budget_is_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    _validation(monkeypatch, {s: (0.5, 0.8) for s in GRID}, 0.48)
    assert choose_cold_scale(_Fake(), Path("d"), 50, 0.01, "hr").scale == 0.0
    _validation(monkeypatch, {s: (0.5 + s / 10, 0.7) for s in GRID}, 0.48)
    model = _Fake()
    assert choose_cold_scale(model, Path("d"), 50, 0.01, "hr").scale == 0.0 and float(model.cold_scale) == 0.0


def test_no_cold_items_or_no_validation_query_leaves_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sdm.pipeline.coldscale.read_manifest", lambda data: {"catalogue": {"items": 0}})
    model = _Fake()
    assert choose_cold_scale(model, Path("d"), 50, 0.01, "hr") is None and float(model.cold_scale) == 1.0
    _validation(monkeypatch, {}, 0.0)
    monkeypatch.setattr(ranking, "evaluate_model", lambda *a, **k: {"queries": 0, "hr@50": 0.0})
    assert choose_cold_scale(model, Path("d"), 50, 0.01, "hr") is None and float(model.cold_scale) == 1.0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synth log with an items table: items without a training event are the catalogue's cold items."""
    root = tmp_path_factory.mktemp("coldscale")
    log = root / "synth" / "logs.parquet"
    generate(SynthConfig(out=log, events=4000, seed=5), progress=False)
    out = root / "data"
    sessionize(
        SessionizeConfig(out=out, items=log.parent / "items.parquet", item_features=["category", "brand"],
                         max_session_len=8, test_fraction=0.2, valid_fraction=0.2),
        log, progress=False,
    )  # fmt: skip
    assert read_manifest(out)["catalogue"]["items"] > 0
    return out


def _cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(data=data, out=out, epochs=1, batch_size=16, embedding_dim=16, num_negatives=16, **kw)


def test_train_chooses_the_scale_on_validation_and_best_pt_carries_it(data: Path, tmp_path: Path) -> None:
    train(_cfg(data, tmp_path / "m"), progress=False)
    best = torch.load(tmp_path / "m" / "best.pt", weights_only=True)
    records = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    chosen = [r["cold_scale"] for r in records if "cold_scale" in r]
    assert len(chosen) == 1 and [r["scale"] for r in chosen[0]["rows"]] == list(GRID)
    assert float(best["model"]["cold_scale"]) == pytest.approx(chosen[0]["scale"], rel=1e-6)  # stored as float32
    # the model evaluate loads scores cold items with that scale
    manifest = read_manifest(data)
    model = load_model(tmp_path / "m", data, manifest, torch.device("cpu"))
    assert float(model.cold_scale) == pytest.approx(chosen[0]["scale"], rel=1e-6)
    row = next(r for r in chosen[0]["rows"] if r["scale"] == chosen[0]["scale"])
    metrics = ranking.evaluate_model(model, data, "valid", [50], 512, candidates="catalogue")
    assert metrics["hr@50"] == pytest.approx(row["hr"]) and metrics["targets"]["warm"]["hr@50"] == pytest.approx(row["warm_hr"])


def test_one_pass_over_cold_factors_equals_one_pass_per_scale(data: Path, tmp_path: Path) -> None:
    train(_cfg(data, tmp_path / "m", cold_scale=1.0), progress=False)
    model = load_model(tmp_path / "m", data, read_manifest(data), torch.device("cpu"))
    factors = (0.0, 0.5, 2.0)
    together = ranking.evaluate_model(model, data, "test", [5, 50], 64, candidates="catalogue", cold_factors=factors)
    plain = {k: v for k, v in together.items() if k != "cold_factors"}
    assert plain == ranking.evaluate_model(model, data, "test", [5, 50], 64, candidates="catalogue")
    for one in together["cold_factors"]:
        model.cold_scale.fill_(one["factor"])
        alone = ranking.evaluate_model(model, data, "test", [5, 50], 64, candidates="catalogue")
        assert {k: v for k, v in one.items() if k != "factor"} == alone, one["factor"]
    differ = {round(one["hr@50"], 9) for one in together["cold_factors"]} | {round(one["ndcg@50"], 9) for one in together["cold_factors"]}
    assert len(differ) > 2  # the factors change the ranking: the comparison is not vacuous
    with pytest.raises(ConfigError, match="cold factors"):
        ranking.evaluate_model(model, data, "test", [5], 64, cold_factors=factors)


def test_an_explicit_scale_is_written_as_given(data: Path, tmp_path: Path) -> None:
    train(_cfg(data, tmp_path / "m", cold_scale=0.3), progress=False)
    manifest = read_manifest(data)
    model = load_model(tmp_path / "m", data, manifest, torch.device("cpu"))
    assert float(model.cold_scale) == pytest.approx(0.3)
    records = (tmp_path / "m" / "train_log.jsonl").read_text()
    assert '"cold_scale"' not in records  # nothing chosen
    catalogue = read_catalogue(data, manifest)
    scaled = cold_item_vectors(model, catalogue)
    model.cold_scale.fill_(1.0)
    torch.testing.assert_close(scaled, 0.3 * cold_item_vectors(model, catalogue))


def test_cold_flags_that_match_nothing_are_refused(data: Path, tmp_path: Path) -> None:
    plain = build_shards(tmp_path / "plain", n_users=8, sessions_per_user=3, session_len=4, n_items=12, n_shards=1)
    assert not (read_manifest(plain).get("catalogue") or {}).get("items")
    with pytest.raises(ConfigError, match="--cold-scale: .* has no cold items"):
        train(_cfg(plain, tmp_path / "m1", cold_scale=0.5), progress=False)
    with pytest.raises(ConfigError, match="--cold-budget does nothing with --cold-scale set|chooses --cold-scale"):
        train(_cfg(data, tmp_path / "m2", cold_scale=0.5, cold_budget=0.02), progress=False)
    result = CliRunner().invoke(app, ["train", "--data", str(plain), "--out", str(tmp_path / "m3"), "--cold-budget", "0.02"])
    assert result.exit_code == 1 and "--cold-budget" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m1").exists() or not any((tmp_path / "m1").glob("*.pt"))


def test_a_state_dict_without_cold_scale_loads_with_scale_one(data: Path, tmp_path: Path) -> None:
    train(_cfg(data, tmp_path / "m", cold_scale=0.25), progress=False)
    path = tmp_path / "m" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["cold_scale"]  # as written before the scale existed
    torch.save(ckpt, path)
    model = load_model(tmp_path / "m", data, read_manifest(data), torch.device("cpu"))
    assert float(model.cold_scale) == 1.0
