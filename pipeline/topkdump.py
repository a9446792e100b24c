"""What `--dump-topk` writes: one topk.parquet row per query, its ranked list in raw item ids.

`raw_items` maps every candidate index to its raw id (the vocabulary's, then the cold
items' of a catalogue; `sdm recommend` writes its lists with it too) and `TopkWriter`
streams the rows of the evaluation loop (`pipeline/ranking.py`) to a scratch file that
replaces topk.parquet only when the run finishes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from sdm.errors import SdmError
from sdm.outputs import scratch_name
from sdm.pipeline.catalogue import Catalogue
from sdm.pipeline.scoring import Queries


def raw_items(data_dir: Path, num_items: int, catalogue: Catalogue | None = None) -> pa.Array:
    """Raw item id of every index 0..V-1 (null for padding, OOV and unknown indices), then of
    every cold item V..V+C-1 of `catalogue`."""
    vocab = pq.read_table(Path(data_dir) / "vocab" / "item.parquet", columns=["raw", "index"])
    pos = np.full(num_items, -1, dtype=np.int64)
    pos[vocab.column("index").to_numpy()] = np.arange(vocab.num_rows)
    raw = vocab.column("raw").combine_chunks().take(pa.array(pos, mask=pos < 0))
    if catalogue is None:
        return raw
    try:
        cold = catalogue.item_id.cast(raw.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise SdmError(
            f"{data_dir}: catalogue item_id is {catalogue.item_id.type}, the vocabulary's raw ids {raw.type}"
        ) from None
    return pa.concat_arrays([raw, cold])


class TopkWriter:
    """Streams `topk.parquet` rows (one per query) in record batches."""

    def __init__(self, path: Path, raw: pa.Array) -> None:
        self.raw = raw
        self.schema = pa.schema(
            [
                ("user_id", pa.string()),
                ("session_start", pa.timestamp("us", tz="UTC")),
                ("position", pa.int32()),
                ("target", raw.type),
                ("target_oov", pa.int64()),
                ("topk", pa.list_(raw.type)),
            ]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, scratch_name(path)
        self.writer = pq.ParquetWriter(self.tmp, self.schema)

    def write(self, batch: dict[str, Any], q: Queries, topk: Tensor) -> None:
        qb = q.qb.cpu().numpy()
        n, k = topk.shape
        flat = pa.array(topk.cpu().numpy().reshape(-1))
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        cols = [
            pa.array(np.asarray(batch["user_id"], dtype=object)[qb], pa.string()),
            pa.array(batch["start_ts"].cpu().numpy()[qb], pa.timestamp("us", tz="UTC")),
            pa.array((q.qp.cpu().numpy() + 2).astype(np.int32)),
            self.raw.take(pa.array(q.target.cpu().numpy())),
            pa.array(q.target_oov.cpu().numpy(), mask=q.target_oov.cpu().numpy() == 0),
            pa.ListArray.from_arrays(offsets, self.raw.take(flat)),
        ]
        self.writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self.schema))

    def close(self, ok: bool) -> None:
        """Finish the file and rename it into place; without `ok` (a failed run) remove it."""
        self.writer.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
