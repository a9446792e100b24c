"""Device choice shared by training, evaluation and export."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sdm.errors import SdmError


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; `cuda` without a GPU is an error.

    Under torchrun each rank takes the GPU of its LOCAL_RANK.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise SdmError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)
