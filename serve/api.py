"""Python API for services: `Recommender.load(export_dir).recommend(events, k=...)`.

Loads an `sdm export` directory once (vocabularies, item vectors, the index and
the user tower: ONNX Runtime when `user_tower.onnx` and onnxruntime are there,
else the `torch.export` program), then turns raw events of one or many users
into recommendations:

1. `serve.sessions`: each user's latest session before `at` and its long-term
   window, with the sessionizer's own stage functions and the training vocabularies;
2. the exported tower: user vector (and, with a repeat head, the history candidates
   and their copy logits) after the session's last event;
3. `serve.rank.rank`: index top-K merged with the re-scored history candidates.

    >>> from sdm.serve import Recommender
    >>> rec = Recommender.load("runs/export")
    >>> rec.recommend([{"user_id": 7, "item_id": 123, "timestamp": datetime(...)}], k=10)

Events use the log schema the data was sessionized from (column names of its
config); a polars / pandas frame, a list of dicts or a dict of lists. The
result is a polars frame: `user_id`, `session_start`, `items` (raw ids, best
first), `scores`, one row per user.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from sdm.errors import SdmError
from sdm.pipeline.dataset import collate
from sdm.serve.index import ExactIndex, FaissIndex
from sdm.serve.rank import rank
from sdm.serve.sessions import Lookups, latest_sessions, open_frame
from sdm.sessionize.io import to_utc_us


def to_frame(events: Any) -> pl.DataFrame:
    """A polars DataFrame from a polars/pandas frame, a list of dicts or a dict of lists.

    Raises:
        SdmError: anything else, or rows polars cannot put in one frame.
    """
    if isinstance(events, pl.LazyFrame):
        return events.collect()
    if isinstance(events, pl.DataFrame):
        return events
    try:
        if type(events).__module__.startswith("pandas"):
            return pl.from_pandas(events)
        if isinstance(events, (list, tuple, dict)):
            return pl.DataFrame(events)
    except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
        raise SdmError(f"events: not one table ({str(exc).strip().splitlines()[0]})") from None
    raise SdmError(f"events: expected a polars or pandas frame, a list of dicts or a dict of lists, got {type(events).__name__}")


class _OnnxTower:
    """The ONNX user tower through onnxruntime (inputs the graph dropped are not fed)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle pool threads spin by default, stealing the cores the index search needs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {n: inputs[n] for n in self.names})


