"""`sdm recommend`: the list for a session equals `sdm evaluate --dump-topk`'s for the same query.

A small `sdm synth` log is sessionized (sessions cut at 8 events, so cut chunks
and long-term windows both occur), an untrained model is checkpointed (random
weights give the same equality as trained ones), and for test queries the log
is cut just before the query's target with `--at`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from conftest import read_sessions
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import EvaluateConfig, RecommendConfig, SessionizeConfig, SynthConfig, TrainConfig
from sdm.errors import SdmError
from sdm.model.sdm import SDM
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.evaluate import evaluate
from sdm.logs.synth import generate
from sdm.pipeline.modelspec import build_model_config
from sdm.pipeline.tables import load_item_table
from sdm.serve.recommend import recommend
from sdm.sessionize import run as sessionize

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def build_pipeline(root: Path, seed: int = 3) -> dict[str, Any]:
    """synth -> sessionize -> an untrained checkpoint; returns the paths."""
    log = root / "synth" / "logs.parquet"
    generate(SynthConfig(out=log, events=5000, seed=seed), progress=False)
    data = root / "data"
    sessionize(
        SessionizeConfig(
            out=data, items=log.parent / "items.parquet", users=log.parent / "users.parquet",
            item_features=["category", "brand"], user_features=["age", "gender"], max_session_len=8,
            test_fraction=0.2, valid_fraction=0.1,
        ),
        log,
        progress=False,
    )  # fmt: skip
    manifest = read_manifest(data)
    model_cfg = build_model_config(TrainConfig(data=data, embedding_dim=16), manifest)
    torch.manual_seed(seed)
    model = SDM(model_cfg, load_item_table(data, manifest, list(model_cfg.item_vocab))).eval()
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(
        {"model": model.state_dict(), "model_config": model_cfg.model_dump(mode="json"),
         "data_fingerprint": manifest["fingerprint"], "config": {"variant": model_cfg.variant}, "step": 0, "epoch": 0},
        model_dir / "best.pt",
    )  # fmt: skip
    return {"root": root, "log": log, "data": data, "model": model_dir, "manifest": manifest}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_pipeline(tmp_path_factory.mktemp("recommend"))


def cut_queries(data: Path, n: int) -> list[dict[str, Any]]:
    """Test queries whose target is strictly later than the event before it (so `--at` can cut there).

    Spread over sessions: some with a long-term window, some in a cut chunk (not the first).
    """
    out = []
    for s in read_sessions(data):
        if s["split"] != "test" or len(s["ts"]) < 2:
            continue
        ok = [t for t in range(2, len(s["ts"]) + 1) if s["ts"][t - 1] > s["ts"][t - 2]]
        if ok:  # the latest position: the longest prefix
            out.append({**s, "t": ok[-1], "at_us": s["ts"][ok[-1] - 1], "start_us": s["ts"][0]})
    with_long = [q for q in out if q["long_ts"]]
    rest = [q for q in out if not q["long_ts"]]
    picked = with_long[: n - n // 3] + rest[: n // 3]
    assert len(with_long) >= 3, "the fixture log should give long-term windows"
    return picked


def to_dt(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def test_recommend_equals_evaluate_dump_topk(pipe: dict[str, Any], tmp_path: Path) -> None:
    k = 20
    evaluate(EvaluateConfig(data=pipe["data"], model=pipe["model"], out=tmp_path / "eval", k=[k], dump_topk=True,
                            device="cpu"))  # fmt: skip
    dump = pl.read_parquet(tmp_path / "eval" / "topk.parquet")
    queries = cut_queries(pipe["data"], 9)
    assert max(q["t"] for q in queries) >= 6
    for q in queries:
        row = dump.filter(
            (pl.col("user_id") == q["user_id"])
            & (pl.col("session_start") == to_dt(q["start_us"]))
            & (pl.col("position") == q["t"])
        )
        assert row.height == 1, (q["user_id"], q["t"])
        out = tmp_path / f"recs_{q['sess_id']}.parquet"
        cfg = RecommendConfig(data=pipe["data"], model=pipe["model"], out=out, at=to_dt(q["at_us"]), k=k, device="cpu")
        recommend(cfg, pipe["log"])
        recs = pl.read_parquet(out).filter(pl.col("user_id").cast(pl.String) == q["user_id"])
        assert recs.height == 1
        assert recs["session_start"][0] == to_dt(q["start_us"])
        assert recs["items"][0].to_list() == row["topk"][0].to_list(), (q["user_id"], q["t"])
        scores = recs["scores"][0].to_list()
        assert scores == sorted(scores, reverse=True) and len(scores) == k


def test_every_user_once_and_buckets_agree(pipe: dict[str, Any], tmp_path: Path) -> None:
    one = tmp_path / "one.parquet"
    many = tmp_path / "many.parquet"
    base = dict(data=pipe["data"], model=pipe["model"], k=10, device="cpu")
    s1 = recommend(RecommendConfig(**base, out=one), pipe["log"])
    s4 = recommend(RecommendConfig(**base, out=many, bucket_events=1500, batch_size=7), pipe["log"])
    assert s1["buckets"] == 1 and s4["buckets"] == 4
    a = pl.read_parquet(one).sort("user_id")
    b = pl.read_parquet(many).sort("user_id")
    users = pl.read_parquet(pipe["log"])["user_id"].unique().sort()
    assert a["user_id"].to_list() == users.to_list() == b["user_id"].to_list()
    assert a["items"].to_list() == b["items"].to_list()
    assert a.schema["user_id"] == pl.Int64  # the log's own type
    assert not list(tmp_path.glob(".sdm-tmp-*"))  # the temporary output and the bucket split are cleaned up


def test_exclude_seen_and_faiss_agree_with_exact(pipe: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    base = dict(data=pipe["data"], model=pipe["model"], k=15, device="cpu", exclude_seen=True)
    exact = tmp_path / "exact.parquet"
    approx = tmp_path / "faiss.parquet"
    recommend(RecommendConfig(**base, out=exact), pipe["log"])
    recommend(RecommendConfig(**base, out=approx, index="faiss"), pipe["log"])
    a = pl.read_parquet(exact).sort("user_id")
    b = pl.read_parquet(approx).sort("user_id")
    # The catalogue is small, so the faiss index is exact (flat) and `retrieval.rank.rank`
    # (index top-K merged with the repeat head's candidates) must equal the evaluate path.
    assert a["items"].to_list() == b["items"].to_list()
    for sa, sb in zip(a["scores"].to_list(), b["scores"].to_list()):
        assert max(abs(x - y) for x, y in zip(sa, sb)) < 1e-4
    # exclude_seen: no item of the user's latest session comes back
    last = read_latest_items(pipe["data"], a)
    for user, items in zip(a["user_id"].to_list(), a["items"].to_list()):
        assert not set(items) & last[user]


def read_latest_items(data: Path, recs: pl.DataFrame) -> dict[Any, set[Any]]:
    """Raw items of each user's latest session, from the shards (all splits)."""
    vocab = pl.read_parquet(data / "vocab" / "item.parquet")
    raw = dict(zip(vocab["index"].to_list(), vocab["raw"].to_list()))
    latest: dict[str, dict[str, Any]] = {}
    for s in read_sessions(data):
        if s["user_id"] not in latest or s["ts"][0] >= latest[s["user_id"]]["ts"][0]:
            latest[s["user_id"]] = s
    return {int(u): {raw.get(i) for i in s["items"]} for u, s in latest.items()}


