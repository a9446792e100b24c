"""`cold-category`: a side-information baseline that also ranks cold items.

The other baselines know items from training events only, so a cold item (in the
catalogue, never in training; `pipeline/catalogue.py`) is a score of -inf for them.
This one knows an item by its category alone: the feature named `category` when
the data has one, else the first item side feature.

For a query whose session prefix has events e_1 .. e_t (their categories read
from the events themselves, so an unknown item's event counts too), candidate j
of category c_j scores

    n_j + b_j,   n_j = number of prefix events of category c_j (the "unseen value" 1 never counts)

with a fixed tie-break b_j in (0, 1):

- cold item j: b_j = 0.5 + 0.5 (1 - (r_j + 1) / (C + 1)), r_j its rank (0 = first) by `known_from`, newest
  first (items known at all times last), then by its category's popularity
  (training events), then by catalogue row;
- vocabulary item j: b_j = 0.5 (1 - (r_j + 1) / (V + 1)), r_j its rank by training
  popularity (ties by index).

So candidates of the categories the session visited most come first and, within
the same count, cold items (newest first) before vocabulary items (most popular
first); candidates of other categories follow in the same tie-break order. With
`--candidates vocabulary` only the vocabulary part is ranked: items of the
prefix's categories by popularity. Scores are float32: with more than about
300k candidates some ties b_j are rounded together and break arbitrarily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from sdm.errors import SdmError
from sdm.names import vocab_file
from sdm.pipeline.baselines.scoring import ScoreFn
from sdm.pipeline.catalogue import Catalogue, read_catalogue
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.tables import load_item_counts, load_item_table


def category_feature(manifest: dict[str, Any]) -> str:
    """`category` when it is an item side feature, else the first side feature.

    Raises:
        SdmError: the data has no item side feature.
    """
    side = list(manifest["item_features"][1:])
    if not side:
        raise SdmError("baseline cold-category needs an item side feature (e.g. a category); the data has none")
    return "category" if "category" in side else side[0]


def _ranks(order: np.ndarray) -> np.ndarray:
    """rank[i] = position of i in `order`."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def cold_tiebreak(catalogue: Catalogue, feature: str, category_counts: np.ndarray) -> np.ndarray:
    """b_j (C,) of the cold items: 0.5 + 0.5 (1 - (r_j + 1) / (C + 1)), r_j by newest known_from, then
    category popularity, then row."""
    c = len(catalogue)
    known = catalogue.known_from.astype(np.float64)
    known[catalogue.known_from == np.iinfo(np.int64).min] = -np.inf
    popularity = category_counts[catalogue.features[feature]]
    order = np.lexsort((np.arange(c), -popularity, -known))
    return 0.5 + 0.5 * (1 - (_ranks(order) + 1) / (c + 1))


def warm_tiebreak(item_counts: np.ndarray) -> np.ndarray:
    """b_j (V,) of the vocabulary items: 0.5 (1 - (r_j + 1) / (V + 1)), r_j by training count (ties by index)."""
    order = np.argsort(-item_counts, kind="stable")
    return 0.5 * (1 - (_ranks(order) + 1) / (len(item_counts) + 1))


class ColdCategory:
    """Prefix-category counts with a cold-first, newest-first tie-break (module docs).

    Args:
        feature: the category feature (its column in the batch's "seq").
        category: (V + C,) category index of every candidate (vocabulary, then cold items).
        tiebreak: (V + C,) b_j in (0, 1).
    """

    name = "cold-category"
    scores_cold = True
    """Scores the cold candidates itself (the evaluator gives the other baselines -inf there)."""

    def __init__(self, feature: str, category: Tensor, tiebreak: Tensor) -> None:
        self.feature = feature
        self.category = category.long().cpu()
        self.tiebreak = tiebreak.float().cpu()

    @classmethod
    def from_data(cls, data_dir: Path, manifest: dict[str, Any] | None = None) -> ColdCategory:
        """From the training popularity, the item table and (when the manifest lists one) the catalogue."""
        manifest = manifest or read_manifest(data_dir)
        feature = category_feature(manifest)
        counts = load_item_counts(data_dir, manifest).numpy()
        category = load_item_table(data_dir, manifest, [feature])[:, 0].numpy()
        tiebreak = warm_tiebreak(counts)
        if "catalogue" in manifest:
            catalogue = read_catalogue(data_dir, manifest)
            category = np.concatenate([category, catalogue.features[feature]])
            popularity = _category_counts(data_dir, manifest, feature)
            tiebreak = np.concatenate([tiebreak, cold_tiebreak(catalogue, feature, popularity)])
        return cls(feature, torch.from_numpy(category), torch.from_numpy(tiebreak))

    def begin_batch(self, batch: dict[str, Any]) -> Tensor:
        """(B, T) category of every session event."""
        return batch["seq"][self.feature].cpu()

    def score_fn(self, state: Tensor, qb: Tensor, qp: Tensor, prefix: Tensor) -> ScoreFn:
        """Scores of a candidate chunk: n_j (occurrences of c_j in the sorted prefix categories) + b_j."""
        cats = state[qb.cpu()]  # (Q, T)
        pos = torch.arange(cats.shape[1])
        counted = (pos.unsqueeze(0) <= qp.cpu().unsqueeze(1)) & (cats > 1)
        seen = torch.where(counted, cats, torch.full_like(cats, -1)).sort(dim=1).values.contiguous()  # (Q, T)
        q = seen.shape[0]

        def score(start: int, end: int) -> Tensor:
            c = self.category[start:end].unsqueeze(0).expand(q, -1).contiguous()  # (Q, C)
            n = torch.searchsorted(seen, c, right=True) - torch.searchsorted(seen, c)  # occurrences of c_j
            return n.float() + self.tiebreak[start:end]

        return score


def _category_counts(data_dir: Path, manifest: dict[str, Any], feature: str) -> np.ndarray:
    """(size,) training-event count of every index of the feature's vocabulary (0 for padding and unseen)."""
    vocab = pq.read_table(Path(data_dir) / vocab_file(feature), columns=["index", "count"])
    counts = np.zeros(int(manifest["vocab_sizes"][feature]), dtype=np.float64)
    counts[vocab.column("index").to_numpy()] = vocab.column("count").to_numpy()
    return counts
