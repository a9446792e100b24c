"""Which model a training run builds: its features, its typed `ModelConfig`, the model itself and its loss.

Pure functions of the run config (`TrainConfig`) and the data manifest, shared by
`sdm train`, the serving code and the benchmarks that need a model shaped like a
training run's without training it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdm.config import TrainConfig
from sdm.errors import SdmError
from sdm.model.sdm import SDM, ModelConfig
from sdm.pipeline.tables import load_item_table, load_item_values, load_user_values

NO_SIDE_INFO_VARIANTS = ("PSDMMAL-NoS",)


def _pick(kind: str, wanted: list[str] | None, have: list[str], default: list[str], data: Path) -> list[str]:
    """`wanted` (default: `default`), checked against the data; SdmError naming what it lacks."""
    if wanted is None:
        return default
    missing = [f for f in wanted if f not in have]
    if missing:
        raise SdmError(
            f"{data}: {kind} feature(s) {missing} are not in the data (it has: {have}); "
            f"sessionize with --{kind}-features to add them"
        )
    return wanted


def model_features(manifest: dict[str, Any], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Item and user features the run reads.

    Items: the item id plus `--item-features` (default: every side feature in the data).
    Users: `--user-features` (default: the profile features, not the user id: SPEC 7's
    e_u is the profile, and a user-id embedding memorises training users and is only the
    OOV vector for new ones; `--user-features user,...` adds it). The NoS variant reads
    the item id and the user id only, as SPEC 7 defines it.

    Raises:
        SdmError: a requested feature the data does not have (the message names it).
    """
    have_items, have_users = list(manifest["item_features"]), list(manifest["user_features"])
    side = _pick("item", cfg.item_features, have_items, have_items, cfg.data)
    items = ["item"] + [f for f in side if f != "item"]
    users = _pick("user", cfg.user_features, have_users, [u for u in have_users if u != "user"], cfg.data)
    if cfg.variant in NO_SIDE_INFO_VARIANTS:
        items, users = ["item"], [u for u in have_users if u == "user"]
    return items, users


def build_model(model_cfg: ModelConfig, data: Path, manifest: dict[str, Any]) -> SDM:
    """A freshly initialised `SDM` of `model_cfg` with the data's item tables: each item's feature
    indices (items.parquet) and each multi-valued feature's value lists (items.parquet, and the
    value sets of users.parquet).

    Raises:
        DataError: an unreadable items.parquet or users.parquet, or bad value lists. ValueError:
            tables that do not fit `model_cfg` (`SDM`).
    """
    table = load_item_table(data, manifest, list(model_cfg.item_vocab))
    items = [f for f in model_cfg.multi_valued if f in model_cfg.item_vocab]
    users = [f for f in model_cfg.multi_valued if f in model_cfg.user_vocab]
    return SDM(model_cfg, table, load_item_values(data, manifest, items), load_user_values(data, manifest, users))


def build_model_config(cfg: TrainConfig, manifest: dict[str, Any]) -> ModelConfig:
    """The model's typed config from the run config and the data manifest.

    The item and user features the run reads that the manifest lists as multi-valued
    (`multi_valued`) are pooled by the model (`ModelConfig.multi_valued`).
    """
    items, users = model_features(manifest, cfg)
    sizes = manifest["vocab_sizes"]
    multi = manifest.get("multi_valued") or {}  # data of an older sdm may lack the key
    return ModelConfig(
        variant=cfg.variant,
        item_vocab={f: int(sizes[f]) for f in items},
        user_vocab={f: int(sizes[f]) for f in users},
        embedding_dim=cfg.embedding_dim,
        lstm_layers=cfg.lstm_layers,
        num_heads=cfg.num_heads,
        num_blocks=cfg.num_blocks,
        dropout=cfg.dropout,
        num_targets=cfg.num_targets if cfg.variant == "PSDMMAL-N" else 1,
        max_session_len=int(manifest["max_session_len"]),
        max_long_len=int(manifest["max_long_len"]),
        user_residual=cfg.user_residual,
        state_query=cfg.state_query,
        repeat=cfg.repeat,
        repeat_prior=cfg.repeat_prior,
        id_dropout=cfg.id_dropout,
        multi_valued=[f for f in [*items, *users] if f in multi],
    )


FULL_SOFTMAX_MAX_LOGITS = 1 << 28
"""`auto` picks the full softmax while a batch's logits matrix (positions x items) can never
pass 2^28 float32 = 1 GiB: batch_size x max_session_len x num_items <= 2^28 (with the default
64 x 50, catalogues up to 83,886 items)."""


def resolve_loss(loss: str, num_items: int, batch_size: int = 64, max_session_len: int = 50) -> str:
    """`auto`: the full softmax while its worst-case logits fit FULL_SOFTMAX_MAX_LOGITS (exact,
    and on the validation splits it beat 1,000 log-Q-corrected samples, e.g. Taobao's 75k items:
    NDCG@50 0.0226 vs 0.0155), else the sampled softmax with log-Q correction (the paper's
    choice; memory independent of the catalogue)."""
    if loss != "auto":
        return loss
    return "full" if batch_size * max_session_len * num_items <= FULL_SOFTMAX_MAX_LOGITS else "sampled"
