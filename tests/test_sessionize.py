"""Every rule of SPEC sections 1-4 on hand-made logs whose answers are checked by eye."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import at, read_sessions, us, vocab, write_log

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize import run
from sdm.sessionize import write as write_mod

# Everything in train unless a test asks for splits.
ALL_TRAIN = {"valid_fraction": 0.0, "test_fraction": 0.0}


def go(tmp_path: Path, df: pl.DataFrame, name: str = "log.parquet", **kw: Any) -> tuple[dict, list[dict]]:
    """Write `df`, sessionize it into tmp_path/out and return (manifest, sessions)."""
    log = write_log(df, tmp_path / name)
    opts = {**ALL_TRAIN, **kw} if not any(k.startswith(("valid_", "test_")) for k in kw) else kw
    cfg = SessionizeConfig(out=tmp_path / "out", overwrite=True, min_shards=1, **opts)
    manifest = run(cfg, log, progress=False)
    return manifest, read_sessions(tmp_path / "out")


def raw_items(tmp_path: Path, sessions: list[dict], key: str = "items") -> list[list[Any]]:
    """Decode item indices back to raw ids (1 -> None) for every session."""
    inv = {i: r for r, i in vocab(tmp_path / "out", "item").items()}
    return [[inv.get(i) for i in s[key]] for s in sessions]


def log(rows: list[tuple], sid: bool = True) -> pl.DataFrame:
    """Rows (user, item, time[, session]) -> a log frame."""
    cols = ["user_id", "item_id", "timestamp"] + (["session_id"] if sid else [])
    data = {c: [r[k] if k < len(r) else None for r in rows] for k, c in enumerate(cols)}
    schema = {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC"), "session_id": pl.Int64}
    return pl.DataFrame(data, schema={c: schema[c] for c in cols})


# --- SPEC 2: sessions -------------------------------------------------------------------


def test_session_id_merges_across_long_gap(tmp_path):
    df = log([(1, 10, at(0), 7), (1, 11, at(300), 7), (1, 12, at(600), 8)])
    _, ss = go(tmp_path, df)
    assert raw_items(tmp_path, ss) == [[10, 11], [12]]


def test_gap_merges_different_session_ids(tmp_path):
    df = log([(1, 10, at(0), 7), (1, 11, at(5), 8), (1, 12, at(9.99), None), (1, 13, at(30), 8)])
    _, ss = go(tmp_path, df)
    assert raw_items(tmp_path, ss) == [[10, 11, 12], [13]]


def test_exactly_gap_starts_new_session_and_less_merges(tmp_path):
    one_us = 1e-6 / 60  # minutes
    df = log([(1, 10, at(0)), (1, 11, at(10)), (1, 12, at(20 - one_us)), (1, 13, at(30 - one_us))], sid=False)
    _, ss = go(tmp_path, df)
    # 0 -> 10 is exactly the gap: new session; 10 -> 20-1us is less: merged;
    # 20-1us -> 30-1us is exactly the gap again: new session.
    assert raw_items(tmp_path, ss) == [[10], [11, 12], [13]]


def test_custom_gap(tmp_path):
    df = log([(1, 10, at(0)), (1, 11, at(20)), (1, 12, at(51))], sid=False)
    _, ss = go(tmp_path, df, gap="30m")
    assert raw_items(tmp_path, ss) == [[10, 11], [12]]


def test_cut_at_50_gives_50_50_20_with_windows(tmp_path):
    df = log([(1, 1000 + k, at(seconds=k)) for k in range(120)], sid=False)
    m, ss = go(tmp_path, df)
    assert [len(s["items"]) for s in ss] == [50, 50, 20]
    items = raw_items(tmp_path, ss)
    assert items == [list(range(1000, 1050)), list(range(1050, 1100)), list(range(1100, 1120))]
    # chunk 2's window is chunk 1; chunk 3's is the most recent 50 = chunk 2
    longs = raw_items(tmp_path, ss, "long_items")
    assert longs == [[], items[0], items[1]]
    assert m["splits"]["train"]["sessions"] == 3
    assert m["splits"]["train"]["samples"] == 49 + 49 + 19


def test_cut_respects_max_session_len(tmp_path):
    df = log([(1, k, at(seconds=k), 5) for k in range(7)])
    _, ss = go(tmp_path, df, max_session_len=3)
    assert [len(s["items"]) for s in ss] == [3, 3, 1]


def test_ties_keep_input_order(tmp_path):
    # input not sorted by time; the three events at minute 5 keep their input order
    df = log([(1, 9, at(5)), (1, 3, at(5)), (1, 1, at(0)), (1, 7, at(5)), (2, 4, at(1)), (2, 2, at(1))], sid=False)
    _, ss = go(tmp_path, df)
    assert raw_items(tmp_path, ss) == [[1, 9, 3, 7], [4, 2]]
    assert ss[0]["ts"] == sorted(ss[0]["ts"])


def test_users_with_one_event(tmp_path):
    df = log([(1, 10, at(0)), (2, 11, at(1)), (2, 12, at(2)), (3, 13, at(100))], sid=False)
    m, ss = go(tmp_path, df)
    assert [s["user_id"] for s in ss] == ["1", "2", "3"]
    assert [len(s["items"]) for s in ss] == [1, 2, 1]
    assert m["splits"]["train"]["sessions"] == 3 and m["splits"]["train"]["samples"] == 1


def test_sess_id_in_user_then_time_order(tmp_path):
    df = log([(2, 10, at(0)), (1, 11, at(100)), (1, 12, at(0)), (2, 13, at(100))], sid=False)
    _, ss = go(tmp_path, df)
    assert [(s["user_id"], s["sess_id"]) for s in ss] == [("1", 0), ("1", 1), ("2", 2), ("2", 3)]
    assert raw_items(tmp_path, ss) == [[12], [11], [10], [13]]


# --- SPEC 3: long-term windows ------------------------------------------------------


def test_window_edges_exactly_seven_days(tmp_path):
    T = 7 * 24 * 60  # minutes: the last sessions start at day 7
    rows = [
        (1, 1, at(-1 / 60)),  # T - 7d - 1s: out
        (1, 2, at(0)),  # exactly T - 7d: in
        (1, 3, at(T - 60)),  # in
        (1, 4, at(T)),  # session start T
        (1, 5, at(T)),
        (1, 6, at(T)),  # same time T, cut into its own session: 4 and 5 are at T, so out of its window
    ]
    # a 1 s gap parts every event above but the ties; the cut at 2 puts 6 alone
    _, ss = go(tmp_path, log(rows, sid=False), max_session_len=2, gap="1s")
    by_item = {raw_items(tmp_path, [s])[0][0]: raw_items(tmp_path, [s], "long_items")[0] for s in ss}
    assert by_item[4] == [2, 3]
    assert by_item[6] == [2, 3]
    assert by_item[3] == [1, 2]  # T-1h - 7d is before item 1: both in
    assert by_item[1] == []


def test_custom_long_window(tmp_path):
    rows = [(1, 1, at(0)), (1, 2, at(60)), (1, 3, at(120))]
    _, ss = go(tmp_path, log(rows, sid=False), long_window="1h")
    assert raw_items(tmp_path, ss, "long_items") == [[], [1], [2]]


def test_max_long_len_keeps_most_recent(tmp_path):
    rows = [(1, k, at(60 * k)) for k in range(1, 7)]
    _, ss = go(tmp_path, log(rows, sid=False), max_long_len=3)
    assert raw_items(tmp_path, ss, "long_items")[-1] == [3, 4, 5]
    assert raw_items(tmp_path, ss, "long_items")[1] == [1]


def test_window_reaches_into_earlier_split(tmp_path):
    rows = [(1, 1, at(0)), (1, 2, at(60)), (1, 3, at(120))]
    _, ss = go(tmp_path, log(rows, sid=False), valid_start=at(50), test_start=at(100))
    assert [s["split"] for s in ss] == ["train", "valid", "test"]
    assert [len(s["long_items"]) for s in ss] == [0, 1, 2]
    assert ss[2]["long_ts"] == [us(at(0)), us(at(60))]


# --- SPEC 4: splits and vocabularies ------------------------------------------------


def _daily(n_days: int = 10) -> pl.DataFrame:
    """One single-event session per day (user 1), items 100.."""
    return log([(1, 100 + d, at(days=d)) for d in range(n_days)], sid=False)


def test_split_explicit_timestamps(tmp_path):
    m, ss = go(tmp_path, _daily(), valid_start=at(days=6), test_start=at(days=8))
    assert [s["split"] for s in ss] == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    assert m["cutoffs"] == {"valid_start": at(days=6).isoformat(), "test_start": at(days=8).isoformat()}


def test_split_naive_explicit_timestamp_is_utc(tmp_path):
    naive = dt.datetime(2024, 1, 7)  # = T0 + 6 days
    _, ss = go(tmp_path, _daily(), valid_start=naive, test_start=dt.datetime(2024, 1, 9))
    assert [s["split"] for s in ss].count("train") == 6


def test_split_days_before_end(tmp_path):
    # end of log = day 9 + 1us; test = last 2 days -> day 8 and day 9 start >= day 7 + 1us
    m, ss = go(tmp_path, _daily(), valid_days=3, test_days=2)
    assert [s["split"] for s in ss] == ["train"] * 5 + ["valid"] * 3 + ["test"] * 2
    assert m["cutoffs"]["test_start"] == (at(days=7) + dt.timedelta(microseconds=1)).isoformat()


def test_split_zero_days_is_empty(tmp_path):
    m, ss = go(tmp_path, _daily(), valid_days=0, test_days=0)
    assert {s["split"] for s in ss} == {"train"}
    assert m["splits"]["test"]["shards"] == [] and m["splits"]["valid"]["sessions"] == 0


def test_split_fractions(tmp_path):
    m, ss = go(tmp_path, _daily(), valid_fraction=0.2, test_fraction=0.3)
    assert [s["split"] for s in ss] == ["train"] * 5 + ["valid"] * 2 + ["test"] * 3
    assert m["cutoffs"]["test_start"] == at(days=7).isoformat()


def test_split_default_fractions(tmp_path):
    log_path = write_log(_daily(20), tmp_path / "log.parquet")
    m = run(SessionizeConfig(out=tmp_path / "out", min_shards=1), log_path, progress=False)
    assert [m["splits"][s]["sessions"] for s in ("train", "valid", "test")] == [16, 2, 2]


def test_split_fraction_zero_is_empty(tmp_path):
    m, ss = go(tmp_path, _daily(), valid_fraction=0.0, test_fraction=0.5)
    assert [s["split"] for s in ss] == ["train"] * 5 + ["test"] * 5


def test_vocab_order_counts_and_reserved(tmp_path):
    # item 7 x3, items 5 and 9 x2 (tie -> raw order), item 8 x1; items 4 only in test
    rows = [(1, i, at(k)) for k, i in enumerate([9, 7, 5, 7, 9, 5, 7, 8])] + [(1, 4, at(days=5))]
    m, ss = go(tmp_path, log(rows, sid=False), valid_start=at(days=1), test_start=at(days=1))
    v = pl.read_parquet(tmp_path / "out" / "vocab" / "item.parquet")
    assert v["raw"].to_list() == [7, 5, 9, 8]
    assert v["index"].to_list() == [2, 3, 4, 5] and v["index"].dtype == pl.Int32
    assert v["count"].to_list() == [3, 2, 2, 1] and v["count"].dtype == pl.Int64
    assert m["vocab_sizes"]["item"] == m["num_items"] == 6
    test = [s for s in ss if s["split"] == "test"]
    assert test[0]["items"] == [1]  # unseen in training -> OOV
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")
    assert items["item"].to_list() == [2, 3, 4, 5] and items["item_id"].to_list() == [7, 5, 9, 8]


def test_unseen_user_maps_to_oov(tmp_path):
    rows = [(1, 1, at(0)), (1, 2, at(1)), (2, 1, at(days=3))]
    m, ss = go(tmp_path, log(rows, sid=False), valid_start=at(days=1), test_start=at(days=2))
    assert [(s["user_id"], s["user"], s["split"]) for s in ss] == [("1", 2, "train"), ("2", 1, "test")]
    users = pl.read_parquet(tmp_path / "out" / "users.parquet")
    assert users.to_dicts() == [{"user_id": "1", "user": 2}, {"user_id": "2", "user": 1}]
    assert m["vocab_sizes"]["user"] == 3


def test_item_features_from_log_null_is_oov(tmp_path):
    df = log([(1, 1, at(0)), (1, 2, at(1)), (1, 3, at(2)), (1, 1, at(3))], sid=False).with_columns(
        pl.Series("cat", ["a", "b", None, "a"])
    )
    m, ss = go(tmp_path, df, item_features=["cat"])
    assert vocab(tmp_path / "out", "cat") == {"a": 2, "b": 3}
    assert ss[0]["cat"] == [2, 3, 1, 2]
    assert m["item_features"] == ["item", "cat"] and m["vocab_sizes"]["cat"] == 4


def test_items_and_users_tables(tmp_path):
    df = log([(1, 1, at(0)), (1, 2, at(1)), (2, 1, at(2)), (3, 9, at(3))], sid=False).with_columns(
        pl.Series("brand", ["x", "y", "x", None])
    )
    items = write_log(
        pl.DataFrame({"item_id": [1, 2, 9], "cat": ["c1", "c2", "c2"], "brand": ["IGNORED"] * 3}),
        tmp_path / "items.parquet",
    )
    users = write_log(
        pl.DataFrame(
            {"user_id": [1, 2, 4], "age": [30, 30, None], "gender": ["f", "m", "m"]},
            schema_overrides={"user_id": pl.Int32},  # another integer width than the log's
        ),
        tmp_path / "users.parquet",
    )
    m, ss = go(tmp_path, df, items=items, users=users, item_features=["cat", "brand"], user_features=["age", "gender"])
    out = tmp_path / "out"
    # brand: the log wins over the items table; cat from the table
    assert vocab(out, "brand") == {"x": 2, "y": 3}
    assert vocab(out, "cat") == {"c1": 2, "c2": 3}
    assert [s["cat"] for s in ss] == [[2, 3], [2], [3]]
    assert [s["brand"] for s in ss] == [[2, 3], [2], [1]]
    # profile vocab from training users (each once): age 30 x2; gender f, m
    assert vocab(out, "age") == {30: 2} and vocab(out, "gender") == {"f": 2, "m": 3}
    row = pl.read_parquet(out / "train").sort("user_id")
    assert row["user_age"].to_list() == [2, 2, 1] and row["user_gender"].to_list() == [2, 3, 1]
    users_out = pl.read_parquet(out / "users.parquet")
    assert users_out.columns == ["user_id", "user", "age", "gender"]
    assert m["user_features"] == ["user", "age", "gender"]
    items_out = pl.read_parquet(out / "items.parquet").sort("item_id")
    assert items_out.select("item_id", "cat", "brand").rows() == [(1, 2, 2), (2, 3, 3), (9, 3, 1)]


def test_no_user_column_each_session_is_a_user(tmp_path):
    df = pl.DataFrame(
        {"session_id": ["b", "a", "a", "b"], "item_id": [1, 2, 3, 4], "timestamp": [at(0), at(1), at(300), at(days=3)]}
    )
    _, ss = go(tmp_path, df)
    assert [s["user_id"] for s in ss] == ["a", "b"]
    assert raw_items(tmp_path, ss) == [[2, 3], [1, 4]]  # same session id merges across gaps
    assert all(s["long_items"] == [] for s in ss)


def test_drops_counted_by_reason(tmp_path):
    df = pl.DataFrame(
        {
            "user_id": [1, None, 1, 1, 1, 1, 1, None],
            "item_id": [1, 2, None, 3, 4, 1, 5, None],
            "timestamp": [at(0), at(1), at(2), None, at(4), at(0), at(5), None],
            "behavior": ["pv", "pv", "pv", "pv", "buy", "pv", "fav", "pv"],
        }
    )
    m, ss = go(tmp_path, df, behaviors=["pv", "buy"])
    assert m["dropped"] == {"null_user": 2, "null_item": 1, "null_timestamp": 1, "behavior": 1, "duplicate": 1}
    assert m["rows_in"] == 8 and m["rows_kept"] == 2
    assert m["rows_in"] == m["rows_kept"] + sum(m["dropped"].values())
    assert raw_items(tmp_path, ss) == [[1, 4]]


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("zone", [None, "UTC", "Asia/Shanghai"])
def test_timestamp_units_and_zones(tmp_path, unit, zone):
    base = dt.datetime(2024, 1, 1, 8, 0)
    times = [base, base + dt.timedelta(minutes=5), base + dt.timedelta(hours=1)]
    df = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": times}).with_columns(
        pl.col("timestamp").dt.cast_time_unit("ms" if unit == "s" else unit)
    )
    if zone:
        df = df.with_columns(pl.col("timestamp").dt.replace_time_zone(zone))
    if unit == "s":
        # polars has no second unit: write a real timestamp[s] column with pyarrow
        table = df.to_arrow()
        table = table.set_column(2, "timestamp", pc.cast(table["timestamp"], pa.timestamp("s", tz=zone)))
        pq.write_table(table, tmp_path / "log.parquet")
        run(SessionizeConfig(out=tmp_path / "out", min_shards=1, **ALL_TRAIN), tmp_path / "log.parquet", progress=False)
        ss = read_sessions(tmp_path / "out")
    else:
        _, ss = go(tmp_path, df)
    offset = {None: 0, "UTC": 0, "Asia/Shanghai": 8 * 3600 * 10**6}[zone]
    assert [s["ts"] for s in ss] == [[us(times[0]) - offset, us(times[1]) - offset], [us(times[2]) - offset]]


@pytest.mark.parametrize("unit,scale", [("s", 1), ("ms", 1000)])
def test_integer_epoch(tmp_path, unit, scale):
    secs = [1_700_000_000, 1_700_000_300, 1_700_009_000]
    df = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": [s * scale for s in secs]})
    _, ss = go(tmp_path, df, time_unit=unit)
    assert [s["ts"] for s in ss] == [[secs[0] * 10**6, secs[1] * 10**6], [secs[2] * 10**6]]


def test_csv_log(tmp_path):
    df = log([(1, 1, at(0)), (1, 2, at(5)), (2, 3, at(0))], sid=False)
    _, ss = go(tmp_path, df, name="log.csv")
    assert raw_items(tmp_path, ss) == [[1, 2], [3]]
    assert ss[0]["ts"][0] == us(at(0))


def test_renamed_columns(tmp_path):
    df = log([(1, 1, at(0)), (1, 2, at(5))])
    df = df.rename({"user_id": "u", "item_id": "i", "timestamp": "t", "session_id": "s"})
    _, ss = go(tmp_path, df, user_col="u", item_col="i", time_col="t", session_col="s")
    assert raw_items(tmp_path, ss) == [[1, 2]]


# --- output format ------------------------------------------------------------------


def test_output_layout_and_shards(tmp_path):
    rows = [(u, u * 10 + k, at(k)) for u in range(1, 8) for k in range(3)]
    log_path = write_log(log(rows, sid=False), tmp_path / "log.parquet")
    cfg = SessionizeConfig(out=tmp_path / "out", min_shards=3, rows_per_shard=2, **ALL_TRAIN)
    m = run(cfg, log_path, progress=False)
    out = tmp_path / "out"
    shards = m["splits"]["train"]["shards"]
    assert [s["path"] for s in shards] == [f"train/part-{k:05d}.parquet" for k in range(4)]
    assert [s["rows"] for s in shards] == [1, 2, 2, 2]
    users = [pl.read_parquet(out / s["path"])["user_id"].to_list() for s in shards]
    assert sum(users, []) == [str(u) for u in range(1, 8)]  # contiguous user ranges
    assert (out / "valid").is_dir() and m["splits"]["valid"]["shards"] == []
    assert (out / "config.json").exists() and (out / "vocab" / "user.parquet").exists()
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["format"] == "sdm-shards" and m["version"] == 2 and len(m["fingerprint"]) == 64
    assert m["config"]["min_shards"] == 3 and m["seconds"] >= 0
    df = pl.read_parquet(out / shards[0]["path"])
    assert df.schema == pl.Schema(
        {
            "user_id": pl.String,
            "user": pl.Int32,
            "ts": pl.List(pl.Int64),
            "seq_item": pl.List(pl.Int32),
            "seq_oov": pl.List(pl.Int64),
            "sess_id": pl.List(pl.Int64),
            "sess_start": pl.List(pl.Int32),
            "sess_len": pl.List(pl.Int32),
            "long_start": pl.List(pl.Int32),
            "long_end": pl.List(pl.Int32),
        }
    )


def test_timeline_holds_only_needed_events(tmp_path):
    # 3 old events outside the window, then a session with a window of 1 event
    rows = [(1, 1, at(0)), (1, 2, at(60)), (1, 3, at(days=10)), (1, 4, at(days=17) - dt.timedelta(minutes=5))]
    rows += [(1, 5, at(days=17))]
    log_path = write_log(log(rows, sid=False), tmp_path / "log.parquet")
    cfg = SessionizeConfig(out=tmp_path / "out", min_shards=1, valid_start=at(days=16), test_start=at(days=16))
    run(cfg, log_path, progress=False)
    test = pl.read_parquet(tmp_path / "out" / "test")
    # session [4, 5] starts at day 17 - 5 min: its 7-day window holds only item 3 (day 10)
    assert test["sess_start"].to_list() == [[1]] and test["sess_len"].to_list() == [[2]]
    assert test["long_start"].to_list() == [[0]] and test["long_end"].to_list() == [[1]]
    assert len(test["ts"][0]) == 3


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
    log_path = write_log(log([(1, 1, at(0))], sid=False), tmp_path / "log.parquet")
    out = tmp_path / "out"
    run(SessionizeConfig(out=out), log_path, progress=False)
    with pytest.raises(SdmError, match=r"out.*earlier `sdm sessionize` output.*--overwrite"):
        run(SessionizeConfig(out=out), log_path, progress=False)
    run(SessionizeConfig(out=out, overwrite=True), log_path, progress=False)
    assert (out / "manifest.json").exists()
    # a file sdm did not write is never replaced, not even with overwrite
    (out / "old.txt").write_text("x")
    with pytest.raises(SdmError, match=r"holds 'old.txt', which `sdm sessionize` did not write"):
        run(SessionizeConfig(out=out, overwrite=True), log_path, progress=False)
    assert (out / "old.txt").exists() and (out / "manifest.json").exists()


def test_crash_midway_leaves_no_manifest(tmp_path, monkeypatch):
    log_path = write_log(log([(1, 1, at(0)), (1, 2, at(1))], sid=False), tmp_path / "log.parquet")
    out = tmp_path / "out"
    run(SessionizeConfig(out=out), log_path, progress=False)
    assert (out / "manifest.json").exists()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write_mod, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run(SessionizeConfig(out=out, overwrite=True), log_path, progress=False)
    assert not (out / "manifest.json").exists()


def test_progress_lines_on_stderr(tmp_path, capsys):
    log_path = write_log(log([(1, 1, at(0))], sid=False), tmp_path / "log.parquet")
    run(SessionizeConfig(out=tmp_path / "out"), log_path, progress=True)
    assert "[sessionize" in capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------


def _cfg(tmp_path: Path, **kw: Any) -> SessionizeConfig:
    return SessionizeConfig(out=tmp_path / "out", **kw)


def _good(tmp_path: Path) -> Path:
    return write_log(log([(1, 1, at(0)), (1, 2, at(1))]), tmp_path / "log.parquet")


def test_error_missing_file(tmp_path):
    with pytest.raises(SdmError, match=r"nope\.parquet: log file not found"):
        run(_cfg(tmp_path), tmp_path / "nope.parquet", progress=False)
    assert not (tmp_path / "out").exists()


def test_error_not_parquet(tmp_path):
    bad = tmp_path / "log.parquet"
    bad.write_text("this is not parquet\n")
    with pytest.raises(SdmError, match=r"log\.parquet: not a readable Parquet file"):
        run(_cfg(tmp_path), bad, progress=False)


def test_error_truncated_parquet(tmp_path):
    good = _good(tmp_path)
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SdmError, match=r"cut\.parquet"):
        run(_cfg(tmp_path), bad, progress=False)


def test_error_missing_required_column_names_found(tmp_path):
    df = pl.DataFrame({"user_id": [1], "product": [2], "timestamp": [at(0)]})
    with pytest.raises(SdmError, match=r"missing required column\(s\) item_id; found: user_id, product, timestamp"):
        run(_cfg(tmp_path), write_log(df, tmp_path / "l.parquet"), progress=False)


def test_error_no_user_and_no_session_column(tmp_path):
    df = pl.DataFrame({"item_id": [2], "timestamp": [at(0)]})
    with pytest.raises(SdmError, match=r"user_id \(or a session column session_id\); found: item_id, timestamp"):
        run(_cfg(tmp_path), write_log(df, tmp_path / "l.parquet"), progress=False)


def test_error_timestamp_string(tmp_path):
    df = pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": ["2024-01-01"]})
    with pytest.raises(SdmError, match=r"l\.parquet: column 'timestamp' holds strings such as '2024-01-01'.*--time-format"):
        run(_cfg(tmp_path), write_log(df, tmp_path / "l.parquet"), progress=False)


def test_error_integer_timestamp_without_unit(tmp_path):
    df = pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [1_700_000_000]})
    with pytest.raises(SdmError, match=r"column 'timestamp' is an integer.*--time-unit"):
        run(_cfg(tmp_path), write_log(df, tmp_path / "l.parquet"), progress=False)


def test_error_empty_log(tmp_path):
    df = log([]).clear()
    with pytest.raises(SdmError, match=r"l\.parquet: empty log"):
        run(_cfg(tmp_path), write_log(df, tmp_path / "l.parquet"), progress=False)


def test_error_items_table_without_key(tmp_path):
    items = write_log(pl.DataFrame({"sku": [1], "cat": ["a"]}), tmp_path / "items.parquet")
    with pytest.raises(SdmError, match=r"items\.parquet: items table has no key column 'item_id'; found: sku, cat"):
        run(_cfg(tmp_path, items=items, item_features=["cat"]), _good(tmp_path), progress=False)


def test_error_users_table_without_key(tmp_path):
    users = write_log(pl.DataFrame({"uid": [1], "age": [3]}), tmp_path / "users.parquet")
    with pytest.raises(SdmError, match=r"users\.parquet: users table has no key column 'user_id'; found: uid, age"):
        run(_cfg(tmp_path, users=users, user_features=["age"]), _good(tmp_path), progress=False)


def test_error_item_feature_nowhere(tmp_path):
    with pytest.raises(SdmError, match=r"item feature column 'brand' not found in the log .*log\.parquet"):
        run(_cfg(tmp_path, item_features=["brand"]), _good(tmp_path), progress=False)


def test_error_user_feature_nowhere(tmp_path):
    users = write_log(pl.DataFrame({"user_id": [1], "age": [3]}), tmp_path / "users.parquet")
    with pytest.raises(SdmError, match=r"users\.parquet: user feature column 'gender' not found; found: user_id, age"):
        run(_cfg(tmp_path, users=users, user_features=["gender"]), _good(tmp_path), progress=False)
    with pytest.raises(SdmError, match=r"user feature column 'gender' needs a users table"):
        run(_cfg(tmp_path, user_features=["gender"]), _good(tmp_path), progress=False)


def test_error_behaviors_without_behavior_column(tmp_path):
    with pytest.raises(SdmError, match=r"--behaviors given but the log has no behavior column 'behavior'"):
        run(_cfg(tmp_path, behaviors=["pv"]), _good(tmp_path), progress=False)


def test_error_all_rows_dropped(tmp_path):
    df = pl.DataFrame(
        {"user_id": [None, None], "item_id": [1, 2], "timestamp": [at(0), at(1)]}, schema_overrides={"user_id": pl.Int64}
    )
    with pytest.raises(SdmError, match=r"all 2 rows were dropped"):
        run(_cfg(tmp_path), write_log(df, tmp_path / "l.parquet"), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_input_leaves_old_output_untouched(tmp_path):
    out = tmp_path / "out"
    run(_cfg(tmp_path), _good(tmp_path), progress=False)
    with pytest.raises(SdmError):
        run(_cfg(tmp_path, overwrite=True, item_features=["nope"]), _good(tmp_path), progress=False)
    assert (out / "manifest.json").exists()


def test_keep_duplicates_keeps_exact_copies_as_events(tmp_path):
    df = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [7, 7, 8], "timestamp": [at(0), at(0), at(1)]})
    m, ss = go(tmp_path / "drop", df)
    assert m["dropped"]["duplicate"] == 1 and raw_items(tmp_path / "drop", ss) == [[7, 8]]
    m, ss = go(tmp_path / "keep", df, keep_duplicates=True)
    assert m["dropped"]["duplicate"] == 0 and m["rows_kept"] == 3
    assert raw_items(tmp_path / "keep", ss) == [[7, 7, 8]]


@pytest.mark.parametrize("dropped_first", [False, True])
def test_copies_differ_in_any_column_with_and_without_dropped_rows(tmp_path, dropped_first):
    """Rows equal on user, time and item but not on another column are not copies. With no
    dropped row the hash of the other columns is found by position, else by row number."""
    df = pl.DataFrame(
        {"user_id": [1, 1, 1, 1], "item_id": [7, 7, 7, 8], "timestamp": [at(0), at(0), at(0), at(1)], "price": [3, 4, 3, 5]}
    )
    if dropped_first:
        df = pl.concat([pl.DataFrame({"user_id": [None], "item_id": [9], "timestamp": [at(0)], "price": [1]}, schema=df.schema), df])
    m, ss = go(tmp_path, df)
    assert m["dropped"]["duplicate"] == 1 and m["dropped"]["null_user"] == int(dropped_first)
    assert raw_items(tmp_path, ss) == [[7, 7, 8]]


def test_oov_events_keep_a_distinct_identity_for_evaluation(tmp_path):
    df = pl.DataFrame(
        {"user_id": [1, 1, 1, 1, 1], "item_id": [5, 6, 8, 9, 8], "timestamp": [at(0), at(1), at(days=2), at(days=2, minutes=1), at(days=2, minutes=2)]}
    )
    go(tmp_path, df, test_start=at(days=1), valid_start=at(days=1))
    test = pl.read_parquet(next((tmp_path / "out" / "test").glob("*.parquet")))
    items, oov = test["seq_item"][0].to_list(), test["seq_oov"][0].to_list()
    assert items[-3:] == [1, 1, 1]  # 8, 9, 8: unknown to the training vocabulary
    assert oov[-3] == oov[-1] != oov[-2] and min(oov[-3:]) > 0
    train = pl.read_parquet(next((tmp_path / "out" / "train").glob("*.parquet")))
    assert set(train["seq_oov"].explode().to_list()) == {0}


def test_held_out_oov_targets_are_counted_and_a_high_share_warns(tmp_path):
    """Most test targets are items training never saw: the manifest counts them, sessionize and train warn."""
    from typer.testing import CliRunner

    from sdm.cli import app

    rows = []
    for u in range(6):  # training: items 1-3; test (the last day): new items 100+ after one known item
        rows += [(u, i, at(minutes=m, days=0)) for m, i in enumerate((1, 2, 3))]
        rows += [(u, i, at(minutes=m, days=5)) for m, i in enumerate((1, 100 + u, 200 + u))]
    log = write_log(pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row"), tmp_path / "log.parquet")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sessionize", str(log), "--out", str(out), "--test-days", "1", "--valid-days", "0", "-q"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["test"]["samples"] == 12 and m["splits"]["test"]["oov_samples"] == 12
    assert "oov_samples" not in m["splits"]["train"]
    assert any("100% of the test split's targets" in w for w in m["warnings"])
    assert "warning: 100% of the test split's targets" in r.output
