"""`sdm export`: what a serving system needs to retrieve with a trained SDM.

Reads `best.pt` of a training run and the shard directory it was trained on,
and writes to the output directory:

- `item_vectors.parquet`: `item_id` (raw), `index` (int32), `vector`
  (fixed_size_list<float32>[D]), `cold` (bool), `known_from` (timestamp[us, UTC]):
  every real item index 2..V-1 of the vocabulary in index order (`cold` false,
  `known_from` null), then every cold item j of the data directory's
  `catalogue.parquet` (`pipeline/catalogue.py`: items with side info but no
  training event) as index V + j (`cold` true, `known_from` the catalogue's: null =
  known at all times). A cold item's vector is the item tower with the id part
  neutral (index 0, the zero padding row) and its side features
  (`SDM.cold_item_vectors`; a multi-valued feature mean-pooled over the catalogue's
  `<f>_values`, as a vocabulary item's over items.parquet's). A data directory
  without a catalogue gives no cold rows; exports of older sdm versions lack both
  columns (all rows warm).
- `items.faiss` + `index.json`: a `retrieval.index.FaissIndex` over the same vectors,
  warm and cold (exact below 50,000 items, IVF with tuned nprobe above; faiss
  row i = parquet row i), and its parameters (only when faiss is installed and
  `faiss` is on).
- `user_tower.pt2`: a `torch.export` program (`UserTower`) taking the batch
  tensors as flat positional inputs and returning the user vector after the
  last valid session position, (B, D): the query vector for the item index.
  For external consumers only: loading a `.pt2` unpickles, which can run code,
  so sdm never loads it.
- `user_tower.weights.pt`: the tower's tensors and its model config (JSON text),
  readable with `torch.load(..., weights_only=True)`; `Recommender` rebuilds
  `UserTower` from this package's model code and these weights (`serve.user_tower.load_tower`).
  They are the whole model's state, the item tower's included (with each item's values
  of the multi-valued features, `SDM.item_values`): `Recommender.add_items` computes
  vectors of new items from them, and the tower needs no data directory.
- `user_tower.onnx`: the same tower as ONNX (same inputs, names and output), for
  ONNX Runtime / Triton (only when the `onnx` extra is installed and `onnx` is on).
- `neighbours.parquet`: only when training chose the neighbour term (`model/neighbours.py`):
  each item's neighbour indices and similarities, for serving systems other than sdm's;
  `user_tower.json`'s `neighbours` gives the weight and the formula (sdm's `Recommender`
  reads the same table from the weights file).
- `user_tower.json`: input names, order, shapes and vocab files, dims, how to
  call it, and the manifest fingerprint.
- `lookups.json`: the training run's sessionize config, features and length caps:
  what `serve.lookups` gives `serve.sessions` to build a user's session like training did.
- `vocab/<file>.parquet` (`names.vocab_file`), `items.parquet`, `users.parquet`,
  `items_raw.parquet` (when the data has it): copies of every vocabulary the
  manifest lists and of the item, user and raw items tables, to turn raw events
  into the tower's indices.
- `config.json`: the resolved `ExportConfig`, written LAST; its absence means
  the export did not finish.

The output directory is guarded by `outputs.OutputDir`: refused when it is, holds
or lies in the data or model directory, when it holds a file export did not
write, or while another sdm process writes it. Its earlier export files are
deleted only after the model and data were read and checked, and every file is
written under a scratch name and renamed into place; a failed export removes
what it wrote, so the directory never holds half an export.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from sdm.config import ExportConfig
from sdm.errors import DataError, StorageError, first_line
from sdm.model.neighbours import DECAY
from sdm.model.sdm import SDM
from sdm.names import vocab_file
from sdm.outputs import OutputDir, atomic_path, write_json, write_text
from sdm.pipeline.catalogue import ALWAYS, Catalogue, cold_item_vectors, read_catalogue
from sdm.pipeline.dataset import read_manifest, user_column
from sdm.pipeline.tables import raw_item_ids
from sdm.manifest import verify_files
from sdm.serve.lookups import LOOKUPS
from sdm.serve.user_tower import EXPORT_VERSION, UserTower, export_onnx, export_user_tower, write_tower_weights, writing
from sdm.sessionize.write import ITEMS_RAW

ITEM_VECTORS = "item_vectors.parquet"
NEIGHBOURS = "neighbours.parquet"
FAISS_INDEX = "items.faiss"
INDEX_SPEC = "index.json"
USER_TOWER = "user_tower.pt2"
WEIGHTS = "user_tower.weights.pt"
ONNX_TOWER = "user_tower.onnx"
TOWER_SPEC = "user_tower.json"
CONFIG = "config.json"
TABLES = ("items.parquet", "users.parquet", ITEMS_RAW)
# Everything `export` writes; `--overwrite` deletes these (and nothing else).
OUTPUTS = (
    CONFIG, ITEM_VECTORS, NEIGHBOURS, FAISS_INDEX, INDEX_SPEC, USER_TOWER, WEIGHTS, ONNX_TOWER, TOWER_SPEC, LOOKUPS, *TABLES,
    "vocab", "vocab/*.parquet",
)  # fmt: skip
ITEM_CHUNK = 65_536


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[export] {msg}", file=sys.stderr, flush=True)


def write_neighbours(path: Path, model: SDM) -> None:
    """The neighbour term's table for serving systems other than sdm's: `index` (int32, as
    item_vectors.parquet's), `neighbours` (list<int32> item indices, best first), `sims`
    (list<float32>); items without neighbours are left out."""
    items, sims = model.neighbours.items.cpu(), model.neighbours.sims.cpu()
    filled = items > 1  # a row's neighbours come first, padding (0) after them
    n = filled.sum(1)
    rows = torch.nonzero(n > 0).squeeze(1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(n[rows].numpy())]).astype("int32"))
    table = pa.table({
        "index": pa.array(rows.numpy().astype("int32")),
        "neighbours": pa.ListArray.from_arrays(offsets, pa.array(items[rows][filled[rows]].numpy().astype("int32"))),
        "sims": pa.ListArray.from_arrays(offsets, pa.array(sims[rows][filled[rows]].numpy().astype("float32"))),
    })  # fmt: skip
    with writing(path) as tmp:
        pq.write_table(table, tmp)


def item_vectors(model: SDM) -> Tensor:
    """(V - 2, D) float32 vectors of item indices 2..V-1 (padding and OOV left out), in chunks."""
    num_items = int(model.item_table.shape[0])
    out = []
    with torch.no_grad():
        for start in range(2, num_items, ITEM_CHUNK):
            ids = torch.arange(start, min(start + ITEM_CHUNK, num_items), device=model.item_table.device)
            out.append(model.item_vectors(ids).float().cpu())
    return torch.cat(out)


def read_cold(data_dir: Path, manifest: dict[str, Any], raw: pa.Array) -> Catalogue | None:
    """The cold items of a data directory (`pipeline.catalogue.read_catalogue`), ids cast to the type of the
    vocabulary's raw ids `raw` (`tables.raw_item_ids`, read once by the caller).

    None when the manifest records no catalogue (a data directory of an older sdm).

    Raises:
        DataError: a damaged catalogue, or ids that do not cast to the vocabulary's raw type.
    """
    if "catalogue" not in manifest:
        return None
    catalogue = read_catalogue(Path(data_dir), manifest, raw)
    raw_type = raw.type
    try:
        catalogue.item_id = catalogue.item_id.cast(raw_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        path = Path(data_dir) / manifest["catalogue"]["path"]
        raise DataError(f"{path}: item_id is {catalogue.item_id.type}, the item vocabulary's raw ids {raw_type}") from None
    return catalogue


def write_item_vectors(
    path: Path, raw: pa.Array, vectors: Tensor, cold_raw: pa.Array | None = None, known_from: np.ndarray | None = None
) -> None:
    """`item_id`, `index`, `vector` (fixed_size_list<float32>[D]), `cold`, `known_from` of every row.

    `vectors` (N, D) holds the vocabulary's items 2..V-1 (`raw`), then the cold items
    (`cold_raw`, `known_from` in us since epoch UTC, `ALWAYS` = null), indices V...
    """
    n, d = vectors.shape
    cold_raw = cold_raw if cold_raw is not None else raw.slice(0, 0)
    known = np.asarray(known_from if known_from is not None else [], dtype=np.int64)
    warm = n - len(cold_raw)
    known = np.concatenate([np.full(warm, ALWAYS, dtype=np.int64), known])
    flat = pa.array(vectors.numpy().astype(np.float32, copy=False).reshape(-1))
    table = pa.table(
        {
            "item_id": pa.concat_arrays([raw, cold_raw]),
            "index": pa.array(np.arange(2, n + 2, dtype=np.int32)),
            "vector": pa.FixedSizeListArray.from_arrays(flat, d),
            "cold": pa.array(np.arange(n) >= warm),
            "known_from": pa.array(known, pa.int64(), mask=known == ALWAYS).cast(pa.timestamp("us", tz="UTC")),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_faiss(path: Path, vectors: Tensor, progress: bool = False) -> str:
    """Write a `FaissIndex` (row i = item index i + 2) and its parameters (`index.json`); returns what happened."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "skipped: faiss is not installed (pip install 'sdm[faiss]')"
    from sdm.retrieval.index import FaissIndex, describe

    padded = torch.cat([vectors.new_zeros(2, vectors.shape[1]), vectors])  # rows 0, 1: padding, OOV
    index = FaissIndex(padded, announce=progress)
    with writing(path) as tmp:
        index.save(str(tmp))
    write_json(path.parent / INDEX_SPEC, index.params)
    return f"{path} ({describe(index.params)})"


def _copy(src: Path, dst: Path) -> None:
    """Copy a file under a scratch name, renamed into place when complete."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _copy_lookups(data_dir: Path, out: Path, manifest: dict[str, Any]) -> dict[str, str | None]:
    """Copy the vocabulary of every feature the manifest lists, and the item, user and raw items tables.

    Every vocabulary, not only the tower's: building a session (`serve.sessions`)
    encodes every item feature of the training log. Each is found where the data
    directory keeps it, `names.vocab_file(name)`, never by listing the folder.

    Returns feature -> vocab path relative to `out` (None when the data has no such file).
    """
    names = dict.fromkeys([*manifest["item_features"], *manifest["user_features"], *manifest["vocab_sizes"]])
    vocab: dict[str, str | None] = {}
    for name in names:
        rel = vocab_file(name)
        vocab[name] = rel if (data_dir / rel).is_file() else None
        if vocab[name] is not None:
            try:
                (out / "vocab").mkdir(exist_ok=True)
            except OSError as exc:
                raise StorageError(f"{out / 'vocab'}: {exc.strerror or exc}") from None
            _copy(data_dir / rel, out / rel)
    for name in TABLES:
        if (data_dir / name).is_file():
            _copy(data_dir / name, out / name)
    return vocab


def _tower_spec(
    model: SDM, manifest: dict[str, Any], vocab: dict[str, str | None], dims: dict[str, Any]
) -> dict[str, Any]:
    """The contents of user_tower.json: how to build the inputs and call the program."""
    tower = UserTower(model)
    cfg = model.config

    def feature_input(name: str, feature: str, shape: list[str]) -> dict[str, Any]:
        return {"name": name, "feature": feature, "shape": shape, "dtype": "int64", "vocab": vocab.get(feature)}

    def length_input(name: str, what: str) -> dict[str, Any]:
        return {"name": name, "shape": ["B"], "dtype": "int64", "meaning": f"number of real {what} events"}

    inputs = (
        [feature_input(f"seq_{f}", f, ["B", "T"]) for f in tower.item_features]
        + [length_input("seq_len", "session")]
        + [feature_input(f"long_{f}", f, ["B", "L"]) for f in tower.item_features]
        + [length_input("long_len", "long-term")]
        + [feature_input(user_column(u), u, ["B"]) for u in tower.user_features]
    )
    return {
        "format": "sdm-user-tower",
        "version": EXPORT_VERSION,
        "fingerprint": manifest["fingerprint"],
        "variant": cfg.variant,
        "embedding_dim": cfg.embedding_dim,
        "item_features": tower.item_features,
        "user_features": tower.user_features,
        "max_session_len": cfg.max_session_len,
        "max_long_len": cfg.max_long_len,
        "inputs": inputs,
        "output": {"name": "user_vector", "shape": ["B", cfg.embedding_dim], "dtype": "float32"},
        "outputs": [
            {"name": "user_vector", "shape": ["B", cfg.embedding_dim], "dtype": "float32"},
            *(
                [
                    {"name": "history_items", "shape": ["B", "C"], "dtype": "int64",
                     "meaning": "distinct items of the session and long-term window (0 = none)"},
                    {"name": "history_logits", "shape": ["B", "C"], "dtype": "float32",
                     "meaning": "copy logit R: final score of history item j = logaddexp(u . v_j, R_j)"},
                ]
                if tower.has_history
                else []
            ),
        ],  # fmt: skip
        "dynamic_dims": dims,
        "item_vectors": ITEM_VECTORS,
        **(
            {"neighbours": {
                "file": NEIGHBOURS, "weight": float(model.neighbours.weight), "decay": DECAY,
                "score": "final score of item j = logaddexp(u . v_j, R_j) + weight * sum_q w_q sim(x_q, j) over the "
                         "session prefix x_0..x_p, w_q = decay^(p - q) normalised to sum 1 (sdm.model.neighbours)",
            }}
            if model.neighbours.active
            else {}
        ),  # fmt: skip
        "call": (
            "program = torch.export.load('user_tower.pt2'); "
            "vectors = program.module()(*[inputs in the order above]); "
            "scores = vectors @ item_vectors.T (or items.faiss.search(vectors, k))"
        ),
        "notes": [
            "Indices: 0 = padding, 1 = unknown/missing (out of vocabulary), 2.. from the vocab files (raw -> index).",
            "Session events oldest first, right-padded with 0, T <= max_session_len. As in sessionize (SPEC 2), "
            "a longer session is cut into chunks of max_session_len: pass its last chunk, events "
            "[(n - 1) // max_session_len * max_session_len, n).",
            "Long-term: the user's events of the long-term window before the session, oldest first, "
            "at most max_long_len (the latest ones), right-padded with 0; with no history pass L = 1 and long_len 0.",
            "Side features of an item (seq_<f>, long_<f>) come from items.parquet; user features from users.parquet.",
            *(
                [f"Multi-valued features {model.multi_valued}: pass the first value (items.parquet's <f>); the tower "
                 "embeds a known item (seq_item / long_item >= 2) by the mean of all its values, which it holds."]
                if model.multi_valued
                else []
            ),
            "Variants without long-term encoder ignore long_* and long_len but still take them.",
            "The program was exported on CPU.",
            "user_tower.weights.pt holds the same tower's tensors and model config (torch.load(..., "
            "weights_only=True)); sdm serves from it and never loads the .pt2, whose loading unpickles.",
        ],
    }


def lookups_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """What `serve.lookups.Lookups` reads from a data manifest, for an export directory."""
    keys = (
        "fingerprint", "item_features", "user_features", "vocab_sizes", "max_session_len", "max_long_len", "num_items",
        "config", "multi_valued",
    )  # fmt: skip
    return {"format": "sdm-lookups", "version": EXPORT_VERSION, **{k: manifest.get(k) for k in keys}}


def export(cfg: ExportConfig, progress: bool = False) -> dict[str, Any]:
    """Export the model in `cfg.model` for serving (see the module docstring for the files).

    Returns:
        Summary: out, items, dim, variant, faiss (path or why skipped), onnx, seconds.

    Raises:
        SdmError: missing data or model directory, unfinished training run, a model
            trained on another manifest than `cfg.data` (DataError); an `out` that
            overlaps an input, holds foreign files, or holds an earlier export
            without overwrite (OutputError); another export writing it
            (LockedError); a failed write (StorageError).
    """
    from sdm.pipeline.checkpoint import load_model  # same checkpoint checks as `sdm evaluate`

    t0 = time.time()
    inputs = {"data directory": cfg.data, "model directory": cfg.model}
    with OutputDir(cfg.out, "export", OUTPUTS, overwrite=cfg.overwrite, inputs=inputs) as guard:
        manifest = read_manifest(cfg.data)
        if getattr(cfg, "verify", True):
            verify_files(cfg.data, manifest)  # every data file against its recorded sha256
        model = load_model(cfg.model, cfg.data, manifest, torch.device("cpu"))
        raw = raw_item_ids(cfg.data, int(manifest["num_items"]))
        cold = read_cold(cfg.data, manifest, raw)
        guard.prepare(first=[CONFIG])  # config.json first: a half-cleared directory is never a finished export
        try:
            summary = _write(cfg, manifest, model, raw, cold, progress)
        except BaseException:
            _discard(cfg.out)
            raise
    return {**summary, "seconds": time.time() - t0}


def _write(
    cfg: ExportConfig, manifest: dict[str, Any], model: SDM, raw: pa.Array, cold: Catalogue | None, progress: bool
) -> dict[str, Any]:
    """Write every export file into the prepared `cfg.out`, config.json last."""
    out = Path(cfg.out)
    _say(progress, "item vectors")
    warm = item_vectors(model)  # (V - 2, D)
    vectors = warm
    if cold is not None and len(cold):
        with torch.no_grad():
            vectors = torch.cat([warm, cold_item_vectors(model, cold).float().cpu()])  # (V - 2 + C, D)
        write_item_vectors(out / ITEM_VECTORS, raw, vectors, cold.item_id, cold.known_from)
    else:
        write_item_vectors(out / ITEM_VECTORS, raw, vectors)
    faiss_status = write_faiss(out / FAISS_INDEX, vectors, progress) if cfg.faiss else "skipped: --no-faiss"
    _say(progress, f"faiss: {faiss_status}")

    if model.neighbours.active:
        write_neighbours(out / NEIGHBOURS, model)
    _say(progress, "exporting the user tower (torch.export)")
    write_tower_weights(model, out / WEIGHTS)
    dims = export_user_tower(model, out / USER_TOWER)
    onnx_status = export_onnx(model, out / ONNX_TOWER) if cfg.onnx else "skipped: --no-onnx"
    _say(progress, f"onnx: {onnx_status}")
    vocab = _copy_lookups(Path(cfg.data), out, manifest)
    write_json(out / TOWER_SPEC, _tower_spec(model, manifest, vocab, dims))
    write_json(out / LOOKUPS, lookups_spec(manifest))
    write_text(out / CONFIG, cfg.model_dump_json(indent=2) + "\n")  # last: marks a finished export
    return {
        "out": str(out),
        "items": int(warm.shape[0]),
        "cold_items": int(vectors.shape[0] - warm.shape[0]),
        "dim": int(vectors.shape[1]),
        "variant": model.config.variant,
        "faiss": faiss_status,
        "onnx": onnx_status,
    }


def _discard(out: Path) -> None:
    """Remove the export files a failed run wrote (config.json first), so no half export is left."""
    for name in OUTPUTS:
        path = out / name
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
