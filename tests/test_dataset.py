"""Streaming dataset: shard assignment, exactly-once delivery, sample contents."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from shard_builder import build_shards
from torch.utils.data import DataLoader

from sdm.errors import SdmError
from sdm.pipeline.dataset import SessionDataset, assign_shards, read_manifest
from sdm.pipeline.tables import load_item_table


@pytest.fixture()
def shards(tmp_path):
    return build_shards(tmp_path / "data", n_users=12, n_shards=4)


def expected_sessions(root, split="train"):
    """sess_id -> item list of every session with >= 2 events, read naively from the shards."""
    out = {}
    for shard in read_manifest(root)["splits"][split]["shards"]:
        for row in pq.read_table(root / shard["path"]).to_pylist():
            for sid, start, n in zip(row["sess_id"], row["sess_start"], row["sess_len"], strict=True):
                if n >= 2:
                    out[sid] = row["seq_item"][start : start + n]
    return out


@pytest.mark.parametrize("num_shards", [4, 7, 16])
def test_assign_shards_partitions_every_epoch(num_shards):
    for world, workers, epoch in itertools.product([1, 2, 3], [0, 1, 2], [0, 1, 5]):
        if num_shards < world * max(workers, 1):
            continue
        seen = [
            s
            for rank in range(world)
            for w in range(max(workers, 1))
            for s in assign_shards(num_shards, rank, world, w, workers, seed=3, epoch=epoch)
        ]
        assert sorted(seen) == list(range(num_shards))


def test_assign_shards_is_pure_and_epoch_dependent():
    a = assign_shards(16, 0, 2, 1, 2, seed=1, epoch=0)
    assert a == assign_shards(16, 0, 2, 1, 2, seed=1, epoch=0)
    orders = {tuple(assign_shards(16, 0, 1, 0, 0, seed=1, epoch=e)) for e in range(5)}
    assert len(orders) > 1
    assert assign_shards(5, 0, 1, 0, 0, seed=1, epoch=0, shuffle=False) == [0, 1, 2, 3, 4]


def test_assign_shards_rejects_too_few_shards():
    with pytest.raises(ValueError, match="3 shards for 2 rank"):
        assign_shards(3, 0, 2, 0, 2, seed=0, epoch=0)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_session_exactly_once(shards, world, workers):
    want = expected_sessions(shards)
    got = Counter()
    for rank in range(world):
        ds = SessionDataset(shards, "train", batch_size=3, shuffle_buffer=4, seed=7, rank=rank, world_size=world)
        ds.set_epoch(1)
        for batch in DataLoader(ds, batch_size=None, num_workers=workers):
            for sid, row, n in zip(batch["sess_id"].tolist(), batch["seq"]["item"], batch["seq_len"].tolist()):
                got[sid] += 1
                assert row[:n].tolist() == want[sid]
                assert (row[n:] == 0).all()
    assert set(got) == set(want)
    assert max(got.values()) == 1


def test_shuffle_depends_on_epoch_and_is_reproducible(shards):
    def order(epoch):
        ds = SessionDataset(shards, "train", batch_size=4, shuffle_buffer=8, seed=0)
        ds.set_epoch(epoch)
        return [s for b in ds for s in b["sess_id"].tolist()]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_long_term_window_and_profile(shards):
    ds = SessionDataset(shards, "valid", batch_size=100, shuffle=False)
    rows = {}
    for shard in read_manifest(shards)["splits"]["valid"]["shards"]:
        for row in pq.read_table(shards / shard["path"]).to_pylist():
            for sid, a, b in zip(row["sess_id"], row["long_start"], row["long_end"], strict=True):
                rows[sid] = (row["seq_item"][a:b], row["seq_category"][a:b], row["user_age"], row["user_id"])
    n = 0
    for batch in ds:
        for i, sid in enumerate(batch["sess_id"].tolist()):
            items, cats, age, uid = rows[sid]
            L = int(batch["long_len"][i])
            assert batch["long"]["item"][i, :L].tolist() == items[-5:]
            assert batch["long"]["category"][i, :L].tolist() == cats[-5:]
            assert int(batch["user"]["age"][i]) == age
            assert batch["user_id"][i] == uid
            n += 1
    assert n > 0


def test_batches_are_trimmed_to_longest_session(shards):
    for batch in SessionDataset(shards, "train", batch_size=5, shuffle=False):
        assert batch["seq"]["item"].shape[1] == int(batch["seq_len"].max())
        assert batch["seq"]["item"].dtype == torch.int64


def test_item_table(shards):
    m = read_manifest(shards)
    table = load_item_table(shards, m)
    assert table.shape == (22, 2)
    assert table[0].tolist() == [0, 0] and table[1].tolist() == [1, 1]
    assert table[5].tolist() == [5, 2 + 5 % 3]


def test_manifest_errors(tmp_path, shards):
    with pytest.raises(SdmError, match="data directory not found"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SdmError, match="no manifest"):
        read_manifest(tmp_path / "empty")
    m = json.loads((shards / "manifest.json").read_text())
    m["version"] = 99
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SdmError, match="unsupported version 99, expected one of 1, 2"):
        read_manifest(shards)
