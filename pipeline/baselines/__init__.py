"""Non-neural baselines scored by the same evaluator as the model (SPEC section 6).

A baseline, like the model adapter in `evaluate.py`, is a *scorer*: for a
batch of queries it returns a function `(start, end) -> (Q, end - start)`
giving the score of items start..end-1 for every query, so the evaluator's
chunked top-K, masking and metrics apply to models and baselines alike.

- `Popularity`: score = training-event count of the item (vocab/item.parquet).
- `ItemCF` (classic): item-to-item cosine similarity from co-occurrence within
  *training sessions*:

      sim(i, j) = c_ij / sqrt(n_i * n_j),   sim(i, i) = 0

  where n_i = number of training sessions that contain i and c_ij = number
  that contain both i and j. The co-occurrence window is the whole session,
  each item counted once per session: sessions are short (a gap rule and
  `max_session_len` bound them), so any two items of one session are related,
  and repeats inside a session would otherwise inflate c_ij. Each item keeps
  its `neighbours` most similar items (the usual item-CF truncation; it bounds
  memory to V x neighbours).
  A query with prefix i_1 .. i_{t-1} scores item j as

      cf(j) = sum_p w_p sim(i_p, j) / sum_p w_p,   w_p = decay ** (t - 1 - p)

  so recent prefix items weigh more (decay 0.8: the last item weighs 1, the
  one before 0.8, ...). cf(j) lies in [0, 1]. Items with no similarity to the
  prefix get a popularity score in (-1, 0), so they rank below every scored
  neighbour and among themselves by popularity (rather than at random).
  A prefix item is not its own neighbour, but may still be scored through
  another prefix item.
- `ItemCF(repeat=True)` (repeat-aware): additionally every prefix item j gets
  a bonus 1 + r(j), r(j) = sum_{p: i_p = j} w_p / sum_p w_p, so re-visits are
  recommended first (most recent / most frequent first), then the classic
  neighbours. On real session logs a large share of next items are re-visits.

- `STAN` (Garg et al., SIGIR 2019) and `VSKNN` (V-SKNN, Ludewig & Jannach 2018):
  session-kNN. A query's neighbours are the k most similar of the most recent
  training sessions that share an item with its prefix (neighbours only ever
  come from the training split); every item of a neighbour is scored by the
  neighbour's similarity (STAN: position- and time-weighted cosine, items
  weighted by their distance to the matching item; V-SKNN: linearly
  position-weighted dot product, neighbours decayed by how far back the match
  is, an idf boost). Formulas, defaults and how they were chosen: the class
  docstrings. Scores are divided by the query's best, so they lie in (0, 1];
  items of no neighbour get the popularity fallback in (-1, 0) as in item-CF.

- `ColdCategory` (`cold-category`): the one baseline that ranks cold items (the
  catalogue's items without training events; every other baseline gives them -inf):
  candidates score by how often their category occurs in the session prefix, ties
  cold items first (newest `known_from` first, then category popularity), then
  vocabulary items by popularity. Exact rule: `coldcategory.py`.

Item-CF scoring is a sparse (Q, V) x (V, V) product per query chunk, on CPU;
session-kNN scoring two sparse products per group of queries (prefix x
item -> sessions, then neighbours x session -> items), also on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdm.errors import SdmError
from sdm.pipeline.baselines.coldcategory import ColdCategory
from sdm.pipeline.baselines.itemcf import ItemCF, cooccurrence_similarity, prefix_weights
from sdm.pipeline.baselines.popularity import Popularity, popularity_scores
from sdm.pipeline.baselines.scoring import ScoreFn
from sdm.pipeline.baselines.sessionindex import SessionIndex, training_session_events
from sdm.pipeline.baselines.sessionknn import STAN, VSKNN, distinct_prefix_items

__all__ = [
    "BASELINES",
    "ColdCategory",
    "STAN",
    "VSKNN",
    "ItemCF",
    "Popularity",
    "ScoreFn",
    "SessionIndex",
    "build_baseline",
    "cooccurrence_similarity",
    "distinct_prefix_items",
    "popularity_scores",
    "prefix_weights",
    "training_session_events",
]

BASELINES = ("popularity", "itemcf", "itemcf-repeat", "stan", "vsknn", "cold-category")


def build_baseline(
    name: str, data_dir: Path, manifest: dict[str, Any] | None = None
) -> Popularity | ItemCF | STAN | VSKNN | ColdCategory:
    """The named baseline, fitted on the training split of `data_dir`.

    Raises:
        SdmError: unknown name.
    """
    if name == "popularity":
        return Popularity.from_data(data_dir, manifest)
    if name in ("itemcf", "itemcf-repeat"):
        return ItemCF.from_data(data_dir, repeat=name == "itemcf-repeat", manifest=manifest)
    if name == "stan":
        return STAN.from_data(data_dir, manifest)
    if name == "vsknn":
        return VSKNN.from_data(data_dir, manifest)
    if name == "cold-category":
        return ColdCategory.from_data(data_dir, manifest)
    raise SdmError(f"unknown baseline {name!r}; expected one of {BASELINES}")
