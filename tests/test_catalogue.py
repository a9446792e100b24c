"""catalogue.parquet: the cold items (outside the item vocabulary) of a hand-made log and items table.

The answers are worked out by hand in `LOG`'s comments: which items are cold,
from when, with which encoded side features, in which order; the hash is the
one the shards store in `seq_oov` at the item's OOV events; several buckets
give the one-bucket file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import at, us, vocab, write_log

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.manifest import check_data_dir
from sdm.sessionize import encode, run

VALID, TEST = at(days=5), at(days=10)

# (user, item, time, color); "color" is a log feature, "category" comes from the items table.
# Training (before day 5): items 10, 11, 12. color counts blue 2, red 2, green 1 -> blue 2, red 3, green 4.
LOG = [
    (1, 10, at(days=0), "red"),
    (1, 11, at(days=0, minutes=1), "blue"),
    (1, 12, at(days=0, minutes=2), "green"),
    (2, 10, at(days=1), "red"),
    (2, 11, at(days=1, minutes=1), "blue"),
    (3, 23, at(days=11), "red"),  # 23: first event by (time, input row) is this one -> red (3)
    (2, 23, at(days=11), "blue"),  # same time, later input row
    (2, 21, at(days=6), "purple"),  # 21: first event on day 6, a color training never saw -> 1
    (3, 21, at(days=12), "red"),
    (1, 20, at(days=11, minutes=5), "green"),  # 20 is in the items table: static, color green (4)
    (None, 22, at(days=2), "red"),  # 22 only in rows dropped as invalid: not in the catalogue
    (3, 22, None, "red"),
    (3, 23, at(days=13), "green"),
]
# category counts over training items: a = 10 (2) + 12 (1) = 3, b = 11 (2) -> a 2, b 3; c unseen -> 1
ITEMS = {"item_id": [10, 11, 12, 20, 30, 31], "category": ["a", "b", "a", "b", "c", "a"]}
NULL = None
# item -> (known_from, color, category)
EXPECTED = {
    20: (NULL, 4, 3),
    30: (NULL, 1, 1),  # no event: no color
    31: (NULL, 1, 2),
    21: (at(days=6), 1, 1),  # not in the items table: category 1
    23: (at(days=11), 3, 1),
}


def _log() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in LOG],
            "item_id": [r[1] for r in LOG],
            "timestamp": [r[2] for r in LOG],
            "color": [r[3] for r in LOG],
        },
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC"), "color": pl.String},
    )


def _run(tmp_path: Path, name: str, log: pl.DataFrame | None = None, items: bool = True, **kw: Any) -> tuple[dict, Path]:
    path = write_log(_log() if log is None else log, tmp_path / "log.parquet")
    table = write_log(pl.DataFrame(ITEMS), tmp_path / "items.parquet") if items else None
    feats = ["color", "category"] if items else ["color"]
    cfg = SessionizeConfig(
        out=tmp_path / name, items=table, item_features=feats, valid_start=VALID, test_start=TEST, min_shards=1, **kw
    )
    return run(cfg, path, progress=False), tmp_path / name


def test_cold_items_their_times_features_and_order(tmp_path):
    m, out = _run(tmp_path, "out")
    cat = pl.read_parquet(out / "catalogue.parquet")
    assert cat.columns == ["item_id", "oov_hash", "known_from", "color", "category"]
    assert cat.schema["item_id"] == pl.Int64 and cat.schema["oov_hash"] == pl.Int64
    assert cat.schema["known_from"] == pl.Datetime("us", "UTC")
    assert cat.schema["color"] == cat.schema["category"] == pl.Int32
    assert m["item_features"] == ["item", "color", "category"]
    assert vocab(out, "color") == {"blue": 2, "red": 3, "green": 4} and vocab(out, "category") == {"a": 2, "b": 3}
    got = {r["item_id"]: (r["known_from"], r["color"], r["category"]) for r in cat.iter_rows(named=True)}
    assert got == EXPECTED
    # static items first, by hash; then by known_from
    hashes = dict(zip(cat["item_id"].to_list(), cat["oov_hash"].to_list()))
    statics = sorted([20, 30, 31], key=hashes.get)
    assert cat["item_id"].to_list() == [*statics, 21, 23]
    assert m["catalogue"] == {"path": "catalogue.parquet", "items": 5}
    assert "catalogue.parquet" in m["files"]
    assert check_data_dir(out)["files"] == len(m["files"])


def test_oov_hash_is_the_shards_seq_oov(tmp_path):
    """Every OOV event of the shards carries its cold item's `oov_hash` in `seq_oov`."""
    _, out = _run(tmp_path, "out")
    cat = pl.read_parquet(out / "catalogue.parquet")
    hashes = dict(zip(cat["item_id"].to_list(), cat["oov_hash"].to_list()))
    item_at = {(str(u), us(t)): i for u, i, t, _ in LOG if u is not None and t is not None}
    seen = set()
    for path in sorted(out.glob("*/part-*.parquet")):
        for row in pl.read_parquet(path).iter_rows(named=True):
            for ts, idx, h in zip(row["ts"], row["seq_item"], row["seq_oov"]):
                if idx == 1:
                    item = item_at[(row["user_id"], ts)]
                    assert h == hashes[item], item
                    seen.add(item)
    assert seen == {20, 21, 23}
    assert hashes[30] == encode.oov_hash(pl.Series([30], dtype=pl.Int64))[0]


