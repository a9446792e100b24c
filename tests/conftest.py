"""Shared test helpers: write tiny logs, run the sessionizer, read its shards back."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sdm.names import vocab_file

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
"""A round start time for hand-made logs."""


def at(minutes: float = 0, days: float = 0, seconds: float = 0) -> dt.datetime:
    """T0 plus an offset (UTC)."""
    return T0 + dt.timedelta(days=days, minutes=minutes, seconds=seconds)


def write_log(df: pl.DataFrame, path: Path) -> Path:
    """Write a frame as Parquet (or CSV when the suffix is .csv) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.write_csv(path)
    else:
        df.write_parquet(path)
    return path


def read_sessions(out: Path) -> list[dict[str, Any]]:
    """Every session of a shard directory, in sess_id order, as plain Python values.

    Each dict holds split, sess_id, user_id, user, ts / items (the session's
    events), long_ts / long_items (its long-term window), per item feature
    f, `f` and `long_f` with the encoded values, and per user feature g `user_g`.
    """
    sessions = []
    table = [c for c in json.loads((out / "manifest.json").read_text()).get("table_features", [])]
    items = pl.read_parquet(out / "items.parquet")
    by_index = {f: dict(zip(items["item"].to_list(), items[f].to_list())) for f in table}
    for split in ("train", "valid", "test"):
        for path in sorted((out / split).glob("part-*.parquet")):
            df = pl.read_parquet(path)
            feats = [c[4:] for c in df.columns if c.startswith("seq_") and c != "seq_item"] + table
            for row in df.iter_rows(named=True):
                for f in table:  # format 2: the item's row of items.parquet, or oov_<f> at OOV events
                    given = iter(row[f"oov_{f}"])
                    row[f"seq_{f}"] = [next(given) if i == 1 else by_index[f][i] for i in row["seq_item"]]
                    assert next(given, None) is None, f"oov_{f} longer than the OOV events of {path}"
                for k, sid in enumerate(row["sess_id"]):
                    a, n = row["sess_start"][k], row["sess_len"][k]
                    lo, hi = row["long_start"][k], row["long_end"][k]
                    s = {
                        "split": split,
                        "sess_id": sid,
                        "user_id": row["user_id"],
                        "user": row["user"],
                        "ts": row["ts"][a : a + n],
                        "items": row["seq_item"][a : a + n],
                        "long_ts": row["ts"][lo:hi],
                        "long_items": row["seq_item"][lo:hi],
                    }
                    s.update({c: row[c] for c in df.columns if c.startswith("user_") and c != "user_id"})
                    for f in feats:
                        s[f] = row[f"seq_{f}"][a : a + n]
                        s[f"long_{f}"] = row[f"seq_{f}"][lo:hi]
                    sessions.append(s)
    return sorted(sessions, key=lambda s: s["sess_id"])


def vocab(out: Path, name: str) -> dict[Any, int]:
    """raw -> index of vocab/<name>.parquet."""
    df = pl.read_parquet(out / vocab_file(name))
    return dict(zip(df["raw"].to_list(), df["index"].to_list()))


def us(t: dt.datetime) -> int:
    """A datetime as microseconds since epoch (naive = UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


@pytest.fixture
def log_file(tmp_path: Path):
    """Factory: `log_file(df, name="log.parquet")` writes df under tmp_path and returns the path."""

    def make(df: pl.DataFrame, name: str = "log.parquet") -> Path:
        return write_log(df, tmp_path / name)

    return make
