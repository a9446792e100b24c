"""The data directory's item and user tables, as the model and the baselines read them.

`load_item_table`: each item index's feature indices (items.parquet). `load_item_values`
and `load_user_values`: the value lists of multi-valued item features (items.parquet) and
the value sets of multi-valued user features (users.parquet), checked by `check_values` and
padded by `pad_values` (which catalogue.parquet's value lists go through too,
`pipeline/catalogue.py`). `load_item_counts`: each item's training-event count, and
`raw_item_ids`: each item's raw id (vocab/item.parquet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sdm.errors import DataError, first_line
from sdm.model.embeddings import MAX_VALUES
from sdm.names import vocab_file
from sdm.pipeline.listcolumns import gather, list_parts


def load_item_table(data_dir: Path, manifest: dict[str, Any], features: list[str] | None = None) -> torch.Tensor:
    """(num_items, F) feature indices of every item index.

    Columns are `features` in that order (default: the manifest's item features);
    rows 0 (padding) and 1 (OOV) hold 0 and 1 in every column.
    """
    feats = list(features) if features is not None else manifest["item_features"]
    table = pq.read_table(Path(data_dir) / "items.parquet")
    n = int(manifest["num_items"])
    out = np.zeros((n, len(feats)), dtype=np.int64)
    out[1, :] = 1
    idx = table.column("item").to_numpy().astype(np.int64)
    for j, f in enumerate(feats):
        out[idx, j] = idx if f == "item" else table.column(f).to_numpy().astype(np.int64)
    return torch.from_numpy(out)


def load_item_values(data_dir: Path, manifest: dict[str, Any], features: list[str]) -> dict[str, torch.Tensor]:
    """Per multi-valued feature among `features`: (num_items, K) value indices of every item index.

    Read from items.parquet's column that the manifest's `multi_valued` names (`<f>_values`).
    Row i holds item i's values in their order, the first `MAX_VALUES` (`pad_values`),
    right-padded with 0; rows 0 (padding) and 1 (OOV) and an item without values are all 0
    (`SDM` embeds the item's single value index there). Features that are not multi-valued
    in the manifest are left out: {} for data without multi-valued features.

    Raises:
        DataError: a missing column or bad values (`check_values`), one line naming items.parquet.
    """
    multi = manifest.get("multi_valued") or {}
    columns = {f: str(multi[f]["items_column"]) for f in features if "items_column" in (multi.get(f) or {})}
    if not columns:
        return {}
    path = Path(data_dir) / "items.parquet"
    table = _read_columns(path, ["item", *columns.values()], f"the value lists {list(columns.values())}")
    idx = table.column("item").to_numpy().astype(np.int64)
    out = {}
    for f, column in columns.items():
        lists = check_values(path, column, table.column(column), int(manifest["vocab_sizes"][f]))
        padded = pad_values(lists)
        full = np.zeros((int(manifest["num_items"]), padded.shape[1]), dtype=np.int64)
        full[idx] = padded
        out[f] = torch.from_numpy(full)
    return out


def load_user_values(data_dir: Path, manifest: dict[str, Any], features: list[str]) -> dict[str, torch.Tensor]:
    """Per multi-valued user feature among `features`: (S, K) value indices of every value set.

    A multi-valued profile feature's index in users.parquet (and the shards' `user_<f>`) is
    its value set s, 2 .. S - 1 (the manifest's `multi_valued[f]["sets"]` is S; 1: no
    value). Row s holds the set's values (users.parquet's `<f>_values`, the first
    `MAX_VALUES`), right-padded with 0; rows 0 and 1 are all 0 (`SDM` embeds the OOV
    value there). {} when none of `features` is a multi-valued user feature.

    Raises:
        DataError: a missing column, bad values (`check_values`), a set index outside
            1 .. S - 1, or one set index with two value lists; one line naming users.parquet.
    """
    multi = manifest.get("multi_valued") or {}
    columns = {f: str(multi[f]["users_column"]) for f in features if "users_column" in (multi.get(f) or {})}
    if not columns:
        return {}
    path = Path(data_dir) / "users.parquet"
    table = _read_columns(path, [*columns, *columns.values()], f"the value sets {list(columns)}")
    out = {}
    for f, column in columns.items():
        sets = multi[f].get("sets")
        if type(sets) is not int or not 2 <= sets <= table.num_rows + 2:
            raise DataError(f"{path}: the manifest's multi_valued[{f!r}] sets {sets!r} is not 2 .. users + 2")
        idx = table.column(f).to_numpy(zero_copy_only=False)
        if table.column(f).null_count or (len(idx) and (idx.min() < 1 or idx.max() >= sets)):
            raise DataError(f"{path}: column {f!r} has value-set indices outside 1 .. {sets - 1} (the manifest's sets)")
        padded = pad_values(check_values(path, column, table.column(column), int(manifest["vocab_sizes"][f])))
        full = np.zeros((sets, padded.shape[1]), dtype=np.int64)
        idx = idx.astype(np.int64)
        full[idx] = padded
        if not np.array_equal(full[idx], padded) or full[:2].any():
            raise DataError(f"{path}: column {f!r}: a value-set index with two different value lists ({column!r})")
        out[f] = torch.from_numpy(full)
    return out


def _read_columns(path: Path, columns: list[str], what: str) -> pa.Table:
    """`columns` of a Parquet file; DataError naming the file and `what` when it cannot be read."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read {what} ({first})") from None