def test_cli_good_and_bad(pipe: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "recs.parquet"
    args = ["recommend", str(pipe["log"]), "--data", str(pipe["data"]), "--model", str(pipe["model"]), "--out", str(out)]
    ok = runner.invoke(app, [*args, "--k", "5", "--device", "cpu", "-q"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("recommended 5 items to 100 users") or "recommended 5 items to" in ok.output
    assert json.loads(out.with_name("recs.config.json").read_text())["k"] == 5
    assert "--exclude-seen" in runner.invoke(app, ["recommend", "--help"]).output

    def one_line(result: Any, needle: str) -> None:
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output

    one_line(runner.invoke(app, [*args, "-q"]), "pass --overwrite to replace it")
    one_line(runner.invoke(app, [*args, "--overwrite", "--k", "100000", "-q"]), "larger than the catalogue")
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(pipe["log"]).drop("item_id").write_parquet(bad)
    one_line(
        runner.invoke(app, ["recommend", str(bad), "--data", str(pipe["data"]), "--model", str(pipe["model"]),
                            "--out", str(tmp_path / "x.parquet"), "-q"]),
        "missing required column(s) item_id",
    )  # fmt: skip
    one_line(
        runner.invoke(app, ["recommend", str(tmp_path / "nope.parquet"), "--data", str(pipe["data"]),
                            "--model", str(pipe["model"]), "--out", str(tmp_path / "x.parquet"), "-q"]),
        "nope.parquet",
    )  # fmt: skip
    assert not (tmp_path / "x.parquet").exists()
    floats = tmp_path / "floats.parquet"  # pandas' integers with a gap: 1.0 would match no profile
    pl.read_parquet(pipe["log"]).with_columns(pl.col("user_id").cast(pl.Float64)).write_parquet(floats)
    one_line(
        runner.invoke(app, ["recommend", str(floats), "--data", str(pipe["data"]), "--model", str(pipe["model"]),
                            "--out", str(tmp_path / "x.parquet"), "-q"]),
        "user column 'user_id' holds Float64; training's user ids are integers",
    )  # fmt: skip
    assert not (tmp_path / "x.parquet").exists()


def test_rows_left_out_are_counted(pipe: dict[str, Any], tmp_path: Path) -> None:
    """A row without an item or a time is left out as the sessionizer leaves it out, and said."""
    log = pl.read_parquet(pipe["log"])
    holes = log.with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 3).then(None).otherwise(pl.col("item_id")).alias("item_id"),
        pl.when(pl.int_range(pl.len()) % 10 == 7).then(None).otherwise(pl.col("timestamp")).alias("timestamp"),
    )
    path = tmp_path / "holes.parquet"
    holes.write_parquet(path)
    want = {"null_item": holes["item_id"].null_count(), "null_timestamp": holes["timestamp"].null_count()}
    s = recommend(RecommendConfig(data=pipe["data"], model=pipe["model"], out=tmp_path / "r.parquet", k=3, device="cpu"), path)
    assert s["dropped"] == want and all(n > 0 for n in want.values())
    full = recommend(RecommendConfig(data=pipe["data"], model=pipe["model"], out=tmp_path / "f.parquet", k=3, device="cpu"), pipe["log"])
    assert full["dropped"] == {}
    r = CliRunner().invoke(app, ["recommend", str(path), "--data", str(pipe["data"]), "--model", str(pipe["model"]),
                                 "--out", str(tmp_path / "c.parquet"), "--k", "3", "--device", "cpu", "-q"])  # fmt: skip
    assert r.exit_code == 0 and f"dropped {sum(want.values()):,} rows of the log" in r.output, r.output


def test_at_before_every_event_is_empty(pipe: dict[str, Any], tmp_path: Path) -> None:
    cfg = RecommendConfig(data=pipe["data"], model=pipe["model"], out=tmp_path / "r.parquet", k=3, device="cpu",
                          at=dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))  # fmt: skip
    s = recommend(cfg, pipe["log"])
    assert s["users"] == 0 and pl.read_parquet(tmp_path / "r.parquet").height == 0


