"""The ONNX user tower (`sdm export` with the `onnx` extra) gives the PyTorch model's outputs within 1e-4.

Checked with onnxruntime on a ragged batch (session lengths 2..4, long-term
windows 0..5), on one session of one event (the dynamic axes), with and
without a repeat head, and for a variant that reads no user or long-term input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_export import last_position, make_data, make_model, one_event, ragged_batch

from sdm.serve.user_tower import UserTower, export_onnx, tower_inputs

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def run_onnx(path: Path, tower: UserTower, batch: dict[str, Any]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    # The exporter leaves out inputs the variant never reads (SDMMA: long_*, users); feed by name.
    assert names == [n for n in tower.input_names() if n in names] and "seq_item" in names
    assert [o.name for o in sess.get_outputs()] == tower.output_names()
    feeds = {n: t.numpy() for n, t in zip(tower.input_names(), tower_inputs(batch, tower)) if n in names}
    return sess.run(None, feeds)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("onnx") / "data")


@pytest.mark.parametrize("variant", ["PSDMMAL-N", "SDMMA"])
def test_onnx_tower_matches_pytorch(data: Path, tmp_path: Path, variant: str) -> None:
    model = make_model(data, variant=variant, seed=4)
    path = tmp_path / "t.onnx"
    assert export_onnx(model, path) == str(path)
    tower = UserTower(model)
    batch = ragged_batch(data, model)
    assert len(set(batch["seq_len"].tolist())) > 1
    out = run_onnx(path, tower, batch)
    np.testing.assert_allclose(out[0], last_position(model, batch).numpy(), atol=1e-4, rtol=0)
    if tower.has_history:
        with torch.no_grad():
            ref = tower(*tower_inputs(batch, tower))
        np.testing.assert_array_equal(out[1], ref[1].numpy())
        real = ref[1].numpy() > 1
        np.testing.assert_allclose(out[2][real], ref[2].numpy()[real], atol=1e-4, rtol=0)

    one = one_event(batch)
    np.testing.assert_allclose(run_onnx(path, tower, one)[0], last_position(model, one).numpy(), atol=1e-4, rtol=0)


def test_onnx_missing_is_skipped(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    status = export_onnx(make_model(data), tmp_path / "t.onnx")
    assert status.startswith("skipped: onnx is not installed") and not (tmp_path / "t.onnx").exists()
