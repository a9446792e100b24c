"""The user tower as `sdm export` writes it and sdm serves it.

`UserTower` is a trained SDM behind flat positional inputs, one user vector per
session out (and the history candidates, with a repeat head). Its files:

- `export_user_tower`: the `torch.export` program, `user_tower.pt2`, for external
  consumers only: loading a `.pt2` unpickles, which can run code, so sdm never does;
- `write_tower_weights` / `load_tower`: its tensors and model config,
  `user_tower.weights.pt`, read with `weights_only=True` and rebuilt from this
  package's model code: what `Recommender` serves from (`serve.runtime`);
- `export_onnx`: the same tower as ONNX, `user_tower.onnx`.

`writing` is the scratch-name-then-rename write these share with `serve.export`'s
faiss and neighbour files: torch's and faiss's failed writes are a `StorageError` too.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdm.errors import DataError, StorageError, first_line
from sdm.model.sdm import SDM
from sdm.outputs import atomic_path
from sdm.pipeline.dataset import user_column

EXPORT_VERSION = 1  # of every file `sdm export` writes
WEIGHTS_FORMAT = "sdm-user-tower-weights"


class UserTower(nn.Module):
    """Serving wrapper of `SDM.forward`: flat tensors in, one user vector per session out.

    Inputs, positionally (all int64; F = `model.item_features`, U = `model.user_features`):
    `seq_<f>` (B, T) for f in F, `seq_len` (B,), `long_<f>` (B, L) for f in F,
    `long_len` (B,), `user` / `user_<u>` (B,) for u in U (the shard column names). Sequences are right-padded with 0.
    Variants without the long-term encoder ignore the long inputs but still take them,
    so every variant has the same calling convention.

    Returns the vector after reading the whole session so far, (B, D): position
    `seq_len - 1` (clamped to [0, T - 1]). A model with a repeat head (`model.repeat`)
    also returns its history candidates at that position, as `copy_scores` gives
    them: `history_items` (B, C) int64 (distinct items, 0 = none) and
    `history_logits` (B, C) float32 copy logits R, C = max_session_len + L; the final
    score of a history item j is logaddexp(u . v_j, R_j) (`retrieval.rank.rank`).

    `nn.LSTM` unrolls over time when exported, which fixes T; so the wrapper right-pads
    the session to `max_session_len` itself. Every encoder is causal, so the padding
    never changes a valid position, and callers may pass any T in 1..max_session_len.

    Args:
        model: a trained SDM (the tower puts it in eval mode).
    """

    def __init__(self, model: SDM) -> None:
        super().__init__()
        self.model = model
        self.item_features = list(model.item_features)
        self.user_features = list(model.user_features)
        self.max_len = int(model.config.max_session_len)
        # The wrapper's own mode matters too: export traces a root left in training
        # mode with dropout switched on, even when the inner model is in eval mode.
        self.eval()

    @property
    def has_history(self) -> bool:
        """Whether the tower also outputs history candidates (the model has a repeat head)."""
        return getattr(self.model, "repeat", None) is not None

    def output_names(self) -> list[str]:
        """Names of the outputs, in order."""
        return ["user_vector", "history_items", "history_logits"] if self.has_history else ["user_vector"]

    def input_names(self) -> list[str]:
        """Names of the positional inputs, in order."""
        return (
            [f"seq_{f}" for f in self.item_features]
            + ["seq_len"]
            + [f"long_{f}" for f in self.item_features]
            + ["long_len"]
            + [user_column(u) for u in self.user_features]
        )

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Args: the tensors of `input_names()`, in order. Returns: (B, D) (and the history, see above)."""
        nf = len(self.item_features)
        seq_in, seq_len = inputs[:nf], inputs[nf]
        long_in, long_len = inputs[nf + 1 : 2 * nf + 1], inputs[2 * nf + 1]
        user_in = inputs[2 * nf + 2 :]
        T = seq_in[0].shape[1]
        seq = {f: F.pad(x, (0, self.max_len - T)) for f, x in zip(self.item_features, seq_in)}  # (B, T_max)
        batch = {
            "seq": seq,
            "seq_len": seq_len,
            "long": dict(zip(self.item_features, long_in)),
            "long_len": long_len,
            "user": dict(zip(self.user_features, user_in)),
        }
        last = (seq_len - 1).clamp(0, T - 1)  # (B,)
        if not self.has_history:
            vecs = self.model(batch)  # (B, T_max, D)
            return vecs.gather(1, last.view(-1, 1, 1).expand(-1, 1, vecs.shape[-1])).squeeze(1)  # (B, D)
        from sdm.model.repeat import copy_scores

        vecs, history = self.model(batch, with_history=True)
        user = vecs.gather(1, last.view(-1, 1, 1).expand(-1, 1, vecs.shape[-1])).squeeze(1)  # (B, D)
        items, logits = copy_scores(history, torch.arange(vecs.shape[0], device=vecs.device), last)  # (B, C)
        return user, items, logits.float()


