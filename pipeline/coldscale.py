"""How far cold items' side-feature vectors are trusted: a scale chosen on validation.

A cold item (`pipeline/catalogue.py`) is scored with the item tower on its side
features alone. Many cold items share the same side features (every new item of a
category gets the category's vector), so when a session's category scores high,
ranking the catalogue fills the top K with that category's cold items, tied, and
pushes the vocabulary's items out: on the shared Diginetica sample, HR@50 on warm
targets fell from 0.78 to 0.48. Cold items the session already showed are found by
the repeat head's copy score, which the scale leaves alone.

The model's `cold_scale` buffer multiplies every cold vector (`SDM.cold_item_vectors`;
a scale folds into the vectors, so export, ONNX and every index keep a plain dot
product). After training, `choose_cold_scale` evaluates the best model on the
validation split with `--candidates catalogue` at every scale of `GRID` (one pass:
the user vectors are computed once, `evaluate_model(cold_factors=...)`) and keeps
the one with the best selection metric (`--select-metric` at `--eval-k`) on all
targets among those that keep HR@K on warm targets (targets in the vocabulary)
within `--cold-budget` (relative) of ranking the vocabulary alone. Ties go to the
smaller scale. When no scale keeps the budget, 0 (cold items only by the copy
score) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdm.manifest import read_manifest
from sdm.pipeline.metrics import selection_value

GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Scales tried, all in one validation pass (plus one over the vocabulary alone)."""


@dataclass
class ColdScaleChoice:
    """The chosen scale and what validation measured.

    Attributes:
        scale: the chosen scale.
        k: the cut-off K of the metrics.
        warm_vocabulary: HR@K on warm targets when the vocabulary alone is ranked.
        rows: one per scale tried: {"scale", "hr", "ndcg", "warm_hr", "cold_hr", "within_budget"}.
        queries: validation queries; warm / cold: those whose target is in the vocabulary / a cold item.
    """

    scale: float
    k: int
    warm_vocabulary: float
    rows: list[dict[str, float]] = field(default_factory=list)
    queries: int = 0
    warm: int = 0
    cold: int = 0

    def chosen(self) -> dict[str, float]:
        return next(r for r in self.rows if r["scale"] == self.scale)

    def summary(self, budget: float) -> str:
        """One line for the trainer's output."""
        row, k = self.chosen(), self.k
        return (
            f"cold items: scale {self.scale:g} chosen on validation: HR@{k} {row['hr']:.4f} on all {self.queries:,} "
            f"targets, {row['warm_hr']:.4f} on {self.warm:,} warm ({self.warm_vocabulary:.4f} ranking the vocabulary "
            f"alone, budget {budget:.0%}), {row['cold_hr']:.4f} on {self.cold:,} cold"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale, "k": self.k, "warm_vocabulary": self.warm_vocabulary, "rows": self.rows,
            "queries": self.queries, "warm": self.warm, "cold": self.cold,
        }  # fmt: skip


def has_cold_items(manifest: dict[str, Any]) -> bool:
    """Whether the data directory lists at least one cold item."""
    entry = manifest.get("catalogue")
    return isinstance(entry, dict) and int(entry.get("items") or 0) > 0


def choose_cold_scale(
    model: torch.nn.Module,
    data_dir: Path,
    k: int,
    budget: float,
    select: str,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    grid: tuple[float, ...] = GRID,
    vocabulary: dict[str, Any] | None = None,
) -> ColdScaleChoice | None:
    """Set `model.cold_scale` to the scale validation prefers (module docs) and return the choice.

    Args:
        vocabulary: the model's validation "queries" and "hr@K" ranking the vocabulary alone,
            when already measured (the neighbour weight's choice); else measured here.

    Returns None, leaving the model as it is, when the data has no cold item or its
    validation split no query.
    """
    from sdm.pipeline.ranking import evaluate_model

    manifest = read_manifest(data_dir)
    if not has_cold_items(manifest):
        return None
    if vocabulary is None:
        vocabulary = evaluate_model(model, data_dir, "valid", [k], batch_size, device)
    if not vocabulary["queries"]:
        return None
    model.cold_scale.fill_(1.0)  # the plain result is scale 1, the others come from the same user vectors
    others = tuple(s for s in grid if s != 1.0)
    m = evaluate_model(model, data_dir, "valid", [k], batch_size, device, candidates="catalogue", cold_factors=others)
    warm, cold = m["targets"]["warm"]["queries"], m["targets"]["cold"]["queries"]
    results = {1.0: m, **{r["factor"]: r for r in m["cold_factors"]}}
    rows = [
        {"scale": s, "hr": r[f"hr@{k}"], "ndcg": r[f"ndcg@{k}"], "select": selection_value(r, select, k),
         "warm_hr": r["targets"]["warm"][f"hr@{k}"], "cold_hr": r["targets"]["cold"][f"hr@{k}"]}
        for s, r in sorted(results.items()) if s in grid
    ]  # fmt: skip
    # Ranked over the vocabulary alone, every hit is a warm target's: its warm HR is the hits over the warm queries.
    warm_vocabulary = vocabulary[f"hr@{k}"] * vocabulary["queries"] / warm if warm else 0.0
    for row in rows:
        row["within_budget"] = row["warm_hr"] >= (1.0 - budget) * warm_vocabulary - 1e-12
    allowed = [r for r in rows if r["within_budget"]]
    best = max(allowed, key=lambda r: (r["select"], -r["scale"]))["scale"] if allowed else 0.0
    model.cold_scale.fill_(best)
    return ColdScaleChoice(best, k, warm_vocabulary, rows, int(vocabulary["queries"]), int(warm), int(cold))
