"""bench/ablation.py: a tiny synthetic log through sessionize -> train -> evaluate -> table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sdm.config import SynthConfig, TrainConfig
from sdm.errors import SdmError
from sdm.logs.synth import generate

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ablation.py"
KS = (20, 50, 100)
TRAIN_ARGS = {"max_steps": 2, "batch_size": 16, "embedding_dim": 8, "num_negatives": 16, "warmup_steps": 1}


def _load_script():
    """bench/ is scripts, not a package: import the file by path."""
    spec = importlib.util.spec_from_file_location("bench_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _load_script()


@pytest.fixture(scope="module")
def synth_log(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synth")
    s = generate(SynthConfig(out=root / "logs.parquet", events=5000, items=300, days=30, seed=0), progress=False)
    return {
        "log": Path(s["out"]),
        "sessionize": {
            "items": s["items_path"],
            "users": s["users_path"],
            "item_features": ["category", "brand"],
            "user_features": ["age"],
            "valid_days": 3,
            "test_days": 3,
        },
    }


def test_run_ablation_table(synth_log, tmp_path):
    rows = ablation.run_ablation(
        synth_log["log"], out=tmp_path / "work", sessionize_args=synth_log["sessionize"],
        variants=["PSDMMAL-N", "DNN"], baselines=["itemcf-repeat"], train_args=TRAIN_ARGS, seed=0, ks=KS,
    )  # fmt: skip
    assert [r["method"] for r in rows] == ["PSDMMAL-N", "DNN", "itemcf-repeat"]
    assert [r["kind"] for r in rows] == ["model", "model", "baseline"]
    for r in rows:
        for m in ("hr", "recall", "ndcg"):
            for k in KS:
                assert 0.0 <= r[f"{m}@{k}"] <= 1.0
        assert r["train_seconds"] >= 0 and r["queries"] > 0
        assert r["hr@20"] <= r["hr@50"] <= r["hr@100"]
    assert rows[0]["steps"] == TRAIN_ARGS["max_steps"] == rows[1]["steps"]
    assert len({r["queries"] for r in rows}) == 1  # every method saw the same test queries

    from sdm.pipeline.dataset import read_manifest

    meta = ablation.describe("synth", read_manifest(tmp_path / "work" / "data"), rows, 0, TRAIN_ARGS)
    table = ablation.markdown(rows, meta, KS)
    lines = table.splitlines()
    assert lines[0].startswith("**synth**, test split:") and "seed 0" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["method", *[f"{m}@{k}" for m in ("HR", "Recall", "NDCG") for k in KS], "train s"]
    body = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in lines[4:]]
    assert [b[0] for b in body] == ["PSDMMAL-N", "DNN", "itemcf-repeat"]
    assert all(0.0 <= float(v) <= 1.0 for b in body for v in b[1:-1])

    md, js = ablation.write_results(rows, meta, table, tmp_path / "results")
    assert md.name == "ablation_synth.md" and md.read_text().strip() == table
    assert [r["method"] for r in json.loads(js.read_text())["rows"]] == ["PSDMMAL-N", "DNN", "itemcf-repeat"]


def test_bad_input_fails_before_work(synth_log, tmp_path):
    with pytest.raises(SdmError, match="unknown method"):
        ablation.run_ablation(synth_log["log"], out=tmp_path, variants=["SDM"], baselines=[])
    with pytest.raises(SdmError, match="may not set"):
        ablation.run_ablation(synth_log["log"], out=tmp_path, variants=["DNN"], train_args={"seed": 3})
    with pytest.raises(SdmError, match="unknown config key"):
        ablation.run_ablation(synth_log["log"], out=tmp_path, variants=["DNN"], train_args={"epoch": 3})
    assert not (tmp_path / "data").exists()  # nothing was sessionized


def test_main_writes_results(synth_log, tmp_path, capsys):
    args = ["--dataset", "tiny synth", "--log", str(synth_log["log"]), "--out", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--variants", "", "--baselines", "popularity",
            "--sessionize-args", json.dumps(synth_log["sessionize"]), "--k", "5,10", "--quiet"]  # fmt: skip
    assert ablation.main(args) == 0
    assert "| popularity |" in capsys.readouterr().out
    assert (tmp_path / "results" / "ablation_tiny_synth.md").is_file()
    assert ablation.main([*args[:-1], "--k", "100000"]) == 1
    assert "larger than the catalogue" in capsys.readouterr().err


def test_train_config_precedence(tmp_path):
    toml = tmp_path / "ds.toml"
    toml.write_text('[sessionize]\ngap = "5m"\n\n[train]\nepochs = 3\nlr = 0.01\n')
    cfg = ablation.train_config(tmp_path / "d", tmp_path / "m", "DNN", 7, toml, {"lr": 0.5})
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.variant) == (3, 0.5, 7, "DNN")
    flat = tmp_path / "flat.toml"
    flat.write_text('gap = "5m"\n')  # no sections: a sessionize config, not applied to training
    assert ablation.train_config(tmp_path / "d", tmp_path / "m", "DNN", 0, flat, {}).epochs == TrainConfig().epochs
