"""Cold items: the catalogue of a data directory, their vectors, and when each may be recommended.

An item training never saw is out of vocabulary (index 1) and, ranked over the
vocabulary alone, a guaranteed miss. The sessionizer also writes
`catalogue.parquet`: one row per item that is NOT in the item vocabulary but that
the data knows (from the items table, or from events after the training split),
with columns

    item_id      raw id
    oov_hash     int64, the hash the shards store in `seq_oov` for an event of that item
    known_from   timestamp[us, UTC]; null = known at all times (a row of a static items
                 table), else the time of the item's first event in the log
    <feature>    int32, one per item side feature (the manifest's item_features[1:], in
                 that order), encoded with the training vocabularies (1 = unseen value);
                 a multi-valued feature's first value
    <f>_values   list<int32>, one per multi-valued feature f (the manifest's `multi_valued`,
                 in item_features order): the indices of all its values, in order (1 =
                 unseen value; empty = none). A catalogue of an older sdm lacks them.

and the manifest records `"catalogue": {"path": "catalogue.parquet", "items": n}`.
Row j is cold item j, candidate index `num_items + j` (after the vocabulary's
0 .. num_items - 1).

A cold item has no id embedding, but SDM's item vector is a function of side
features too: its vector is the item tower with the id part zero
(`SDM.cold_item_vectors`; training with `id_dropout` teaches the tower that input),
a multi-valued feature mean-pooled over `<f>_values` as a vocabulary item's is.

The availability rule (no leakage): cold item j is a candidate for a query iff
`known_from[j]` is null or `known_from[j] <= ` the time of the query's last prefix
event, i.e. what a live system knows when it recommends. An item known only from
the log counts from its first event on, so a target that is its item's first
event anywhere is still a miss: nothing could have known it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from sdm.errors import DataError, first_line
from sdm.pipeline.dataset import SessionDataset
from sdm.pipeline.tables import check_values, pad_values, raw_item_ids
from sdm.sessionize.schema import value_kind

ALWAYS = np.iinfo(np.int64).min
"""`known_from` (us) of an item known at all times (null in the file)."""
FIXED_COLUMNS = ("item_id", "oov_hash", "known_from")
VECTOR_CHUNK = 65536


@dataclass
class Catalogue:
    """The cold items of a data directory (row j = candidate index `num_items + j`).

    Attributes:
        num_items: V, the vocabulary size (padding and OOV included).
        item_id: (C,) raw ids.
        oov_hash: (C,) int64 `seq_oov` hash of each item.
        known_from: (C,) int64 microseconds since epoch; `ALWAYS` = known at all times.
        features: catalogue column -> its values: side feature f -> (C,) int64 indices, and for a
            multi-valued f also `<f>_values` -> (C, K) int64 value indices, padded with 0
            (`pipeline.tables.pad_values`). Rows are items, so a row subset of every array is
            the catalogue of those items.
    """

    num_items: int
    item_id: pa.Array
    oov_hash: np.ndarray
    known_from: np.ndarray
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.oov_hash)

    @property
    def candidates(self) -> int:
        """V + C: candidate indices 0 .. V + C - 1."""
        return self.num_items + len(self)

    def side(self, names: list[str]) -> Tensor:
        """(C, len(names)) LongTensor of the named side features."""
        cols = [torch.from_numpy(self.features[f]) for f in names]
        return torch.stack(cols, dim=1) if cols else torch.zeros(len(self), 0, dtype=torch.long)

    def values(self, names: list[str]) -> dict[str, Tensor]:
        """feature -> (C, K) LongTensor of its value indices, for the named features that have them."""
        return {f: torch.from_numpy(self.features[values_column(f)]) for f in names if values_column(f) in self.features}


def values_column(feature: str) -> str:
    """catalogue.parquet's (and items.parquet's) column of a multi-valued feature's value lists."""
    return f"{feature}_values"