@pytest.mark.parametrize("buckets", [2, 3])
def test_buckets_give_the_one_bucket_catalogue(tmp_path, buckets):
    m1, one = _run(tmp_path, "b1")
    mn, many = _run(tmp_path, f"b{buckets}", buckets=buckets)
    assert pl.read_parquet(one / "catalogue.parquet").equals(pl.read_parquet(many / "catalogue.parquet"))
    assert mn["catalogue"] == m1["catalogue"]


def test_without_items_table_only_logged_items(tmp_path):
    _, out = _run(tmp_path, "out", items=False)
    cat = pl.read_parquet(out / "catalogue.parquet")
    assert cat.columns == ["item_id", "oov_hash", "known_from", "color"]
    # 20 is now cold from its first event (day 11, green)
    got = {r["item_id"]: (r["known_from"], r["color"]) for r in cat.iter_rows(named=True)}
    assert got == {21: (at(days=6), 1), 23: (at(days=11), 3), 20: (at(days=11, minutes=5), 4)}
    assert cat["item_id"].to_list() == [21, 23, 20]


def test_no_cold_item_is_an_empty_catalogue(tmp_path):
    """Everything in training and no items table: the file is still written, with no row."""
    log = _log().filter(pl.col("timestamp") < VALID, pl.col("user_id").is_not_null())
    path = write_log(log, tmp_path / "log.parquet")
    cfg = SessionizeConfig(out=tmp_path / "out", item_features=["color"], valid_fraction=0, test_fraction=0, min_shards=1)
    m = run(cfg, path, progress=False)
    cat = pl.read_parquet(tmp_path / "out" / "catalogue.parquet")
    assert cat.height == 0 and cat.columns == ["item_id", "oov_hash", "known_from", "color"]
    assert m["catalogue"] == {"path": "catalogue.parquet", "items": 0}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["catalogue"]["items"] == 0


def test_string_ids_and_a_feature_named_like_a_catalogue_column(tmp_path):
    log = _log().with_columns(pl.col("item_id").cast(pl.String))
    path = write_log(log, tmp_path / "log.parquet")
    cfg = SessionizeConfig(out=tmp_path / "out", item_features=["color"], valid_start=VALID, test_start=TEST, min_shards=1)
    run(cfg, path, progress=False)
    cat = pl.read_parquet(tmp_path / "out" / "catalogue.parquet")
    assert cat.schema["item_id"] == pl.String and cat["item_id"].to_list() == ["21", "23", "20"]
    assert cat["oov_hash"].to_list() == encode.oov_hash(pl.Series(["21", "23", "20"])).to_list()
    renamed = write_log(log.rename({"color": "known_from"}), tmp_path / "log2.parquet")
    with pytest.raises(SdmError, match="catalogue.parquet would hold two columns 'known_from'"):
        run(cfg.model_copy(update={"item_features": ["known_from"], "out": tmp_path / "o2"}), renamed, progress=False)