def tower_inputs(batch: dict[str, Any], tower: UserTower) -> tuple[Tensor, ...]:
    """A model batch dict (`pipeline.dataset.collate`) -> the tower's positional inputs."""
    return (
        *[batch["seq"][f] for f in tower.item_features],
        batch["seq_len"],
        *[batch["long"][f] for f in tower.item_features],
        batch["long_len"],
        *[batch["user"][u] for u in tower.user_features],
    )


def export_user_tower(model: SDM, path: Path) -> dict[str, Any]:
    """`torch.export` the user tower to `path`; returns the dims that stayed dynamic.

    Batch B and long-term length L are dynamic (>= 1); T is dynamic in
    1..max_session_len (static 1 when max_session_len is 1). The example inputs
    use sizes 2, because export specialises dims whose example size is 0 or 1.
    """
    from torch.export import Dim

    tower = UserTower(model).cpu()
    nf, nu = len(tower.item_features), len(tower.user_features)
    item2 = model.item_table[2].cpu()  # (F,) a real item's feature indices
    t_ex = min(2, tower.max_len)
    seq = [item2[j].expand(2, t_ex).clone() for j in range(nf)]  # (2, T)
    long = [item2[j].expand(2, 2).clone() for j in range(nf)]  # (2, 2)
    # One distinct tensor per input: export treats a tensor passed twice as one input.
    users = [torch.ones(2, dtype=torch.long) for _ in range(nu)]
    args = (*seq, torch.tensor([t_ex, 1]), *long, torch.tensor([2, 1]), *users)

    B, L = Dim("batch", min=1), Dim("long_len", min=1)
    T: Any = Dim("seq_len", min=1, max=tower.max_len) if tower.max_len >= 2 else None
    shapes = (
        [{0: B, 1: T}] * nf + [{0: B}] + [{0: B, 1: L}] * nf + [{0: B}] + [{0: B}] * nu
    )  # one spec per positional input
    with torch.no_grad(), warnings.catch_warnings():
        # nn.LSTM re-assigns its `_flat_weights` list on every call, which export reports;
        # the program still reads the registered parameters (the tests compare outputs).
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights", category=UserWarning)
        program = torch.export.export(tower, args, dynamic_shapes=(tuple(shapes),))
    with writing(path) as tmp, open(tmp, "wb") as fh:  # a file object: the archive is not named after tmp
        torch.export.save(program, fh)
    return {"batch": [1, None], "T": [1, tower.max_len], "L": [1, None]}


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """`outputs.atomic_path(path)`, where torch's and faiss's failed writes (RuntimeError) are a StorageError too."""
    with atomic_path(path) as tmp:
        try:
            yield tmp
        except RuntimeError as exc:
            raise StorageError(f"{path}: cannot write ({first_line(exc)})") from None


