"""Streaming dataset over the sessionizer's shards (docs/FORMAT.md).

A shard row is one user's timeline in one split; every session of the row with
at least two events is one training example holding all of its SPEC-5 samples
(the model scores every position in one causal pass). The dataset reads shards
with pyarrow in record batches, gathers each session's short-term items and its
long-term window with vectorised numpy indexing (no Python loop per session),
mixes sessions in a bounded shuffle buffer, and yields collated batches.

Which shards a worker reads is the pure function `assign_shards`; memory is
bounded by `shuffle_buffer` and `read_rows`, whatever the dataset size. The item and
user tables the model reads beside the shards are `pipeline/tables.py`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sdm.errors import SdmError
from sdm.manifest import read_manifest
from sdm.pipeline.listcolumns import gather, list_parts
from sdm.pipeline.tables import load_item_table

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
        return list_parts(t.column(f"seq_{f}"))[1]
    vals = lookup[f][items]
    given = list_parts(t.column(f"oov_{f}"))[1]
    if len(given) != len(oov):
        raise pa.ArrowInvalid(f"oov_{f} holds {len(given)} values for {len(oov)} OOV events")
    vals[oov] = given
    return vals


def _item_events(t: pa.Table, lookup: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The flat `seq_item` values of `t` and the positions of its OOV events (index 1), for `_event_values`.

    Raises:
        pyarrow.ArrowInvalid: an item index beyond the items table (a damaged shard).
    """
    items = list_parts(t.column("seq_item"))[1]
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
    ts_off, ts = list_parts(t.column("ts"))
    s_off, s_start = list_parts(t.column("sess_start"))
    _, s_len = list_parts(t.column("sess_len"))
    _, l_start = list_parts(t.column("long_start"))
    _, l_end = list_parts(t.column("long_end"))
    _, s_id = list_parts(t.column("sess_id"))
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
        out[f"seq_{f}"] = gather(vals, g_start, s_len, max_session_len)
        out[f"long_{f}"] = gather(vals, g_long, l_len, max_long_len)
    if "seq_oov" in t.column_names:  # evaluation only: the raw identity of OOV events
        _, vals = list_parts(t.column("seq_oov"))
        out["seq_oov"] = gather(vals, g_start, s_len, max_session_len)
    if times:
        out["seq_ts"] = gather(ts, g_start, s_len, max_session_len)
        hashes = list_parts(t.column("seq_oov"))[1] if "seq_oov" in t.column_names else np.zeros(len(ts), np.int64)
        out["long_oov"] = gather(hashes, g_long, l_len, max_long_len)
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
