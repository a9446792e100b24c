"""Serving: from a trained model to recommendations.

- `export`: `sdm export` — item vectors (the catalogue's cold items after the vocabulary's),
  the user tower (weights, torch.export and ONNX), the index.
- `user_tower`: `UserTower`, the SDM behind flat inputs, and its files: the torch.export
  program, the weights file sdm serves from (`load_tower`), ONNX.
- `sessions`: a user's latest session and its long-term window from raw events,
  built by the sessionizer's own stage functions and the training vocabularies.
- `lookups`: `Lookups`, the training run's sessionize config, vocabularies and encoded
  tables, read from a data or export directory, every file checked.
- `recommend`: `sdm recommend LOG` — batch top-K for every user of a log.
- `api`: `Recommender.load(export_dir).recommend(events, k=...)` for services;
  `add_items(table)` gives items added after export vectors and puts them in the index.
- `export_reader`: `Recommender.load`'s reading of an export directory, every file checked.
- `runtime`: the user tower run by ONNX Runtime or torch.
- `arguments`: what callers pass `Recommender`, checked (events and items tables, k, at).
- `rank`: the one function that turns user vectors (and optional per-candidate
  extra scores) into a top-K list over an item index.
- `index`: exact and faiss indexes (parameters chosen from the catalogue size).
- `inspect`: `sdm inspect DIR` — what a shard, model or export directory holds.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Recommender"]


def __getattr__(name: str) -> Any:
    # Lazy: `import sdm.retrieval.index` must not pull in polars, onnxruntime or the model.
    if name == "Recommender":
        from sdm.serve.api import Recommender

        return Recommender
    raise AttributeError(name)
