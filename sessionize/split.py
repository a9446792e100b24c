"""Stage: split (SPEC 4). Cutoffs from session start times, each session's split, sanity checks.

Sessions are assigned by their start time: train before the validation cutoff,
validation up to the test cutoff, test after. With `train_start`, sessions
starting before it are history: in no split (no shard row, no sample, no
vocabulary count), their events only fill later sessions' long-term windows.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize.times import from_us, to_utc_us
from sdm.sessionize.sessions import SLEN, START

SPLIT = "_split"      # 0 train, 1 valid, 2 test, 3 history (before train_start: no split)
SPLITS = ("train", "valid", "test")
HISTORY = 3


@dataclass(frozen=True)
class Cutoffs:
    """Split cutoffs in us since epoch, UTC: history < train_start <= train < valid_start <= valid < test_start <= test.

    `train_start` None: no history, every session before `valid_start` trains.
    """

    valid_start: int
    test_start: int
    train_start: int | None = None


def _fraction_position(n: int, fraction: float) -> int:
    """Index (0-based, in start-time order) of the first of the last floor(fraction * n) sessions."""
    # the epsilon keeps 0.1 * 30 == 3 from becoming 2.9999... -> 2
    return n - math.floor(fraction * n + 1e-9)


def compute_cutoffs(cfg: SessionizeConfig, starts: pl.Series, max_ts: int) -> Cutoffs:
    """Resolve the split cutoffs from the config and the sorted session start times.

    Test cutoff first: an explicit `test_start`; or `test_days` before the end of
    the log, where the end is the last timestamp + 1 us (exclusive, so 0 days
    gives an empty split and 1 day covers exactly the last 24 h); or
    `test_fraction` f: the start time of the session at 0-based position
    n - floor(f * n) in start-time order (sessions tying with it go to test too).
    Then the validation cutoff: explicit `valid_start`; `valid_days` before the
    test cutoff; or `valid_fraction` f: floor(f * n) sessions just before the
    test cutoff. With nothing given, valid_fraction = test_fraction = 0.1.
    An empty test split has test_start = end of the log.

    `train_start` is taken as given (None without it).

    Raises:
        SdmError: an explicit valid_start after the computed test cutoff; a
            train_start not before the validation cutoff.
    """
    n = len(starts)
    end = max_ts + 1
    def none_given(name: str) -> bool:
        return all(getattr(cfg, f"{name}_{k}") is None for k in ("start", "days", "fraction"))

    if cfg.test_start is not None:
        test_start = to_utc_us(cfg.test_start)
    elif cfg.test_days is not None:
        test_start = end - round(cfg.test_days * 86_400_000_000)
    else:
        f = 0.1 if none_given("test") else cfg.test_fraction
        p = _fraction_position(n, f)
        test_start = int(starts[p]) if p < n else end
    if cfg.valid_start is not None:
        valid_start = to_utc_us(cfg.valid_start)
        if valid_start > test_start:
            raise SdmError(
                f"valid_start {cfg.valid_start.isoformat()} is after the test cutoff "
                f"({from_us(test_start)}); choose an earlier valid_start"
            )
    elif cfg.valid_days is not None:
        valid_start = test_start - round(cfg.valid_days * 86_400_000_000)
    else:
        f = 0.1 if none_given("valid") else cfg.valid_fraction
        p_test = int(starts.search_sorted(test_start, side="left"))
        p = max(0, p_test - math.floor(f * n + 1e-9))
        valid_start = int(starts[p]) if p < p_test else test_start
    train_start = None
    if cfg.train_start is not None:
        train_start = to_utc_us(cfg.train_start)
        if train_start >= valid_start:
            raise SdmError(
                f"train_start {cfg.train_start.isoformat()} is not before the validation cutoff "
                f"({from_us(valid_start)}): the training split would be empty; choose an earlier train_start"
            )
    return Cutoffs(valid_start=valid_start, test_start=test_start, train_start=train_start)


def split_of(start: pl.Expr, cut: Cutoffs) -> pl.Expr:
    """The split code (0 train, 1 valid, 2 test, 3 history before `train_start`) of sessions starting at `start`."""
    code = pl.when(start < cut.valid_start).then(0).when(start < cut.test_start).then(1).otherwise(2)
    if cut.train_start is not None:
        code = pl.when(start < cut.train_start).then(HISTORY).otherwise(code)
    return code.cast(pl.Int8)


def is_train(start: pl.Expr, cut: Cutoffs) -> pl.Expr:
    """True for sessions of the training split: from `train_start` (if any) to before `valid_start`."""
    train = start < cut.valid_start
    return train if cut.train_start is None else train & (start >= cut.train_start)


def in_train(sessions: pl.DataFrame, cut: Cutoffs) -> pl.Series:
    """True for the events of training sessions (started in [`train_start`, `valid_start`)) of a bucket's
    sessionized events, in their frame order, from its session rows alone (`START`, `SLEN`, in
    frame order, as `sessions.session_starts` lists them): no event column is read.

    At 100M events (9 buckets) the vocabulary counts read one column of each spill instead
    of three, and skip a forward fill over every event.
    """
    start = sessions.get_column(START)
    train = start < cut.valid_start
    if cut.train_start is not None:
        train = train & (start >= cut.train_start)
    train = train.to_numpy()
    return pl.Series("_train", np.repeat(train, sessions.get_column(SLEN).to_numpy()))


def assign_split(sessions: pl.LazyFrame, cut: Cutoffs) -> pl.LazyFrame:
    """Label each session (`windows.sessions_table`) with its split, by its start time (SPEC 4)."""
    return sessions.with_columns(split_of(pl.col("start_ts"), cut).alias(SPLIT))


def split_settings(cfg: SessionizeConfig) -> str:
    """The split flags in effect, for messages ("--test-days 1000, --valid-fraction 0.1 (default)")."""
    given = [
        f"--{k.replace('_', '-')} {v.isoformat() if isinstance(v, dt.datetime) else v}"
        for k in ("train_start", "valid_start", "valid_days", "valid_fraction", "test_start", "test_days", "test_fraction")
        if (v := getattr(cfg, k)) is not None
    ]
    for name in ("valid", "test"):
        if all(getattr(cfg, f"{name}_{k}") is None for k in ("start", "days", "fraction")):
            given.append(f"--{name}-fraction 0.1 (default)")
    return ", ".join(given)


def history_counts(sessions: pl.DataFrame, cut: Cutoffs) -> dict[str, int]:
    """Sessions and events before `train_start` (in no split: long-term window events only)."""
    if cut.train_start is None:
        return {"sessions": 0, "events": 0}
    row = sessions.filter(pl.col(START) < cut.train_start).select(
        pl.len().alias("sessions"), pl.col(SLEN).cast(pl.Int64).sum().alias("events")
    ).row(0, named=True)
    return {k: int(v or 0) for k, v in row.items()}


def check_splits(cfg: SessionizeConfig, log: Path, sessions: pl.DataFrame, cut: Cutoffs, min_ts: int, max_ts: int) -> list[str]:
    """Refuse a training split with no sample; warn about an empty validation or test split.

    Train needs at least one session of two or more events (a sample, SPEC 5);
    an empty valid or test split only means nothing to validate or evaluate on,
    so it is a warning (in the manifest and on stderr), not an error.

    Raises:
        SdmError: one line naming the split settings and the log's time range.
    """
    # sums over the three masks of `split_of`, not a group-by of every session: 17M sessions
    # (100M events) 0.08 s against 0.15-0.36 s
    start, samples = pl.col(START), pl.col(SLEN).cast(pl.Int64) - 1
    after_valid = start >= cut.valid_start
    masks = [is_train(start, cut), after_valid & (start < cut.test_start), after_valid & (start >= cut.test_start)]
    row = sessions.select(
        *[m.sum().alias(f"n{s}") for s, m in enumerate(masks)],
        *[samples.filter(m).sum().alias(f"samples{s}") for s, m in enumerate(masks)],
    ).row(0, named=True)
    per = {s: (int(row[f"n{s}"]), int(row[f"samples{s}"])) for s in range(3)}
    span = f"the log runs {from_us(min_ts)} to {from_us(max_ts)}"
    cuts = f"cutoffs valid {from_us(cut.valid_start)}, test {from_us(cut.test_start)}"
    if cut.train_start is not None:
        cuts = f"cutoffs train {from_us(cut.train_start)}, valid {from_us(cut.valid_start)}, test {from_us(cut.test_start)}"
    n_train, train_samples = per.get(0, (0, 0))
    if n_train == 0:
        raise SdmError(
            f"{log}: the training split is empty ({cuts}; {span}; {split_settings(cfg)}); "
            "choose later cutoffs, an earlier train_start or smaller valid/test shares"
        )
    warnings = []
    if train_samples == 0:
        # a warning here (tiny hand-made logs legitimately have them); `sdm train` refuses the data
        warnings.append(
            f"no training session has 2 or more events ({n_train:,} sessions of one event; "
            f"--gap {cfg.gap}): there is no training sample"
        )
    for code_, name, key in ((1, "validation", "valid"), (2, "test", "test")):
        n, samples = per.get(code_, (0, 0))
        if n == 0 and asked_empty(cfg, key):
            continue  # --test-days 0: nothing to warn about
        if samples == 0:
            what = "is empty" if n == 0 else f"has {n:,} sessions but none of 2 or more events"
            warnings.append(f"the {name} split {what} ({cuts}; {split_settings(cfg)})")
    return warnings


def asked_empty(cfg: SessionizeConfig, split: str) -> bool:
    """Whether the user set the split's size to zero (`--test-days 0`, `--valid-fraction 0`)."""
    return any(getattr(cfg, f"{split}_{unit}") == 0 for unit in ("days", "fraction"))


_YEAR_US = 365 * 86_400 * 1_000_000
_1980_US = 315_532_800_000_000


def time_warnings(cfg: SessionizeConfig, starts: pl.Series, min_ts: int, max_ts: int) -> list[str]:
    """Warnings about timestamps that look misread: all in 1970, or single events centuries away."""
    warnings = []
    if cfg.time_unit == "ms" and max_ts < _1980_US:
        warnings.append(
            f"every timestamp is before 1980 ({from_us(min_ts)} to {from_us(max_ts)}) with --time-unit ms: "
            "are they seconds (--time-unit s)?"
        )
    median = int(starts[len(starts) // 2])
    for v, side in ((min_ts, "earliest"), (max_ts, "latest")):
        if abs(v - median) > 100 * _YEAR_US:
            warnings.append(
                f"the {side} event, {from_us(v)}, is over 100 years from the median session start "
                f"{from_us(median)}: a wrong timestamp? (--*-days cutoffs count from the last event)"
            )
    return warnings
