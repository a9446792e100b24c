"""`sdm export`: the exported user tower gives the PyTorch model's vectors, the item
vectors and faiss index match the item tower, bad inputs give one-line errors.

One untrained model (random weights are as good as trained ones for equality
checks) is exported once per module; tiny shards from `shard_builder`, CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import ExportConfig, TrainConfig
from sdm.model.sdm import SDM
from sdm.pipeline.dataset import SessionDataset, read_manifest
from sdm.serve.export import export
from sdm.serve.user_tower import UserTower, export_user_tower, tower_inputs
from sdm.pipeline.modelspec import build_model_config, model_features
from sdm.pipeline.tables import load_item_table

from shard_builder import build_shards

# The exported LSTM is unrolled over max_session_len steps; a short cap keeps the
# export fast (the builder's sessions have at most 4 events).
MAX_SESSION_LEN = 6
D = 16


def make_data(root: Path) -> Path:
    data = build_shards(root)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["max_session_len"] = MAX_SESSION_LEN
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def make_model(data: Path, variant: str = "PSDMMAL-N", seed: int = 0) -> SDM:
    manifest = read_manifest(data)
    model_cfg = build_model_config(TrainConfig(data=data, variant=variant, embedding_dim=D), manifest)
    torch.manual_seed(seed)
    item_table = load_item_table(data, manifest, list(model_cfg.item_vocab))
    return SDM(model_cfg, item_table).eval()


def write_checkpoint(model: SDM, out: Path, fingerprint: str) -> Path:
    """A checkpoint with the keys `sdm train` writes and `sdm evaluate` reads."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "model": model.state_dict(),
        "model_config": model.config.model_dump(mode="json"),
        "data_fingerprint": fingerprint,
        "config": {"variant": model.config.variant},
    }
    torch.save(ckpt, out / "best.pt")
    return out


def ragged_batch(data: Path, model: SDM) -> dict[str, Any]:
    """All test sessions in one batch: lengths 2..4, long-term windows 0..5."""
    ds = SessionDataset(data, "test", 64, model.item_features, model.user_features, shuffle=False)
    return next(iter(ds))



def last_position(model: SDM, batch: dict[str, Any]) -> torch.Tensor:
    """The PyTorch reference: forward, then the vector at position seq_len - 1."""
    with torch.no_grad():
        vecs = model(batch)  # (B, T, D)
    return vecs[torch.arange(vecs.shape[0]), batch["seq_len"] - 1]  # (B, D)


