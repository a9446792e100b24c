"""The trainer's log: `train_log.jsonl` always, TensorBoard events with `--tensorboard DIR`.

One JSON record per line (`{"step", "epoch", "loss", "lr", "samples_per_s"}` every
`log_every` steps, `{"step", "epoch", "seconds", "valid": {...}}` per validation,
`{"summary": ...}` at the end). With a TensorBoard directory the same numbers are
also scalars: `train/loss`, `train/lr`, `train/samples_per_s` and `valid/<metric>@K`
by step, for comparing runs in TensorBoard (`pip install 'sdm[tensorboard]'`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdm.errors import ConfigError
from sdm.outputs import MARKER, check_disjoint


class TrainLog:
    """Append-only training log (rank 0), optionally mirrored to TensorBoard."""

    def __init__(self, path: Path, tensorboard: Path | None = None, inputs: dict[str, Any] | None = None) -> None:
        self.tb = _summary_writer(tensorboard, inputs or {}) if tensorboard is not None else None
        self.fh = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for tag, value in scalars(record):
                self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """The TensorBoard scalars of one log record (none for the summary)."""
    if "step" not in record:
        return []
    out = [(f"train/{k}", float(record[k])) for k in ("loss", "lr", "samples_per_s") if k in record]
    for key, value in (record.get("valid") or {}).items():
        if "@" in key and isinstance(value, (int, float)):
            out.append((f"valid/{key}", float(value)))
    return out


def check_tensorboard(folder: Path | None, out: Path, inputs: dict[str, Any]) -> None:
    """`--tensorboard`, before anything is written: never an input, never another sdm output, and
    inside --out only as `--out/tensorboard`, the one folder there `sdm train` owns (any other
    would be foreign to the next `--resume` or `--overwrite`).

    Raises:
        ConfigError / OutputError: naming the folder.
    """
    if folder is None:
        return
    check_disjoint(folder, inputs, flag="--tensorboard")
    where, own = Path(folder).resolve(), Path(out).resolve()
    if (where == own or own in where.parents) and where != own / "tensorboard":
        raise ConfigError(f"--tensorboard {folder} lies inside --out {out}; use {Path(out) / 'tensorboard'} or a folder outside it")
    if (Path(folder) / MARKER).exists():
        raise ConfigError(f"--tensorboard {folder} is the output of another sdm command; choose a folder of its own")


def _summary_writer(folder: Path, inputs: dict[str, Any]) -> Any:
    """A SummaryWriter on `folder` (never an input), or one line saying how to install it."""
    check_disjoint(folder, inputs, flag="--tensorboard")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'sdm[tensorboard]'") from None
    return SummaryWriter(log_dir=str(folder))
