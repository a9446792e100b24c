"""The popularity baseline and the popularity order every baseline falls back on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdm.pipeline.baselines.scoring import ScoreFn
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.tables import load_item_counts


def popularity_scores(counts: Tensor) -> Tensor:
    """(V,) scores in (-1, 0) ordering items by count, ties by index (the vocabulary order).

    Scores are -(rank + 1) / (V + 1), rank 0 = most frequent; deterministic, unlike raw
    counts, whose ties top-k would break arbitrarily.
    """
    v = counts.shape[0]
    order = torch.argsort(-counts.double(), stable=True)
    rank = torch.empty(v, dtype=torch.long)
    rank[order] = torch.arange(v)
    return -(rank + 1).float() / (v + 1)


class Popularity:
    """Most frequent training items first (ties by vocabulary index), the same list for every query.

    Args:
        counts: (V,) training-event count of each item index.
    """

    name = "popularity"

    def __init__(self, counts: Tensor) -> None:
        self.scores = popularity_scores(counts.cpu())

    @classmethod
    def from_data(cls, data_dir: Path, manifest: dict[str, Any] | None = None) -> Popularity:
        """Counts from `vocab/item.parquet` of a shard directory."""
        manifest = manifest or read_manifest(data_dir)
        return cls(load_item_counts(data_dir, manifest))

    def begin_batch(self, batch: dict[str, Any]) -> None:
        """Nothing per batch."""
        return None

    def score_fn(self, state: Any, qb: Tensor, qp: Tensor, prefix: Tensor) -> ScoreFn:
        """Scores of an item chunk for Q queries: the popularity scores, repeated per query."""
        q = qb.shape[0]
        return lambda start, end: self.scores[start:end].expand(q, end - start).clone()
