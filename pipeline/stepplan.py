"""The ranks of `sdm train` and the steps each epoch takes.

`setup_distributed` joins torchrun's process group (DDP: gloo on CPU, NCCL on GPU)
and gives the rank and world size. Each rank reads its own shards, so
`trainable_sessions` counts the sessions per shard and `plan_epoch_steps` gives
every rank the same number of optimizer steps per epoch (the smallest rank's),
so that no rank waits for or diverges from another.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import torch
import torch.distributed as dist

from sdm.pipeline.dataset import assign_shards


def setup_distributed(device_name: str) -> tuple[int, int]:
    """Join the process group when launched by torchrun (even with one process, so that
    `torchrun --nproc_per_node 1` runs the DDP code path); (rank, world_size)."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trainable_sessions(data: Path, manifest: dict[str, Any]) -> list[int]:
    """Per training shard, the sessions that yield a sample (at least 2 events): the
    loader skips the others, so they must not count as steps."""
    counts = []
    for shard in manifest["splits"]["train"]["shards"]:
        lengths = pq.read_table(Path(data) / shard["path"], columns=["sess_len"]).column("sess_len")
        counts.append(int(sum((lst.values.to_numpy() >= 2).sum() for lst in lengths.chunks)))
    return counts


def plan_epoch_steps(counts: list[int], batch_size: int, world: int, num_workers: int, seed: int, epoch: int) -> int:
    """Optimizer steps of one epoch, the same on every rank.

    Each loader worker yields ceil(sessions of its shards / batch_size) batches (the
    shards it reads are `assign_shards`'s pure function of rank, worker, seed and
    epoch); a rank's steps are the sum over its workers, and every rank stops after the
    smallest rank's count, so DDP ranks take the same steps with the same learning rate.
    """
    per_rank = []
    for rank in range(world):
        steps = 0
        for worker in range(max(num_workers, 1)):
            shards = assign_shards(len(counts), rank, world, worker, num_workers, seed, epoch)
            steps += math.ceil(sum(counts[s] for s in shards) / batch_size)
        per_rank.append(steps)
    return min(per_rank)
