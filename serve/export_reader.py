"""Reading an `sdm export` directory for `Recommender.load`, each file checked as it is read.

A missing, damaged or foreign file, or files that do not fit each other (the
tower's inputs and the lookups' features, vector dims, index size), is one
`DataError` line naming the file. Nothing is unpickled: the weights file is read
with `weights_only=True` (`serve.user_tower.load_tower`).

- `read_spec`, `check_features`: user_tower.json, and that it reads lookups.json's features;
- `probe_tower`: the loaded tower (`serve.runtime`) runs and gives outputs of the spec's shapes;
- `read_item_vectors`: item_vectors.parquet, the vocabulary's rows then the cold ones;
- `load_index`: the exact index, or items.faiss + index.json;
- `weights_state`, `read_neighbours`: the neighbour term's table in the weights file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sdm.errors import DataError, SdmError, first_line
from sdm.pipeline.catalogue import ALWAYS
from sdm.pipeline.dataset import user_column
from sdm.retrieval.index import ExactIndex, FaissIndex
from sdm.serve.export import FAISS_INDEX, INDEX_SPEC, TOWER_SPEC
from sdm.serve.lookups import LOOKUPS, Lookups, read_json
from sdm.serve.user_tower import load_tower


def read_spec(path: Path) -> dict[str, Any]:
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


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _input_names(item_features: list[str], user_features: list[str]) -> list[str]:
    """`UserTower.input_names()` for these features."""
    return (
        [f"seq_{f}" for f in item_features] + ["seq_len"] + [f"long_{f}" for f in item_features] + ["long_len"]
        + [user_column(u) for u in user_features]
    )  # fmt: skip


def check_features(path: Path, spec: dict[str, Any], lookups: Lookups) -> None:
    """The tower reads only features the lookups can build, and both describe the same data."""
    items = ["item", *lookups.item_features]
    users = ["user", *lookups.user_features]
    unknown = [f for f in spec["item_features"] if f not in items] + [f for f in spec["user_features"] if f not in users]
    if unknown or "item" not in spec["item_features"]:
        raise DataError(f"{path}: the tower reads feature(s) {unknown or ['item']} that {LOOKUPS} does not describe")
    if spec.get("fingerprint") and lookups.fingerprint and spec["fingerprint"] != lookups.fingerprint:
        raise DataError(f"{path}: written for other data than {LOOKUPS} (fingerprints differ): files of two exports")


def probe_tower(tower: Any, spec: dict[str, Any], d: int) -> None:
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


def weights_state(path: Path) -> dict[str, Any]:
    """The state dict of the export's weights file (`weights_only`: no code runs; `load_tower`'s checks)."""
    return load_tower(path).model.state_dict()


def read_neighbours(state: dict[str, Any], path: Path, num_items: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The neighbour term in the state dict of the export's weights file `path` (`model/neighbours.py`),
    checked, or None when it is off.

    Raises:
        DataError: a table that does not fit the vocabulary (naming the file).
    """
    items, sims, weight = (state.get(f"neighbours.{n}") for n in ("items", "sims", "weight"))
    if items is None or sims is None or weight is None or items.numel() == 0 or float(weight) <= 0:
        return None
    ok = (
        items.dim() == 2 and items.shape == sims.shape and items.shape[0] == num_items
        and not items.is_floating_point() and int(items.min()) >= 0 and int(items.max()) < num_items
        and bool(torch.isfinite(sims).all()) and math.isfinite(float(weight))
    )  # fmt: skip
    if not ok:
        raise DataError(f"{path}: damaged neighbour table (it must be ({num_items}, N) item indices with finite sims)")
    return items.long(), sims.float(), float(weight)


