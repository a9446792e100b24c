"""How much of item-CF's neighbour scores the model adds: a weight chosen on validation.

The neighbour term (`model/neighbours.py`) adds weight x item-CF's score of the
session prefix to the model's score. After training, `choose_neighbour_weight`
builds the table (each item's top `--neighbours` by session co-occurrence cosine on
the training split) and evaluates the best model on the validation split at every weight
of `GRID` in one pass: the user vectors are computed once, and the bonus of weight 1 is
scaled to each weight (`evaluate_model(bonus_weights=...)`; the grid's weights are powers
of two and 0, so the scaled bonus is the one the weight itself gives, bit for bit). It
keeps the best by the selection metric (`--select-metric` at `--eval-k`) among the weights
up to the first one that scores below the best before it (ties go to the smaller
weight): validation curves over this grid rise to one peak and fall (the scores are
added to logits, so doubling the weight past the peak only hurts), and a later, noisier
bump is not taken. A chosen weight of 0 empties the table: the model keeps a plain dot
product and serves as before.

The table's counts (c_ij of each listed pair, n_i of each item) go into best.pt beside
the model (`COUNTS_KEY`), whatever the weight, with the time they run up to (the data's
validation start): a warm start (`--init-from`), which trains on the newest days only,
adds the counts of its split's sessions from that time on, so its table approaches the
one of every day, and a split that reaches back over days already counted does not
count them twice (`neighbour_table(previous=..., since=...)`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdm.manifest import read_manifest
from sdm.pipeline.baselines.itemcf import NeighbourCounts, neighbour_table
from sdm.pipeline.metrics import selection_value
from sdm.sessionize.times import to_utc_us

GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""Weights measured (all in one validation pass); the choice stops at the first drop (`first_peak`)."""


@dataclass
class NeighbourChoice:
    """The chosen weight and what validation measured.

    Attributes:
        weight: the chosen weight (0: the term is off).
        k: the cut-off K of the metrics.
        neighbours: neighbours kept per item.
        rows: one per weight of the grid: {"weight", "hr", "ndcg", "select"}.
        queries: validation queries.
    """

    weight: float
    k: int
    neighbours: int
    rows: list[dict[str, float]] = field(default_factory=list)
    queries: int = 0

    def chosen(self) -> dict[str, float]:
        """The validation metrics at the chosen weight: {"queries", "hr@K", "ndcg@K"} (ranking the vocabulary)."""
        row = next(r for r in self.rows if r["weight"] == self.weight)
        return {"queries": self.queries, f"hr@{self.k}": row["hr"], f"ndcg@{self.k}": row["ndcg"]}

    def summary(self) -> str:
        """One line for the trainer's output."""
        k = self.k
        tried = ", ".join(f"{r['weight']:g}: {r['hr']:.4f}/{r['ndcg']:.4f}" for r in self.rows)
        return (
            f"neighbour term: weight {self.weight:g} chosen on validation (HR@{k}/NDCG@{k} on {self.queries:,} "
            f"queries by weight: {tried}); {self.neighbours} neighbours per item"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "k": self.k, "neighbours": self.neighbours, "rows": self.rows,
                "queries": self.queries}  # fmt: skip


