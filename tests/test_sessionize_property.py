"""Property tests: `run` agrees with the plain-Python reference sessionizer on random logs.

Random small logs with many timestamp ties, gaps right at the 10-minute and
7-day edges, optional session ids with nulls, null users/items and exact
duplicates. Checked: the items of every session, every long-term window, every
split label, the item vocabulary and the drop count.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import reference_sessionizer as ref
from conftest import read_sessions, us
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize import run

BASE = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
DAY = 86_400
# steps (seconds) between consecutive event times: ties, both sides of the 10-minute
# gap, both sides of the 7-day window
STEPS = [0, 0, 0, 1, 599, 600, 601, 3_000, DAY, 7 * DAY - 601, 7 * DAY - 1, 7 * DAY, 7 * DAY + 1]


@st.composite
def logs(draw: st.DrawFn) -> dict[str, Any]:
    """A random log as rows (user, item, second, sid), shuffled, plus run options."""
    n = draw(st.integers(1, 40))
    steps = draw(st.lists(st.sampled_from(STEPS), min_size=n, max_size=n))
    times, t = [], 0
    for s in steps:
        t += s
        times.append(t)
    rows = []
    for sec in times:
        user = draw(st.one_of(st.integers(1, 3), st.just(None))) if draw(st.booleans()) else draw(st.integers(1, 3))
        item = draw(st.integers(1, 6)) if draw(st.integers(0, 9)) else None
        sid = draw(st.sampled_from([None, 1, 2, 3]))
        rows.append((user, item, sec, sid))
    # exact duplicates of some rows, then shuffle: input order decides ties
    rows += draw(st.lists(st.sampled_from(rows), max_size=3))
    rows = draw(st.permutations(rows))
    split = draw(st.sampled_from(["fraction", "days", "start", "default"]))
    return {
        "rows": rows,
        "with_sid": draw(st.booleans()),
        "max_session_len": draw(st.integers(2, 4)),  # 1 is refused: no session would give a sample
        "max_long_len": draw(st.integers(1, 5)),
        "split": split,
        "fractions": (draw(st.sampled_from([0.0, 0.1, 0.25, 0.5])), draw(st.sampled_from([0.0, 0.1, 0.3]))),
        "days": (draw(st.sampled_from([0, 1, 7, 600 / DAY])), draw(st.sampled_from([0, 1, 600 / DAY]))),
        "starts": sorted(draw(st.lists(st.sampled_from(times + [t + 1 for t in times]), min_size=2, max_size=2))),
    }


def _check(case: dict[str, Any], user_from_session: bool) -> None:
    rows = case["rows"]
    to_dt = lambda s: None if s is None else BASE + dt.timedelta(seconds=s)  # noqa: E731
    data: dict[str, Any] = {
        "item_id": pl.Series([r[1] for r in rows], dtype=pl.Int64),
        "timestamp": pl.Series([to_dt(r[2]) for r in rows], dtype=pl.Datetime("us", "UTC")),
    }
    if user_from_session:
        # no user column: the session id is the user
        data["session_id"] = pl.Series([r[3] for r in rows], dtype=pl.Int64)
        ref_rows = [(r[3], r[1], us(to_dt(r[2])), r[3]) for r in rows]
    else:
        data["user_id"] = pl.Series([r[0] for r in rows], dtype=pl.Int64)
        if case["with_sid"]:
            data["session_id"] = pl.Series([r[3] for r in rows], dtype=pl.Int64)
        ref_rows = [(r[0], r[1], us(to_dt(r[2])), r[3] if case["with_sid"] else None) for r in rows]

    events = ref.clean(ref_rows)
    if not events:
        return  # an all-dropped log is an error, tested elsewhere
    sessions = ref.sessionize(events, 600 * 10**6, case["max_session_len"], 7 * DAY * 10**6, case["max_long_len"])
    opts: dict[str, Any] = {}
    valid = test = None
    if case["split"] == "fraction":
        opts = {"valid_fraction": case["fractions"][1], "test_fraction": case["fractions"][0]}
        valid, test = ("fraction", opts["valid_fraction"]), ("fraction", opts["test_fraction"])
    elif case["split"] == "days":
        opts = {"valid_days": case["days"][1], "test_days": case["days"][0]}
        valid, test = ("days", opts["valid_days"]), ("days", opts["test_days"])
    elif case["split"] == "start":
        v, t = case["starts"]
        opts = {"valid_start": BASE + dt.timedelta(seconds=v), "test_start": BASE + dt.timedelta(seconds=t)}
        valid, test = ("start", us(opts["valid_start"])), ("start", us(opts["test_start"]))
    cut = ref.cutoffs([s.start for s in sessions], max(e.ts for e in events), valid, test)
    ref.assign(sessions, *cut)
    vocab = ref.item_vocab(sessions)
    enc = lambda evs: [vocab.get(e.item, 1) for e in evs]  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.parquet"
        pl.DataFrame(data).write_parquet(log)
        cfg = SessionizeConfig(
            out=Path(tmp) / "out",
            max_session_len=case["max_session_len"],
            max_long_len=case["max_long_len"],
            min_shards=2,
            **opts,
        )
        if not any(s.split == "train" for s in sessions):
            # settings that leave no training session are refused before anything is written
            with pytest.raises(SdmError, match="the training split is empty"):
                run(cfg, log, progress=False)
            assert not (Path(tmp) / "out").exists()
            return
        manifest = run(cfg, log, progress=False)
        got = read_sessions(Path(tmp) / "out")

    assert manifest["rows_kept"] == len(events)
    assert manifest["rows_in"] == len(rows) == manifest["rows_kept"] + sum(manifest["dropped"].values())
    assert manifest["num_items"] == len(vocab) + 2
    assert [s["sess_id"] for s in got] == list(range(len(sessions)))
    assert [(s["user_id"], s["split"]) for s in got] == [(str(s.user), s.split) for s in sessions]
    assert [s["ts"] for s in got] == [[e.ts for e in s.events] for s in sessions]
    assert [s["items"] for s in got] == [enc(s.events) for s in sessions]
    assert [s["long_ts"] for s in got] == [[e.ts for e in s.long] for s in sessions]
    assert [s["long_items"] for s in got] == [enc(s.long) for s in sessions]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs())
def test_matches_reference(case: dict[str, Any]) -> None:
    _check(case, user_from_session=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs())
def test_matches_reference_without_user_column(case: dict[str, Any]) -> None:
    _check(case, user_from_session=True)