def read_item_vectors(path: Path, d: int, num_items: int) -> tuple[np.ndarray, np.ndarray, pl.Series, np.ndarray]:
    """item_vectors.parquet, checked: (N + 2, d) float32 vectors by item index (rows 0, 1 zero),
    (N + 2,) raw ids (object), the `item_id` column as stored (N,), and (C,) `known_from` of the
    cold rows (us, `ALWAYS` = known at all times). An export without `cold` column has none."""
    if not path.is_file():
        raise DataError(f"{path}: not found; re-run `sdm export`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    warm = num_items - 2
    if "vector" not in table.column_names or "item_id" not in table.column_names:
        raise DataError(f"{path}: not item vectors (no item_id / vector column; found {', '.join(table.column_names)})")
    vtype = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_floating(vtype.value_type):
        raise DataError(f"{path}: column 'vector' holds {vtype}, expected fixed_size_list<float>")
    if vtype.list_size != d:
        raise DataError(f"{path}: vectors of dim {vtype.list_size}, but the user tower's are of dim {d}")
    known = _cold_rows(path, table, warm)
    n = table.num_rows
    column = table.column("vector").combine_chunks()
    if "index" in table.column_names and table.column("index").to_pylist() != list(range(2, n + 2)):
        raise DataError(f"{path}: column 'index' is not 2..{n + 1} in order")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if column.null_count or len(flat) != n * d or not np.isfinite(flat).all():
        raise DataError(f"{path}: missing or non-finite vector values")
    vecs = np.zeros((n + 2, d), dtype=np.float32)
    vecs[2:] = flat.reshape(n, d)
    ids = pl.Series("item_id", table.column("item_id").combine_chunks())
    if ids.null_count():
        raise DataError(f"{path}: column 'item_id' has nulls")
    twice = ids.filter(ids.is_duplicated())
    if len(twice):  # one item twice would be recommended twice
        raise DataError(f"{path}: item {twice[0]!r} occurs twice in column 'item_id'")
    raw = np.empty(n + 2, dtype=object)
    raw[2:] = ids.to_list()
    return vecs, raw, ids, known


def _cold_rows(path: Path, table: pa.Table, warm: int) -> np.ndarray:
    """(C,) `known_from` (us, `ALWAYS` for null) of the cold rows after the `warm` vocabulary rows.

    Raises:
        DataError: fewer rows than the vocabulary, rows beyond it without a `cold` column, a
            `cold` column that is not bool, has nulls or is not false then true, or a
            `known_from` that is missing, not a UTC timestamp, or set on a warm row.
    """
    n = table.num_rows
    if n < warm or ("cold" not in table.column_names and n != warm):
        raise DataError(f"{path}: {n} vectors, but the catalogue has {warm} items")
    if "cold" not in table.column_names:
        return np.zeros(0, dtype=np.int64)  # an export of an older sdm: every row warm
    cold = table.column("cold")
    if not pa.types.is_boolean(cold.type) or cold.null_count:
        raise DataError(f"{path}: column 'cold' holds {cold.type} with {cold.null_count} nulls, expected bool without nulls")
    flags = cold.to_numpy()
    if flags[:warm].any() or not flags[warm:].all():
        raise DataError(f"{path}: column 'cold' must be false for the vocabulary's {warm} items and true after them")
    if "known_from" not in table.column_names:
        raise DataError(f"{path}: a 'cold' column without 'known_from'")
    known = table.column("known_from")
    if not pa.types.is_timestamp(known.type) or known.type.tz not in ("UTC", "+00:00", "Etc/UTC"):
        raise DataError(f"{path}: column 'known_from' holds {known.type}, expected timestamp[us, tz=UTC]")
    if known.slice(0, warm).null_count != warm:
        raise DataError(f"{path}: column 'known_from' is set for an item of the vocabulary (null expected)")
    try:
        us = known.slice(warm).cast(pa.timestamp("us", tz=known.type.tz)).cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{path}: column 'known_from' is not a usable time ({first_line(exc)})") from None
    return us.fill_null(ALWAYS).to_numpy().astype(np.int64)


def load_index(root: Path, vecs: np.ndarray, kind: str) -> Any:
    """The item index: faiss (items.faiss + index.json) when asked, or by "auto" for an approximate one; else exact."""
    spec_path, path = root / INDEX_SPEC, root / FAISS_INDEX
    has_faiss = spec_path.is_file() and path.is_file() and importable("faiss")
    if kind == "faiss" and not has_faiss:
        raise DataError(f"{root}: index faiss needs items.faiss + index.json and faiss (pip install 'sdm[faiss]')")
    if kind == "faiss" or (kind == "auto" and has_faiss):
        params = _read_index_spec(spec_path, len(vecs) - 2)
        if kind == "faiss" or params["kind"] != "flat":
            return _read_faiss(path, params, vecs.shape[1])
    return ExactIndex(vecs)


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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
