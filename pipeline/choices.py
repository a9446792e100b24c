"""What `sdm train` chooses on validation after the last epoch, written into best.pt.

Training picks best.pt by its validation metric; two settings are then chosen for
that model, each given by its flag or the value validation prefers, said on one line
and logged in full (`train_log.jsonl`):

1. the neighbour term (`pipeline/neighbourweight.py`, `--neighbours` > 0): its table
   (with the co-occurrence counts a warm start adds to) and its weight;
2. for data with cold items, their scale (`pipeline/coldscale.py`).

The neighbour weight's validation pass also ranks the vocabulary with the chosen
weight, which the cold scale's choice starts from: two validation passes in all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdm.config import TrainConfig
from sdm.errors import ConfigError
from sdm.pipeline.baselines.itemcf import NeighbourCounts
from sdm.pipeline.coldscale import choose_cold_scale, has_cold_items
from sdm.pipeline.neighbourweight import (
    COUNTS_KEY,
    choose_neighbour_weight,
    counts_entry,
    previous_counts,
    previous_until,
    set_neighbour_weight,
)

Say = Callable[[str], None]
Log = Callable[[dict[str, Any]], None]


def needs_choices(cfg: TrainConfig, manifest: dict[str, Any]) -> bool:
    """Whether anything is chosen after training (the neighbour term is on, or the data has cold items)."""
    return bool(cfg.neighbours) or has_cold_items(manifest)


def check_choice_flags(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """Flags that match nothing are errors: --cold-scale / --cold-budget for data without cold
    items, --cold-budget with --cold-scale, and --neighbour-weight with --neighbours 0.

    Raises:
        ConfigError: naming the flag.
    """
    if cfg.neighbour_weight is not None and not cfg.neighbours:
        raise ConfigError("--neighbour-weight: --neighbours 0 switches the neighbour term off")
    named = [f"--{f.replace('_', '-')}" for f in ("cold_scale", "cold_budget") if f in cfg.model_fields_set]
    if named and not has_cold_items(manifest):
        raise ConfigError(f"{' and '.join(named)}: {cfg.data} has no cold items (its catalogue is empty or missing)")
    if "cold_budget" in cfg.model_fields_set and cfg.cold_scale is not None:
        raise ConfigError("--cold-budget chooses --cold-scale on validation; it does nothing with --cold-scale set")


def choose_after_training(
    cfg: TrainConfig, model: torch.nn.Module, manifest: dict[str, Any], device: torch.device, ckpt: dict[str, Any],
    say: Say, log: Log, previous: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Set `model`'s neighbour term and cold scale (module docs) and write them into `ckpt`
    (best.pt's dict, whose weights `model` holds).

    Args:
        previous: the checkpoint a warm start began from (its neighbour counts are added to), or None.
    """
    measured = None  # validation ranking the vocabulary with the chosen weight, when the choice measured it
    if cfg.neighbours:
        table, measured = _neighbours(cfg, model, manifest, device, say, log, previous)
        ckpt[COUNTS_KEY] = counts_entry(table, manifest)
        for name, value in model.neighbours.state_dict().items():
            ckpt["model"][f"neighbours.{name}"] = value.detach().cpu().clone()
    if has_cold_items(manifest):
        _cold_scale(cfg, model, device, say, log, measured)
        ckpt["model"]["cold_scale"] = model.cold_scale.detach().cpu().clone()


def _neighbours(
    cfg: TrainConfig, model: torch.nn.Module, manifest: dict[str, Any], device: torch.device, say: Say, log: Log,
    previous: dict[str, Any] | None,
) -> tuple[NeighbourCounts, dict[str, Any] | None]:  # fmt: skip
    """The neighbour term: --neighbour-weight, or the weight validation prefers. Returns the
    table with its counts, and the validation metrics at the chosen weight (None when given)."""
    counts = previous_counts(previous, int(manifest["num_items"]), cfg.neighbours) if previous is not None else None
    since = previous_until(previous) if counts is not None else None  # sessions before it are counted already
    if cfg.neighbour_weight is not None:
        return set_neighbour_weight(model, cfg.data, cfg.neighbours, cfg.neighbour_weight, counts, since), None
    choice, table = choose_neighbour_weight(model, cfg.data, cfg.neighbours, cfg.eval_k, cfg.select_metric, device,
                                            previous=counts, since=since)  # fmt: skip
    if choice is None:
        return table, None
    say(f"[train] {choice.summary()}")
    log({"neighbours": choice.as_dict()})
    return table, choice.chosen()


def _cold_scale(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, say: Say, log: Log,
                vocabulary: dict[str, Any] | None) -> None:  # fmt: skip
    """The cold items' scale: --cold-scale, or the one validation prefers (`vocabulary`: the
    model's validation ranking of the vocabulary alone, when already measured)."""
    if cfg.cold_scale is not None:
        model.cold_scale.fill_(cfg.cold_scale)
        return
    choice = choose_cold_scale(model, cfg.data, cfg.eval_k, cfg.cold_budget, cfg.select_metric, device,
                               vocabulary=vocabulary)  # fmt: skip
    if choice is not None:
        say(f"[train] {choice.summary(cfg.cold_budget)}")
        log({"cold_scale": choice.as_dict()})
