"""Streaming dataset over the sessionizer's shards (docs/FORMAT.md).

A shard row is one user's timeline in one split; every session of the row with
at least two events is one training example holding all of its SPEC-5 samples
(the model scores every position in one causal pass). The dataset reads shards
with pyarrow in record batches, gathers each session's short-term items and its
long-term window with vectorised numpy indexing (no Python loop per session),
mixes sessions in a bounded shuffle buffer, and yields collated batches.

Which shards a worker reads is the pure function `assign_shards`; memory is
bounded by `shuffle_buffer` and `read_rows`, whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sdm.errors import DataError, SdmError
from sdm.manifest import read_manifest
from sdm.model.embeddings import MAX_VALUES

SPLITS = ("train", "valid", "test")


def assign_shards(
    num_shards: int,
    rank: int,
    world_size: int,
    worker_id: int,
    num_workers: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[int]:
    """Shards read by one data-loader worker of one rank in one epoch.

    Every worker shuffles the shard list identically with `seed + epoch`, then
    takes every `total`-th shard starting at its global worker number
    `rank * num_workers + worker_id`, so each shard is read by exactly one
    worker. `num_workers` 0 (loading in the main process) counts as one worker.

    Raises:
        SdmError: fewer shards than workers in total (some would idle while
            the others still hold data, which stalls DDP); a ValueError, so
            the one-line message reaches the CLI even from a loader worker.
    """
    workers = max(num_workers, 1)
    total = world_size * workers
    if num_shards < total:
        raise SdmError(
            f"{num_shards} shards for {world_size} rank(s) x {workers} loader worker(s) = {total}: "
            "sessionize with a larger --min-shards or use fewer --num-workers"
        )
    if not (0 <= rank < world_size and 0 <= worker_id < workers):
        raise ValueError(f"rank {rank}/{world_size}, worker {worker_id}/{workers} out of range")
    order = np.arange(num_shards)
    if shuffle:
        order = np.random.default_rng(seed + epoch).permutation(num_shards)
    return [int(s) for s in order[rank * workers + worker_id :: total]]


def user_column(feature: str) -> str:
    """Shard column of a user feature: `user` for the user id, else `user_<f>`."""
    return "user" if feature == "user" else f"user_{feature}"


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat values) of a list column, as numpy arrays."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]] if len(offsets) else values


def _gather(values: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Rows values[start[i] : start[i]+length[i]] right-padded with 0 to `width`."""
    idx = start[:, None] + np.arange(width)[None, :]  # (S, W)
    mask = np.arange(width)[None, :] < length[:, None]
    if len(values) == 0:
        return np.zeros(idx.shape, dtype=np.int64)
    return np.where(mask, values[np.minimum(idx, len(values) - 1)], 0).astype(np.int64)


def _event_values(t: pa.Table, f: str, lookup: dict[str, np.ndarray], items: np.ndarray, oov: np.ndarray) -> np.ndarray:
    """Flat values of item feature f over the timelines of `t`.

    Stored per event (`seq_<f>`), or (format 2, a feature of the items table)
    the item's row of items.parquet, except at OOV events, which take
    `oov_<f>` in order. `items` / `oov`: the flat `seq_item` values and the
    positions where they are 1 (`_item_events`, once per record batch).

    Raises:
        KeyError: a column is missing; pyarrow.ArrowInvalid: `oov_<f>` does not match the OOV
            events (both a damaged shard).
    """
    if f"seq_{f}" in t.column_names or f not in lookup:
        return _list_parts(t.column(f"seq_{f}"))[1]
    vals = lookup[f][items]
    given = _list_parts(t.column(f"oov_{f}"))[1]
    if len(given) != len(oov):
        raise pa.ArrowInvalid(f"oov_{f} holds {len(given)} values for {len(oov)} OOV events")
    vals[oov] = given
    return vals