def check_values(path: Path, column: str, lists: pa.ChunkedArray | pa.Array, size: int) -> pa.Array:
    """A value-list column (`<f>_values` of items.parquet or catalogue.parquet), checked: lists of
    integers, no null value inside a list, every value in 1 .. size - 1 of the feature's
    vocabulary (1 = a value training never saw). A null list holds no value.

    Raises:
        DataError: one line naming the file and the column.
    """
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    kind = lists.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{path}: column {column!r} is {kind}, expected lists of int32 value indices")
    flat = pc.list_flatten(lists)
    if flat.null_count:
        raise DataError(f"{path}: column {column!r} has a null value inside a list")
    values = flat.to_numpy().astype(np.int64)
    if len(values) and (values.min() < 1 or values.max() >= size):
        raise DataError(
            f"{path}: column {column!r} has indices in [{values.min()}, {values.max()}], "
            f"outside 1 .. {size - 1} of its vocabulary"
        )
    return lists


def pad_values(lists: pa.Array) -> np.ndarray:
    """(n, K) int64: each list's first `MAX_VALUES` values, right-padded with 0 (a null list: none).

    K is the longest list kept (at most `MAX_VALUES`), at least 1.
    """
    offsets, values = list_parts(lists)
    length = np.diff(offsets)
    if lists.null_count:
        length = np.where(lists.is_null().to_numpy(zero_copy_only=False), 0, length)
    width = max(1, min(MAX_VALUES, int(length.max()) if len(length) else 0))
    return gather(values.astype(np.int64), offsets[:-1], np.minimum(length, width), width)


def load_item_counts(data_dir: Path, manifest: dict[str, Any]) -> torch.Tensor:
    """Training-event count of every item index (0 for padding and OOV)."""
    vocab = pq.read_table(Path(data_dir) / "vocab" / "item.parquet", columns=["index", "count"])
    counts = np.zeros(int(manifest["num_items"]), dtype=np.float64)
    counts[vocab.column("index").to_numpy()] = vocab.column("count").to_numpy()
    return torch.from_numpy(counts)


def raw_item_ids(data_dir: Path, num_items: int) -> pa.Array:
    """Raw id of every item index 2..V-1, in index order, from `vocab/item.parquet`.

    Raises:
        DataError: a missing or damaged vocabulary, or one not covering exactly the indices 2..V-1.
    """
    path = Path(data_dir) / vocab_file("item")
    if not path.is_file():
        raise DataError(f"{path}: item vocabulary not found")
    try:
        vocab = pq.read_table(path, columns=["raw", "index"]).sort_by("index")
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise DataError(f"{path}: not a readable item vocabulary ({first_line(exc)})") from None
    idx = vocab.column("index").to_numpy()
    if not np.array_equal(idx, np.arange(2, num_items)):
        raise DataError(f"{path}: indices do not cover 2..{num_items - 1} exactly (manifest num_items {num_items})")
    return vocab.column("raw").combine_chunks()
