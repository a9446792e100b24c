"""Bucketed, multi-process and multi-file sessionizing equal the one-bucket output.

Small random logs (ties, nulls, duplicates, session ids, item features, a users
table) through `run` with several bucket counts, through worker processes and
from a directory or glob of parts; the rebuilt sessions, windows, splits,
vocabularies, side tables and manifest totals must be identical to the
one-bucket run. The Ray engine's equality test is `test_sessionize_ray.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from conftest import read_sessions

from sdm.config import SessionizeConfig
from sdm.names import vocab_file
from sdm.errors import SdmError
from sdm.pipeline.dataset import SessionDataset
from sdm.sessionize import run, write


def _random_log(tmp_path: Path, seed: int, n: int = 600) -> tuple[Path, Path]:
    """A messy random log (string users, ties, nulls, duplicates) and a users table."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 40, n)
    minutes = np.sort(rng.choice([0, 0, 1, 9, 10, 11, 300, 3000, 10080], n).cumsum())
    items = rng.integers(0, 30, n).astype(object)
    items[rng.random(n) < 0.02] = None
    sid = rng.integers(0, 5, n).astype(object)
    sid[rng.random(n) < 0.5] = None
    df = pl.DataFrame(
        {
            "user_id": [f"u{u:02d}" if r > 0.01 else None for u, r in zip(users, rng.random(n))],
            "item_id": pl.Series(items.tolist(), dtype=pl.Int64),
            "timestamp": pl.Series((minutes * 60_000_000).tolist(), dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
            "session_id": pl.Series(sid.tolist(), dtype=pl.Int64),
            "category": pl.Series((rng.integers(0, 5, n)).tolist(), dtype=pl.Int64),
        }
    ).sample(fraction=1.0, shuffle=True, seed=seed)
    df = pl.concat([df, df.head(7)])  # exact duplicates
    log = tmp_path / "log.parquet"
    df.write_parquet(log)
    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": [f"u{u:02d}" for u in range(0, 40, 2)], "age": list(range(20))}).write_parquet(users)
    return log, users


def _cfg(out: Path, users: Path, **kw: Any) -> SessionizeConfig:
    base = dict(
        out=out, users=users, item_features=["category"], user_features=["age"],
        max_session_len=3, max_long_len=4, rows_per_shard=5, min_shards=4,
    )
    return SessionizeConfig(**{**base, **kw})


def _same_output(a: Path, b: Path, ma: dict[str, Any], mb: dict[str, Any]) -> None:
    assert read_sessions(a) == read_sessions(b)
    for name in ma["vocab_sizes"]:
        assert pl.read_parquet(a / vocab_file(name)).equals(pl.read_parquet(b / vocab_file(name)))
    for table in ("items.parquet", "users.parquet"):
        assert pl.read_parquet(a / table).equals(pl.read_parquet(b / table))
    for key in ("rows_in", "rows_kept", "dropped", "vocab_sizes", "cutoffs", "num_items", "side_tables", "warnings"):
        assert ma[key] == mb[key], key
    for split in ("train", "valid", "test"):
        for key in ("users", "sessions", "events", "samples"):
            assert ma["splits"][split][key] == mb["splits"][split][key], (split, key)


SPLITS = [{"valid_fraction": 0.2, "test_fraction": 0.25}, {"valid_days": 3, "test_days": 2}, {}]


@pytest.mark.parametrize("split", range(len(SPLITS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_buckets_equal_one_bucket(tmp_path, seed, split):
    log, users = _random_log(tmp_path, seed)
    one = run(_cfg(tmp_path / "b1", users, **SPLITS[split]), log, progress=False)
    assert one["dropped"]["duplicate"] >= 7 and one["dropped"]["null_user"] > 0
    for n in (2, 3, 7):
        m = run(_cfg(tmp_path / f"b{n}", users, buckets=n, **SPLITS[split]), log, progress=False)
        _same_output(tmp_path / "b1", tmp_path / f"b{n}", one, m)
        for s in m["splits"].values():
            # min_shards holds over all buckets together
            assert len(s["shards"]) >= min(4, s["users"])
            assert sum(x["rows"] for x in s["shards"]) == s["users"]
    assert not list(tmp_path.glob(".sdm-work-*")), "work directory left behind"


def test_workers_equal_one_process(tmp_path):
    log, users = _random_log(tmp_path, 2, n=300)
    one = run(_cfg(tmp_path / "b1", users), log, progress=False)
    m = run(_cfg(tmp_path / "w", users, buckets=3, workers=2), log, progress=False)
    _same_output(tmp_path / "b1", tmp_path / "w", one, m)


def test_directory_and_glob_inputs_equal_one_file(tmp_path):
    """A log given as a directory of Parquet parts, or as a glob, reads as the concatenated file."""
    log, users = _random_log(tmp_path, 3)
    one = run(_cfg(tmp_path / "b1", users), log, progress=False)
    df = pl.read_parquet(log)
    parts = tmp_path / "parts" / "day=1"
    parts.mkdir(parents=True)
    bounds = [0, 100, 350, df.height]
    for k in range(3):
        df.slice(bounds[k], bounds[k + 1] - bounds[k]).write_parquet(parts / f"part-{k}.parquet")
    (parts / "_SUCCESS").write_text("")  # marker files of a partitioned write are not parts
    m = run(_cfg(tmp_path / "dir", users, buckets=2), tmp_path / "parts", progress=False)
    _same_output(tmp_path / "b1", tmp_path / "dir", one, m)
    m = run(_cfg(tmp_path / "glob", users), tmp_path / "parts" / "*" / "part-*.parquet", progress=False)
    _same_output(tmp_path / "b1", tmp_path / "glob", one, m)
    with pytest.raises(SdmError, match="matches no file"):
        run(_cfg(tmp_path / "x", users), tmp_path / "parts" / "*.csv", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdmError, match="holds no .parquet or .csv"):
        run(_cfg(tmp_path / "x", users), tmp_path / "empty", progress=False)


def test_engine_config_validation(tmp_path):
    log, users = _random_log(tmp_path, 4, n=50)
    with pytest.raises(ValueError, match="local"):
        SessionizeConfig(engine="spark")
    with pytest.raises(SdmError, match="--ray-address 'x:1' is for --engine ray"):
        run(_cfg(tmp_path / "x", users, ray_address="x:1"), log, progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=">= 1"):
        SessionizeConfig(buckets=0)


def test_ray_engine_without_the_ray_package(tmp_path, monkeypatch):
    """Without the ray package --engine ray is one line naming the extra; nothing is written."""
    import sys

    log, users = _random_log(tmp_path, 4, n=50)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(SdmError, match=r"--engine ray needs Ray: pip install 'sdm\[ray\]'"):
        run(_cfg(tmp_path / "x", users, engine="ray"), log, progress=False)
    assert not (tmp_path / "x").exists()


def test_ray_engine_refuses_workers(tmp_path):
    pytest.importorskip("ray", reason="the --workers refusal is checked after Ray is found: needs the ray extra")
    log, users = _random_log(tmp_path, 4, n=50)
    with pytest.raises(SdmError, match="--workers is for the local engine"):
        run(_cfg(tmp_path / "x", users, engine="ray", workers=2), log, progress=False)
    assert not (tmp_path / "x").exists()


def test_allocate_shards_over_buckets():
    from sdm.sessionize.plan import allocate as _allocate

    # one bucket: the one-bucket rule
    assert _allocate([7], 2, 3) == [(0, 4)]
    assert _allocate([0, 0], 2, 3) == [(0, 0), (0, 0)]
    # min_shards over all buckets, never more shards than a bucket's rows
    got = _allocate([1, 9, 0], 100, 8)
    assert sum(c for _, c in got) >= 8 and got[0][1] <= 1 and got[2][1] == 0
    assert [f for f, _ in got] == [0, got[0][1], got[0][1] + got[1][1]]


def test_row_groups_bounded(tmp_path):
    rows = pl.DataFrame({"sess_len": [[1, 2]] * 20_000})
    shards = write.write_shards(tmp_path, "train", rows, 0, 1)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / shards[0]["path"]).metadata.num_row_groups == 3
    assert shards[0] == {"path": "train/part-00000.parquet", "rows": 20_000, "sessions": 40_000, "events": 60_000, "samples": 20_000}


def test_empty_buckets_equal_one_bucket(tmp_path):
    """More buckets than users: some buckets hold no row at all."""
    log, users = _random_log(tmp_path, 5, n=80)
    df = pl.read_parquet(log).with_columns(
        pl.when(pl.col("user_id").is_not_null()).then(pl.lit("u02")).otherwise(None).alias("user_id")
    )
    df.write_parquet(log)
    one = run(_cfg(tmp_path / "b1", users), log, progress=False)
    for n in (5, 9):
        m = run(_cfg(tmp_path / f"b{n}", users, buckets=n), log, progress=False)
        _same_output(tmp_path / "b1", tmp_path / f"b{n}", one, m)


def _new_items_late(log: Path) -> pl.DataFrame:
    """The log with odd items of its last fifth (valid/test) renamed to 30..59: ids training never saw."""
    df = pl.read_parquet(log)
    late = (pl.col("timestamp") > pl.col("timestamp").quantile(0.8)) & (pl.col("item_id") % 2 == 1)
    return df.with_columns(pl.when(late).then(pl.col("item_id") + 30).otherwise(pl.col("item_id")).alias("item_id"))


@pytest.mark.parametrize("buckets", [1, 3])
def test_items_table_feature_equals_the_same_feature_in_the_log(tmp_path, buckets):
    """A feature looked up per item from the items table gives what the same column in the log gives,
    OOV items included (items 31..39 have a row in the table, 41..59 not)."""
    log, users = _random_log(tmp_path, 8)
    df = _new_items_late(log).with_columns((pl.col("item_id") % 4).alias("category"))
    df.write_parquet(log)
    items = tmp_path / "items.parquet"
    # the table also lists items the log lacks, and misses item 0 (its events get OOV)
    pl.DataFrame({"item_id": list(range(1, 40)), "category": [i % 4 for i in range(1, 40)]}).write_parquet(items)
    bare = tmp_path / "bare.parquet"
    df.drop("category").write_parquet(bare)
    # items 0 and 40.. have no row in the table: in the log variant their category must be null too
    no_row = (pl.col("item_id") == 0) | (pl.col("item_id") >= 40)
    df.with_columns(pl.when(no_row).then(None).otherwise(pl.col("category")).alias("category")).write_parquet(log)
    in_log = run(_cfg(tmp_path / "log", users, buckets=buckets), log, progress=False)
    from_table = run(_cfg(tmp_path / "table", users, buckets=buckets, items=items), bare, progress=False)
    assert read_sessions(tmp_path / "log") == read_sessions(tmp_path / "table")
    for name in ("item", "category", "user"):
        a = pl.read_parquet(tmp_path / "log" / vocab_file(name))
        assert a.equals(pl.read_parquet(tmp_path / "table" / vocab_file(name))), name
    assert pl.read_parquet(tmp_path / "log" / "items.parquet").equals(pl.read_parquet(tmp_path / "table" / "items.parquet"))
    for key in ("rows_kept", "dropped", "vocab_sizes", "cutoffs"):
        assert in_log[key] == from_table[key], key
    # format 2 keeps the table feature out of the shards; the loader rebuilds the same arrays
    assert from_table["table_features"] == ["category"] and in_log["table_features"] == []
    shard = pl.read_parquet(tmp_path / "table" / "test" / "*.parquet")
    assert "seq_category" not in shard.columns and "oov_category" in shard.columns
    oov = shard.select(pl.col("seq_item").list.eval(pl.element() == 1).list.sum()).to_series().to_list()
    assert shard["oov_category"].list.len().to_list() == oov and sum(oov) > 0
    assert (shard["oov_category"].explode() > 1).any()  # an unseen item the table knows keeps its category
    for split in ("train", "valid", "test"):
        a = list(SessionDataset(tmp_path / "log", split, 64, shuffle=False))
        b = list(SessionDataset(tmp_path / "table", split, 64, shuffle=False))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            for side in ("seq", "long"):
                assert torch.equal(x[side]["category"], y[side]["category"]), (split, side)


def test_oov_feature_list_that_does_not_match_the_oov_events_is_a_damaged_shard(tmp_path):
    log, users = _random_log(tmp_path, 8)
    _new_items_late(log).drop("category").write_parquet(log)
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": list(range(40)), "category": [i % 4 for i in range(40)]}).write_parquet(items)
    m = run(_cfg(tmp_path / "out", users, items=items, min_shards=1), log, progress=False)
    path = tmp_path / "out" / m["splits"]["test"]["shards"][0]["path"]
    shard = pl.read_parquet(path)
    assert shard["oov_category"].list.len().sum() > 0
    shard.with_columns(pl.col("oov_category").list.head(0)).write_parquet(path)
    with pytest.raises(SdmError, match=r"damaged shard \(oov_category holds 0 values for \d+ OOV events\)"):
        list(SessionDataset(tmp_path / "out", "test", 64, shuffle=False, manifest=m))
    # an item index beyond items.parquet cannot be looked up: the same one-line error, not an IndexError
    shard.with_columns(pl.col("seq_item").list.eval(pl.element() + 10**6)).write_parquet(path)
    with pytest.raises(SdmError, match=r"damaged shard \(item index \d+ beyond the \d+ rows of items.parquet\)"):
        list(SessionDataset(tmp_path / "out", "test", 64, shuffle=False, manifest=m))
    bad = {**m, "table_features": ["colour"]}
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(SdmError, match="table_features must list side features of item_features"):
        SessionDataset(tmp_path / "out", "test", 64)


@pytest.mark.parametrize(
    "years, max_long, window_share, threads",
    [(1, 5, 50, 1), (1, 1, 50, 1), (1, 10**6, 50, 1), (9000, 5, 50, 1), (1, 5, 10**-6, 1), (1, 5, 50, 3), (1, 10**6, 50, 4)],
)
def test_long_window_bounds_against_brute_force(years, max_long, window_share, threads, monkeypatch):
    """`windows.long_windows` (a bounded binary search per session) against counting by hand: a
    window of a fiftieth of the span, the last 1 / 5 / all events, a span of 9000 years, and a
    window far wider than any time (clamped, not an int64 overflow). Times lie on a grid that the
    window is a multiple of, so events at exactly T - window (inside the window) are common.
    `threads` > 1: the sessions are searched in that many slices, one thread each."""
    from sdm.sessionize import sessions as S
    from sdm.sessionize import windows as W

    if threads > 1:
        monkeypatch.setattr(W, "SEARCH_SLICE", 10)
        monkeypatch.setattr(W.pl, "thread_pool_size", lambda: threads)
    from sdm.sessionize.columns import ROW, SID, TS, USER

    rng = np.random.default_rng(years + max_long)
    n = 3000
    span = years * 365 * 86_400_000_000
    ev = pl.DataFrame({
        ROW: np.arange(n, dtype=np.uint32),
        USER: rng.integers(0, 120, n),
        TS: rng.integers(0, 2000, n) * (span // 2000) - 10**15,
        SID: pl.Series([None] * n, dtype=pl.Int64),
    })
    ev = S.sort_events(ev)
    window = int(2000 / window_share) * (span // 2000)
    ev = S.sessionize(ev.lazy(), span // 400, 4).collect()
    table = W.long_windows(W.sessions_table(ev.lazy(), ev.height).collect(), ev, window, max_long)
    times = {u: g.get_column(TS).to_list() for (u,), g in ev.group_by(USER)}
    for row in table.iter_rows(named=True):
        t = times[row[USER]]
        end = sum(1 for x in t if x < row["start_ts"])
        start = max(sum(1 for x in t if x < row["start_ts"] - window), end - max_long)
        assert (row["long_start"], row["long_end"]) == (start, end)


@pytest.mark.parametrize("case", ["dense", "grows", "wide", "strings", "weighted"])
def test_tally_equals_a_group_by(case):
    """`vocab.Tally` (dense bincounts merged over parts, or group-bys) counts what one group-by counts."""
    from sdm.sessionize.vocab import Tally

    rng = np.random.default_rng(len(case))
    parts = {
        "dense": [rng.integers(100, 200, 500) for _ in range(3)],
        "grows": [rng.integers(1000, 1100, 300), rng.integers(-50, 10, 300), rng.integers(5000, 5200, 300)],
        "wide": [rng.integers(0, 100, 300), np.array([0, 10**15, 7])],
        "strings": [np.array(["a", "b", "a"]), np.array(["c", "a"])],
        "weighted": [rng.integers(0, 30, 200) for _ in range(2)],
    }[case]
    tally, frames = Tally(), []
    for k, values in enumerate(parts):
        s = pl.Series("v", values)
        if k == 0 and case != "strings":
            s = s.cast(pl.Int64).scatter([0, 1], [None, None])  # nulls are not counted
        w = pl.Series("w", rng.integers(1, 5, len(s)), dtype=pl.UInt32) if case == "weighted" else None
        tally.add(s, w)
        frames.append(pl.DataFrame({"raw": s, "count": w.cast(pl.Int64) if w is not None else pl.Series([1] * len(s), dtype=pl.Int64)}))
    want = pl.concat(frames).drop_nulls("raw").group_by("raw").agg(pl.col("count").sum()).sort("raw")
    got = tally.frame().sort("raw")
    assert got.get_column("raw").to_list() == want.get_column("raw").to_list()
    assert got.get_column("count").to_list() == want.get_column("count").to_list()


@pytest.mark.parametrize("case", ["inside", "oov_outside_range", "wide", "strings", "nulls", "big_uint", "empty"])
def test_encode_series_equals_a_dict_lookup(case):
    """`encode.encode_series` (one gather over a lookup array, or `encode`'s clipped gather or join)
    gives every value its vocabulary index, 1 for unknown or null values; `encode_events` adds the
    OOV hash of exactly the unknown events."""
    from sdm.sessionize.columns import ITEM
    from sdm.sessionize.encode import encode_events, encode_series

    rng = np.random.default_rng(len(case))
    vocab_raw, values = {
        "inside": (rng.permutation(np.arange(100, 300))[:150], rng.integers(100, 300, 400)),
        "oov_outside_range": (np.arange(100, 300), np.concatenate([rng.integers(100, 300, 50), [5, 900, -3]])),
        "wide": (np.array([0, 10**15, 7]), np.array([7, 10**15, 3, 0, 2 * 10**15])),
        "strings": (np.array(["a", "b", "c"]), np.array(["b", "z", "a", "a"])),
        "nulls": (np.arange(10), [1, None, 3, 42, None]),
        "big_uint": (np.array([2**63 + 5, 1], dtype=np.uint64), np.array([1, 2**63 + 5, 3], dtype=np.uint64)),
        "empty": (np.arange(5), np.array([], dtype=np.int64)),
    }[case]
    vocab = pl.DataFrame({"raw": pl.Series(vocab_raw), "index": pl.Series(range(2, len(vocab_raw) + 2), dtype=pl.Int32)})
    series = pl.Series(ITEM, values, dtype=None if case != "empty" else pl.Int64)
    want = [dict(zip(vocab["raw"].to_list(), vocab["index"].to_list())).get(v, 1) for v in series.to_list()]
    got = encode_series(series, vocab)
    assert got.dtype == pl.Int32 and got.to_list() == want
    enc = encode_events(series.to_frame(), {"item": vocab}, [])
    assert enc.columns == ["seq_item", "seq_oov"] and enc["seq_item"].to_list() == want
    oov = enc["seq_oov"].to_list()
    assert all((o == 0) == (w != 1) for o, w in zip(oov, want))
    hashed = (series.hash(7) // 4).cast(pl.Int64) + 1
    assert all(o == h for o, h, w in zip(oov, hashed.to_list(), want) if w == 1)


def test_narrowed_sort_equals_plain_sort(tmp_path, monkeypatch):
    """Large buckets sort ids narrowed to 32-bit offsets (`normalise._narrow`): same output as the plain sort."""
    from sdm.sessionize import normalise

    log, users = _random_log(tmp_path, 9)
    df = pl.read_parquet(log).with_columns(
        (pl.col("item_id") + 10**12).alias("item_id"),  # 64-bit ids with a small range: narrowed
        pl.col("user_id").str.slice(1).cast(pl.Int64).alias("user_id"),
    )
    df.write_parquet(log)
    plain = run(_cfg(tmp_path / "plain", None, user_features=[]), log, progress=False)
    monkeypatch.setattr(normalise, "NARROW_ROWS", 0)
    calls = []
    real = normalise._narrow
    monkeypatch.setattr(normalise, "_narrow", lambda cols, names: calls.append(1) or real(cols, names))
    narrow = run(_cfg(tmp_path / "narrow", None, user_features=[]), log, progress=False)
    assert calls, "the narrowed path did not run"
    _same_output(tmp_path / "plain", tmp_path / "narrow", plain, narrow)


def test_sort_events_orders_by_user_time_input_row_from_any_order():
    """Rows handed over out of input order (a reader's choice) still tie-break by ROW."""
    from sdm.sessionize.columns import ROW, TS, USER
    from sdm.sessionize.sessions import sort_events

    rng = np.random.default_rng(3)
    n = 2000
    df = pl.DataFrame({
        ROW: np.arange(n, dtype=np.uint32), USER: rng.integers(0, 20, n), TS: rng.integers(0, 30, n),
    })
    want = df.sort([USER, TS, ROW])
    for frame in (df, df.sample(fraction=1.0, shuffle=True, seed=1), df.sort(TS, maintain_order=True)):
        assert sort_events(frame).equals(want)


def test_sort_events_keeps_ties_in_input_order_across_chunks():
    """The streaming engine sorts a frame of many chunks in parallel: a million rows in 40 chunks,
    20 users and 50 times (every (user, time) holds about a thousand tied rows, spread over the
    chunks) come out exactly in (user, time, input row) order, in time order or not. (Polars 2.1
    keeps tied rows in order here even without `maintain_order`: this guards the chunked, parallel
    sort, not the flag. It fails when the tied rows are reversed before the user sort.)"""
    from sdm.sessionize.columns import ROW, SID, TS, USER
    from sdm.sessionize.sessions import sort_events

    rng = np.random.default_rng(4)
    n, parts = 1_000_000, 40
    df = pl.DataFrame({
        ROW: np.arange(n, dtype=np.uint32), USER: rng.integers(0, 20, n), TS: rng.integers(0, 50, n),
        SID: rng.integers(0, 1000, n),
    })
    want = df.sort([USER, TS, ROW])
    for frame in (df, df.sort(TS, maintain_order=True)):
        chunked = pl.concat([frame.slice(i * n // parts, n // parts) for i in range(parts)], rechunk=False)
        assert chunked.n_chunks() == parts
        assert sort_events(chunked).equals(want)


def test_uint64_ids_near_the_top_equal_the_same_ids_shifted_down(tmp_path):
    """Ids of 2^63 and above skip the int64 fast paths (bincount, lookup array) and encode as smaller ids do."""
    log, _ = _random_log(tmp_path, 10)
    df = pl.read_parquet(log).drop_nulls(["user_id", "item_id"])
    top = df.with_columns(
        (pl.lit(2**64 - 100, dtype=pl.UInt64) + pl.col("item_id").cast(pl.UInt64)).alias("item_id"),
        (pl.lit(2**64 - 100, dtype=pl.UInt64) + pl.col("user_id").str.slice(1).cast(pl.UInt64)).alias("user_id"),
    )
    low = df.with_columns(
        (pl.lit(10**6) + pl.col("item_id")).alias("item_id"),
        (pl.lit(10**6) + pl.col("user_id").str.slice(1).cast(pl.Int64)).alias("user_id"),
    )
    top.write_parquet(tmp_path / "top.parquet")
    low.write_parquet(tmp_path / "low.parquet")
    kw = dict(user_features=[], item_features=["category"])
    for buckets in (1, 2):
        a = run(_cfg(tmp_path / f"top{buckets}", None, buckets=buckets, **kw), tmp_path / "top.parquet", progress=False)
        b = run(_cfg(tmp_path / f"low{buckets}", None, buckets=buckets, **kw), tmp_path / "low.parquet", progress=False)
        assert a["vocab_sizes"] == b["vocab_sizes"] and a["splits"]["train"]["events"] == b["splits"]["train"]["events"]
        sa = [{k: v for k, v in s.items() if k != "user_id"} for s in read_sessions(tmp_path / f"top{buckets}")]
        sb = [{k: v for k, v in s.items() if k != "user_id"} for s in read_sessions(tmp_path / f"low{buckets}")]
        assert sa == sb
        raw = pl.read_parquet(tmp_path / f"top{buckets}" / "vocab" / "item.parquet").get_column("raw")
        assert raw.dtype == pl.UInt64 and int(raw.min()) >= 2**64 - 100


def test_items_table_key_wider_than_the_log_key_is_no_error(tmp_path):
    """An items-table id the log's (narrower) type cannot hold matches no event; it does not stop the run."""
    log = tmp_path / "log.parquet"
    n = 30
    pl.DataFrame({
        "user_id": [i % 3 for i in range(n)], "item_id": pl.Series([i % 5 for i in range(n)], dtype=pl.Int32),
        "timestamp": pl.Series([i * 60_000_000 for i in range(n)]).cast(pl.Datetime("us", "UTC")),
    }).write_parquet(log)
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [0, 1, 2, 2**40], "category": [7, 8, 9, 10]}).write_parquet(items)
    m = run(SessionizeConfig(out=tmp_path / "o", items=items, item_features=["category"]), log, progress=False)
    table = pl.read_parquet(tmp_path / "o" / "items.parquet")
    cats = pl.read_parquet(tmp_path / "o" / "vocab" / "category.parquet").get_column("raw").to_list()
    assert m["rows_kept"] == n and 10 not in cats and set(cats) <= {7, 8, 9}
    assert table.filter(pl.col("item_id") == 3).get_column("category").to_list() == [1]  # not in the table: OOV


def test_default_buckets_follow_bucket_events(tmp_path):
    """Unset --buckets: ceil(rows / bucket_events) buckets (Parquet and CSV), saved in the config; same output."""
    log, users = _random_log(tmp_path, 11)
    rows = pl.read_parquet(log).height
    one = run(_cfg(tmp_path / "one", users), log, progress=False)
    assert one["config"]["buckets"] == 1  # a small log: one bucket by default
    m = run(_cfg(tmp_path / "auto", users, bucket_events=100), log, progress=False)
    assert m["config"]["buckets"] == -(-rows // 100) > 1
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["buckets"] == m["config"]["buckets"]
    _same_output(tmp_path / "one", tmp_path / "auto", one, m)
    csv = tmp_path / "log.csv"
    pl.read_parquet(log).with_columns(pl.col("timestamp").dt.epoch("s")).write_csv(csv)
    c = run(_cfg(tmp_path / "csv", users, bucket_events=250, time_unit="s"), csv, progress=False)
    assert c["config"]["buckets"] == -(-rows // 250)
    with pytest.raises(ValueError, match=">= 1"):
        SessionizeConfig(bucket_events=0)


def _rows_by_hand(sessions: pl.DataFrame) -> list[dict[str, Any]]:
    """`windows.rows_table` in plain Python: group by (split, user) in session order."""
    from sdm.sessionize.columns import USER
    from sdm.sessionize.split import SPLIT

    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for s in sorted(sessions.iter_rows(named=True), key=lambda s: (s[SPLIT], s["sess_id"])):
        groups.setdefault((s[SPLIT], s[USER]), []).append(s)
    out = []
    for (split, user), ss in groups.items():
        lo = min(s["long_start"] for s in ss)
        out.append({
            USER: user, SPLIT: split, "sess_id": [s["sess_id"] for s in ss],
            "sess_start": [s["start_idx"] - lo for s in ss], "sess_len": [s["len"] for s in ss],
            "long_start": [s["long_start"] - lo for s in ss], "long_end": [s["long_end"] - lo for s in ss],
            "row_start": lo, "row_end": max(s["start_idx"] + s["len"] for s in ss), "_base": ss[0]["_base"],
        })
    return out


def _sessions_frame(rows: list[tuple[int, ...]]) -> pl.DataFrame:
    """Sessions as `long_windows` leaves them: (sess_id, user, base, start_idx, len, long_start, long_end, split)."""
    cols = ["sess_id", "_user", "_base", "start_idx", "len", "long_start", "long_end", "_split"]
    df = pl.DataFrame(rows, schema=cols, orient="row")
    return df.with_columns(
        pl.col("_base").cast(pl.UInt32), pl.col("start_idx").cast(pl.Int32), pl.col("len").cast(pl.UInt32),
        pl.col("long_end").cast(pl.Int32), pl.col("_split").cast(pl.Int8),
    )


def test_rows_table_by_hand_and_against_a_reference():
    """Rows of (user, split), split by split; offsets relative to the earliest long-term start."""
    from sdm.sessionize import windows as W

    # user 7: sessions at timeline offsets 0 (train), 3 (train, window from 1), 6 (test, window 2..6);
    # user 9 (frame position 10): one valid session at 0
    sessions = _sessions_frame([
        (0, 7, 0, 0, 3, 0, 0, 0), (1, 7, 0, 3, 2, 1, 3, 0), (2, 7, 0, 6, 1, 2, 6, 2), (3, 9, 10, 0, 4, 0, 0, 1),
    ])
    rows = W.rows_table(sessions)
    assert rows.to_dicts() == [
        {"_user": 7, "_split": 0, "sess_id": [0, 1], "sess_start": [0, 3], "sess_len": [3, 2], "long_start": [0, 1],
         "long_end": [0, 3], "row_start": 0, "row_end": 5, "_base": 0},
        {"_user": 9, "_split": 1, "sess_id": [3], "sess_start": [0], "sess_len": [4], "long_start": [0],
         "long_end": [0], "row_start": 0, "row_end": 4, "_base": 10},
        {"_user": 7, "_split": 2, "sess_id": [2], "sess_start": [4], "sess_len": [1], "long_start": [0],
         "long_end": [4], "row_start": 2, "row_end": 7, "_base": 0},
    ]
    assert rows.schema["sess_start"] == pl.List(pl.Int32) and rows.schema["sess_id"] == pl.List(pl.Int64)

    rng = np.random.default_rng(3)
    rand, sess, base = [], 0, 0
    for user in range(30):
        at = 0
        for _ in range(int(rng.integers(1, 6))):
            length = int(rng.integers(1, 4))
            end = at
            start = max(0, end - int(rng.integers(0, 5)))
            rand.append((sess, user * 3, base, at, length, start, end, int(rng.integers(0, 3))))
            sess, at = sess + 1, at + length
        base += at
    got = W.rows_table(_sessions_frame(rand))
    assert got.to_dicts() == _rows_by_hand(_sessions_frame(rand))
    # shuffled input: the same rows (sessions are put back in sess order)
    assert W.rows_table(_sessions_frame(rand).sample(fraction=1.0, shuffle=True, seed=1)).equals(got)
    empty = W.rows_table(_sessions_frame(rand).clear())
    assert empty.height == 0 and empty.schema == got.schema


@pytest.mark.parametrize(("given", "buckets", "want"), [
    (None, None, "dirty_decay_ms:5000"),   # default bucket count: freed pages kept 5 s
    (None, "1", None),                     # an explicit bucket count keeps polars' own setting
    (None, "3", None),
    ("dirty_decay_ms:1000", None, "dirty_decay_ms:1000"),  # the user's setting wins
])
def test_sessionize_cli_sets_the_allocator_before_polars_loads(tmp_path, given, buckets, want):
    """`sdm sessionize` sets `_RJEM_MALLOC_CONF` before polars is imported (polars appends it to
    its own defaults when it loads, so the last value wins), only with the default bucket count."""
    import os
    import subprocess
    import sys

    log, _ = _random_log(tmp_path, 3)
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    if given is not None:
        env["_RJEM_MALLOC_CONF"] = given
    args = ["sdm", "sessionize", str(log), "--out", str(tmp_path / "out"), "--quiet"] + (["--buckets", buckets] if buckets else [])
    code = (
        "import os, sys, atexit\n"
        "atexit.register(lambda: print('CONF=' + os.environ.get('_RJEM_MALLOC_CONF', ''), file=sys.stderr))\n"
        f"sys.argv = {args!r}\n"
        "from sdm.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    conf = next(line for line in proc.stderr.splitlines() if line.startswith("CONF="))[5:]
    assert conf.startswith("dirty_decay_ms:500,")  # polars loaded and wrote its defaults first
    if want is None:
        assert "dirty_decay_ms:5000" not in conf
    else:
        assert conf.endswith("," + want)


def test_positions_finds_every_key_and_refuses_a_missing_one():
    """`plan.positions`: binary search in sorted distinct keys, one line naming the table when a value is missing."""
    from sdm.sessionize.plan import positions

    keys = pl.Series(["a", "c", "d", "k"])
    assert positions(keys, pl.Series(["d", "a", "k", "k"]), "the users table").to_list() == [2, 0, 3, 3]
    assert positions(keys, pl.Series([], dtype=pl.String), "the users table").to_list() == []
    for missing in (["b"], ["z"], ["a", "e"]):
        with pytest.raises(SdmError, match="^the users table: not every user"):
            positions(keys, pl.Series(missing), "the users table")
