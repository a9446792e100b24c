"""`sdm sessionize`: raw interaction log -> sessions, long-term windows, splits, shards.

Implements SPEC sections 1-4 and writes the shard directory of docs/FORMAT.md.
The stages, one module each, in the order the data meets them:

    io        read: open the tables (file, directory, glob); polars failures as one line
    schema    validate: the config's columns against the tables' schemas
              (times: the time column as us UTC; behaviors: the `--behaviors` filter)
    normalise drop unusable rows (counted by reason), normalise columns, drop exact copies
    sessions  sort each user's events by time, number the sessions (SPEC 2)
    split     cutoffs and each session's split (SPEC 4)
    windows   long-term windows (SPEC 3) and the per-(user, split) timelines
    vocab     vocabularies from the training split
              (numeric: a numeric feature's buckets, cut at training quantiles)
    encode    ids -> vocabulary indices
    tables    the item and user tables
    catalogue the cold items (outside the vocabulary) the item tower can still embed
    write     shards, tables and (last) the manifest

`columns` names the normalised columns every stage uses.

`previous` reads the data directory of `--vocab-from`, whose vocabularies
are kept (seeding the plan's).

`passes` calls them for one user hash bucket (a first pass up to the
sessions, a second pass from the split on), `plan` combines the buckets'
first passes, and `engine` runs the passes: here (`local`) or as Ray tasks
(`ray`). No stage knows which engine runs it.

Choices where the SPEC is silent:

- Naive timestamps are UTC; zoned ones are converted to UTC; integer columns
  are epoch seconds/milliseconds per `time_unit` (required for integers).
- No user column but a session column: each session id is its own user (empty
  long-term). A users table is then refused.
- Item side features come from the log or, when the log lacks the column, from
  the items table joined on the item column (the log wins when both have it).
  Profile features come from the users table only.
- Split defaults: valid_fraction = test_fraction = 0.1 when nothing is given.
  `*_days` count back from the end of the log = last timestamp + 1 us.
- Vocabulary counts: events of training sessions (item and its features,
  user); for profile features, training users (each counted once).
- `train_start`: sessions starting before it are history, in no split (no
  shard row, no sample, no vocabulary count: their only items are OOV unless
  `--vocab-from` keeps them), counted under the manifest's `history`; their
  events still fill later sessions' long-term windows exactly as without it.
- Numeric features (`numeric_features`, by default the float and decimal
  features; integers are ids or codes unless listed) are bucketised at
  inverted-CDF quantiles of those same training values, at most
  `numeric_buckets` buckets, null and NaN a bucket of their own.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sdm.config import SessionizeConfig
from sdm.errors import storage_error
from sdm.outputs import OutputDir
from sdm.sessionize import catalogue, engine, previous, write
from sdm.sessionize.plan import make_plan
from sdm.sessionize.read import check_behaviors, open_input
from sdm.sessionize.schema import check_flags_used
from sdm.sessionize.split import SPLITS

__all__ = ["run"]


def run(cfg: SessionizeConfig, log: Path, progress: bool = True) -> dict[str, Any]:
    """Sessionize `log` (a file, a directory of parts or a glob) into `cfg.out`; return the manifest.

    With `cfg.buckets` = N > 1 (by default ceil(rows / `bucket_events`), see
    `engine.resolve_buckets`) the users are hash-partitioned into N buckets:
    a first pass sessionizes bucket by bucket (spilling each to a work
    directory `.sdm-work-*` inside `out`), `plan.make_plan` derives what needs
    the whole log (cutoffs, vocabularies, sess_id offsets, shard layout), and a
    second pass writes each bucket's shards. The sessions, windows, splits and
    vocabularies equal the one-bucket output, whatever the engine; only which
    shard holds which user differs.

    `out` is held by an `outputs.OutputDir` for the whole run: refused when it
    overlaps an input or holds anything `sdm sessionize` does not write (`.git`,
    a home folder's files), locked against a second writer, and cleared of the
    earlier output only once the input is validated and the plan is built.

    Returns:
        The manifest dict (also written, last, as `cfg.out/manifest.json`),
        with an extra key `seconds` (wall time).

    Raises:
        SdmError: any problem with the input files, the engine or the output
            directory (`OutputError`, `LockedError`, `StorageError`).
    """
    t0 = time.perf_counter()
    say = _stage_printer(progress, t0)
    out = Path(cfg.out)
    inputs = {"log": log, "items table": cfg.items, "users table": cfg.users, "--vocab-from data directory": cfg.vocab_from}
    with OutputDir(out, "sessionize", write.OWNS, overwrite=cfg.overwrite, inputs=inputs,
                   scratch=(write.WORK_PREFIX,)) as guard:  # fmt: skip
        try:
            return _run(cfg, log, guard, say, t0)
        except OSError as exc:  # a write the OS refused (no space, read-only) below a stage's own handling
            raise storage_error(exc, out) from None


def _run(cfg: SessionizeConfig, log: Path, guard: OutputDir, say: Callable[[str], None], t0: float) -> dict[str, Any]:
    """The run inside the output guard: validate, first passes, plan, clear the old output, second passes, finish."""
    out = guard.out
    # Everything that can be checked is checked before the first byte is deleted.
    engine.check_engine(cfg)
    inp = open_input(cfg, log)
    check_behaviors(inp)
    inp.cfg = cfg = engine.resolve_buckets(inp)  # with defaulted side features and the bucket count
    check_flags_used(cfg)
    prev = previous.load(inp)  # --vocab-from: read and checked before the first pass
    if prev is not None:
        say(f"keeping the vocabularies of {cfg.vocab_from} ({prev.entry['vocab_sizes']['item'] - 2} items)")
    say(f"reading {inp.log}" + (f" in {cfg.buckets} buckets" if cfg.buckets > 1 else "") + f" ({cfg.engine} engine)")
    for note in inp.notes:
        say(note)
    work = None
    if engine.spills(cfg):
        # spill inside the (locked) output directory, so an interrupted run leaves nothing
        # beside it; the next run removes what a killed one left (OutputDir's scratch)
        try:
            work = Path(tempfile.mkdtemp(prefix=write.WORK_PREFIX, dir=out))
        except OSError as exc:
            raise storage_error(exc, out) from None
    try:
        with engine.ray_session(cfg):
            parts = engine.first_passes(inp, work, say)
            plan = make_plan(inp, parts, prev)
            del prev
            rows_kept = plan.rows_in - sum(plan.dropped.values())
            say(f"sessionized {rows_kept} events ({plan.rows_in - rows_kept} dropped); vocabularies done")
            # Only now touch the output: bad input above leaves an old directory intact.
            # The old manifest goes first: a half-cleared directory never looks complete.
            guard.prepare(first=[write.MANIFEST])
            results = engine.second_passes(inp, plan, parts, out, say)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    shards = {name: [s for r in results for s in r[name]] for name in SPLITS}
    cold = catalogue.build(plan, [r[catalogue.KEY] for r in results])
    say(f"catalogue: {cold.height} cold items (outside the item vocabulary)")
    return write.finish(cfg, plan, out, shards, t0, say, cold)


def _stage_printer(progress: bool, t0: float) -> Callable[[str], None]:
    """A function printing one stage line on stderr (seconds since t0), or doing nothing."""

    def say(msg: str) -> None:
        if progress:
            print(f"[sessionize {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say