def test_recommend_config_rejects_bad_values() -> None:
    with pytest.raises(Exception, match="k"):
        RecommendConfig(k=0)
    with pytest.raises(SdmError):
        from sdm.configfile import build_config

        build_config(RecommendConfig, None, "recommend", {"index": "annoy"})


def test_side_features_fall_back_to_the_encoded_item_table(tmp_path: Path) -> None:
    """Without the raw items table, side features come from items.parquet: same lists for known items."""
    p = build_pipeline(tmp_path / "p", seed=11)
    base = dict(data=p["data"], model=p["model"], k=10, device="cpu")
    recommend(RecommendConfig(**base, out=tmp_path / "with.parquet"), p["log"])
    items_table = p["log"].parent / "items.parquet"
    items_table.rename(tmp_path / "moved.parquet")  # training's items table is gone
    recommend(RecommendConfig(**base, out=tmp_path / "without.parquet"), p["log"])
    a = pl.read_parquet(tmp_path / "with.parquet").sort("user_id")
    b = pl.read_parquet(tmp_path / "without.parquet").sort("user_id")
    vocab = set(pl.read_parquet(p["data"] / "vocab" / "item.parquet")["raw"].to_list())
    log = pl.read_parquet(p["log"])
    latest_known = {
        u: set(g.sort("timestamp")["item_id"].to_list()[-8:]) <= vocab
        for (u,), g in log.group_by("user_id")
    }  # fmt: skip
    same = [x == y for x, y, u in zip(a["items"].to_list(), b["items"].to_list(), a["user_id"].to_list())
            if latest_known[u]]  # fmt: skip
    assert same and all(same)
    # an explicit --items gives back the table's features
    recommend(RecommendConfig(**base, out=tmp_path / "explicit.parquet", items=tmp_path / "moved.parquet"), p["log"])
    assert pl.read_parquet(tmp_path / "explicit.parquet").sort("user_id")["items"].to_list() == a["items"].to_list()


def test_scores_with_one_or_several_chunks_agree(pipe: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores read from the single score chunk equal the second pass over several chunks."""
    base = dict(data=pipe["data"], model=pipe["model"], k=12, device="cpu", exclude_seen=True)
    recommend(RecommendConfig(**base, out=tmp_path / "one.parquet"), pipe["log"])
    monkeypatch.setattr("sdm.serve.recommend.chunked_topk", _small_chunks)
    recommend(RecommendConfig(**base, out=tmp_path / "many.parquet"), pipe["log"])
    a = pl.read_parquet(tmp_path / "one.parquet").sort("user_id")
    b = pl.read_parquet(tmp_path / "many.parquet").sort("user_id")
    assert a["items"].to_list() == b["items"].to_list()
    for x, y in zip(a["scores"].to_list(), b["scores"].to_list()):
        assert max(abs(p - q) for p, q in zip(x, y)) < 1e-5


def _small_chunks(fn: Any, num_items: int, k: int, chunk_items: int, exclude: Any = None) -> Any:
    from sdm.pipeline.metrics import chunked_topk

    return chunked_topk(fn, num_items, k, 37, exclude)  # several chunks even for this small catalogue
