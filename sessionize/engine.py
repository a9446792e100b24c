"""Engines: who runs the two passes over the user buckets. Thin on purpose: every engine calls `passes`.

- `local` (default): in this process, bucket after bucket; with several
  buckets the log is first split by bucket in one streaming read and every
  bucket's events are spilled inside the output directory, so peak memory
  follows one bucket. `workers` > 1 runs buckets in that many processes.
- `ray`: every pass of every bucket is a Ray task (`ray.init()` on this
  machine, or the cluster at `ray_address`). A first-pass task reads the
  log's columns, keeps its bucket's rows and spills its sessionized events to
  the work folder inside `out`; a second-pass task reads that spill and
  writes the bucket's shards into `out`. On a cluster `out` (and the log)
  must be on storage every node sees.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError, SdmError
from sdm.sessionize.io import polars_errors
from sdm.sessionize.passes import first_pass, first_pass_job, second_pass, second_pass_job
from sdm.sessionize.plan import Part, Plan
from sdm.sessionize.read import SPLIT_KEY, Input, split_events

Say = Callable[[str], None]


def resolve_buckets(inp: Input) -> SessionizeConfig:
    """The config with `buckets` set: as given, or ceil(rows / `bucket_events`) (the log's row count).

    The row count of Parquet comes from its metadata; a CSV is counted with
    one streaming pass (polars counts lines without parsing them). So by
    default memory follows `bucket_events`, not the size of the log; the
    resolved number is saved with the config.

    An explicit count larger than the log's rows is refused, not clamped: it
    can only leave buckets empty, and each bucket is a pass of its own
    (`--buckets 100000` over 4,000 events ran for more than 10 minutes). The
    user asked for a number; an error says which numbers do not fit, where a
    silent clamp would save a config unlike the one given.

    Raises:
        ConfigError: `buckets` is more than the log's rows.
    """
    cfg = inp.cfg
    if cfg.buckets == 1:
        return cfg
    with polars_errors(str(inp.log)):
        rows = inp.lf.select(pl.len()).collect(engine="streaming").item()
    if cfg.buckets is not None:
        if rows and cfg.buckets > rows:
            raise ConfigError(
                f"--buckets {cfg.buckets} is more than the {rows:,} rows of the log {inp.log}: a bucket holds "
                f"whole users, so at most {rows:,} can hold any; leave --buckets out for the default"
            )
        return cfg
    return cfg.model_copy(update={"buckets": max(1, math.ceil(rows / cfg.bucket_events))})


def spills(cfg: SessionizeConfig) -> bool:
    """Whether the first pass spills each bucket's events to the work folder (else they stay in memory)."""
    return cfg.buckets > 1 or cfg.engine == "ray"


def first_passes(inp: Input, work: Path | None, say: Say) -> list[Part]:
    """The first pass over every bucket, by the config's engine."""
    cfg, n = inp.cfg, inp.cfg.buckets
    paths = [None if work is None else work / f"bucket-{b:05d}.ipc" for b in range(n)]
    if cfg.engine == "ray":
        say(f"first pass: {n} Ray tasks")
        return ray_map(first_pass_job, [(cfg, inp.log, b, n, paths[b], None) for b in range(n)])
    split_dir = None
    if work is not None and n > 1:
        split_dir = work / "input"
        split_events(inp, n, split_dir)
        say(f"split the log into {n} buckets")
    try:
        if cfg.workers > 1 and n > 1:
            say(f"first pass: {n} buckets in {cfg.workers} processes")
            return process_map(first_pass_job, [(cfg, inp.log, b, n, paths[b], split_dir) for b in range(n)], cfg.workers)
        parts = []
        for b in range(n):
            parts.append(first_pass(inp, b, n, paths[b], split_dir))
            if split_dir is not None:
                # each bucket's input is read once
                shutil.rmtree(split_dir / f"{SPLIT_KEY}={b}", ignore_errors=True)
            if n > 1:
                say(f"first pass: bucket {b + 1}/{n} ({parts[-1].sessions.height} sessions)")
        return parts
    finally:
        if split_dir is not None:
            shutil.rmtree(split_dir, ignore_errors=True)


def second_passes(inp: Input, plan: Plan, parts: list[Any], out: Path, say: Say) -> list[dict[str, Any]]:
    """The second pass over every bucket (writes the shards), by the config's engine."""
    cfg, n = inp.cfg, len(parts)
    jobs = [(cfg, inp.log, plan, b, parts[b], out) for b in range(n)]
    if cfg.engine == "ray":
        say(f"second pass: {n} Ray tasks")
        return ray_map(second_pass_job, jobs)
    if cfg.workers > 1 and n > 1:
        return process_map(second_pass_job, jobs, cfg.workers)
    results = []
    for b in range(n):
        results.append(second_pass(inp, plan, b, parts[b], out))
        parts[b] = None  # free the bucket's events
        if n > 1:
            say(f"second pass: bucket {b + 1}/{n}")
    return results


def check_engine(cfg: SessionizeConfig) -> None:
    """Refuse an engine that cannot run, before anything is read or written.

    Raises:
        SdmError: `ray` without the `ray` package or with `--workers`, or a
            `ray_address` without `--engine ray`.
    """
    if cfg.ray_address is not None and cfg.engine != "ray":
        raise SdmError(f"--ray-address {cfg.ray_address!r} is for --engine ray (the engine is {cfg.engine!r})")
    if cfg.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SdmError("--engine ray needs Ray: pip install 'sdm[ray]' (or pip install ray)") from None
        if cfg.workers > 1:
            raise SdmError("--workers is for the local engine; Ray schedules the tasks itself")


@contextmanager
def ray_session(cfg: SessionizeConfig) -> Iterator[None]:
    """Ray for the whole run with `--engine ray`: started here (and shut down after) unless already running.

    `ray.init()` starts a Ray on this machine, or joins the cluster at
    `ray_address`; a Ray that is already initialised in this process (a
    caller's own) is used as it is and left running.

    Raises:
        SdmError: Ray cannot be started or reached.
    """
    if cfg.engine != "ray":
        yield
        return
    import ray

    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=cfg.ray_address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {cfg.ray_address!r}" if cfg.ray_address else "a local Ray"
            raise SdmError(f"cannot start {where}: {str(exc).strip().splitlines()[0]}") from None
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def ray_map(fn: Callable, jobs: list[Any]) -> list[Any]:
    """Run `fn` over `jobs` as Ray tasks (one CPU each) and return the results in job order.

    Runs inside `ray_session`, which started or joined Ray. When a task
    fails, every other task is awaited before the error is raised, so none is
    left writing into the work folder or the output; an `SdmError` raised in
    a task comes back as itself, any other failure as one line naming it.
    The others are not cancelled: in Ray 2.60 a `ray.cancel` racing with a
    task's completion can abort the driver (a RAY_CHECK in
    `TaskManager::CompletePendingTask`, seen once in CI; ray-project/ray#54785).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("ray_map runs inside engine.ray_session")
    task = ray.remote(num_cpus=1, max_retries=0)(fn)
    refs = [task.remote(j) for j in jobs]
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as exc:
        ray.wait(refs, num_returns=len(refs))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SdmError):
            raise SdmError(str(cause)) from None
        text = str(cause if isinstance(cause, BaseException) else exc).strip()
        raise SdmError(f"a Ray task failed: {text.splitlines()[-1] if text else type(exc).__name__}") from None


def process_map(fn: Callable, jobs: list[Any], workers: int) -> list[Any]:
    """Run jobs in `workers` spawned processes sharing the cores' polars threads."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    old = os.environ.get("POLARS_MAX_THREADS")
    # read by polars when a child imports it; spawn (not fork) so no parent thread pool is copied
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            return list(pool.map(fn, jobs))
    finally:
        if old is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
        else:
            os.environ["POLARS_MAX_THREADS"] = old


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when its parent dies, even by `kill -9`.

    A killed parent cannot shut its pool down, and the workers would wait on
    their task queue forever. On Linux the kernel sends SIGKILL when the parent
    goes (PR_SET_PDEATHSIG); a thread checking the parent's pid every second
    covers other systems and a parent thread that exits first.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="sdm-parent-watch", daemon=True).start()
