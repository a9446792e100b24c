"""`sdm inspect DIR` on a shard, a model and an export directory, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import at
from test_export import make_data, make_model, write_checkpoint
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import ExportConfig, SessionizeConfig
from sdm.pipeline.dataset import read_manifest
from sdm.serve.export import export
from sdm.serve.inspect import inspect_dir
from sdm.sessionize import run


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    data = make_data(root / "data")
    model = make_model(data)
    model_dir = write_checkpoint(model, root / "model", read_manifest(data)["fingerprint"])
    (model_dir / "train_log.jsonl").write_text(json.dumps({"step": 5, "valid_hr@50": 0.25}) + "\n")
    mp = pytest.MonkeyPatch()
    mp.setattr("sdm.serve.export.export_user_tower", lambda model, path: {})  # the tower is not what this checks
    mp.setattr("sdm.serve.export.export_onnx", lambda model, path: "skipped: test")
    export(ExportConfig(data=data, model=model_dir, out=root / "export"))
    mp.undo()
    return {"data": data, "model": model_dir, "export": root / "export", "root": root}


def test_data_dir(dirs: dict[str, Path]) -> None:
    s = inspect_dir(dirs["data"])
    assert s["kind"] == "data" and s["fingerprint"] == "test-fingerprint"
    assert s["splits"]["test"]["sessions"] > 0 and s["splits"]["train"]["shards"] == 4
    assert "category" in s["item_features"]
    out = CliRunner().invoke(app, ["inspect", str(dirs["data"])])
    assert out.exit_code == 0, out.output
    assert "| train |" in out.output and "item features: item" in out.output


def test_model_dir(dirs: dict[str, Path]) -> None:
    s = inspect_dir(dirs["model"])
    assert s["kind"] == "model" and s["variant"] == "PSDMMAL-N"
    assert s["checkpoints"]["best.pt"]["parameters"] > 0
    assert s["validations"] == 1 and s["last_validation"]["valid_hr@50"] == 0.25
    out = CliRunner().invoke(app, ["inspect", str(dirs["model"])])
    assert out.exit_code == 0 and "PSDMMAL-N" in out.output and "best.pt: step" in out.output
    # a checkpoint whose config predates --select-metric was chosen by HR
    assert s["checkpoints"]["best.pt"]["select_metric"] == "hr@50" and "best hr@50" in out.output


def test_model_dir_names_the_select_metric(dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import torch

    model_dir = tmp_path / "model"
    shutil.copytree(dirs["model"], model_dir)
    ckpt = torch.load(model_dir / "best.pt", weights_only=True)
    ckpt["config"].update(select_metric="hr+ndcg", eval_k=20)
    torch.save(ckpt, model_dir / "best.pt")
    assert inspect_dir(model_dir)["checkpoints"]["best.pt"]["select_metric"] == "hr+ndcg@20"


def test_model_dir_says_what_training_chose_after_the_last_epoch(dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import torch

    model_dir = tmp_path / "model"
    shutil.copytree(dirs["model"], model_dir)
    best = inspect_dir(model_dir)["checkpoints"]["best.pt"]
    assert best["neighbour_weight"] == 0.0 and best["neighbours"] == 0 and best["cold_scale"] == 1.0
    ckpt = torch.load(model_dir / "best.pt", weights_only=True)
    params = best["parameters"]
    ckpt["model"].update({"neighbours.items": torch.ones(30, 7, dtype=torch.int32), "neighbours.sims": torch.ones(30, 7),
                          "neighbours.weight": torch.tensor(4.0), "cold_scale": torch.tensor(0.4)})  # fmt: skip
    torch.save(ckpt, model_dir / "best.pt")
    best = inspect_dir(model_dir)["checkpoints"]["best.pt"]
    assert (best["neighbour_weight"], best["neighbours"], best["cold_scale"]) == (4.0, 7, pytest.approx(0.4))
    assert best["parameters"] == params  # the neighbour table is data, not parameters
    weights = sum(t.numel() for k, t in ckpt["model"].items() if not k.startswith(("item_table", "item_values.", "neighbours.")))
    assert params == weights  # nor are the item table and the value lists
    out = CliRunner().invoke(app, ["inspect", str(model_dir)])
    assert out.exit_code == 0 and "neighbour term weight 4 (7 per item), cold scale 0.4" in out.output


def test_export_dir_and_json(dirs: dict[str, Path]) -> None:
    out = CliRunner().invoke(app, ["inspect", str(dirs["export"]), "--json"])
    assert out.exit_code == 0, out.output
    s = json.loads(out.output)
    assert s["kind"] == "export" and s["finished"] and s["inputs"][0] == "seq_item"
    assert "item_vectors.parquet" in s["files"]
    text = CliRunner().invoke(app, ["inspect", str(dirs["export"])]).output
    assert "export directory" in text and "index:" in text


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda root: root / "missing", "not found"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "not a shard, model or export directory"),
        (lambda root: (root / "f.txt").write_text("x") and root / "f.txt", "not a directory"),
    ],
)
def test_bad_paths_are_one_line(tmp_path: Path, make: Any, needle: str) -> None:
    result = CliRunner().invoke(app, ["inspect", str(make(tmp_path))])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_help() -> None:
    assert "shard directory" in CliRunner().invoke(app, ["inspect", "--help"]).output


def test_partial_output_of_an_older_version_says_what_to_do(tmp_path):
    (tmp_path / "partial-manifest.json").write_text("{}")
    res = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and "no longer combines" in res.output and "--engine ray" in res.output


def test_sessionized_dir_shows_users_per_split_and_the_table_features(tmp_path: Path) -> None:
    """A real `sdm sessionize` output: the split table counts users, and the items-table features are named."""
    rows = [("a", 1, at(0)), ("a", 2, at(1)), ("b", 1, at(0)), ("b", 3, at(2)), ("c", 2, at(5))]
    log = tmp_path / "log.parquet"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_parquet(log)
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [1, 2, 3], "category": [7, 7, 8]}).write_parquet(items)
    cfg = SessionizeConfig(out=tmp_path / "data", items=items, item_features=["category"], valid_fraction=0, test_fraction=0)
    run(cfg, log, progress=False)
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "data")])
    assert out.exit_code == 0, out.output
    assert "| train | 3 | 3 | 5 | 2 |" in out.output
    assert "read from items.parquet by item (not stored per event): category" in out.output
