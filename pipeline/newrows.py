"""`--new-item-lr-scale`: the items new since the previous model learn faster than the rest.

A warm start grows the item-id table by one row per item that came into the vocabulary
since the previous model (`pipeline/warmstart.py`): a zero row, so the item's vector comes
from its side features, or is zero without them. Every other weight has been trained for
days; those rows must be learnt from the newest day alone, from the few sessions an item
has there, and at the learning rate that fine-tunes the rest they stay close to where they
started. On the YOOCHOOSE replay of `bench/daily.py` targets first seen on the newest
day were 39% and 67% of the warm run's NDCG@50 gap to a scratch run on its two days.

With a scale K, every optimizer step moves those rows K times as far as it moved them:
their update (AdamW's, weight decay included) is multiplied by K after the step, which is
the step at K times the learning rate for them alone. The rows are those from the previous
model's item count on, recorded with the run's `init_from` entry, so `--resume` continues
with the same rows; DDP ranks take the same step, all-reduced, and scale it alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from sdm.config import TrainConfig
from sdm.errors import SdmError
from sdm.model.sdm import SDM
from sdm.pipeline.warmstart import ITEMS_BEFORE, item_id_table


class NewItemPace:
    """The id rows from `first` on move `scale` times as far at every step (module docs)."""

    def __init__(self, table: Tensor, first: int, scale: float) -> None:
        self.table, self.first, self.scale = table, first, scale

    @property
    def rows(self) -> int:
        return self.table.shape[0] - self.first

    @contextmanager
    def step(self) -> Iterator[None]:
        """Around `optimizer.step()`: scale the update of the new rows."""
        before = self.table.detach()[self.first :].clone()
        yield
        with torch.no_grad():
            moved = self.table[self.first :]
            moved.copy_(before.add_(moved - before, alpha=self.scale))


def new_item_pace(cfg: TrainConfig, model: SDM, record: dict[str, Any] | None) -> NewItemPace | None:
    """The pace of the run's new rows; None with a scale of 1 or no new item.

    Args:
        record: the run's `init_from` record (a fresh warm start's, or the one last.pt carries).

    Raises:
        SdmError: a resumed run that was not warm-started, or whose last.pt does not say
            which rows are new (written by an sdm without this option).
    """
    if cfg.new_item_lr_scale == 1:
        return None
    if record is None:
        raise SdmError(f"{cfg.out / 'last.pt'}: --new-item-lr-scale acts only on a run started with --init-from, "
                       "and this one was not")  # fmt: skip
    if not isinstance(record.get(ITEMS_BEFORE), int):
        raise SdmError(f"{cfg.out / 'last.pt'}: --new-item-lr-scale needs the item count of the model the run "
                       "started from, and this run's checkpoint does not record one; resume with "
                       "--new-item-lr-scale 1 or start again with --init-from")  # fmt: skip
    table = item_id_table(model)
    first = record[ITEMS_BEFORE]
    if not 0 <= first <= table.shape[0]:
        raise SdmError(f"{cfg.out / 'last.pt'}: its init_from record says {first:,} items before, "
                       f"the model has {table.shape[0]:,}")  # fmt: skip
    pace = NewItemPace(table, first, cfg.new_item_lr_scale)
    return pace if pace.rows else None
