"""Checkpoints: one format for `sdm train` (last.pt, best.pt), `sdm evaluate` and `sdm export`.

A checkpoint is a dict (nanoGPT style): the model and optimizer state, the model
config, the run config, the data fingerprint, the step, the position inside the
epoch, the best validation metric and the RNG states. It is read with
`weights_only=True`, so a malicious pickle cannot run code, and written to a
temporary file that replaces the old one, so a crash never leaves half a file.
`load_model` rebuilds the model of a run's best.pt for a data directory, with the
checks that `sdm evaluate`, `sdm export` and `sdm recommend` share.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from sdm.errors import DataError, SdmError
from sdm.outputs import atomic_path, check_finished, write_text

CHECKPOINT_VERSION = 1
MODEL_KEYS = ("model", "model_config", "data_fingerprint")
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "config", "step", "epoch", "batch_in_epoch", "best_metric", "bad_epochs", "rng")


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to `path` through a temporary file in the same directory (removed if the write fails)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: Path, keys: tuple[str, ...] = MODEL_KEYS) -> dict[str, Any]:
    """The checkpoint at `path`, checked to be a dict holding `keys`.

    Raises:
        SdmError: missing, empty, unreadable, not a dict (e.g. a bare tensor), or lacking keys;
            one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SdmError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise SdmError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about legacy formats before failing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise SdmError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict):
        raise SdmError(f"{path}: not an sdm checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise SdmError(f"{path}: not an sdm checkpoint (missing {missing})")
    return ckpt


# Settings a resumed run may change: they do not alter what the next step computes (init_from:
# a resumed run continues last.pt, whose weights already hold the warm start; it is ignored).
RESUME_FREE = {"resume", "overwrite", "epochs", "max_steps", "patience", "eval_every", "log_every", "checkpoint_every",
               "device", "out", "data", "verify", "tensorboard", "init_from", "init_moments", "cold_scale", "cold_budget",
               "neighbours", "neighbour_weight"}  # fmt: skip
# Settings that decide which batch comes next: changing them breaks the replay of the data position.
RESUME_FIXED = ("batch_size", "seed", "num_workers", "shuffle_buffer")
# Settings that define the best metric so far (with their value in checkpoints older than the setting).
RESUME_METRIC = {"select_metric": "hr", "eval_k": 50}


def check_resume(
    path: Path, ckpt: dict[str, Any], fingerprint: str, model_config: dict[str, Any], config: dict[str, Any]
) -> list[str]:
    """Whether `ckpt` (read from `path`) can be continued by a run with this data, model and run config.

    Returns:
        "name old -> new" of each other setting that changed (applied, worth a note).

    Raises:
        SdmError: another dataset or model config, a changed data-order setting, or another
            selection metric (`select_metric`, `eval_k`) than the one best.pt was chosen by.
    """
    if ckpt["data_fingerprint"] != fingerprint:
        raise SdmError(f"{path}: checkpoint was trained on another data manifest than this run's --data")
    if normalised_model_config(path, ckpt["model_config"]) != model_config:
        raise SdmError(f"{path}: checkpoint has another model config (variant/dimensions) than this run")
    before = ckpt["config"]
    fixed = [k for k in RESUME_FIXED if before.get(k) != config.get(k)]
    if fixed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({before.get(k)} -> {config.get(k)})" for k in fixed)
        raise SdmError(f"{path}: --resume with another {flags}: the data order would not continue where the run stopped")
    measured = [k for k in RESUME_METRIC if before.get(k, RESUME_METRIC[k]) != config.get(k)]
    if measured:
        flags = ", ".join(f"--{k.replace('_', '-')} ({before.get(k, RESUME_METRIC[k])} -> {config.get(k)})" for k in measured)
        raise SdmError(f"{path}: --resume with another {flags}: best.pt was chosen by the checkpoint's metric")
    changed = [k for k in config if k not in RESUME_FREE and k not in RESUME_METRIC and k not in RESUME_FIXED and before.get(k) != config.get(k)]
    return [f"{k} {before.get(k)} -> {config.get(k)}" for k in changed]


def normalised_model_config(path: Path, config: Any) -> dict[str, Any]:
    """A checkpoint's model config with the defaults of fields added since it was written.

    Raises:
        DataError: a model config this version cannot read.
    """
    from sdm.model.sdm import ModelConfig

    try:
        return ModelConfig.model_validate(config).model_dump(mode="json")
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a model config this sdm reads ({first})") from None


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after `step` (steps a killed run logged past its last checkpoint,
    which the resumed run trains and logs again) and old summaries."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if isinstance(rec, dict) and "summary" not in rec and rec.get("step", 0) <= step:
            keep.append(line)
    write_text(path, "".join(x + "\n" for x in keep))


def load_model(model_dir: Path, data_dir: Path, manifest: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """Rebuild the model of `model_dir/best.pt` for the shards of `data_dir`.

    Raises:
        SdmError: missing directory or checkpoint, unreadable checkpoint, or a
            model trained on another dataset (fingerprint mismatch).
    """
    return load_model_and_checkpoint(model_dir, data_dir, manifest, device)[0]


def load_model_and_checkpoint(
    model_dir: Path, data_dir: Path, manifest: dict[str, Any], device: torch.device
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """`load_model`, plus the checkpoint dict it was read from (step, configs), read once."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SdmError(f"{model_dir}: model directory not found (run `sdm train` first)")
    check_finished(model_dir, "model directory (`sdm train` runs)")
    path = model_dir / "best.pt"
    if not path.is_file():
        raise SdmError(f"{model_dir}: no best.pt; the training run that wrote it did not finish")
    ckpt = read_checkpoint(path)
    if ckpt["data_fingerprint"] != manifest.get("fingerprint"):
        raise SdmError(
            f"{path}: model trained on another dataset (fingerprint {str(ckpt['data_fingerprint'])[:12]}... "
            f"!= {str(manifest.get('fingerprint'))[:12]}... of {data_dir})"
        )
    from sdm.model.sdm import ModelConfig
    from sdm.pipeline.modelspec import build_model

    try:
        model_cfg = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{path}: invalid model config in the checkpoint ({first})") from None
    try:
        model = build_model(model_cfg, data_dir, manifest)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{path}: checkpoint does not fit its model config or this data ({first[:300]})") from None
    return model.to(device).eval(), ckpt
