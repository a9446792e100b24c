"""The neighbour term: item-CF's scores added to the model's, with a weight chosen on validation.

On small, sparse logs with long histories (MovieLens-style rating logs) item-to-item
co-occurrence is knowledge a sequence model trained on a few thousand users does not
learn. Like the repeat head gives the model what a heuristic knows about re-visits,
this term gives it item-CF's neighbour scores; validation decides how much.

For a query at session position p with prefix items x_0 .. x_p, the bonus of item j is

    B_j = weight * sum_{q <= p} w_q * sim(x_q, j),   w_q = decay^(p - q) / sum_{q' <= p} decay^(p - q')

(the classic item-CF score of the session prefix), with sim the top `N` neighbours of
each item by session co-occurrence cosine (`pipeline/neighbourweight.py` builds them from
the training split). An item's final score is logaddexp(u . v_j, R_j) + B_j (R_j: the
repeat head's copy score, where there is one). B_j >= 0 and only the prefix items'
neighbours get one, so an index search over u . v_j stays exact for every other item:
serving merges the index's top K with the bonus candidates (`retrieval.rank.rank`).

`NeighbourTable` holds the table as model buffers, empty until training chooses a
weight > 0, so a model without the term keeps a plain dot product and costs nothing.
`neighbour_bonus` is the computation itself, shared by evaluation, `sdm recommend` and
the serving API (which reads the table from the export's `neighbours.parquet`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

DECAY = 0.8
"""Recency decay of the prefix weights (item-CF's)."""


def neighbour_bonus(
    items: Tensor, sims: Tensor, weight: float, prefix: Tensor, qp: Tensor, decay: float = DECAY
) -> tuple[Tensor, Tensor]:
    """Each query's bonus items, each once, with its bonus B_j (module docs).

    Args:
        items: (V, N) int neighbour indices of each item (0 = none).
        sims: (V, N) float similarity of each neighbour.
        weight: the term's weight.
        prefix: (Q, T) item indices of each query's session prefix (0 after position qp;
            1 and indices >= V, out-of-vocabulary and cold items, have no neighbours).
        qp: (Q,) the query's position in the prefix.
        decay: recency decay of the prefix weights.

    Returns:
        (items (Q, T * N) long, bonus (Q, T * N) float32): distinct items, 0 with bonus 0
        where an entry is empty or repeats an earlier one.
    """
    Q, T = prefix.shape
    V = items.shape[0]
    pos = torch.arange(T, device=prefix.device)
    age = (qp.unsqueeze(1) - pos.unsqueeze(0)).float()  # (Q, T)
    w = torch.where((prefix != 0) & (age >= 0), decay ** age.clamp(min=0), torch.zeros_like(age))
    w = w / w.sum(1, keepdim=True).clamp(min=1e-30)  # (Q, T), every query's weights sum to 1
    known = (prefix > 1) & (prefix < V)
    rows = torch.where(known, prefix, torch.zeros_like(prefix)).long()  # row 0 has no neighbours
    nbr = items[rows].long()  # (Q, T, N)
    val = (w * known).unsqueeze(2) * sims[rows].float() * float(weight)  # (Q, T, N)
    nbr, val = nbr.reshape(Q, -1), val.reshape(Q, -1)
    val = torch.where(nbr > 1, val, torch.zeros_like(val))
    # Each item once: sort, then sum each run of equal items into its first entry.
    nbr, order = nbr.sort(dim=1, stable=True)
    val = val.gather(1, order)
    first = torch.ones_like(nbr, dtype=torch.bool)
    first[:, 1:] = nbr[:, 1:] != nbr[:, :-1]
    run = first.long().cumsum(1) - 1  # (Q, C) run index of each entry
    total = torch.zeros_like(val).scatter_add(1, run, val)  # (Q, C) run sums, at run positions
    bonus = torch.where(first, total.gather(1, run), torch.zeros_like(val))
    keep = first & (nbr > 1) & (bonus > 0)
    return torch.where(keep, nbr, torch.zeros_like(nbr)), torch.where(keep, bonus, torch.zeros_like(bonus))


def merge_candidates(
    hist_items: Tensor | None, hist_logits: Tensor | None, bonus_items: Tensor, bonus: Tensor, no_copy: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One candidate list from the repeat head's (items, copy logits) and the bonus (items, bonus).

    Args:
        hist_items, hist_logits: (Q, H) distinct history items and copy logits R, or None.
        bonus_items, bonus: (Q, C) distinct bonus items and bonus B (`neighbour_bonus`).
        no_copy: the copy logit of an item without one (`sdm.model.repeat.NO_COPY`).

    Returns:
        (items, R, B), each (Q, H + C): a history item also in the bonus list takes its
        bonus there, and its bonus entry becomes 0 (none).
    """
    if hist_items is None or hist_logits is None:
        return bonus_items, torch.full_like(bonus, no_copy), bonus
    same = (hist_items.unsqueeze(2) == bonus_items.unsqueeze(1)) & (hist_items.unsqueeze(2) > 1)  # (Q, H, C)
    hist_bonus = (same.float() * bonus.unsqueeze(1)).sum(2)  # (Q, H)
    taken = same.any(1)  # (Q, C)
    rest = torch.where(taken, torch.zeros_like(bonus_items), bonus_items)
    return (
        torch.cat([hist_items.long(), rest.long()], 1),
        torch.cat([hist_logits.float(), torch.full_like(bonus, no_copy)], 1),
        torch.cat([hist_bonus, torch.where(taken, torch.zeros_like(bonus), bonus)], 1),
    )


class NeighbourTable(nn.Module):
    """The neighbour term's table and weight, as buffers (module docs).

    Buffers: `items` (V, N) int32 neighbour indices, `sims` (V, N) float32, `weight` ()
    float32. Empty (V = N = 0, weight 0) until `fill`; a state dict's table is taken at
    its own size, and one written before the term existed loads empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("items", torch.zeros(0, 0, dtype=torch.int32))
        self.register_buffer("sims", torch.zeros(0, 0))
        self.register_buffer("weight", torch.tensor(0.0))

    @property
    def active(self) -> bool:
        """Whether the term changes any score."""
        return self.items.numel() > 0 and float(self.weight) > 0

    def fill(self, items: Tensor, sims: Tensor, weight: float) -> None:
        """Set the table (V, N) and the weight (0 empties the table: nothing to store or serve)."""
        if weight <= 0:
            items, sims = items[:0, :0], sims[:0, :0]
        device = self.weight.device
        self.items = items.to(device=device, dtype=torch.int32)
        self.sims = sims.to(device=device, dtype=torch.float32)
        self.weight.fill_(float(weight))

    def bonus(self, prefix: Tensor, qp: Tensor) -> tuple[Tensor, Tensor]:
        """`neighbour_bonus` of this table and weight."""
        return neighbour_bonus(self.items, self.sims, float(self.weight), prefix, qp)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the table at the size it was saved with; absent (an older model), it is empty."""
        for name, empty in (("items", self.items[:0, :0]), ("sims", self.sims[:0, :0]), ("weight", torch.tensor(0.0))):
            value = state_dict.setdefault(prefix + name, empty)
            if name != "weight":
                setattr(self, name, torch.empty_like(value, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
