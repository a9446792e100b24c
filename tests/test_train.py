"""Trainer: runs, resumes exactly, refuses bad input, stops on NaN, runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from shard_builder import build_shards
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import TrainConfig
from sdm.errors import SdmError
from sdm.pipeline.train import get_lr, train


@pytest.fixture()
def data(tmp_path):
    return build_shards(tmp_path / "data", n_users=16, sessions_per_user=4, session_len=5, n_shards=4)


def cfg(data, out, **kw):
    base = dict(data=data, out=out, batch_size=8, embedding_dim=16, num_negatives=8, epochs=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def params(path):
    return torch.load(path, weights_only=True)["model"]


def test_get_lr_warmup_then_cosine():
    c = TrainConfig(lr=1.0, warmup_steps=10)
    assert get_lr(0, c, 40) == pytest.approx(0.25)  # warmup capped at a tenth of the run
    assert get_lr(0, c, 110) == pytest.approx(0.1)
    assert get_lr(9, c, 110) == pytest.approx(1.0)
    assert get_lr(60, c, 110) == pytest.approx(0.55)
    assert get_lr(110, c, 110) == pytest.approx(0.1)
    assert get_lr(500, c, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("variant", ["PSDMMAL-N", "SDMMA", "DNN", "PSDMMAL-NoS"])
def test_train_writes_checkpoints_and_log(data, tmp_path, variant):
    out = tmp_path / "model"
    summary = train(cfg(data, out, variant=variant), progress=False)
    assert summary["epochs"] == 2 and summary["steps"] > 0
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["model_config"]["variant"] == variant
    assert ckpt["data_fingerprint"] == "test-fingerprint"
    assert json.loads((out / "config.json").read_text())["variant"] == variant
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any("valid" in x for x in lines)
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)


def test_resume_gives_same_parameters_as_uninterrupted(data, tmp_path):
    # 3 steps per epoch here, so the cut at step 4 falls inside the second epoch.
    full = tmp_path / "full"
    train(cfg(data, full, max_steps=8, epochs=5), progress=False)
    half = tmp_path / "half"
    train(cfg(data, half, max_steps=4, epochs=5), progress=False)
    train(cfg(data, half, max_steps=8, epochs=5, resume=True), progress=False)
    a, b = params(full / "last.pt"), params(half / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_other_model_config(data, tmp_path):
    out = tmp_path / "m"
    train(cfg(data, out, max_steps=2), progress=False)
    with pytest.raises(SdmError, match="another model config"):
        train(cfg(data, out, max_steps=4, embedding_dim=32, resume=True), progress=False)
    other = build_shards(tmp_path / "other", n_users=8)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "different"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdmError, match="another data manifest"):
        train(cfg(other, out, max_steps=4, resume=True), progress=False)


def test_nan_loss_stops_with_message_and_keeps_last_good(data, tmp_path):
    out = tmp_path / "m"
    train(cfg(data, out, max_steps=2), progress=False)
    before = params(out / "last.pt")
    with pytest.raises(SdmError, match="loss became NaN"):
        train(cfg(data, out, max_steps=6, lr=1e30, warmup_steps=1, resume=True), progress=False)
    after = params(out / "last.pt")
    for k in before:
        torch.testing.assert_close(before[k], after[k])


def test_cli_train_errors(tmp_path, data):
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "data directory not found" in r.output
    (tmp_path / "half").mkdir()
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "half")])
    assert r.exit_code == 1 and "no manifest" in r.output
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nepochz = 3\n")
    r = runner.invoke(app, ["train", "--config", str(toml)])
    assert r.exit_code == 1 and "unknown config key 'epochz'" in r.output
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--resume"])
    assert r.exit_code == 1 and "no checkpoint to resume from" in r.output


def test_cli_train_good_path(tmp_path, data):
    out = tmp_path / "m"
    r = CliRunner().invoke(
        app, ["train", "--data", str(data), "--out", str(out), "--max-steps", "3", "--embedding-dim", "16", "-q"]
    )
    assert r.exit_code == 0, r.output
    assert "trained PSDMMAL-N: 3 steps" in r.output
    assert (out / "best.pt").exists()


def test_torchrun_two_processes(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "sdm.cli", "train", "--data", str(data), "--out", str(out),
        "--epochs", "2", "--batch-size", "4", "--embedding-dim", "16", "--num-negatives", "8", "-q",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained PSDMMAL-N") == 1  # only rank 0 reports
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["epoch"] >= 1
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("valid" in x for x in lines)


def test_feature_selection_and_missing_feature_error(data, tmp_path):
    from sdm.pipeline.dataset import read_manifest
    from sdm.pipeline.train import build_model_config

    m = read_manifest(data)
    mc = build_model_config(cfg(data, tmp_path / "m", item_features=[], user_features="user,age"), m)
    assert list(mc.item_vocab) == ["item"] and list(mc.user_vocab) == ["user", "age"]
    default = build_model_config(cfg(data, tmp_path / "m"), m)  # profile only, no user id
    assert list(default.item_vocab) == ["item", "category"] and list(default.user_vocab) == ["age"]
    nos = build_model_config(cfg(data, tmp_path / "m", variant="PSDMMAL-NoS"), m)
    assert list(nos.item_vocab) == ["item"] and list(nos.user_vocab) == ["user"]
    summary = train(cfg(data, tmp_path / "m", item_features=[], max_steps=2), progress=False)
    assert summary["steps"] == 2
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--item-features", "brand,category"])
    assert r.exit_code == 1
    assert "item feature(s) ['brand'] are not in the data (it has: ['item', 'category'])" in r.output
