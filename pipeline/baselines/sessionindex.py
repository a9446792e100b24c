"""The training-session index of the session-kNN baselines (`sessionknn.py`).

The in-vocabulary events of every training session (`training_session_events`)
and `SessionIndex`: sessions ranked by recency, with session -> items and
item -> sessions maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from sdm.errors import SdmError
from sdm.pipeline.baselines.sparse import coo, ptr


def training_session_events(data_dir: Path, manifest: dict[str, Any]) -> pl.DataFrame:
    """(sess_id, start_ts, item, pos): every in-vocabulary event of every training session.

    `start_ts` is the session's first event time (us since epoch) and `pos` the
    0-based position of the event in its session (repeats and OOV events keep
    their positions).
    """
    paths = [str(Path(data_dir) / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    if not paths:
        raise SdmError(f"{data_dir}: no training shards to build session-kNN from")
    return (
        pl.scan_parquet(paths)
        .select("ts", "seq_item", "sess_id", "sess_start", "sess_len")
        .explode(["sess_id", "sess_start", "sess_len"])
        .filter(pl.col("sess_id").is_not_null())
        .select(
            pl.col("sess_id").cast(pl.Int64),
            pl.col("ts").list.get(pl.col("sess_start")).cast(pl.Int64).alias("start_ts"),
            pl.col("seq_item").list.slice(pl.col("sess_start"), pl.col("sess_len")).alias("item"),
        )
        .with_columns(pl.int_ranges(0, pl.col("item").list.len()).alias("pos"))
        .explode(["item", "pos"])
        .filter(pl.col("item") >= 2)
        .select("sess_id", "start_ts", pl.col("item").cast(pl.Int64), pl.col("pos").cast(pl.Int64))
        .collect(engine="streaming")
    )


def _t(series: pl.Series) -> Tensor:
    return torch.from_numpy(series.to_numpy().astype(np.int64, copy=True))


class SessionIndex:
    """Training sessions ranked by recency, with session -> items and item -> sessions maps.

    Sessions are ranked 0.. by start time, most recent first (ties: larger
    `sess_id` first). Each session keeps its distinct items with the position of
    their LAST occurrence; each item keeps its sessions in rank order, truncated
    to the `sample_size` most recent (exact for "the m most recent sessions
    sharing an item with the query": such a session is among the m most recent
    of every item it shares).

    Args:
        events: (sess_id, start_ts, item, pos) in-vocabulary training events.
        num_items: V, the catalogue size including padding and OOV.
        sample_size: sessions kept per item (None or 0: all).
    """

    def __init__(self, events: pl.DataFrame, num_items: int, sample_size: int | None = None) -> None:
        self.num_items = num_items
        self.sample_size = sample_size or None
        item_events = events.group_by("item").agg(pl.len().alias("n"))
        self.item_events = torch.zeros(num_items, dtype=torch.long)
        self.item_events[_t(item_events["item"])] = _t(item_events["n"])
        last = events.group_by("sess_id", "item").agg(pl.col("start_ts").first(), pl.col("pos").max())
        sessions = (
            last.group_by("sess_id")
            .agg(pl.col("start_ts").first(), pl.len().alias("size"))
            .sort(["start_ts", "sess_id"], descending=True)
            .with_row_index("rank")
        )
        self.num_sessions = sessions.height
        self.start_ts = _t(sessions["start_ts"])  # (N,) by rank
        self.size = _t(sessions["size"])  # (N,) distinct items per session
        last = last.join(sessions.select("sess_id", pl.col("rank").cast(pl.Int64)), on="sess_id")
        by_sess = last.sort("rank", "item")
        self.sess_ptr = ptr(_t(by_sess["rank"]), self.num_sessions)
        self.sess_item, self.sess_pos = _t(by_sess["item"]), _t(by_sess["pos"])
        self.sess_key = _t(by_sess["rank"]) * num_items + self.sess_item  # sorted
        by_item = last.sort("item", "rank")
        if sample_size:
            by_item = by_item.filter(pl.int_range(pl.len()).over("item") < sample_size)
        self.item_ptr = ptr(_t(by_item["item"]), num_items)
        self.post_rank, self.post_pos = _t(by_item["rank"]), _t(by_item["pos"])
        self.post_pos = self.post_pos.clamp(max=1000)  # 2^pos stays finite
        # (V, N) item -> sessions maps: 1, and 2^(last position of the item in the session).
        post_item = torch.repeat_interleave(torch.arange(num_items), self.item_ptr[1:] - self.item_ptr[:-1])
        shape = (num_items, max(self.num_sessions, 1))
        self.post_one = coo(post_item, self.post_rank, torch.ones(self.post_rank.shape[0], dtype=torch.float64), shape)
        self.post_exp2 = coo(post_item, self.post_rank, torch.exp2(self.post_pos.double()), shape)
