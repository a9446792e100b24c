"""`sdm synth`: determinism, shape, planted structure, chunked writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import SynthConfig
from sdm.errors import SdmError
from sdm.logs.synth import generate


def _gen(tmp: Path, name: str = "a", **kw) -> dict:
    cfg = SynthConfig(out=tmp / name / "logs.parquet", **{"events": 60_000, **kw})
    return generate(cfg, progress=False)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict]:
    tmp = tmp_path_factory.mktemp("synth")
    s = _gen(tmp, events=120_000, session_id_share=0.3)
    return pl.read_parquet(s["out"]), pl.read_parquet(s["items_path"]), pl.read_parquet(s["users_path"]), s


def test_same_seed_same_bytes(tmp_path):
    a, b = _gen(tmp_path, "a"), _gen(tmp_path, "b")
    for key in ("out", "items_path", "users_path"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
    c = _gen(tmp_path, "c", seed=1)
    assert Path(c["out"]).read_bytes() != Path(a["out"]).read_bytes()
    # the resolved configuration beside the log, as every command saves its own
    saved = SynthConfig.model_validate_json((tmp_path / "c" / "logs.config.json").read_text())
    assert saved.seed == 1 and saved.events == 60_000 and saved.out == tmp_path / "c" / "logs.parquet"
    # a file of that name it did not write is not replaced without --overwrite
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "logs.config.json").write_text("mine")
    with pytest.raises(SdmError, match="logs.config.json"):
        _gen(tmp_path, "d")
    assert (tmp_path / "d" / "logs.config.json").read_text() == "mine"


def test_schema_and_exact_count(log):
    df, items, users, s = log
    assert df.height == 120_000 == s["events"]
    assert df.schema == pl.Schema(
        {
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "timestamp": pl.Datetime("us", "UTC"),
            "session_id": pl.Int64,
            "behavior": pl.String,
        }
    )
    assert set(df["behavior"].unique()) == {"click", "cart", "buy"}
    assert sum(df.select(pl.col("user_id", "item_id", "timestamp").null_count()).row(0)) == 0
    # sorted by user, then time
    assert df["user_id"].is_sorted()
    steps = df.select(pl.col("timestamp").diff().over("user_id").alias("d"))["d"].drop_nulls()
    assert (steps >= pl.Series([0]).cast(pl.Duration("us"))).all()


def test_side_tables_join(log):
    df, items, users, _ = log
    assert items.columns == ["item_id", "category", "category_l1", "brand", "shop"]
    assert users.columns == ["user_id", "age", "gender", "life_stage"]
    assert df.join(items, on="item_id", how="anti").height == 0
    assert df.join(users, on="user_id", how="anti").height == 0
    assert users["user_id"].is_unique().all() and items["item_id"].is_unique().all()
    # each leaf category has one first-level category
    assert items.group_by("category").agg(pl.col("category_l1").n_unique())["category_l1"].max() == 1


def test_zipf_popularity_and_heavy_users(log):
    df, *_ = log
    counts = np.sort(df.group_by("item_id").len()["len"].to_numpy())[::-1]
    ranks = np.arange(1, len(counts) + 1)
    head = slice(10, 1000)  # log-log slope of rank-frequency over the head
    slope = np.polyfit(np.log(ranks[head]), np.log(counts[head]), 1)[0]
    assert -1.6 < slope < -0.4
    per_user = df.group_by("user_id").len()["len"]
    assert per_user.max() > 10 * per_user.median()


def _sessions(df: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Sessions by the 10-minute rule (what the sessionizer does)."""
    return (
        df.join(items, on="item_id")
        .sort("user_id", "timestamp")
        .with_columns(gap=pl.col("timestamp").diff().over("user_id"))
        .with_columns(sess=(pl.col("gap").is_null() | (pl.col("gap") >= pl.duration(minutes=10))).cum_sum())
    )