def user_vector(out: Any) -> torch.Tensor:
    """The tower's first output (a model with a repeat head also returns its history)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def one_event(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's first session cut to one event, with a one-event long-term window (dynamic dims)."""
    return {
        "seq": {f: v[:1, :1] for f, v in batch["seq"].items()},
        "seq_len": torch.tensor([1]),
        "long": {f: v[-1:, :1] for f, v in batch["long"].items()},
        "long_len": torch.tensor([1]),
        "user": {f: v[:1] for f, v in batch["user"].items()},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Shards, a checkpoint, and an export through the library API."""
    root = tmp_path_factory.mktemp("export")
    data = make_data(root / "data")
    model = make_model(data)
    model_dir = write_checkpoint(model, root / "model", read_manifest(data)["fingerprint"])
    cfg = ExportConfig(data=data, model=model_dir, out=root / "export")
    summary = export(cfg)
    return {"root": root, "data": data, "model": model, "model_dir": model_dir, "out": cfg.out, "summary": summary}


def test_user_tower_matches_pytorch_on_ragged_batch(exported: dict[str, Any]) -> None:
    model, data = exported["model"], exported["data"]
    program = torch.export.load(str(exported["out"] / "user_tower.pt2")).module()
    tower = UserTower(model)
    batch = ragged_batch(data, model)
    assert len(set(batch["seq_len"].tolist())) > 1 and len(set(batch["long_len"].tolist())) > 1
    got = user_vector(program(*tower_inputs(batch, tower)))
    torch.testing.assert_close(got, last_position(model, batch), atol=1e-5, rtol=0)

    # Dynamic dims: one session, cut to one event, with a one-event long-term window.
    one = one_event(batch)
    torch.testing.assert_close(user_vector(program(*tower_inputs(one, tower))), last_position(model, one), atol=1e-5, rtol=0)


def test_user_tower_spec(exported: dict[str, Any]) -> None:
    spec = json.loads((exported["out"] / "user_tower.json").read_text())
    model = exported["model"]
    assert [i["name"] for i in spec["inputs"]] == UserTower(model).input_names()
    assert [i["name"] for i in spec["inputs"]] == [
        "seq_item", "seq_category", "seq_len", "long_item", "long_category", "long_len", "user_age",
    ]  # fmt: skip
    assert spec["fingerprint"] == "test-fingerprint"
    assert spec["embedding_dim"] == D and spec["max_session_len"] == MAX_SESSION_LEN
    assert spec["inputs"][0]["vocab"] == "vocab/item.parquet"
    assert (exported["out"] / "vocab" / "item.parquet").is_file()
    assert json.loads((exported["out"] / "config.json").read_text())["model"] == str(exported["model_dir"])


def test_item_vectors_parquet(exported: dict[str, Any]) -> None:
    model = exported["model"]
    table = pq.read_table(exported["out"] / "item_vectors.parquet")
    assert table.schema.field("vector").type.list_size == D
    assert str(table.schema.field("vector").type.value_type) == "float"
    n = model.item_table.shape[0] - 2
    assert table.column("index").to_pylist() == list(range(2, n + 2))
    assert table.column("item_id").to_pylist() == [f"i{i}" for i in range(2, n + 2)]  # raw ids of shard_builder
    vecs = torch.from_numpy(np.stack(table.column("vector").to_numpy(zero_copy_only=False)))
    with torch.no_grad():
        expected = model.all_item_vectors()[2:]
    torch.testing.assert_close(vecs, expected, atol=1e-5, rtol=0)
    assert exported["summary"]["items"] == n and exported["summary"]["dim"] == D


def test_faiss_index_matches_exact_search(exported: dict[str, Any]) -> None:
    faiss = pytest.importorskip("faiss")
    assert "items.faiss (flat over 20 items)" in exported["summary"]["faiss"]
    index = faiss.read_index(str(exported["out"] / "items.faiss"))
    table = pq.read_table(exported["out"] / "item_vectors.parquet")
    vecs = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert index.ntotal == len(vecs)
    model = exported["model"]
    queries = last_position(model, ragged_batch(exported["data"], model)).numpy()
    _, got = index.search(queries, 10)
    exact = torch.from_numpy(queries @ vecs.T).topk(10, dim=1).indices.numpy()
    np.testing.assert_array_equal(got, exact)


def test_faiss_off_is_skipped(exported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tower export is not what this checks; skip its cost.
    monkeypatch.setattr("sdm.serve.export.export_user_tower", lambda model, path: {})
    cfg = ExportConfig(data=exported["data"], model=exported["model_dir"], out=tmp_path / "x", faiss=False)
    summary = export(cfg)
    assert summary["faiss"].startswith("skipped") and not (cfg.out / "items.faiss").exists()


def test_other_variant_without_user_or_long_inputs(exported: dict[str, Any], tmp_path: Path) -> None:
    """SDMMA reads no user feature and no long-term window: same calling convention, fewer inputs."""
    model = make_model(exported["data"], variant="SDMMA", seed=1)
    export_user_tower(model, tmp_path / "t.pt2")
    tower = UserTower(model)
    assert tower.input_names() == ["seq_item", "seq_category", "seq_len", "long_item", "long_category", "long_len"]
    batch = ragged_batch(exported["data"], model)
    got = user_vector(torch.export.load(str(tmp_path / "t.pt2")).module()(*tower_inputs(batch, tower)))
    torch.testing.assert_close(got, last_position(model, batch), atol=1e-5, rtol=0)


# -- CLI ---------------------------------------------------------------------------


def one_line_error(result: Any, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_cli_good_path_with_overwrite(exported: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "items.faiss").write_text("stale")
    (out / "notes.txt").write_text("not ours")
    args = ["export", "--data", str(exported["data"]), "--model", str(exported["model_dir"]), "--out", str(out)]
    runner = CliRunner()
    # a file export did not write: refused, even with --overwrite, and nothing is touched
    one_line_error(runner.invoke(app, [*args, "--overwrite", "--quiet"]), "holds 'notes.txt', which `sdm export` did not write")
    assert (out / "notes.txt").read_text() == "not ours" and (out / "items.faiss").read_text() == "stale"
    (out / "notes.txt").unlink()
    one_line_error(runner.invoke(app, [*args, "--quiet"]), "pass --overwrite")
    ok = runner.invoke(app, [*args, "--overwrite", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("exported PSDMMAL-N: 20 item vectors of dim 16")
    assert (out / "user_tower.pt2").is_file() and (out / "user_tower.weights.pt").is_file() and (out / "config.json").is_file()
    assert (out / "items.faiss").stat().st_size > 5 or "skipped" in ok.output


def test_cli_bad_inputs(exported: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(exported["data"])
    out = str(tmp_path / "out")
    missing = tmp_path / "nope"
    one_line_error(
        runner.invoke(app, ["export", "--data", data, "--model", str(missing), "--out", out, "-q"]),
        f"{missing}: model directory not found",
    )
    foreign = write_checkpoint(exported["model"], tmp_path / "foreign", "another-fingerprint")
    one_line_error(
        runner.invoke(app, ["export", "--data", data, "--model", str(foreign), "--out", out, "-q"]),
        "model trained on another dataset",
    )
    one_line_error(
        runner.invoke(app, ["export", "--data", str(missing), "--model", str(foreign), "--out", out, "-q"]),
        "data directory not found",
    )
    assert not Path(out).exists()  # nothing is written before the inputs check out


def test_model_features_agree_with_tower(exported: dict[str, Any]) -> None:
    """The tower's inputs are the trainer's features for the variant (so batches fit it)."""
    manifest = read_manifest(exported["data"])
    tower = UserTower(exported["model"])
    assert (tower.item_features, tower.user_features) == model_features(manifest, TrainConfig(data=exported["data"], variant="PSDMMAL-N"))


def test_tower_history_outputs_match_the_repeat_head(exported: dict[str, Any]) -> None:
    """With a repeat head the tower also returns copy_scores' candidates at the last position."""
    from sdm.model.repeat import copy_scores

    model, data = exported["model"], exported["data"]
    tower = UserTower(model)
    if not tower.has_history:
        pytest.skip("the default model has no repeat head")
    assert tower.output_names() == ["user_vector", "history_items", "history_logits"]
    batch = ragged_batch(data, model)
    program = torch.export.load(str(exported["out"] / "user_tower.pt2")).module()
    with torch.no_grad():
        _, items, logits = program(*tower_inputs(batch, tower))
        _, history = model(batch, with_history=True)
    want_items, want_logits = copy_scores(history, torch.arange(len(batch["seq_len"])), batch["seq_len"] - 1)
    # The tower pads the session to max_session_len: same candidates, in the same order, plus padding.
    for b in range(len(batch["seq_len"])):
        got = {int(i): float(r) for i, r in zip(items[b], logits[b]) if i > 1}
        want = {int(i): float(r) for i, r in zip(want_items[b], want_logits[b]) if i > 1}
        assert got.keys() == want.keys() and got
        assert max(abs(got[i] - want[i]) for i in got) < 1e-4
    spec = json.loads((exported["out"] / "user_tower.json").read_text())
    assert [o["name"] for o in spec["outputs"]] == tower.output_names()
