"""One `sdm train` run's state and its files in --out.

`Run` holds what the loop keeps fixed for a whole run, `Progress` where it is.
`claim_out` holds --out (`OWN_FILES` are the files a run may replace there);
`save` writes the run as last.pt or best.pt in the format of
`sdm.pipeline.checkpoint`, and `resume` loads last.pt back into a run.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdm.config import TrainConfig
from sdm.errors import SdmError
from sdm.model.loss import NegativeSampler
from sdm.model.sdm import SDM, ModelConfig
from sdm.outputs import OutputDir
from sdm.pipeline.checkpoint import (
    CHECKPOINT_VERSION,
    RESUME_KEYS,
    atomic_save,
    check_resume,
    read_checkpoint,
    truncate_log,
)
from sdm.pipeline.dataset import SessionDataset
from sdm.pipeline.newrows import NewItemPace
from sdm.pipeline.trainstep import WeightAverage
from sdm.pipeline.warmstart import WarmStart


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Batches of `epoch` already trained (a resume replays the loader past them)."""
    best: float = -1.0
    bad_epochs: int = 0


@dataclass
class Run:
    """What the loop holds fixed for a whole run."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    manifest: dict[str, Any]
    model_cfg: ModelConfig
    model: SDM
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sampler: NegativeSampler
    gen: torch.Generator
    loss_kind: str
    dataset: SessionDataset
    loader: DataLoader
    epoch_steps: list[int]
    t0: float
    log: Any = None
    bar: Any = None
    ema: WeightAverage | None = None
    window: dict[str, float] = field(default_factory=dict)
    talk: bool = False
    """Print one line per validation, and the resume / interrupt lines, on stderr (rank 0, not --quiet)."""
    last_loss: torch.Tensor | float = float("nan")
    """The loss of the newest step (the epoch line's), a tensor so that no step waits on the device."""
    last_valid: dict[str, Any] = field(default_factory=dict)
    saved_step: int | None = None
    """Step of the newest last.pt this run wrote (None: none yet)."""
    warm: WarmStart | None = None
    """What `--init-from` loaded (a fresh run only)."""
    init_from: dict[str, Any] | None = None
    """The checkpoints' `init_from` record: this run's warm start, or the one last.pt carries when resumed."""
    teacher: SDM | None = None
    """The frozen previous model of `--distill-weight` (`pipeline/distill.py`), else None."""
    pace: NewItemPace | None = None
    """The new items' faster learning rate of `--new-item-lr-scale` (`pipeline/newrows.py`), else None."""

    @property
    def total_steps(self) -> int:
        return sum(self.epoch_steps)


def checkpoint(run: Run, state: Progress) -> dict[str, Any]:
    """The checkpoint dict of the run at `state`."""
    return {
        "version": CHECKPOINT_VERSION,
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "model_config": run.model_cfg.model_dump(mode="json"),
        "config": run.cfg.model_dump(mode="json"),
        "data_fingerprint": run.manifest["fingerprint"],
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "best_metric": state.best,
        "bad_epochs": state.bad_epochs,
        **({"ema": run.ema.avg} if run.ema is not None else {}),
        **({"init_from": run.init_from} if run.init_from is not None else {}),
        "rng": {
            "torch": torch.get_rng_state(),
            "sampler": run.gen.get_state(),
            **({"cuda": torch.cuda.get_rng_state(run.device)} if run.device.type == "cuda" else {}),
        },
    }


def save(run: Run, state: Progress, name: str) -> None:
    """Write last.pt or best.pt (rank 0 only; atomically). best.pt's weights are what was validated, so it needs no average."""
    if run.rank == 0:
        ckpt = checkpoint(run, state)
        if name == "best.pt":
            ckpt.pop("ema", None)
        atomic_save(ckpt, run.cfg.out / name)
        if name == "last.pt":
            run.saved_step = state.step


RUN_FILES = ("best.pt", "last.pt", "train_log.jsonl")
OWN_FILES = (*RUN_FILES, "config.json", "best.tmp", "last.tmp", "train_log.tmp", "tensorboard",
             "tensorboard/events.out.tfevents.*")  # fmt: skip
"""Everything `sdm train` writes in --out (the .tmp names: scratch of older versions); --overwrite removes these only."""


def claim_out(cfg: TrainConfig, rank: int) -> AbstractContextManager[Any]:
    """Rank 0 holds --out for the whole run (`sdm.outputs.OutputDir`): never an input, locked, own files only."""
    if rank != 0:
        return nullcontext()
    return OutputDir(
        cfg.out, "train", OWN_FILES, overwrite=cfg.overwrite, keep=cfg.resume,
        inputs={"data directory": cfg.data, "--init-from model": cfg.init_from},
        hint="pass --overwrite to replace it or --resume to continue it",
    )  # fmt: skip


def resume(run: Run) -> Progress:
    """The state of last.pt, loaded into `run` (weights, optimizer, average, RNGs); the log cut back to it.

    Raises:
        SdmError: no or unreadable last.pt, another model config or dataset, changed data-order settings.
    """
    path = run.cfg.out / "last.pt"
    if not path.is_file():
        raise SdmError(f"{path}: --resume given but there is no checkpoint to resume from")
    ckpt = read_checkpoint(path, RESUME_KEYS)
    changed = check_resume(path, ckpt, run.manifest["fingerprint"], run.model_cfg.model_dump(mode="json"),
                           run.cfg.model_dump(mode="json"))  # fmt: skip
    if changed and run.rank == 0:
        print("note: resuming with changed " + ", ".join(changed), file=sys.stderr)
    try:
        run.model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        if run.ema is not None and "ema" in ckpt:
            run.ema.load(ckpt["ema"])
        elif run.ema is not None:  # a run that had no average starts it from the trained weights
            run.ema = WeightAverage(run.model, run.cfg.ema_decay)
        torch.set_rng_state(ckpt["rng"]["torch"])
        run.gen.set_state(ckpt["rng"]["sampler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdmError(f"{path}: damaged checkpoint ({first})") from None
    if run.device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    state = Progress(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_metric"], ckpt["bad_epochs"])
    run.init_from = ckpt.get("init_from")  # a warm-started run's record stays in its checkpoints
    if run.rank == 0:
        truncate_log(run.cfg.out / "train_log.jsonl", state.step)
    return state
