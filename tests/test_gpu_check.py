"""bench/gpu_check.py: the whole check passes on a CPU with --small and writes the JSON it
promises; a failed subprocess or a disagreement beyond the tolerance exits non-zero."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
CHECKS = {
    "environment", "synth", "sessionize", "train", "train_cpu_reference", "evaluate", "evaluate_cpu_reference",
    "export", "torchrun", "agreement", "throughput",
}  # fmt: skip
TOP_KEYS = {"ok", "device", "small", "environment", "sizes", "tolerance", "checks", "commands", "seconds"}


@pytest.fixture()
def gpu_check(monkeypatch):
    """The script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_small_cpu_run_passes_and_writes_the_json(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert TOP_KEYS <= set(res)
    assert res["ok"] is True and res["device"] == "cpu" and res["small"] is True
    assert set(res["checks"]) == CHECKS
    assert all(c["ok"] for c in res["checks"].values()), {n: c["detail"] for n, c in res["checks"].items() if not c["ok"]}
    for name in CHECKS:  # one line per check, ok or FAIL, then its numbers
        assert any(line.startswith(f"ok   {name} ") for line in r.stdout.splitlines()), (name, r.stdout)

    env = res["environment"]
    assert {"torch", "cuda", "cudnn", "gpu", "gpu_memory_gib"} <= set(env) and env["gpu"] == "cpu"
    assert res["tolerance"]["abs"] == 0.02 and res["tolerance"]["metrics"] == ["hr@50", "ndcg@50"]
    c = res["checks"]
    for run in ("train", "train_cpu_reference"):
        assert c[run]["steps"] == res["sizes"]["steps"] and c[run]["last_loss"] == c[run]["last_loss"]  # not NaN
        assert 0 < c[run]["valid_hr@50"] <= 1
    for key in ("diff_valid_hr@50", "diff_valid_ndcg@50", "diff_test_hr@50", "diff_test_ndcg@50"):
        assert c["agreement"][key] == 0  # on a CPU both runs are the same fp32 computation
    assert c["export"]["files"] > 0
    assert c["torchrun"]["steps"] == res["sizes"]["ddp_steps"]
    tp = c["throughput"]
    for key in ("train_samples_per_s", "model_step_samples_per_s", "loader_alone_samples_per_s"):
        assert tp[key] > 0
    assert 0 <= tp["loader_share"] <= 1 and tp["loss"] == "sampled" and tp["advice"]

    commands = res["commands"]
    train = next(x for x in commands if " sdm.cli train " in x and "--out " + str(out / "work" / "train") + " " in x)
    assert "--device cpu" in train and "--loss sampled" in train
    for stage in ("synth", "sessionize", "evaluate", "export"):
        assert any(f" sdm.cli {stage} " in x for x in commands), stage
    assert any("torch.distributed.run" in x and "--nproc_per_node=1" in x for x in commands)


def test_a_failed_subprocess_exits_nonzero(gpu_check, tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "error: injected failure\n")

    monkeypatch.setattr(gpu_check.subprocess, "run", failing)
    monkeypatch.setattr(gpu_check, "throughput", lambda *a: {"stub": 1})  # in-process, not a subprocess: not under test
    assert gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["ok"] is False
    assert not res["checks"]["synth"]["ok"] and "injected failure" in res["checks"]["synth"]["detail"]
    assert res["checks"]["train"]["detail"] == "not run: needs sessionize"
    assert res["checks"]["environment"]["ok"] and res["checks"]["throughput"]["ok"]


@pytest.mark.parametrize(("diff", "tolerance", "code"), [(0.01, "0.02", 0), (0.03, "0.02", 1), (0.0, "-1", 1)])
def test_agreement_beyond_the_tolerance_exits_nonzero(gpu_check, tmp_path, monkeypatch, diff, tolerance, code):
    """The real agreement check and exit code, on stub runs whose metrics differ by `diff`."""
    def run(offset):
        return lambda *a: {"valid_hr@50": 0.3 + offset, "valid_ndcg@50": 0.1, "test_hr@50": 0.3, "test_ndcg@50": 0.1}

    monkeypatch.setattr(gpu_check, "train", lambda work, size, device, name: run(diff if name == "train" else 0)())
    monkeypatch.setattr(gpu_check, "evaluate", lambda *a: {})
    for name in ("synth", "sessionize", "export", "torchrun", "throughput"):
        monkeypatch.setattr(gpu_check, name, lambda *a: {})
    assert gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path), "--tolerance", tolerance]) == code
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["checks"]["agreement"]["ok"] is (code == 0)
    assert res["checks"]["agreement"]["diff_valid_hr@50"] == pytest.approx(diff)
    assert res["tolerance"]["abs"] == float(tolerance)


def test_feed_advice_follows_the_measured_shares(gpu_check):
    """The advice the small run never reaches: a loader-bound and copy-bound GPU step, and a step-bound one."""
    bound = gpu_check.feed_advice(wait=0.6, copy=0.1, step=0.3, device="cuda", shards=8, workers=0)
    assert "60% of a step waiting" in bound[0] and "--num-workers" in bound[0] and "prefetch" in bound[0]
    assert "pin_memory=True" in bound[1]
    fine = gpu_check.feed_advice(wait=0.01, copy=0.01, step=0.98, device="cuda", shards=8, workers=0)
    assert "nothing to change" in fine[0] and "would not pay" in fine[1]
    assert len(gpu_check.feed_advice(wait=0.5, copy=0.0, step=0.5, device="cpu", shards=8, workers=0)) == 1