def choose_neighbour_weight(
    model: torch.nn.Module,
    data_dir: Path,
    neighbours: int,
    k: int,
    select: str,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    grid: tuple[float, ...] = GRID,
    previous: NeighbourCounts | None = None,
    since: int | None = None,
) -> tuple[NeighbourChoice | None, NeighbourCounts]:
    """Fill `model.neighbours` with the table and the weight validation prefers (module docs).

    Args:
        previous, since: the counts of the model a warm start began from, and the time they
            run up to (`neighbour_table`).

    Returns:
        The choice (None, the weight left at 0, when the validation split has no query)
        and the table with its counts (for the next warm start).
    """
    from sdm.pipeline.ranking import evaluate_model

    table = neighbour_table(data_dir, read_manifest(data_dir), neighbours, previous, since)
    model.neighbours.fill(table.items, table.sims, 1.0)  # weight 1: the pass scales the bonus to each weight
    others = tuple(w for w in grid if w != 1.0)
    m = evaluate_model(model, data_dir, "valid", [k], batch_size, device, bonus_weights=others)
    if not m["queries"]:
        model.neighbours.fill(table.items, table.sims, 0.0)
        return None, table
    results = {1.0: m, **{r["weight"]: r for r in m["bonus_weights"]}}
    rows = [{"weight": w, "hr": results[w][f"hr@{k}"], "ndcg": results[w][f"ndcg@{k}"],
             "select": selection_value(results[w], select, k)} for w in grid]  # fmt: skip
    best = first_peak(rows)
    model.neighbours.fill(table.items, table.sims, best)
    return NeighbourChoice(best, k, neighbours, rows, int(m["queries"])), table


def first_peak(rows: list[dict[str, float]]) -> float:
    """The weight of the best "select" among the rows up to the first that scores below the best
    before it (module docs); ties go to the smaller weight."""
    upto: list[dict[str, float]] = []
    for row in rows:
        if upto and row["select"] < max(r["select"] for r in upto):
            break
        upto.append(row)
    return max(upto, key=lambda r: (r["select"], -r["weight"]))["weight"]


def set_neighbour_weight(
    model: torch.nn.Module, data_dir: Path, neighbours: int, weight: float, previous: NeighbourCounts | None = None,
    since: int | None = None,
) -> NeighbourCounts:  # fmt: skip
    """Fill `model.neighbours` with the table and a given weight (`--neighbour-weight`); returns the table."""
    table = neighbour_table(data_dir, read_manifest(data_dir), neighbours, previous, since)
    model.neighbours.fill(table.items, table.sims, weight)
    return table


COUNTS_KEY = "neighbour_counts"
"""The checkpoint entry (best.pt) with the table's counts, which a warm start adds today's to."""


def counts_entry(table: NeighbourCounts, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint entry of a table's counts, with `until`: the data's validation start (µs
    since the epoch), before which every training session is counted (left out when the
    manifest records none)."""
    entry = {"items": table.items, "counts": table.counts, "n": table.n}
    start = (manifest.get("cutoffs") or {}).get("valid_start")
    if start is None:
        return entry
    us = to_utc_us(dt.datetime.fromisoformat(str(start).replace("Z", "+00:00")))
    return {**entry, "until": torch.tensor(us, dtype=torch.int64)}


def previous_until(ckpt: dict[str, Any]) -> int | None:
    """The time (µs since the epoch) a checkpoint's counts run up to (`counts_entry`); None when
    it does not say (a checkpoint written before it: every session of the new split is added)."""
    until = (ckpt.get(COUNTS_KEY) or {}).get("until")
    if not isinstance(until, torch.Tensor) or until.dim() != 0 or until.is_floating_point():
        return None
    return int(until)


def previous_counts(ckpt: dict[str, Any], num_items: int, neighbours: int) -> NeighbourCounts | None:
    """The counts a checkpoint carries (`COUNTS_KEY`), or None when it has none that fit: written
    before the counts existed, another `--neighbours`, or a vocabulary larger than `num_items`."""
    entry = ckpt.get(COUNTS_KEY)
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), torch.Tensor) for k in ("items", "counts", "n")):
        return None
    items, counts, n = entry["items"], entry["counts"], entry["n"]
    V = items.shape[0] if items.dim() == 2 else -1
    if not (items.shape == counts.shape and items.shape[1:] == (neighbours,) and n.shape == (V,) and 0 < V <= num_items):
        return None
    if items.is_floating_point() or int(items.min()) < 0 or int(items.max()) >= V:
        return None
    return NeighbourCounts(items.int(), torch.zeros_like(counts, dtype=torch.float32), counts.float(), n.float())
