"""`train_start`: sessions before it are in no split, but their events still fill later windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import at, read_sessions, us, vocab, write_log

from sdm.config import SessionizeConfig
from sdm.configfile import build_config
from sdm.errors import ConfigError, SdmError
from sdm.sessionize import run

VALID, TEST = at(days=8), at(days=8, minutes=12 * 60)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 users over 9 days: two sessions a day each (morning and evening), items per user and day.

    u3's items of days 0-2 are seen only then (history-only items when training starts at day 7).
    """
    rows = []
    for u, user in enumerate(("u1", "u2", "u3")):
        for d in range(9):
            for h in (8 + u, 20 + u):
                for k in range(3):
                    item = f"h{d}" if user == "u3" and d < 3 else f"i{(d + u + k) % 6}"
                    rows.append((user, item, at(days=d, minutes=h * 60 + k)))
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    return write_log(df, tmp_path_factory.mktemp("log") / "log.parquet")


def _run(log: Path, out: Path, **kw: Any) -> tuple[dict, list[dict]]:
    cfg = SessionizeConfig(out=out, min_shards=1, valid_start=VALID, test_start=TEST, **kw)
    m = run(cfg, log, progress=False)
    inv = {i: r for r, i in vocab(out, "item").items()}
    sessions = read_sessions(out)
    for s in sessions:
        s["raw"] = [inv.get(i) for i in s["items"]]
        s["long_raw"] = [inv.get(i) for i in s["long_items"]]
    return m, sessions


def _key(s: dict) -> tuple:
    return (s["user_id"], s["ts"][0])


def _known(raw: list, items: set) -> list:
    """Raw ids as a run whose vocabulary is `items` decodes them (OOV -> None)."""
    return [r if r in items else None for r in raw]


@pytest.fixture(scope="module")
def plain(log: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    return _run(log, tmp_path_factory.mktemp("plain") / "out")


@pytest.fixture(scope="module")
def late(log: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    return _run(log, tmp_path_factory.mktemp("late") / "out", train_start=at(days=7))


def test_training_sessions_are_those_from_train_start(plain, late) -> None:
    m, sessions = late
    train = [s for s in sessions if s["split"] == "train"]
    assert train and all(us(at(days=7)) <= s["ts"][0] < us(VALID) for s in train)
    expected = sorted(_key(s) for s in plain[1] if s["split"] == "train" and s["ts"][0] >= us(at(days=7)))
    assert sorted(_key(s) for s in train) == expected
    assert len(train) == 6  # 3 users x 2 sessions of day 7
    assert m["splits"]["train"]["sessions"] == 6 and m["splits"]["train"]["events"] == 18
    assert m["history"] == {"sessions": 42, "events": 126}  # days 0-6
    assert m["rows_kept"] == m["history"]["events"] + sum(m["splits"][s]["events"] for s in ("train", "valid", "test"))
    assert m["cutoffs"]["train_start"] == at(days=7).isoformat()
    assert m["config"]["train_start"] is not None
    assert plain[0]["history"] == {"sessions": 0, "events": 0} and "train_start" not in plain[0]["cutoffs"]


def test_windows_equal_the_plain_runs(plain, late) -> None:
    """Every kept session's window holds the same events (times, and raw items where still known)."""
    before = {_key(s): s for s in plain[1]}
    m, sessions = late
    items = set(vocab(Path(m["config"]["out"]), "item"))
    assert {s["split"] for s in sessions} == {"train", "valid", "test"}
    for s in sessions:
        p = before[_key(s)]
        assert s["split"] == p["split"] and s["ts"] == p["ts"] and s["long_ts"] == p["long_ts"]
        assert len(s["long_ts"]) > 0
        assert s["long_raw"] == _known(p["long_raw"], items)  # raw ids where known; OOV only if unseen now
        assert s["raw"] == _known(p["raw"], items)
    # the window of day 7 reaches back to day 0 (7 days), through the history sessions
    first = next(s for s in sessions if s["split"] == "train" and s["user_id"] == "u3")
    assert first["long_ts"][0] < us(at(days=3)) and None in first["long_raw"]


def test_valid_and_test_unchanged(plain, late) -> None:
    """The same valid/test sessions, events and windows (raw ids where the new vocabulary knows them)."""
    items = set(vocab(Path(late[0]["config"]["out"]), "item"))
    for name in ("valid", "test"):
        a = sorted((_key(s), _known(s["raw"], items), s["long_ts"], _known(s["long_raw"], items)) for s in plain[1] if s["split"] == name)
        b = sorted((_key(s), s["raw"], s["long_ts"], s["long_raw"]) for s in late[1] if s["split"] == name)
        assert a and a == b
        for k in ("users", "sessions", "events", "samples"):
            assert late[0]["splits"][name][k] == plain[0]["splits"][name][k]


def test_vocabulary_counts_training_sessions_only(late) -> None:
    m, sessions = late
    items = set(vocab(Path(m["config"]["out"]), "item"))
    assert not any(str(r).startswith("h") for r in items)  # history-only items are OOV
    assert items == {r for s in sessions if s["split"] == "train" for r in s["raw"]}


def test_buckets_equal_one_bucket(log: Path, late, tmp_path: Path) -> None:
    m2, sessions2 = _run(log, tmp_path / "b2", train_start=at(days=7), buckets=2)
    m1, sessions1 = late
    assert m2["config"]["buckets"] == 2 and len(m2["splits"]["train"]["shards"]) == 2  # a shard per bucket
    assert sessions2 == sessions1
    assert m2["history"] == m1["history"] and m2["splits"]["train"]["sessions"] == m1["splits"]["train"]["sessions"]
    assert m2["vocab_sizes"] == m1["vocab_sizes"]


def test_refusals(log: Path, tmp_path: Path) -> None:
    # given cutoffs: refused by the config, one line
    with pytest.raises(ConfigError, match=r"--train-start .* must be before --valid-start"):
        build_config(SessionizeConfig, None, "sessionize", {"out": tmp_path / "o", "train_start": "2024-01-09T00:00:00", "valid_start": "2024-01-09T00:00:00"})
    with pytest.raises(ConfigError, match=r"--train-start .* must be before --test-start"):
        build_config(SessionizeConfig, None, "sessionize", {"out": tmp_path / "o", "train_start": "2024-01-10", "test_start": "2024-01-09"})
    # a computed validation cutoff at or before train_start
    cfg = SessionizeConfig(out=tmp_path / "o", min_shards=1, valid_days=1, test_days=0.5, train_start=at(days=8, minutes=1))
    with pytest.raises(SdmError, match=r"train_start .* is not before the validation cutoff"):
        run(cfg, log, progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()
    # before valid_start, but no session starts in [train_start, valid_start): empty training split
    cfg = SessionizeConfig(out=tmp_path / "o", min_shards=1, valid_start=VALID, test_start=TEST, train_start=at(days=7, minutes=23 * 60))
    with pytest.raises(SdmError, match=r"the training split is empty .*cutoffs train"):
        run(cfg, log, progress=False)