def read_catalogue(data_dir: Path, manifest: dict[str, Any], raw_ids: pa.Array | None = None) -> Catalogue:
    """The catalogue of a data directory, validated; `raw_ids`: the item vocabulary's raw ids
    (`tables.raw_item_ids`) when the caller has them, else read here.

    Raises:
        DataError (one line): no catalogue in the manifest, an unreadable file, other
            columns or types than the format's, nulls, repeated items or hashes, ids of
            another kind than the item vocabulary's raw ids or an id the vocabulary holds
            (a cold item is one training never saw), a feature index (or one in a value
            list) outside its vocabulary, a row count the manifest does not record.
    """
    entry = manifest.get("catalogue")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise DataError(
            f"{data_dir}: no cold-item catalogue in the manifest; sessionize with this sdm to write catalogue.parquet"
        )
    path = Path(data_dir) / entry["path"]
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable catalogue ({first})") from None
    features = list(manifest["item_features"][1:])
    multi = [f for f in features if f in (manifest.get("multi_valued") or {})]
    listed = _check_schema(path, table.schema, features, multi)
    if entry.get("items") != table.num_rows:
        raise DataError(f"{path}: {table.num_rows} rows, the manifest records {entry.get('items')!r}")
    for name in table.column_names:
        if table.column(name).null_count and name != "known_from":
            raise DataError(f"{path}: column {name!r} has nulls")
    hashes = table.column("oov_hash").to_numpy().copy()
    _check_unique(path, table, hashes)
    if raw_ids is None:
        raw_ids = raw_item_ids(data_dir, int(manifest["num_items"]))
    _check_outside_vocabulary(path, table.column("item_id").combine_chunks(), raw_ids)
    known = table.column("known_from").cast(pa.int64()).fill_null(ALWAYS).to_numpy().copy()
    encoded = {f: table.column(f).to_numpy().astype(np.int64) for f in features}
    for f, values in encoded.items():
        size = int(manifest["vocab_sizes"][f])
        if len(values) and (values.min() < 1 or values.max() >= size):
            raise DataError(
                f"{path}: feature {f!r} has indices in [{values.min()}, {values.max()}], "
                f"outside 1 .. {size - 1} of its vocabulary"
            )
    for f in listed:
        lists = check_values(path, values_column(f), table.column(values_column(f)), int(manifest["vocab_sizes"][f]))
        encoded[values_column(f)] = pad_values(lists)
    return Catalogue(int(manifest["num_items"]), table.column("item_id").combine_chunks(), hashes, known, encoded)


def _check_schema(path: Path, schema: pa.Schema, features: list[str], multi: list[str]) -> list[str]:
    """Columns item_id, oov_hash (int64), known_from (timestamp[us, UTC]), int32 features in order,
    then the value lists of the multi-valued features in order (their type: `check_values`).

    Returns:
        The multi-valued features whose lists the file has: `multi`, or none for the
        catalogue of an sdm that wrote the first value only (the model embeds that one).
    """
    expected = [*FIXED_COLUMNS, *features, *[values_column(f) for f in multi]]
    older = [*FIXED_COLUMNS, *features]  # an sdm that wrote the first value only
    if schema.names not in (expected, older):
        raise DataError(f"{path}: columns {schema.names}, expected {expected}")
    listed = multi if schema.names == expected else []
    if schema.field("oov_hash").type != pa.int64():
        raise DataError(f"{path}: oov_hash is {schema.field('oov_hash').type}, expected int64")
    known = schema.field("known_from").type
    if not (pa.types.is_timestamp(known) and known.unit == "us" and known.tz in ("UTC", "+00:00", "Etc/UTC")):
        raise DataError(f"{path}: known_from is {known}, expected timestamp[us, tz=UTC]")
    wrong = [f"{f} ({schema.field(f).type})" for f in features if schema.field(f).type != pa.int32()]
    if wrong:
        raise DataError(f"{path}: feature column(s) {', '.join(wrong)} are not int32")
    return listed


def _check_outside_vocabulary(path: Path, ids: pa.Array, vocab: pa.Array) -> None:
    """The catalogue's ids are of the vocabulary's kind (integers or strings) and none is in it:
    an item of both would be recommended twice, once warm and once cold."""
    def kind(values: pa.Array) -> str:
        return value_kind(pl.Series(values.slice(0, 0)).dtype)

    if len(ids) and len(vocab) and kind(ids) != kind(vocab):
        raise DataError(f"{path}: item_id holds {kind(ids)} ({ids.type}), the item vocabulary's raw ids {kind(vocab)} ({vocab.type})")
    if not len(ids) or not len(vocab):
        return
    common = pa.int64() if pa.types.is_integer(vocab.type) else pa.large_string()
    try:
        inside = pc.is_in(ids.cast(common), value_set=vocab.cast(common))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{path}: item_id does not compare with the item vocabulary's raw ids ({first_line(exc)})") from None
    if pc.any(inside).as_py():
        first = ids.filter(inside)[0].as_py()
        raise DataError(f"{path}: item {first!r} is in the item vocabulary; a cold item is one training never saw")


