"""The two runtimes of an export's user tower in `Recommender`: ONNX Runtime or torch.

Each is built from one export file, checked against `user_tower.json`'s inputs, and
called with the tower's named int64 inputs (`named_inputs`, from a collated batch); it
returns the tower's outputs as numpy arrays (the user vectors, then with a repeat
head the history items and logits).
A tower that fails at request time is one `DataError` line naming its file.

- `OnnxTower`: `user_tower.onnx` through onnxruntime, on the CPU, spinning no idle threads;
- `TorchTower`: `UserTower` rebuilt from `user_tower.weights.pt`
  (`serve.user_tower.load_tower`), its vocabularies checked against the lookups'.
  `Recommender.add_items` runs its model's item tower too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdm.errors import DataError, first_line
from sdm.names import vocab_file
from sdm.pipeline.dataset import user_column
from sdm.serve.export import TOWER_SPEC
from sdm.serve.lookups import Lookups
from sdm.serve.user_tower import load_tower


class OnnxTower:
    """The ONNX user tower through onnxruntime (inputs the graph dropped are not fed)."""

    def __init__(self, path: Path, threads: int, names: list[str]) -> None:
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle pool threads spin by default, stealing the cores the index search needs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are plain Exceptions
            raise DataError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
        self.names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.names if n not in names]
        if unknown:
            raise DataError(f"{path}: the ONNX tower takes input(s) {unknown} that {TOWER_SPEC} does not list")

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, {n: inputs[n] for n in self.names})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are plain Exceptions
            raise DataError(f"{self.path}: the ONNX tower failed ({first_line(exc)})") from None


class TorchTower:
    """`UserTower` rebuilt from `user_tower.weights.pt` (never the `.pt2` program: loading it unpickles)."""

    def __init__(self, path: Path, names: list[str], lookups: Lookups) -> None:
        self.path = path
        self.module = load_tower(path)
        if self.module.input_names() != names:
            raise DataError(f"{path}: the tower's inputs {self.module.input_names()} differ from {TOWER_SPEC}'s {names}")
        vocab = self.module.model.config.item_vocab
        for name, table in lookups.vocabs.items():  # vocabulary sizes include padding and OOV
            if name in vocab and vocab[name] != table.height + 2:
                raise DataError(
                    f"{path}: the tower's {name!r} vocabulary has {vocab[name]} entries, "
                    f"{vocab_file(name)} {table.height + 2}: files of two different exports"
                )
        self.names = names

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            with torch.no_grad():
                out = self.module(*[torch.from_numpy(inputs[n]) for n in self.names])
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DataError(f"{self.path}: the user tower failed ({first_line(exc)})") from None
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in out]


def named_inputs(batch: dict[str, Any], item_features: list[str], user_features: list[str]) -> dict[str, np.ndarray]:
    """The tower's named inputs from a collated batch (int64 numpy)."""
    out = {f"seq_{f}": batch["seq"][f].numpy() for f in item_features}
    out["seq_len"] = batch["seq_len"].numpy()
    out.update({f"long_{f}": batch["long"][f].numpy() for f in item_features})
    out["long_len"] = batch["long_len"].numpy()
    out.update({user_column(f): batch["user"][f].numpy() for f in user_features})
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in out.items()}