def write_tower_weights(model: SDM, path: Path) -> None:
    """The tower's tensors and model config, loadable with `torch.load(weights_only=True)` (`load_tower`)."""
    blob = {
        "format": WEIGHTS_FORMAT,
        "version": EXPORT_VERSION,
        "model_config": json.dumps(model.config.model_dump(mode="json")),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    with writing(path) as tmp, open(tmp, "wb") as fh:
        torch.save(blob, fh)


def load_tower(path: Path) -> UserTower:
    """The user tower of an export: this package's model code with the tensors of `user_tower.weights.pt`.

    Only plain tensors, strings and numbers are read (`weights_only=True`): no
    code in the file runs. The `.pt2` program is never loaded, because
    `torch.export.load` unpickles.

    Raises:
        DataError: the file is missing (an export of an older sdm), damaged, or does not fit its model config.
    """
    from sdm.model.embeddings import state_item_values, state_user_values
    from sdm.model.sdm import ModelConfig

    if not path.is_file():
        raise DataError(f"{path}: not found; this export was written by an older sdm: re-run `sdm export`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
        why = first_line(exc)
        if "weights_only" in why or "Weights only" in why:  # torch's text suggests weights_only=False: never
            why = "it holds objects other than tensors and plain values"
        raise DataError(f"{path}: not a readable weights file ({why})") from None
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise DataError(f"{path}: not an sdm tower weights file (no format {WEIGHTS_FORMAT!r})")
    state = blob.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise DataError(f"{path}: damaged weights file (state_dict is not a map of names to tensors)")
    try:
        config = ModelConfig(**json.loads(blob.get("model_config")))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: damaged weights file (model config: {first_line(exc)})") from None
    _check_size(path, config, state)
    try:
        model = SDM(config, state.get("item_table"), state_item_values(config, state), state_user_values(config, state))
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise DataError(f"{path}: the weights do not fit their model config ({first_line(exc)})") from None
    return UserTower(model.eval())


def _check_size(path: Path, config: Any, state: dict[str, Tensor]) -> None:
    """Refuse a model config whose embedding tables alone hold more numbers than the file (no huge allocation)."""
    need = config.embedding_dim * (
        sum(config.item_vocab.get(f, 0) for f in config.item_features)
        + sum(config.user_vocab.get(f, 0) for f in config.user_features)
    )
    have = sum(int(t.numel()) for t in state.values())
    if need > have:
        raise DataError(f"{path}: the model config needs {need:,} embedding weights, the file holds {have:,}")


def export_onnx(model: SDM, path: Path) -> str:
    """Write the user tower as ONNX to `path`; returns the path, or why it was skipped.

    Same positional inputs (named as in `UserTower.input_names()`) and output
    `user_vector` (B, D) as the torch.export program; B, T and L are dynamic axes.
    Uses the TorchScript-based exporter: it maps `nn.LSTM` to ONNX's LSTM operator
    (the torch.export-based one unrolls it over max_session_len steps, ~15x slower
    to export and larger), and it is what torch 2.13 still ships.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "skipped: onnx is not installed (pip install 'sdm[onnx]')"
    tower = UserTower(model).cpu()
    names = tower.input_names()
    nf, nu = len(tower.item_features), len(tower.user_features)
    item2 = model.item_table[2].cpu()
    t_ex = min(2, tower.max_len)
    seq = [item2[j].expand(2, t_ex).clone() for j in range(nf)]
    long = [item2[j].expand(2, 2).clone() for j in range(nf)]
    users = [torch.ones(2, dtype=torch.long) for _ in range(nu)]
    args = (*seq, torch.tensor([t_ex, 1]), *long, torch.tensor([2, 1]), *users)
    axes: dict[str, dict[int, str]] = {}
    for name, a in zip(names, args):
        axes[name] = {0: "B"} if a.dim() == 1 else {0: "B", 1: "T" if name.startswith("seq_") else "L"}
    for name in tower.output_names():
        axes[name] = {0: "B"} if name == "user_vector" else {0: "B", 1: "C"}
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and LSTM batch-size notes
        torch.onnx.export(
            tower, args, str(tmp), input_names=names, output_names=tower.output_names(), dynamic_axes=axes,
            opset_version=17, dynamo=False,
        )  # fmt: skip
    return str(path)