def _check_unique(path: Path, table: pa.Table, hashes: np.ndarray) -> None:
    """Each item once, each hash once and positive (0 marks a known item in `seq_oov`)."""
    if len(hashes) and hashes.min() < 1:
        raise DataError(f"{path}: oov_hash must be >= 1, got {hashes.min()}")
    if len(np.unique(hashes)) != len(hashes):
        raise DataError(f"{path}: an oov_hash occurs twice (two rows for one item, or a hash collision)")
    if len(pc.unique(table.column("item_id"))) != table.num_rows:
        raise DataError(f"{path}: an item_id occurs twice")


def cold_item_vectors(model: torch.nn.Module, catalogue: Catalogue) -> Tensor:
    """(C, D) item-tower vectors of the cold items: id part zero, side features from the catalogue.

    Only the side features the model reads are used (`--item-features`); a model
    without side features (PSDMMAL-NoS) gets zero vectors: it cannot tell cold items apart.
    A multi-valued feature is pooled over the item's `<f>_values` (`SDM.cold_item_vectors`).
    """
    names = list(model.item_features[1:])
    side, values = catalogue.side(names), catalogue.values(names)
    device = model.item_table.device

    def chunk(s: int) -> Tensor:
        part = {f: v[s : s + VECTOR_CHUNK].to(device) for f, v in values.items()}
        return model.cold_item_vectors(side[s : s + VECTOR_CHUNK].to(device), part)

    out = [chunk(s) for s in range(0, len(catalogue), VECTOR_CHUNK)]
    dim = model.config.embedding_dim
    return torch.cat(out).float() if out else torch.zeros(0, dim, device=device)


class ColdIndex:
    """`seq_oov` hash -> candidate index of the cold item, on one device.

    Args:
        catalogue: the cold items.
        device: where the lookups run.
    """

    def __init__(self, catalogue: Catalogue, device: torch.device | str = "cpu") -> None:
        order = np.argsort(catalogue.oov_hash, kind="stable")
        self.hashes = torch.from_numpy(catalogue.oov_hash[order]).to(device)
        self.index = torch.from_numpy(order).to(device) + catalogue.num_items
        self.known_from = torch.from_numpy(catalogue.known_from).to(device)
        self.num_items = catalogue.num_items

    def lookup(self, oov: Tensor) -> Tensor:
        """Candidate index of each hash in `oov` (any shape), 0 where it is 0 or not a cold item."""
        if not len(self.hashes):
            return torch.zeros_like(oov)
        pos = torch.searchsorted(self.hashes, oov.contiguous()).clamp_(max=len(self.hashes) - 1)
        found = (self.hashes[pos] == oov) & (oov > 0)
        return torch.where(found, self.index[pos], torch.zeros_like(oov))

    def available(self, start: int, end: int, query_time: Tensor) -> Tensor:
        """(Q, end - start) bool: whether cold candidates start .. end - 1 (indices >= num_items)
        are known at each query's time (Q,) (the availability rule of the module docs)."""
        known = self.known_from[start - self.num_items : end - self.num_items]
        return known.unsqueeze(0) <= query_time.unsqueeze(1)


class CatalogueSessions(SessionDataset):
    """The evaluation stream (`shuffle=False`) plus what cold candidates need per session:
    `seq_ts` (B, T) event times (the query time of the availability rule) and `long_oov`
    (B, L) hashes of the long-term window's OOV events (its cold items, for --exclude-history
    and the repeat head)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs, times=True)

    def _batches(self, merged: dict[str, np.ndarray], last: bool = False) -> Iterator[dict[str, Any]]:
        """`SessionDataset._batches` with `seq_ts` and `long_oov`, trimmed as the batch's own columns."""
        for i, batch in enumerate(super()._batches(merged, last)):
            part = slice(i * self.batch_size, (i + 1) * self.batch_size)
            t, l_max = batch["seq"]["item"].shape[1], batch["long"]["item"].shape[1]
            batch["seq_ts"] = torch.from_numpy(np.ascontiguousarray(merged["seq_ts"][part, :t]))
            batch["long_oov"] = torch.from_numpy(np.ascontiguousarray(merged["long_oov"][part, :l_max]))
            yield batch
