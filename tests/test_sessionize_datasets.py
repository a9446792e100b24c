"""Smoke runs of the sessionizer on each real dataset in ../shared/datasets.

The datasets are read in place (never copied into the repository). Set
SDM_SHARED to the folder holding `datasets/` to point elsewhere; a missing
dataset folder is a skip, with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sdm.config import SessionizeConfig
from sdm.names import vocab_file
from sdm.sessionize import run

SHARED = Path(os.environ.get("SDM_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATASETS = SHARED / "datasets"

# name -> (folder, log file, config overrides; items/users are file names in the folder)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # session_id + nullable user_id (anonymous rows are dropped as null_user); categories in items.parquet
    "diginetica": ("diginetica", "views_sample.parquet", {"items": "items.parquet", "item_features": ["category_id"]}),
    # no user column: each session id is its own user
    "yoochoose": ("yoochoose_rsc15_100k", "interactions.parquet", {}),
    "taobao_head": (
        "taobao_userbehavior",
        "user_histories_head.parquet",
        {"item_features": ["category_id"], "behaviors": ["pv", "cart", "fav", "buy"]},
    ),
    "taobao_slice": (
        "taobao_userbehavior",
        "time_slice.parquet",
        {"item_features": ["category_id"], "behaviors": ["pv", "buy"]},
    ),
    "movielens_100k": (
        "movielens_100k",
        "interactions.parquet",
        {
            "items": "items.parquet",
            "users": "users.parquet",
            "item_features": ["genres", "release_year"],
            "user_features": ["age", "gender", "occupation"],
        },
    ),
    "movielens_1m": (
        "movielens_1m_side_info",
        "interactions_sample.parquet",
        {
            "items": "items.parquet",
            "users": "users.parquet",
            "item_features": ["genres", "release_year"],
            "user_features": ["age", "gender", "occupation"],
        },
    ),
    # string session ids, side info in the log
    "rees46": ("rees46_ecommerce_sample", "interactions.parquet", {"item_features": ["category_id", "brand"]}),
    # naive timestamps; item/user tables with no overlap with the log (all features OOV)
    "sdm_jd": (
        "sdm_jd_sample",
        "interactions.parquet",
        {
            "items": "items.parquet",
            "users": "users.parquet",
            "item_features": ["brand_id", "shop_id", "category_id"],
            "user_features": ["age", "sex", "user_lv_cd"],
        },
    ),
    # OTTO "sessions" last weeks: use them as users and cut by the 10-minute gap
    "otto": ("otto_sample", "interactions.parquet", {"user_col": "session_id", "session_col": ""}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dataset_smoke(name: str, tmp_path: Path) -> None:
    folder, log_name, overrides = CASES[name]
    root = DATASETS / folder
    if not (root / log_name).exists():
        pytest.skip(f"dataset {root / log_name} absent (set SDM_SHARED to the folder holding datasets/)")
    opts = {k: (root / v if k in ("items", "users") else v) for k, v in overrides.items()}
    out = tmp_path / "out"
    m = run(SessionizeConfig(out=out, min_shards=2, **opts), root / log_name, progress=False)

    assert (out / "manifest.json").exists()
    assert m["rows_in"] == m["rows_kept"] + sum(m["dropped"].values())
    assert m["rows_in"] == pl.scan_parquet(root / log_name).select(pl.len()).collect().item()
    total = sum(m["splits"][s]["sessions"] for s in ("train", "valid", "test"))
    assert total > 0 and m["splits"]["train"]["sessions"] > 0
    assert sum(m["splits"][s]["events"] for s in ("train", "valid", "test")) == m["rows_kept"]
    assert m["item_features"] == ["item", *overrides.get("item_features", [])]
    for split in ("train", "valid", "test"):
        shards = m["splits"][split]["shards"]
        if not shards:
            continue
        df = pl.read_parquet([out / s["path"] for s in shards])
        assert df.height == m["splits"][split]["users"] == sum(s["rows"] for s in shards)
        lens = df["sess_len"].explode()
        assert lens.len() == m["splits"][split]["sessions"] and 1 <= lens.min() and lens.max() <= 50
        widths = (df["long_end"].explode() - df["long_start"].explode())
        assert widths.min() >= 0 and widths.max() <= 50
        # every slice lies inside its row's timeline, and timelines are sorted
        ends = df.select(
            (pl.col("sess_start").list.last() + pl.col("sess_len").list.last()).alias("e"),
            pl.col("ts").list.len().alias("n"),
        )
        assert (ends["e"] == ends["n"]).all()
        assert df.select(pl.col("ts").list.eval(pl.element().diff().fill_null(0).min()).list.first().min()).item() >= 0
    for f in m["item_features"] + m["user_features"]:
        assert (out / vocab_file(f)).exists()
