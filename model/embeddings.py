"""The model's input side (paper section 3, SPEC section 7: item input and user vector e_u).

A batch holds feature indices, 0 for padding and 1 for OOV; `EmbeddingBank` embeds them,
one table per feature. A multi-valued feature (genres 'Comedy|Romance', a profile's
interests 'sports|music') is embedded as the mean of its values' embeddings: `ValueLists`
holds each item's (each user value set's) value indices, `pooled_embedding` averages them,
and `state_item_values` / `state_user_values` read those tables back from a state dict.

Shape letters as in `sdm.py`: D `embedding_dim`, K values of a multi-valued feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from sdm.model.config import ModelConfig

Batch = Mapping[str, Mapping[str, Tensor] | Tensor]

# Vocabulary index 0 is padding and 1 is out-of-vocabulary (docs/FORMAT.md).
PAD, OOV = 0, 1

MAX_VALUES = 16
"""Most values of a multi-valued item feature that an item is embedded with: its first 16 (in the
order of its string); later ones are dropped when items.parquet and catalogue.parquet are read
(`pipeline.tables.pad_values`). A list's width K is the longest one the data holds, up to this
cap, and pooling looks up (..., K, D) embeddings: the full softmax's item tower holds
num_items x K x D floats at once. 16 is well above the handful of genres or tags an item
usually lists, and keeps that at most 16x the embedding table's own size."""


class EmbeddingBank(nn.Module):
    """One embedding table per feature, each of width D, padding row fixed at zero.

    A ModuleList rather than a ModuleDict: feature names come from user data and
    a name like "type" or "train" would clash with nn.Module attributes.

    Args:
        vocab: feature name -> vocabulary size, in column order.
        dim: D.
    """

    def __init__(self, vocab: Mapping[str, int], dim: int) -> None:
        super().__init__()
        self.names = list(vocab)
        self.tables = nn.ModuleList(nn.Embedding(n, dim, padding_idx=PAD) for n in vocab.values())
        for t in self.tables:
            nn.init.normal_(t.weight, std=dim**-0.5)
            with torch.no_grad():
                t.weight[PAD].zero_()

    def forward(self, ids: Sequence[Tensor]) -> list[Tensor]:
        """Args: ids: one LongTensor (...) per feature, in `names` order. Returns: one (..., D) per feature."""
        return [table(x) for table, x in zip(self.tables, ids, strict=True)]


class ValueLists(nn.Module):
    """The value indices of every row, per multi-valued feature (`ModelConfig.multi_valued`).

    Items (`SDM.item_values`): row i holds item i's values (items.parquet's `<f>_values`).
    Users (`SDM.user_values`): row s holds the values of value set s, the index a user's
    profile carries for the feature (users.parquet's `<f>` and `<f>_values`).

    One buffer `values_<k>` (rows, K) per feature, k in `names` order (not the feature's
    name: names come from user data and could clash with nn.Module attributes). A row holds
    at most `MAX_VALUES` value indices, right-padded with 0. Rows 0 (padding) and 1 (OOV),
    and a row without values, are all 0: there a single value index is embedded
    (`pooled_embedding`). The buffers travel in the state dict, so a model rebuilt from its
    weights alone (serving) needs no data directory.

    Args:
        tables: feature name -> (rows, K) LongTensor, checked by `SDM`.
    """

    def __init__(self, tables: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(tables)
        for k, table in enumerate(tables.values()):
            self.register_buffer(f"values_{k}", table)

    def rows(self, items: Tensor | None) -> dict[str, Tensor]:
        """feature -> (..., K) value indices of the item indices `items` (...); None: every item's (num_items, K)."""
        tables = {f: getattr(self, f"values_{k}") for k, f in enumerate(self.names)}
        return tables if items is None else {f: t[items] for f, t in tables.items()}


def pooled_embedding(table: nn.Embedding, single: Tensor, values: Tensor) -> Tensor:
    """A multi-valued feature's embedding: the mean of the embeddings of `values` (..., K) (0 = padding,
    left out of the mean), or where a row holds no value, the embedding of `single` (...). Returns (..., D)."""
    count = (values != PAD).sum(-1, keepdim=True)  # (..., 1)
    mean = table(values).sum(-2) / count.clamp_min(1).to(table.weight.dtype)  # (..., K, D) -> (..., D)
    return torch.where(count > 0, mean, table(single))


def state_item_values(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The item `ValueLists` buffers of an `SDM` state dict, by feature: with the state's `item_table`,
    what `SDM(config, ...)` needs to rebuild the model from its weights alone (serving)."""
    names = [f for f in config.multi_valued if f in config.item_features]
    keys = {f: f"item_values.values_{k}" for k, f in enumerate(names)}
    return {f: state[key] for f, key in keys.items() if key in state}


def state_user_values(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The user `ValueLists` buffers of an `SDM` state dict, by feature (`state_item_values`)."""
    names = [f for f in config.multi_valued if f in config.user_features]
    keys = {f: f"user_values.values_{k}" for k, f in enumerate(names)}
    return {f: state[key] for f, key in keys.items() if key in state}
