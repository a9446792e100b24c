"""Python API for services: `Recommender.load(export_dir).recommend(events, k=...)`.

Loads an `sdm export` directory once (vocabularies, item vectors, the index and
the user tower: ONNX Runtime when `user_tower.onnx` and onnxruntime are there,
else `UserTower` rebuilt from this package's model code and the tensors of
`user_tower.weights.pt`), then turns raw events of one or many users into
recommendations:

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

Safety: nothing in an export directory is unpickled (`user_tower.pt2` is never
loaded: `torch.export.load` unpickles, which runs code a crafted file holds).
Every file is checked as it is loaded: a missing, damaged or foreign one, or
files that do not fit each other (vector dims, index size, tower inputs), is one
`DataError` line naming the file; a bad argument (`k`, `at`, events) is a
`ConfigError`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sdm.errors import ConfigError, DataError, SdmError
from sdm.names import vocab_file
from sdm.pipeline.dataset import collate, user_column
from sdm.serve.export import (
    CONFIG, FAISS_INDEX, INDEX_SPEC, ITEM_VECTORS, LOOKUPS, ONNX_TOWER, TOWER_SPEC, WEIGHTS, load_tower,
)  # fmt: skip
from sdm.serve.index import ExactIndex, FaissIndex
from sdm.serve.rank import rank
from sdm.serve.sessions import Lookups, first_line, latest_sessions, open_frame, read_json
from sdm.sessionize.io import polars_errors, to_utc_us

INT64 = (-(2**63), 2**63 - 1)


def to_frame(events: Any) -> pl.DataFrame:
    """A polars DataFrame from a polars/pandas frame, a list of dicts or a dict of lists.

    Raises:
        ConfigError: anything else, rows polars cannot put in one frame, or integers beyond int64.
    """
    if isinstance(events, pl.LazyFrame):
        with polars_errors("events"):
            events = events.collect()
    if isinstance(events, pl.DataFrame):
        return _check_int64(events)
    try:
        if type(events).__module__.startswith("pandas"):
            return _check_int64(pl.from_pandas(events))
        if isinstance(events, (list, tuple, dict)):
            return _check_int64(pl.DataFrame(events))
    except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, SdmError):
            raise
        raise ConfigError(f"events: not one table ({first_line(exc)})") from None
    raise ConfigError(
        f"events: expected a polars or pandas frame, a list of dicts or a dict of lists, got {type(events).__name__}"
    )


def _check_int64(frame: pl.DataFrame) -> pl.DataFrame:
    """Refuse integer columns holding values beyond int64 (ids sdm's tables cannot hold)."""
    for name, dtype in frame.schema.items():
        if dtype in (pl.Int128, pl.UInt64, pl.UInt128) and frame.height:
            col = frame.get_column(name).drop_nulls()
            if len(col) and (col.min() < INT64[0] or col.max() > INT64[1]):
                bad = col.max() if col.max() > INT64[1] else col.min()
                raise ConfigError(f"events: column {name!r} holds {bad}, beyond the 64-bit integers sdm reads")
    return frame


def _check_k(k: Any) -> int:
    """k as an int >= 1 (not a bool, float or string)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k must be an integer, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    return int(k)


def _at_us(at: Any) -> int | None:
    """`at` (None, a datetime, or an ISO 8601 string; naive = UTC) as microseconds since epoch."""
    if at is None:
        return None
    value = at
    if isinstance(at, str):
        try:
            value = dt.datetime.fromisoformat(at)
        except ValueError:
            raise ConfigError(f"at: {at!r} is not an ISO 8601 date and time") from None
    if not isinstance(value, dt.datetime):
        raise ConfigError(f"at must be a datetime or an ISO 8601 string, got {at!r} ({type(at).__name__})")
    try:
        return to_utc_us(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"at: {at!r} is not a usable time ({first_line(exc)})") from None


class _OnnxTower:
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


class _TorchTower:
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
        """Load an `sdm export` directory, checking every file it reads.

        Args:
            export_dir: the directory.
            runtime: "onnx", "torch" or "auto" (ONNX when user_tower.onnx and onnxruntime exist).
            index: "exact", "faiss" (items.faiss) or "auto" (faiss when the export has an
                approximate index and faiss is installed, else exact).
            threads: CPU threads of the tower (1 keeps a single request's latency lowest
                and leaves the other cores to other requests).

        Raises:
            ConfigError: an unknown runtime or index, threads < 1.
            DataError: not a finished export, the asked runtime / index missing, or a
                file missing, damaged or not fitting the others (naming the file).
        """
        _choice("runtime", runtime, ("auto", "onnx", "torch"))
        _choice("index", index, ("auto", "exact", "faiss"))
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
        root = Path(export_dir)
        if not (root / CONFIG).is_file() or not (root / TOWER_SPEC).is_file():
            raise DataError(f"{root}: not a finished `sdm export` directory (no config.json / user_tower.json)")
        if not (root / LOOKUPS).is_file():
            raise DataError(f"{root}: no lookups.json; re-run `sdm export` with this version")
        read_json(root / CONFIG, "an sdm export config")
        spec = _read_spec(root / TOWER_SPEC)
        lookups = Lookups.load(root)
        _check_features(root / TOWER_SPEC, spec, lookups)
        names = [i["name"] for i in spec["inputs"]]
        onnx_path = root / ONNX_TOWER
        use_onnx = runtime == "onnx" or (runtime == "auto" and onnx_path.is_file() and _has("onnxruntime"))
        if runtime == "onnx" and not (onnx_path.is_file() and _has("onnxruntime")):
            raise DataError(f"{root}: runtime onnx needs user_tower.onnx and onnxruntime (pip install 'sdm[onnx]')")
        torch.set_num_threads(threads)  # the torch tower and the exact index search
        if use_onnx:
            tower: Any = _OnnxTower(onnx_path, threads, names)
        else:
            tower = _TorchTower(root / WEIGHTS, names, lookups)
        d = int(spec["embedding_dim"])
        _probe(tower, spec, d)
        vecs, raw = _read_item_vectors(root / ITEM_VECTORS, d, lookups.num_items)
        idx = _load_index(root, vecs, index)
        return cls(root, lookups, spec, tower, idx, torch.from_numpy(vecs), raw, "onnx" if use_onnx else "torch")

    def recommend(
        self, events: Any, k: int = 10, at: dt.datetime | str | None = None, exclude_seen: bool = False
    ) -> pl.DataFrame:
        """Top-k items for every user of `events` (latest session before `at`, see the module docstring).

        Args:
            events: a polars / pandas frame, a list of dicts or a dict of lists (the log's columns).
            k: items per user (an integer >= 1; at most the catalogue is returned).
            at: a datetime or an ISO 8601 string (naive = UTC): events at or after it are ignored.
            exclude_seen: never recommend items of the user's current session.

        Returns:
            polars frame: user_id, session_start (UTC), items (raw ids, best first), scores.

        Raises:
            ConfigError: a bad k, at, exclude_seen or events value.
            SdmError: events the training config cannot read (missing column, wrong type).
            DataError: an export file that fails at request time (naming it).
        """
        k = min(_check_k(k), len(self.raw_items) - 2)
        at_us = _at_us(at)
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise ConfigError(f"exclude_seen must be True or False, got {exclude_seen!r}")
        frame = to_frame(events)
        with polars_errors("events"):
            inp, missing = open_frame(self.lookups, frame)
            served = latest_sessions(inp, self.lookups, missing, at_us)
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
    out = {f"seq_{f}": batch["seq"][f].numpy() for f in item_features}
    out["seq_len"] = batch["seq_len"].numpy()
    out.update({f"long_{f}": batch["long"][f].numpy() for f in item_features})
    out["long_len"] = batch["long_len"].numpy()
    out.update({user_column(f): batch["user"][f].numpy() for f in user_features})
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in out.items()}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _choice(what: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected {', '.join(allowed[:-1])} or {allowed[-1]}")


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_spec(path: Path) -> dict[str, Any]:
    """user_tower.json, checked: dims, features, and the inputs in the order `UserTower` takes them."""
    spec = read_json(path, "an sdm user tower spec")
    problem = None
    d = spec.get("embedding_dim")
    inputs = spec.get("inputs")
    if spec.get("format") != "sdm-user-tower":
        problem = f"format {spec.get('format')!r}, expected 'sdm-user-tower'"
    elif not isinstance(d, int) or isinstance(d, bool) or d < 1:
        problem = f"embedding_dim must be an integer >= 1, got {d!r}"
    elif not _names(spec.get("item_features")) or not _names(spec.get("user_features")):
        problem = "item_features and user_features must be lists of names"
    elif not isinstance(inputs, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in inputs):
        problem = "inputs must be a list of objects with a name"
    elif [i["name"] for i in inputs] != _input_names(spec["item_features"], spec["user_features"]):
        problem = "its inputs are not the tower's for its features"
    elif len(spec.get("outputs") or [None]) not in (1, 3):
        problem = "outputs must list 1 or 3 outputs"
    if problem is not None:
        raise DataError(f"{path}: damaged user tower spec ({problem}); re-run `sdm export`")
    return spec


def _input_names(item_features: list[str], user_features: list[str]) -> list[str]:
    """`UserTower.input_names()` for these features."""
    return (
        [f"seq_{f}" for f in item_features] + ["seq_len"] + [f"long_{f}" for f in item_features] + ["long_len"]
        + [user_column(u) for u in user_features]
    )  # fmt: skip


def _check_features(path: Path, spec: dict[str, Any], lookups: Lookups) -> None:
    """The tower reads only features the lookups can build, and both describe the same data."""
    items = ["item", *lookups.item_features]
    users = ["user", *lookups.user_features]
    unknown = [f for f in spec["item_features"] if f not in items] + [f for f in spec["user_features"] if f not in users]
    if unknown or "item" not in spec["item_features"]:
        raise DataError(f"{path}: the tower reads feature(s) {unknown or ['item']} that {LOOKUPS} does not describe")
    if spec.get("fingerprint") and lookups.fingerprint and spec["fingerprint"] != lookups.fingerprint:
        raise DataError(f"{path}: written for other data than {LOOKUPS} (fingerprints differ): files of two exports")


def _probe(tower: Any, spec: dict[str, Any], d: int) -> None:
    """Run the tower on one one-event session of unknown ids: it must run and give (1, d) user vectors."""
    inputs = {}
    for i in spec["inputs"]:
        name = i["name"]
        if name in ("seq_len", "long_len"):
            inputs[name] = np.array([1 if name == "seq_len" else 0], dtype=np.int64)
        elif name.startswith(("seq_", "long_")):
            inputs[name] = np.ones((1, 1), dtype=np.int64)
        else:
            inputs[name] = np.ones(1, dtype=np.int64)
    out = tower(inputs)
    want = len(spec.get("outputs") or [None])
    shapes = [tuple(np.shape(o)) for o in out]
    ok = len(out) == want and shapes[0] == (1, d)
    if ok and want == 3:
        ok = len(shapes[1]) == 2 and shapes[1] == shapes[2] and shapes[1][0] == 1
    if not ok:
        raise DataError(f"{tower.path}: the tower's outputs {shapes} do not fit {TOWER_SPEC} ({want} output(s), dim {d})")


def _read_item_vectors(path: Path, d: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(V, d) float32 vectors (rows 0, 1 zero) and (V,) raw ids (object) from item_vectors.parquet, checked."""
    if not path.is_file():
        raise DataError(f"{path}: not found; re-run `sdm export`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    n = num_items - 2
    if "vector" not in table.column_names or "item_id" not in table.column_names:
        raise DataError(f"{path}: not item vectors (no item_id / vector column; found {', '.join(table.column_names)})")
    vtype = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_floating(vtype.value_type):
        raise DataError(f"{path}: column 'vector' holds {vtype}, expected fixed_size_list<float>")
    if vtype.list_size != d:
        raise DataError(f"{path}: vectors of dim {vtype.list_size}, but the user tower's are of dim {d}")
    if table.num_rows != n:
        raise DataError(f"{path}: {table.num_rows} vectors, but the catalogue has {n} items")
    column = table.column("vector").combine_chunks()
    if "index" in table.column_names and table.column("index").to_pylist() != list(range(2, n + 2)):
        raise DataError(f"{path}: column 'index' is not 2..{n + 1} in order")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if column.null_count or len(flat) != n * d or not np.isfinite(flat).all():
        raise DataError(f"{path}: missing or non-finite vector values")
    vecs = np.zeros((n + 2, d), dtype=np.float32)
    vecs[2:] = flat.reshape(n, d)
    raw = np.empty(n + 2, dtype=object)
    raw[2:] = table.column("item_id").to_pylist()
    return vecs, raw


def _load_index(root: Path, vecs: np.ndarray, kind: str) -> Any:
    """The item index: faiss (items.faiss + index.json) when asked, or by "auto" for an approximate one; else exact."""
    spec_path, path = root / INDEX_SPEC, root / FAISS_INDEX
    has_faiss = spec_path.is_file() and path.is_file() and _has("faiss")
    if kind == "faiss" and not has_faiss:
        raise DataError(f"{root}: index faiss needs items.faiss + index.json and faiss (pip install 'sdm[faiss]')")
    if kind == "faiss" or (kind == "auto" and has_faiss):
        params = _read_index_spec(spec_path, len(vecs) - 2)
        if kind == "faiss" or params["kind"] != "flat":
            return _read_faiss(path, params, vecs.shape[1])
    return ExactIndex(vecs)


def _read_index_spec(path: Path, n: int) -> dict[str, Any]:
    """index.json, checked against the catalogue size `n`."""
    params = read_json(path, "a faiss index spec")
    kind = params.get("kind")
    problem = None
    if kind not in ("flat", "ivf", "hnsw"):
        problem = f"kind {kind!r}, expected flat, ivf or hnsw"
    elif params.get("items") != n:
        problem = f"items {params.get('items')!r}, but the catalogue has {n}"
    elif kind == "ivf" and not (isinstance(params.get("nprobe"), int) and params["nprobe"] >= 1):
        problem = f"ivf nprobe {params.get('nprobe')!r}"
    elif not isinstance(params.get("max_norm", 0.0), (int, float)) or not isinstance(params.get("ef_search", 1), int):
        problem = "max_norm / ef_search must be numbers"
    if problem is not None:
        raise DataError(f"{path}: damaged index spec ({problem}); re-run `sdm export`")
    return params


def _read_faiss(path: Path, params: dict[str, Any], d: int) -> FaissIndex:
    """items.faiss, checked to hold the catalogue's vectors at the tower's dim."""
    try:
        index = FaissIndex.read(str(path), params)
    except SdmError:
        raise
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError, or its own types
        raise DataError(f"{path}: not a readable faiss index ({first_line(exc)})") from None
    dim = d + 1 if params["kind"] == "ivf" else d
    needs = {"ivf": "nprobe", "hnsw": "hnsw", "flat": "ntotal"}[params["kind"]]
    if not hasattr(index.index, needs):
        raise DataError(f"{path}: not a faiss {params['kind']} index, which {INDEX_SPEC} says it is")
    if int(index.index.ntotal) != params["items"] or int(index.index.d) != dim:
        raise DataError(
            f"{path}: holds {index.index.ntotal} vectors of dim {index.index.d}, "
            f"expected {params['items']} of dim {dim} (item_vectors.parquet / index.json)"
        )
    return index