def _item_events(t: pa.Table, lookup: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The flat `seq_item` values of `t` and the positions of its OOV events (index 1), for `_event_values`.

    Raises:
        pyarrow.ArrowInvalid: an item index beyond the items table (a damaged shard).
    """
    items = _list_parts(t.column("seq_item"))[1]
    rows = len(next(iter(lookup.values())))  # every lookup has one entry per item index
    if len(items) and int(items.max()) >= rows:
        raise pa.ArrowInvalid(f"item index {int(items.max())} beyond the {rows} rows of items.parquet")
    return items, np.flatnonzero(items == 1)


def item_lookups(data_dir: Path, manifest: dict[str, Any], features: list[str]) -> dict[str, np.ndarray]:
    """Item index -> value of each requested feature that the shards read from items.parquet (format 2)."""
    table = [f for f in manifest.get("table_features", []) if f in features]
    if not table:
        return {}
    values = load_item_table(data_dir, manifest, table).numpy()
    return {f: np.ascontiguousarray(values[:, j]) for j, f in enumerate(table)}


def sessions_from_record_batch(
    rb: pa.RecordBatch,
    item_features: list[str],
    user_features: list[str],
    max_session_len: int,
    max_long_len: int,
    min_len: int = 2,
    item_lookup: dict[str, np.ndarray] | None = None,
    times: bool = False,
) -> dict[str, np.ndarray]:
    """Every session of a record batch of shard rows, as padded arrays.

    With `times`, also `seq_ts` (S, max_session_len) event times and `long_oov`
    (S, max_long_len) `seq_oov` hashes of the long-term window (what cold
    candidates need: the query time, and the window's unknown items).

    `item_lookup`: item index -> value of each feature of the items table
    (`item_lookups`), for shards that do not store it per event.

    Returns:
        dict with `seq_<f>` (S, max_session_len), `long_<f>` (S, max_long_len),
        `seq_len`, `long_len`, `user_<f>`, `sess_id`, `start_ts` (S,) and
        `row` (S,) (index of the user row in `rb`, for raw user ids). Sessions
        shorter than `min_len` are left out (they have no SPEC-5 sample).
    """
    t = pa.Table.from_batches([rb])
    ts_off, ts = _list_parts(t.column("ts"))
    s_off, s_start = _list_parts(t.column("sess_start"))
    _, s_len = _list_parts(t.column("sess_len"))
    _, l_start = _list_parts(t.column("long_start"))
    _, l_end = _list_parts(t.column("long_end"))
    _, s_id = _list_parts(t.column("sess_id"))
    row = np.repeat(np.arange(t.num_rows), np.diff(s_off))  # (S,) user row of each session
    keep = s_len >= min_len
    row, s_start, s_len, l_start, l_end, s_id = (a[keep] for a in (row, s_start, s_len, l_start, l_end, s_id))
    base = ts_off[row]
    g_start = base + s_start.astype(np.int64)  # position in the flat timeline
    s_len = np.minimum(s_len.astype(np.int64), max_session_len)
    l_len = np.minimum((l_end - l_start).astype(np.int64), max_long_len)
    g_long = base + l_end.astype(np.int64) - l_len  # the most recent max_long_len
    out: dict[str, np.ndarray] = {
        "seq_len": s_len,
        "long_len": l_len,
        "sess_id": s_id.astype(np.int64),
        "start_ts": ts[g_start] if len(ts) else np.zeros(0, np.int64),
        "row": row,
    }
    lookup = item_lookup or {}
    items, oov = _item_events(t, lookup) if lookup else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for f in item_features:
        vals = _event_values(t, f, lookup, items, oov)
        out[f"seq_{f}"] = _gather(vals, g_start, s_len, max_session_len)
        out[f"long_{f}"] = _gather(vals, g_long, l_len, max_long_len)
    if "seq_oov" in t.column_names:  # evaluation only: the raw identity of OOV events
        _, vals = _list_parts(t.column("seq_oov"))
        out["seq_oov"] = _gather(vals, g_start, s_len, max_session_len)
    if times:
        out["seq_ts"] = _gather(ts, g_start, s_len, max_session_len)
        hashes = _list_parts(t.column("seq_oov"))[1] if "seq_oov" in t.column_names else np.zeros(len(ts), np.int64)
        out["long_oov"] = _gather(hashes, g_long, l_len, max_long_len)
    for f in user_features:
        out[f"user_{f}"] = t.column(user_column(f)).to_numpy().astype(np.int64)[row]
    return out


def collate(chunk: dict[str, np.ndarray], item_features: list[str], user_features: list[str]) -> dict[str, Any]:
    """Numpy session arrays -> the model's batch dict of tensors.

    The short-term side is trimmed to the longest session in the batch and the
    long-term side to the longest window, so short sessions do not pay for
    max_session_len; padding stays 0 and the lengths act as masks.
    """
    seq_len = torch.from_numpy(chunk["seq_len"])
    long_len = torch.from_numpy(chunk["long_len"])
    t_max = max(int(seq_len.max()) if len(seq_len) else 1, 1)
    l_max = max(int(long_len.max()) if len(long_len) else 0, 1)
    return {
        "seq": {f: torch.from_numpy(np.ascontiguousarray(chunk[f"seq_{f}"][:, :t_max])) for f in item_features},
        "seq_len": seq_len,
        "long": {f: torch.from_numpy(np.ascontiguousarray(chunk[f"long_{f}"][:, :l_max])) for f in item_features},
        "long_len": long_len,
        "user": {f: torch.from_numpy(chunk[f"user_{f}"]) for f in user_features},
        "sess_id": torch.from_numpy(chunk["sess_id"]),
        "start_ts": torch.from_numpy(chunk["start_ts"]),
        **({"seq_oov": torch.from_numpy(np.ascontiguousarray(chunk["seq_oov"][:, :t_max]))} if "seq_oov" in chunk else {}),
    }


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _take(chunk: dict[str, np.ndarray], idx: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in chunk.items()}


class SessionDataset(IterableDataset):
    """Batches of sessions of one split, streamed from the shards.

    Args:
        data_dir: shard directory (with a finished manifest).
        split: "train", "valid" or "test".
        batch_size: sessions per yielded batch (use DataLoader(batch_size=None)).
        item_features / user_features: which features to load (default: all
            in the manifest).
        shuffle: shuffle shard order and sessions (training); off for
            evaluation, which then sees sessions in shard order.
        shuffle_buffer: sessions held for mixing; bounds memory.
        seed: base seed; epoch e uses seed + e (see `set_epoch`).
        rank / world_size: this process's place in a distributed run.
        drop_last: drop a last incomplete batch of each worker.
        read_rows: user rows per pyarrow record batch.
        times: also yield `seq_ts` and `long_oov` (`sessions_from_record_batch`).
    """

    def __init__(
        self,
        data_dir: Path,
        split: str,
        batch_size: int,
        item_features: list[str] | None = None,
        user_features: list[str] | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 2048,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        read_rows: int = 1024,
        manifest: dict[str, Any] | None = None,
        times: bool = False,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.data_dir)
        self.split = split
        self.shards = [self.data_dir / s["path"] for s in self.manifest["splits"][split]["shards"]]
        self.item_features = list(item_features or self.manifest["item_features"])
        self.user_features = list(user_features if user_features is not None else self.manifest["user_features"])
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.read_rows = read_rows
        self.times = times
        self.epoch = 0
        self.max_session_len = int(self.manifest["max_session_len"])
        self.max_long_len = int(self.manifest["max_long_len"])
        self.item_lookup = item_lookups(self.data_dir, self.manifest, self.item_features)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and shuffle (call before iterating)."""
        self.epoch = epoch

    def _columns(self, have: list[str]) -> list[str]:
        """The columns to read from a shard whose columns are `have`."""
        cols = ["user_id", "ts", "sess_id", "sess_start", "sess_len", "long_start", "long_end"]
        for f in self.item_features:
            cols += ["seq_item", f"oov_{f}"] if f in self.item_lookup and f"seq_{f}" not in have else [f"seq_{f}"]
        cols = list(dict.fromkeys(cols)) + [user_column(f) for f in self.user_features]
        if not self.shuffle and "seq_oov" in have:
            cols.append("seq_oov")  # evaluation order: keep unknown targets apart (older shards lack it)
        return cols

    def iter_sessions(self, shard_ids: list[int]) -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
        """(session arrays, raw user ids of the record batch) per record batch, in shard order."""
        for sid in shard_ids:
            path = self.shards[sid]
            try:
                pf = pq.ParquetFile(path)
                batches = pf.iter_batches(batch_size=self.read_rows, columns=self._columns(pf.schema_arrow.names))
                for rb in batches:
                    chunk = sessions_from_record_batch(
                        rb, self.item_features, self.user_features, self.max_session_len, self.max_long_len,
                        item_lookup=self.item_lookup, times=self.times,
                    )
                    if len(chunk["seq_len"]):
                        yield chunk, rb.column("user_id").to_pylist()
            except (OSError, pa.ArrowException, KeyError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SdmError(f"{path}: damaged shard ({first}); `sdm check {self.data_dir}` verifies every file") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 0)
        shard_ids = assign_shards(
            len(self.shards), self.rank, self.world_size, worker_id, num_workers, self.seed, self.epoch, self.shuffle
        )
        # One generator per (seed, epoch, global worker): reproducible, and
        # different workers mix differently.
        gid = self.rank * max(num_workers, 1) + worker_id
        rng = np.random.default_rng([self.seed, self.epoch, gid])
        buffer: list[dict[str, np.ndarray]] = []
        held = 0
        for chunk, user_ids in self.iter_sessions(shard_ids):
            if not self.shuffle:
                chunk["user_id"] = np.asarray(user_ids, dtype=object)[chunk["row"]]
            buffer.append(chunk)
            held += len(chunk["seq_len"])
            if held >= self.shuffle_buffer:
                # Emit full batches from the mixed buffer and keep the rest
                # (block shuffle), so memory never exceeds ~2 buffers.
                merged = _concat(buffer)
                if self.shuffle:
                    merged = _take(merged, rng.permutation(held))
                # Shuffling emits half the buffer and mixes the rest with what
                # comes next; in order, every full batch goes out at once.
                n_out = max((held // 2 if self.shuffle else held) // self.batch_size, 1) * self.batch_size
                yield from self._batches(_take(merged, slice(0, n_out)))
                rest = _take(merged, slice(n_out, None))
                buffer, held = [rest], held - n_out
        if held:
            merged = _concat(buffer)
            if self.shuffle:
                merged = _take(merged, rng.permutation(held))
            yield from self._batches(merged, last=True)

    def _batches(self, merged: dict[str, np.ndarray], last: bool = False) -> Iterator[dict[str, Any]]:
        n = len(merged["seq_len"])
        for i in range(0, n, self.batch_size):
            if last and self.drop_last and i + self.batch_size > n:
                return
            part = _take(merged, slice(i, i + self.batch_size))
            batch = collate(part, self.item_features, self.user_features)
            if "user_id" in part:
                batch["user_id"] = list(part["user_id"])
            yield batch


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Copy every tensor of a (nested) batch dict to `device`."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {f: t.to(device, non_blocking=True) for f, t in v.items()}
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


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
    offsets, values = _list_parts(lists)
    length = np.diff(offsets)
    if lists.null_count:
        length = np.where(lists.is_null().to_numpy(zero_copy_only=False), 0, length)
    width = max(1, min(MAX_VALUES, int(length.max()) if len(length) else 0))
    return _gather(values.astype(np.int64), offsets[:-1], np.minimum(length, width), width)


def load_item_counts(data_dir: Path, manifest: dict[str, Any]) -> torch.Tensor:
    """Training-event count of every item index (0 for padding and OOV)."""
    vocab = pq.read_table(Path(data_dir) / "vocab" / "item.parquet", columns=["index", "count"])
    counts = np.zeros(int(manifest["num_items"]), dtype=np.float64)
    counts[vocab.column("index").to_numpy()] = vocab.column("count").to_numpy()
    return torch.from_numpy(counts)
