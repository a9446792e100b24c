"""`sdm train --init-from PREV_MODEL`: start a run from the weights of yesterday's model.

Daily retraining sessionizes the newest log with `sdm sessionize --vocab-from
PREV_DATA`, so every raw id and feature value of PREV_DATA keeps its index and new
ones are appended after. A model trained on PREV_DATA then fits the new data once
its vocabulary-sized tables grow: rows [0, old size) are the old rows, and

- a new item's id row is zero, so its item vector is item_proj(0, side features):
  it comes from its side features alone (as a cold item's would);
- new rows of the side-feature and user tables keep the fresh init of the new model.

Every other weight has the same shape and is copied; the `item_table` buffer (each
item's feature indices), the `item_values` buffers (each item's values of a
multi-valued feature) and the `user_values` buffers (each value set's values of a
multi-valued user feature) are the new data's. Read top-down: `read_init` (best.pt,
weights only), `check_compatible` (refusals, one line each), `grow_state_dict`
(the copy), `grow_moments` (AdamW's state, grown the same way) and `warm_start`,
which does these on a freshly built model.

The optimizer's moments are carried over too (`--no-init-moments`: a fresh AdamW), so
training continues where yesterday's stopped: a fresh AdamW's first steps move every
weight by about the learning rate whatever its gradient's history. On the daily replay
(bench/daily.py) the moments let a run over every day reach in 2 epochs what took 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdm.config import TrainConfig
from sdm.errors import ConfigError, DataError
from sdm.model.sdm import SDM, ModelConfig
from sdm.pipeline.checkpoint import MODEL_KEYS, normalised_model_config, read_checkpoint
from sdm.pipeline.neighbourweight import COUNTS_KEY

VOCAB_FIELDS = ("item_vocab", "user_vocab")
TRAINING_ONLY = ("dropout", "id_dropout")
"""Model settings a warm start may change: they act in training only and hold no weights."""
READ_FROM_DATA = ("multi_valued",)
"""Model settings a warm start may change too: how the data's item features are read, no weight
(a model trained before multi-valued features were pooled seeds one that pools them)."""
DATA_BUFFERS = ("item_table",)
"""State-dict entries that come from the new data, never from the previous model."""
DATA_BUFFER_PREFIXES = ("item_values.", "user_values.", "neighbours.")
"""Prefixes of state-dict entries that come from the new data (`SDM.item_values`: each item's values;
`SDM.user_values`: each value set's values, whose indices a new sessionize may renumber;
`SDM.neighbours`: the neighbour table, rebuilt from the new training split after training)."""


def is_data_buffer(key: str) -> bool:
    """Whether state-dict entry `key` is a data buffer (taken from the new data, never carried)."""
    return key in DATA_BUFFERS or key.startswith(DATA_BUFFER_PREFIXES)


WARM_ONLY = {
    "distill_weight": "the model whose scores it keeps",
    "new_item_lr_scale": "the items new since the model it names",
}
"""Training settings that act on a warm start only, and what of the previous model each needs."""


def check_warm_only(cfg: TrainConfig) -> None:
    """Refuse a `WARM_ONLY` setting changed from its default on a fresh run without `--init-from`:
    it would act on nothing (a resumed run takes the warm start its last.pt records).

    Raises:
        ConfigError: naming the flag and what it needs.
    """
    if cfg.init_from is not None or cfg.resume:
        return
    for name, needs in WARM_ONLY.items():
        if getattr(cfg, name) != TrainConfig.model_fields[name].default:
            raise ConfigError(f"--{name.replace('_', '-')} acts only with --init-from ({needs})")


ITEMS_BEFORE = "items_before"
"""The `init_from` record's entry with the previous model's item count: the first row of the
items new since then (`pipeline/newrows.py`)."""


@dataclass
class WarmStart:
    """What `warm_start` did: recorded in the checkpoints and told on stderr."""

    path: Path
    """The previous model's best.pt."""
    step: int | None
    data_fingerprint: str
    carried: int
    """Weights copied (whole, or into the first rows of a grown table)."""
    total: int
    """Weights of the new model (the data buffers not counted)."""
    items_before: int
    items_after: int
    side_features: bool
    """Whether the model reads item side features (else a new item's vector starts at zero)."""
    moments: dict[int, dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    """The previous run's AdamW state, grown like the weights (`grow_moments`); None: a fresh optimizer."""
    previous: dict[str, Any] = field(default_factory=dict, repr=False)
    """What of the previous best.pt is used after training: its neighbour counts (`COUNTS_KEY`),
    which this run adds its own to (`pipeline/choices.py`); the weights are not kept."""

    def record(self, given: Path) -> dict[str, Any]:
        """The checkpoint's `init_from` entry."""
        return {"path": str(given), "step": self.step, "data_fingerprint": self.data_fingerprint,
                ITEMS_BEFORE: self.items_before}  # fmt: skip

    def line(self) -> str:
        """The one line `sdm train` prints at the start."""
        new = self.items_after - self.items_before
        if new:
            start = "their side features" if self.side_features else "a zero vector (the model reads no side features)"
            items = f"item table grown {self.items_before:,} -> {self.items_after:,} ({new:,} new items start from {start})"
        else:
            items = f"item table unchanged ({self.items_after:,} rows)"
        optimizer = "optimizer moments carried over" if self.moments is not None else "a fresh optimizer"
        return f"[train] warm start from {self.path}: {self.carried} of {self.total} weights carried over, {items}, {optimizer}"


def read_init(model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The previous model's best.pt (read with weights_only), and its path.

    Raises:
        SdmError: no model directory, no or unreadable best.pt (one line naming it).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"--init-from {model_dir}: not a model directory (give the --out of an earlier `sdm train`)")
    path = model_dir / "best.pt"
    return path, read_checkpoint(path, MODEL_KEYS)


def _trained_on(ckpt: dict[str, Any]) -> str:
    """The data directory the checkpoint's run read, for the messages."""
    config = ckpt.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return str(data) if data else "the data the model was trained on"


def check_compatible(path: Path, ckpt: dict[str, Any], manifest: dict[str, Any], data: Path, model_cfg: ModelConfig) -> None:
    """Whether the model in `ckpt` (read from `path`) can seed a run on `data` with `model_cfg`.

    Its vocabularies must be a prefix of the new data's: the new manifest's
    `vocab_from` names the checkpoint's data (or the data is the same), no vocabulary
    is smaller, and the model config is the same but for vocabulary sizes.

    Raises:
        DataError: the data does not extend the checkpoint's data, or a vocabulary shrinks.
        ConfigError: another model setting (the first one named, `field old -> new`).
    """
    prev = _trained_on(ckpt)
    old_fp, new_fp = ckpt["data_fingerprint"], manifest["fingerprint"]
    vocab_from = manifest.get("vocab_from") or {}
    from_fp = vocab_from.get("fingerprint") if isinstance(vocab_from, dict) else None
    if old_fp != new_fp and from_fp != old_fp:
        has = f"vocab_from {str(from_fp)[:12]}" if from_fp else "no vocab_from"
        raise DataError(
            f"--init-from {path}: the model was trained on data {str(old_fp)[:12]}, which {data} does not extend "
            f"(its manifest has {has}); sessionize the new log with --vocab-from {prev} so every id keeps its index"
        )
    old = normalised_model_config(path, ckpt["model_config"])
    new = model_cfg.model_dump(mode="json")
    for key in new:
        if key in TRAINING_ONLY or key in READ_FROM_DATA:
            continue
        if key in VOCAB_FIELDS:
            before, after = list(old[key]), list(new[key])
            what = f"{key.split('_')[0]} features {before} -> {after}"
        else:
            before, after = old.get(key), new[key]
            what = f"{key} {before} -> {after}"
        if before != after:
            raise ConfigError(
                f"--init-from {path}: the model has another config than this run ({what}); a warm start changes "
                "only the vocabulary sizes, so train with the previous model's settings (or without --init-from)"
            )
    for key in VOCAB_FIELDS:
        for name, size in old[key].items():
            if size > new[key][name]:
                raise DataError(
                    f"--init-from {path}: vocabulary {name!r} shrinks {size} -> {new[key][name]} in {data}; the new "
                    f"data must extend the model's vocabularies: sessionize the new log with --vocab-from {prev}"
                )


def item_id_table(model: SDM) -> torch.nn.Parameter:
    """The item-id embedding table: one row per vocabulary item, grown by a warm start."""
    return model.item_emb.tables[model.item_emb.names.index("item")].weight


def _item_id_key(model: SDM) -> str:
    """State-dict name of the item-id embedding table."""
    table = item_id_table(model)
    return next(k for k, v in model.state_dict(keep_vars=True).items() if v is table)


def _vocab_tables(model: SDM) -> dict[str, str]:
    """State-dict name of each embedding table -> its feature ("item:category", "user:age")."""
    names = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    out = {}
    for side, bank in (("item", model.item_emb), ("user", model.user_emb)):
        for feature, table in zip(bank.names, bank.tables, strict=True):
            out[names[id(table.weight)]] = f"{side}:{feature}"
    return out


def grow_state_dict(
    old: dict[str, torch.Tensor], model: SDM, old_cfg: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], int]:
    """`model`'s state dict with `old`'s weights copied in; (state dict, weights carried over).

    Equal shapes are copied; a tensor whose first dimension is a vocabulary size that
    grew gets the old rows in [0, old size) and keeps the model's rows after them,
    except the item-id table, whose new rows are zero. The data buffers are the model's.

    Raises:
        DataError: a weight whose shape differs otherwise (a checkpoint that does not match its config).
    """
    new_cfg = model.config.model_dump(mode="json")
    sizes = {f"{k.split('_')[0]}:{f}": (old_cfg[k][f], new_cfg[k][f]) for k in VOCAB_FIELDS for f in new_cfg[k]}
    grown = {pair for pair in sizes.values() if pair[0] < pair[1]}
    tables, id_key = _vocab_tables(model), _item_id_key(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    carried = 0
    for key, fresh in state.items():
        if is_data_buffer(key) or key not in old:
            continue
        prev = old[key].to(device=fresh.device, dtype=fresh.dtype)
        if prev.shape == fresh.shape:
            fresh.copy_(prev)
        elif _grows(prev, fresh, sizes.get(tables.get(key, "")), grown):
            fresh[: prev.shape[0]] = prev
            if key == id_key:
                fresh[prev.shape[0] :] = 0.0
        else:
            raise DataError(
                f"weight {key} of the --init-from model has shape {tuple(prev.shape)}, this run's "
                f"{tuple(fresh.shape)}: the checkpoint does not match its own model config"
            )
        carried += 1
    return state, carried


def _grows(prev: torch.Tensor, fresh: torch.Tensor, table: tuple[int, int] | None, grown: set[tuple[int, int]]) -> bool:
    """`prev` is `fresh` with fewer rows, and the row counts are a vocabulary's old and new size
    (the table's own feature for an embedding table, any grown vocabulary for another tensor)."""
    if prev.dim() == 0 or prev.shape[1:] != fresh.shape[1:]:
        return False
    pair = (prev.shape[0], fresh.shape[0])
    return pair == table if table is not None else pair in grown


def grow_moments(ckpt: dict[str, Any], model: SDM) -> dict[int, dict[str, torch.Tensor]] | None:
    """The AdamW state of `ckpt` for `model`'s parameters, grown like `grow_state_dict` grows the weights.

    A grown table's old rows keep their moments; a new row starts with no first moment
    and the mean second moment of the old rows, so its first steps are of the usual size
    (a zero second moment would make them three times the learning rate). None when the
    checkpoint holds no optimizer state (then training starts a fresh optimizer).

    Raises:
        DataError: a moment whose shape matches neither its weight in the checkpoint nor a grown table.
    """
    saved = ckpt.get("optimizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return None
    params = dict(model.named_parameters())
    names = list(params)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for index, state in saved["state"].items():
        ok = isinstance(index, int) and 0 <= index < len(names) and isinstance(state, dict)
        if not ok or not all(torch.is_tensor(v) for v in state.values()):
            raise DataError(f"the optimizer state of the --init-from checkpoint does not match its model (entry {index!r})")
        name = names[index]
        fresh, old = params[name], ckpt["model"].get(name)
        grown: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if value.dim() == 0:  # the step count
                grown[key] = value.clone()
                continue
            if old is None or value.shape != old.shape:  # the weight itself was checked by grow_state_dict
                raise DataError(f"the optimizer state of the --init-from checkpoint does not match weight {name} "
                                f"({key} {tuple(value.shape)}, weight {tuple(fresh.shape)})")  # fmt: skip
            out = value.new_zeros(fresh.shape)
            out[: value.shape[0]] = value
            if key == "exp_avg_sq" and value.shape[0] < fresh.shape[0]:
                out[value.shape[0] :] = value.mean(dim=0)
            grown[key] = out
        moments[index] = grown
    return moments


def load_moments(opt: torch.optim.Optimizer, moments: dict[int, dict[str, torch.Tensor]]) -> None:
    """Put grown AdamW state into a fresh optimizer; its settings (learning rate, weight decay) stay this run's."""
    state = opt.state_dict()
    state["state"] = moments
    opt.load_state_dict(state)


def warm_start(model: SDM, model_dir: Path, manifest: dict[str, Any], data: Path, moments: bool = True) -> WarmStart:
    """Load the previous model's weights into a freshly built `model` (checked, tables grown).

    Raises:
        SdmError: see `read_init` and `check_compatible`.
    """
    path, ckpt = read_init(model_dir)
    check_compatible(path, ckpt, manifest, data, model.config)
    old_cfg = normalised_model_config(path, ckpt["model_config"])
    state, carried = grow_state_dict(ckpt["model"], model, old_cfg)
    model.load_state_dict(state)
    step = ckpt.get("step")
    return WarmStart(
        path=path,
        step=int(step) if isinstance(step, int) else None,
        data_fingerprint=str(ckpt["data_fingerprint"]),
        carried=carried,
        total=sum(1 for k in state if not is_data_buffer(k)),
        items_before=int(old_cfg["item_vocab"]["item"]),
        items_after=int(model.config.item_vocab["item"]),
        side_features=len(model.item_features) > 1,
        moments=grow_moments(ckpt, model) if moments else None,
        previous={COUNTS_KEY: ckpt[COUNTS_KEY]} if COUNTS_KEY in ckpt else {},
    )