class _TorchTower:
    """The `torch.export` program (positional inputs in `user_tower.json` order)."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.module = torch.export.load(str(path)).module()
        self.names = names

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.module(*[torch.from_numpy(inputs[n]) for n in self.names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in out]


class Recommender:
    """Recommendations from an export directory (see the module docstring).

    Use `Recommender.load`; the constructor takes the loaded parts.
    """

    def __init__(
        self, root: Path, lookups: Lookups, spec: dict[str, Any], tower: Any, index: Any, item_vecs: torch.Tensor,
        raw_items: np.ndarray, runtime: str,
    ) -> None:  # fmt: skip
        self.root = root
        self.lookups = lookups
        self.spec = spec
        self.tower = tower
        self.index = index
        self.item_vecs = item_vecs
        self.raw_items = raw_items
        self.runtime = runtime
        self.item_features = list(spec["item_features"])
        self.user_features = list(spec["user_features"])
        self.input_names = [i["name"] for i in spec["inputs"]]

    @classmethod
    def load(cls, export_dir: Path | str, runtime: str = "auto", index: str = "auto", threads: int = 1) -> Recommender:
        """Load an `sdm export` directory.

        Args:
            export_dir: the directory.
            runtime: "onnx", "torch" or "auto" (ONNX when user_tower.onnx and onnxruntime exist).
            index: "exact", "faiss" (items.faiss) or "auto" (faiss when the export has an
                approximate index and faiss is installed, else exact).
            threads: CPU threads of the tower (1 keeps a single request's latency lowest
                and leaves the other cores to other requests).

        Raises:
            SdmError: not a finished export, or the asked runtime / index missing.
        """
        root = Path(export_dir)
        if not (root / "config.json").is_file() or not (root / "user_tower.json").is_file():
            raise SdmError(f"{root}: not a finished `sdm export` directory (no config.json / user_tower.json)")
        if not (root / "lookups.json").is_file():
            raise SdmError(f"{root}: no lookups.json; re-run `sdm export` with this version")
        spec = json.loads((root / "user_tower.json").read_text())
        lookups = Lookups.load(root)
        names = [i["name"] for i in spec["inputs"]]
        onnx_path = root / "user_tower.onnx"
        use_onnx = runtime == "onnx" or (runtime == "auto" and onnx_path.is_file() and _has("onnxruntime"))
        if runtime == "onnx" and not (onnx_path.is_file() and _has("onnxruntime")):
            raise SdmError(f"{root}: runtime onnx needs user_tower.onnx and onnxruntime (pip install 'sdm[onnx]')")
        if runtime not in ("auto", "onnx", "torch"):
            raise SdmError(f"unknown runtime {runtime!r}; expected auto, onnx or torch")
        torch.set_num_threads(threads)  # the torch tower and the exact index search
        if use_onnx:
            tower: Any = _OnnxTower(onnx_path, threads)
        else:
            tower = _TorchTower(root / "user_tower.pt2", names)

        table = pq.read_table(root / "item_vectors.parquet")
        flat = table.column("vector").combine_chunks().values.to_numpy().astype(np.float32)
        d = int(spec["embedding_dim"])
        vecs = np.zeros((table.num_rows + 2, d), dtype=np.float32)
        vecs[2:] = flat.reshape(-1, d)
        raw = np.empty(table.num_rows + 2, dtype=object)
        raw[2:] = table.column("item_id").to_pylist()
        idx = _load_index(root, vecs, index)
        return cls(root, lookups, spec, tower, idx, torch.from_numpy(vecs), raw, "onnx" if use_onnx else "torch")

    def recommend(
        self, events: Any, k: int = 10, at: dt.datetime | None = None, exclude_seen: bool = False
    ) -> pl.DataFrame:
        """Top-k items for every user of `events` (latest session before `at`, see the module docstring).

        Returns:
            polars frame: user_id, session_start (UTC), items (raw ids, best first), scores.

        Raises:
            SdmError: events the training config cannot read (missing column, wrong type), k < 1.
        """
        if k < 1:
            raise SdmError(f"k must be >= 1, got {k}")
        frame = to_frame(events)
        inp, missing = open_frame(self.lookups, frame)
        served = latest_sessions(inp, self.lookups, missing, to_utc_us(at) if at is not None else None)
        user_type = frame.schema.get(inp.spec.user_key, pl.String)
        if not len(served):
            return _frame(served.user_id.cast(user_type), np.zeros(0, np.int64), [], [])
        batch = collate(served.arrays, self.item_features, self.user_features)
        inputs = _inputs(batch, self.item_features, self.user_features)
        out = self.tower(inputs)
        u = torch.from_numpy(out[0])
        prefix = batch["seq"]["item"] if exclude_seen else None
        if len(out) == 3:
            scores, items = rank(u, self.index, k, prefix, torch.from_numpy(out[1]), torch.from_numpy(out[2]),
                                 self.item_vecs)  # fmt: skip
        else:
            scores, items = rank(u, self.index, k, prefix)
        ids = items.numpy()
        raw = [[self.raw_items[j] for j in row if j > 1] for row in ids]
        sc = [[float(s) for s, j in zip(srow, row) if j > 1] for srow, row in zip(scores.numpy(), ids)]
        return _frame(served.user_id, served.session_start, raw, sc)


def _frame(user_id: pl.Series, start: np.ndarray, items: list[list[Any]], scores: list[list[float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": user_id,
            "session_start": pl.Series(start, dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
            "items": items,
            "scores": pl.Series(scores, dtype=pl.List(pl.Float32)),
        }
    )


def _inputs(batch: dict[str, Any], item_features: list[str], user_features: list[str]) -> dict[str, np.ndarray]:
    """The tower's named inputs from a collated batch (int64 numpy)."""
    from sdm.pipeline.dataset import user_column

    out = {f"seq_{f}": batch["seq"][f].numpy() for f in item_features}
    out["seq_len"] = batch["seq_len"].numpy()
    out.update({f"long_{f}": batch["long"][f].numpy() for f in item_features})
    out["long_len"] = batch["long_len"].numpy()
    out.update({user_column(f): batch["user"][f].numpy() for f in user_features})
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in out.items()}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _load_index(root: Path, vecs: np.ndarray, kind: str) -> Any:
    spec_path, path = root / "index.json", root / "items.faiss"
    has_faiss = spec_path.is_file() and path.is_file() and _has("faiss")
    if kind == "faiss":
        if not has_faiss:
            raise SdmError(f"{root}: index faiss needs items.faiss + index.json and faiss (pip install 'sdm[faiss]')")
        return FaissIndex.read(str(path), json.loads(spec_path.read_text()))
    if kind == "auto" and has_faiss:
        params = json.loads(spec_path.read_text())
        if params.get("kind") not in ("flat", None):
            return FaissIndex.read(str(path), params)
    if kind not in ("auto", "exact", "faiss"):
        raise SdmError(f"unknown index {kind!r}; expected auto, exact or faiss")
    return ExactIndex(vecs)
