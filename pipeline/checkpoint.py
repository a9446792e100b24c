"""Checkpoints: one format for `sdm train` (last.pt, best.pt), `sdm evaluate` and `sdm export`.

A checkpoint is a dict (nanoGPT style): the model and optimizer state, the model
config, the run config, the data fingerprint, the step, the position inside the
epoch, the best validation metric and the RNG states. It is read with
`weights_only=True`, so a malicious pickle cannot run code, and written to a
temporary file that replaces the old one, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from sdm.errors import SdmError

CHECKPOINT_VERSION = 1
MODEL_KEYS = ("model", "model_config", "data_fingerprint")
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "config", "step", "epoch", "batch_in_epoch", "best_metric", "bad_epochs", "rng")


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to `path` through a temporary file in the same directory."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