def test_session_shape(log):
    df, items, _, _ = log
    ev = _sessions(df, items)
    lens = ev.group_by("sess").len()["len"]
    assert 4.5 < lens.mean() < 8
    assert (lens > 50).sum() > 0
    within = ev.filter(pl.col("gap") < pl.duration(minutes=10))["gap"].dt.total_seconds()
    assert within.median() < 120
    starts = ev.filter(pl.col("gap") >= pl.duration(minutes=10))["gap"].dt.total_seconds()
    assert starts.median() > 3600  # between sessions: hours to days
    # an active user has an earlier session within 7 days for most sessions
    assert (starts < 7 * 86400).mean() > 0.7


def test_session_ids_on_configured_share(log):
    df, items, _, _ = log
    by_sid = df.filter(pl.col("session_id").is_not_null())
    n_sessions = df.select(pl.col("session_id").n_unique()).item() - 1
    with_id = _sessions(df, items).group_by("sess").agg(pl.col("session_id").is_not_null().any())
    share = with_id["session_id"].mean()
    assert 0.25 < share < 0.35
    assert n_sessions > 0 and by_sid.group_by("session_id").agg(pl.col("user_id").n_unique())["user_id"].max() == 1


def test_planted_structure(log):
    df, items, _, _ = log
    ev = _sessions(df, items).with_columns(
        prev_cat=pl.col("category").shift().over("sess"),
        prev_item=pl.col("item_id").shift().over("sess"),
    )
    pairs = ev.filter(pl.col("prev_cat").is_not_null())
    same_cat = (pairs["prev_cat"] == pairs["category"]).mean()
    share = df.join(items, on="item_id").group_by("category").len()["len"].to_numpy() / df.height
    chance = float((share**2).sum())
    assert same_cat > 0.5 and same_cat > 5 * chance
    # a fixed successor: the most frequent next item of an item is very frequent
    top_next = pairs.group_by("prev_item", "item_id").len().group_by("prev_item").agg(
        pl.col("len").max().alias("top"), pl.col("len").sum().alias("n")
    )
    busy = top_next.filter(pl.col("n") >= 20)
    assert (busy["top"] / busy["n"]).median() > 0.2
    # users come back to their brands: a user's top brand share far above its global share
    ub = df.join(items, on="item_id").group_by("user_id", "brand").len()
    top_share = ub.group_by("user_id").agg((pl.col("len").max() / pl.col("len").sum()).alias("s"), pl.col("len").sum().alias("n"))
    assert top_share.filter(pl.col("n") >= 30)["s"].median() > 0.1


def test_chunked_equals_single_chunk_in_distribution(tmp_path):
    one = _gen(tmp_path, "one", events=50_000)
    many = _gen(tmp_path, "many", events=50_000, chunk_events=7_000)
    assert many["chunks"] > 5 and one["chunks"] == 1
    a, b = pl.read_parquet(one["out"]), pl.read_parquet(many["out"])
    assert a.height == b.height == 50_000
    # per-user event counts are dealt out before chunking: identical
    assert a.group_by("user_id").len().sort("user_id").equals(b.group_by("user_id").len().sort("user_id"))
    assert pq.ParquetFile(many["out"]).num_row_groups == many["chunks"]
    for frame in (a, b):
        assert pl.read_parquet(Path(one["users_path"])).height == frame["user_id"].n_unique()
    # sessions are drawn per chunk stream: same distribution, not same draws
    assert abs(one["sessions"] - many["sessions"]) / one["sessions"] < 0.15
    assert abs(a["session_id"].null_count() - b["session_id"].null_count()) / a.height < 0.05


def test_refuses_existing_output(tmp_path):
    _gen(tmp_path, "a", events=2_000)
    with pytest.raises(SdmError, match="already exists"):
        _gen(tmp_path, "a", events=2_000)
    _gen(tmp_path, "a", events=2_000, overwrite=True)
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_config_validation():
    with pytest.raises(ValueError, match="must not exceed events"):
        SynthConfig(events=10, users=20)
    with pytest.raises(ValueError, match="--session-id-share"):
        SynthConfig(session_id_share=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        SynthConfig(events=0)


def test_cli(tmp_path):
    out = tmp_path / "s" / "logs.parquet"
    r = CliRunner().invoke(app, ["synth", "--events", "5000", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "generated 5,000 events" in r.output and out.exists()
    r = CliRunner().invoke(app, ["synth", "--events", "5000", "--out", str(out), "--quiet"])
    assert r.exit_code == 1 and "already exists" in r.output
