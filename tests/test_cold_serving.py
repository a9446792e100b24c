"""Cold items in serving: `sdm export`'s cold rows, `--candidates catalogue`, `Recommender.add_items`,
`--exclude-history`.

One small synth pipeline (sessionize, an untrained checkpoint) gets three hand-made
cold items in its catalogue.parquet: A known at all times, B known from the middle
of the log, C known from a day after its end. The checkpoint's id embeddings are
scaled down 1000x, so an item's vector is (nearly) a function of its side
features: a new item with the features of a user's best item scores as that item
does, whatever its id. The index and `rank` pieces are checked on random vectors.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_recommend import build_pipeline

from sdm.config import ExportConfig, RecommendConfig
from sdm.errors import ConfigError, DataError, SdmError
from sdm.pipeline.catalogue import read_catalogue
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.dataset import read_manifest
from sdm.manifest import file_digest
from sdm.serve import Recommender
from sdm.serve.export import FAISS_INDEX, INDEX_SPEC, export, write_faiss
from sdm.retrieval.index import ExactIndex, FaissIndex
from sdm.serve.recommend import recommend
from sdm.serve.sessions import latest_sessions, open_frame
from sdm.sessionize.encode import oov_hash

COLD_IDS = {"A": 900_001, "B": 900_002, "C": 900_003}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip(), text
    return text


def add_cold_rows(data: Path, rows: list[dict[str, Any]]) -> None:
    """Append `rows` (item_id, known_from, category, brand: encoded) to the data's catalogue.parquet, and
    record it in the manifest (files table, `catalogue` key; the fingerprint does not cover it)."""
    manifest = json.loads((data / "manifest.json").read_text())
    features = manifest["item_features"][1:]
    path = data / "catalogue.parquet"
    schema = {"item_id": pl.Int64, "oov_hash": pl.Int64, "known_from": pl.Datetime("us", "UTC"),
              **{f: pl.Int32 for f in features}}  # fmt: skip
    old = pl.read_parquet(path) if path.is_file() else pl.DataFrame(schema=schema)
    ids = pl.Series([r["item_id"] for r in rows], dtype=pl.Int64)
    new = pl.DataFrame(
        {
            "item_id": ids,
            "oov_hash": oov_hash(ids),
            "known_from": pl.Series([r["known_from"] for r in rows], dtype=pl.Datetime("us", "UTC")),
            **{f: pl.Series([r[f] for r in rows], dtype=pl.Int32) for f in features},
        }
    )
    table = pl.concat([old.cast(schema), new])
    table.write_parquet(path)
    manifest["catalogue"] = {"path": "catalogue.parquet", "items": table.height}
    manifest["files"]["catalogue.parquet"] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cold_serving")
    p = build_pipeline(root, seed=11)
    ckpt = torch.load(p["model"] / "best.pt", weights_only=False)
    ckpt["model"]["item_emb.tables.0.weight"] *= 1e-3  # vectors from side features, almost
    torch.save(ckpt, p["model"] / "best.pt")
    log = pl.read_parquet(p["log"])
    first, last = log["timestamp"].min(), log["timestamp"].max()
    p["mid"] = first + (last - first) / 2
    p["last"] = last
    rows = [
        {"item_id": COLD_IDS["A"], "known_from": None, "category": 2, "brand": 3},
        {"item_id": COLD_IDS["B"], "known_from": p["mid"], "category": 3, "brand": 1},  # brand unseen (1)
        {"item_id": COLD_IDS["C"], "known_from": last + dt.timedelta(days=1), "category": 4, "brand": 5},
    ]
    add_cold_rows(p["data"], rows)
    p["manifest"] = read_manifest(p["data"])
    p["catalogue"] = read_catalogue(p["data"], p["manifest"])
    p["export"] = root / "export"
    p["summary"] = export(ExportConfig(data=p["data"], model=p["model"], out=p["export"]))
    p["log_frame"] = log
    p["V"] = int(p["manifest"]["num_items"])
    return p


def cold_ids(p: dict[str, Any]) -> list[int]:
    return p["catalogue"].item_id.to_pylist()


def all_items(frame: pl.DataFrame) -> list[set[Any]]:
    return [set(x) for x in frame["items"].to_list()]


# -- export -------------------------------------------------------------------------------------


def test_export_writes_cold_rows_after_the_vocabulary(pipe: dict[str, Any]) -> None:
    table = pq.read_table(pipe["export"] / "item_vectors.parquet")
    V, cat = pipe["V"], pipe["catalogue"]
    n_cold = len(cat)
    assert n_cold >= 3 and pipe["summary"]["cold_items"] == n_cold and pipe["summary"]["items"] == V - 2
    assert table.num_rows == V - 2 + n_cold
    assert table.schema.field("cold").type == pa.bool_()
    assert table.schema.field("known_from").type == pa.timestamp("us", tz="UTC")
    assert table.column("cold").to_pylist() == [False] * (V - 2) + [True] * n_cold
    assert table.column("index").to_pylist() == list(range(2, V + n_cold))  # cold item j is V + j
    assert table.column("item_id").to_pylist()[V - 2 :] == cat.item_id.to_pylist()
    known = table.column("known_from").to_pylist()
    assert known[: V - 2] == [None] * (V - 2)
    want_known = pq.read_table(pipe["data"] / "catalogue.parquet").column("known_from").to_pylist()
    assert known[V - 2 :] == want_known
    assert known[V - 2 :][-3:] == [None, pipe["mid"], pipe["last"] + dt.timedelta(days=1)]

    model = load_model(pipe["model"], pipe["data"], pipe["manifest"], torch.device("cpu"))
    vecs = torch.from_numpy(np.stack(table.column("vector").to_numpy(zero_copy_only=False)))
    side = [torch.from_numpy(cat.features[f]) for f in model.item_features[1:]]
    with torch.no_grad():
        want = model.item_input([torch.zeros(n_cold, dtype=torch.long), *side])  # id part neutral: index 0
        warm = model.all_item_vectors()[2:]
    torch.testing.assert_close(vecs[V - 2 :], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(vecs[: V - 2], warm, atol=1e-5, rtol=0)
    if (pipe["export"] / FAISS_INDEX).is_file():
        faiss = pytest.importorskip("faiss")
        assert faiss.read_index(str(pipe["export"] / FAISS_INDEX)).ntotal == table.num_rows  # row i = parquet row i
        assert json.loads((pipe["export"] / INDEX_SPEC).read_text())["items"] == table.num_rows


def old_export(pipe: dict[str, Any], out: Path) -> Path:
    """A copy of the export as an older sdm wrote it: no cold rows, no cold / known_from columns."""
    shutil.copytree(pipe["export"], out)
    table = pq.read_table(out / "item_vectors.parquet").slice(0, pipe["V"] - 2).select(["item_id", "index", "vector"])
    pq.write_table(table, out / "item_vectors.parquet")
    if (out / FAISS_INDEX).is_file():
        (out / FAISS_INDEX).unlink()
        (out / INDEX_SPEC).unlink()
        vecs = torch.from_numpy(np.stack(table.column("vector").to_numpy(zero_copy_only=False)))
        write_faiss(out / FAISS_INDEX, vecs)
    return out


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_vocabulary_candidates_give_todays_answers(pipe: dict[str, Any], tmp_path: Path, index: str) -> None:
    """The cold rows change nothing for "vocabulary" (the default); an export without them still loads."""
    if index == "faiss":
        pytest.importorskip("faiss")
    old = Recommender.load(old_export(pipe, tmp_path / "old"), runtime="torch", index=index)
    new = Recommender.load(pipe["export"], runtime="torch", index=index)
    assert len(old.known_from) == 0 and len(new.known_from) == len(pipe["catalogue"])
    log = pipe["log_frame"]
    for kwargs in ({"k": 20}, {"k": 10**6, "exclude_seen": True}, {"k": 7, "at": pipe["mid"]}):
        want = old.recommend(log, **kwargs)
        assert new.recommend(log, **kwargs).equals(want), kwargs
        assert new.recommend(log, candidates="vocabulary", **kwargs).equals(want), kwargs
    assert not set().union(*all_items(new.recommend(log, k=10**6))) & set(cold_ids(pipe))
    with pytest.raises(ConfigError) as err:
        old.recommend(log, k=3, candidates="everything")
    assert "candidates" in one_line(err.value)


# -- catalogue candidates -----------------------------------------------------------------------


def test_catalogue_candidates_follow_known_from(pipe: dict[str, Any]) -> None:
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact", candidates="catalogue")
    log = pipe["log_frame"]
    a, b, c = COLD_IDS["A"], COLD_IDS["B"], COLD_IDS["C"]
    always = {i for i, t in zip(cold_ids(pipe), rec.known_from) if t == np.iinfo(np.int64).min}
    assert a in always
    total = pipe["V"] - 2 + len(pipe["catalogue"])
    for at, known, unknown in (
        (pipe["mid"] - dt.timedelta(seconds=1), always, {b, c}),
        (pipe["mid"], always | {b}, {c}),  # known_from <= at
        (None, always | {b, c}, set()),  # default: now, a day after the log's end
    ):
        lists = all_items(rec.recommend(log, k=total, at=at))
        assert lists
        for items in lists:
            assert known <= items and not items & unknown, at
    by_request = rec.recommend(log, k=total, at=pipe["mid"], candidates="vocabulary")
    assert not set().union(*all_items(by_request)) & set(cold_ids(pipe))


def test_a_cold_item_in_the_session_is_excluded_with_exclude_seen(pipe: dict[str, Any]) -> None:
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact")
    log = pipe["log_frame"]
    user = log["user_id"][0]
    mine = log.filter(pl.col("user_id") == user).sort("timestamp")
    cold = mine.tail(1).with_columns(pl.lit(COLD_IDS["A"], dtype=pl.Int64).alias("item_id"),
                                     pl.col("timestamp") + dt.timedelta(minutes=1))  # fmt: skip
    events = pl.concat([mine, cold])
    total = pipe["V"] - 2 + len(pipe["catalogue"])
    assert COLD_IDS["A"] in rec.recommend(events, k=total, candidates="catalogue")["items"][0].to_list()
    kept = rec.recommend(events, k=total, candidates="catalogue", exclude_seen=True)["items"][0].to_list()
    assert COLD_IDS["A"] not in kept and COLD_IDS["B"] in kept


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_sdm_recommend_with_catalogue_candidates(pipe: dict[str, Any], tmp_path: Path, index: str) -> None:
    if index == "faiss":
        pytest.importorskip("faiss")
    available = [i for i, t in zip(cold_ids(pipe), pipe["catalogue"].known_from) if t <= us(pipe["mid"])]
    assert COLD_IDS["B"] in available and COLD_IDS["C"] not in available
    k = pipe["V"] - 2 + len(available)
    cfg = dict(data=pipe["data"], model=pipe["model"], device="cpu", at=pipe["mid"], index=index)
    s = recommend(RecommendConfig(**cfg, out=tmp_path / "c.parquet", k=k, candidates="catalogue"), pipe["log"])
    assert s["cold_items"] == len(available) and s["candidates"] == "catalogue"
    lists = all_items(pl.read_parquet(tmp_path / "c.parquet"))
    assert lists and all(set(available) <= x and COLD_IDS["C"] not in x for x in lists)
    recommend(RecommendConfig(**cfg, out=tmp_path / "v.parquet", k=pipe["V"] - 2), pipe["log"])
    assert not set().union(*all_items(pl.read_parquet(tmp_path / "v.parquet"))) & set(cold_ids(pipe))
    with pytest.raises(ConfigError) as err:
        recommend(RecommendConfig(**cfg, out=tmp_path / "x.parquet", k=k + 1, candidates="catalogue"), pipe["log"])
    assert "--k" in one_line(err.value)


def test_sdm_recommend_sees_a_cold_item_in_the_session(pipe: dict[str, Any], tmp_path: Path) -> None:
    """An event of a cold item is that candidate in the batch too: excluded with --exclude-seen."""
    log = pipe["log_frame"]
    mine = log.filter(pl.col("user_id") == log["user_id"][0]).sort("timestamp")
    cold = mine.tail(1).with_columns(pl.lit(COLD_IDS["A"], dtype=pl.Int64).alias("item_id"),
                                     pl.col("timestamp") + dt.timedelta(minutes=1))  # fmt: skip
    path = tmp_path / "user.parquet"
    pl.concat([mine, cold]).write_parquet(path)
    k = pipe["V"] - 2 + len(pipe["catalogue"])
    cfg = dict(data=pipe["data"], model=pipe["model"], device="cpu", k=k, candidates="catalogue")
    recommend(RecommendConfig(**cfg, out=tmp_path / "all.parquet"), path)
    assert COLD_IDS["A"] in pl.read_parquet(tmp_path / "all.parquet")["items"][0].to_list()
    recommend(RecommendConfig(**cfg, out=tmp_path / "seen.parquet", exclude_seen=True), path)
    kept = pl.read_parquet(tmp_path / "seen.parquet")["items"][0].to_list()
    assert COLD_IDS["A"] not in kept and COLD_IDS["B"] in kept


def us(t: dt.datetime) -> int:
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


# -- add_items ----------------------------------------------------------------------------------


def best_item(rec: Recommender, events: pl.DataFrame) -> tuple[Any, dict[str, Any]]:
    """The user's best item outside the history (pure dot product, no copy bonus), and its raw features."""
    top = rec.recommend(events, k=1, exclude_history=True)["items"][0][0]
    raw = pl.read_parquet(rec.root / "items_raw.parquet").filter(pl.col("item_id") == top)
    return top, raw.drop("item_id").to_dicts()[0]


@pytest.mark.parametrize(("runtime", "index"), [("torch", "exact"), ("onnx", "faiss")])
def test_add_items_makes_a_new_item_retrievable(pipe: dict[str, Any], runtime: str, index: str) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    if index == "faiss":
        pytest.importorskip("faiss")
    rec = Recommender.load(pipe["export"], runtime=runtime, index=index)
    log = pipe["log_frame"]
    events = log.filter(pl.col("user_id") == log["user_id"][3])
    top, features = best_item(rec, events)
    new_id = 123_456_789
    rows_before = len(rec.raw_items)
    added = rec.add_items([{"item_id": new_id, **features}])
    assert added["item_id"].to_list() == [new_id] and len(rec.raw_items) == rows_before + 1
    enc = added.row(0, named=True)
    table = rec.lookups.item_table
    # same encoded side features as the best item: the new item scores as it does (ids weigh 1e-3)
    assert [enc[f] for f in rec.lookups.item_features] == list(table[rec.raw_items.tolist().index(top), 1:])
    # items with those features (the cold ones at most) tie with it up to the ids' 1e-3
    twins = int((table[2:, 1:] == table[rec.raw_items.tolist().index(top), 1:]).all(1).sum()) + len(pipe["catalogue"])
    got = rec.recommend(events, k=twins + 1, exclude_history=True, candidates="catalogue")["items"][0].to_list()
    assert new_id in got
    assert new_id not in rec.recommend(events, k=twins + 1, exclude_history=True)["items"][0].to_list()
    # known from now: a request of the log's time does not see it yet
    past = rec.recommend(events, k=10**6, at=pipe["last"] + dt.timedelta(hours=1), candidates="catalogue")
    assert new_id not in past["items"][0].to_list()
    # its vector is the item tower's of its side features, the id part neutral
    model = rec._item_model()
    side = torch.tensor([[enc[f] for f in model.item_features[1:]]])
    with torch.no_grad():
        want = model.item_input([torch.zeros(1, dtype=torch.long), *side.unbind(-1)])
    torch.testing.assert_close(rec.item_vecs[-1:], want, atol=1e-5, rtol=0)


def test_an_added_items_events_take_its_side_features(pipe: dict[str, Any]) -> None:
    """A session ending with an added item reads its features; with an unknown id, they are unknown (1)."""
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact")
    log = pipe["log_frame"]
    mine = log.filter(pl.col("user_id") == log["user_id"][5]).sort("timestamp")
    step = mine.tail(1).with_columns(pl.col("timestamp") + dt.timedelta(minutes=1))
    with_new = pl.concat([mine, step.with_columns(pl.lit(555_000_001, dtype=pl.Int64).alias("item_id"))])
    with_unknown = pl.concat([mine, step.with_columns(pl.lit(555_000_002, dtype=pl.Int64).alias("item_id"))])
    before = rec.recommend(with_new, k=20)["items"].to_list()
    assert before == rec.recommend(with_unknown, k=20)["items"].to_list()  # both ids unknown
    features = pl.read_parquet(rec.root / "items_raw.parquet").row(0, named=True)
    rec.add_items([{**features, "item_id": 555_000_001}])
    inp, missing = open_frame(rec.lookups, with_new)
    served = latest_sessions(inp, rec.lookups, missing, None, cold=rec.cold)
    n = int(served.arrays["seq_len"][0])
    assert int(served.arrays["seq_item"][0][n - 1]) == 1  # still OOV for the tower's id input
    assert int(served.arrays["seq___cold"][0][n - 1]) == len(rec.raw_items) - 1  # its candidate index
    assert served.arrays["seq_category"][0][n - 1] == rec.cold_side[-1][0] != 1
    assert rec.recommend(with_new, k=20)["items"].to_list() != before


def test_add_items_refuses_known_or_bad_ids(pipe: dict[str, Any]) -> None:
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact")
    warm, rows = rec.raw_items[2], len(rec.raw_items)
    for items, words in (
        ([{"item_id": warm}], [str(warm), "already known"]),
        ([{"item_id": COLD_IDS["C"]}], [str(COLD_IDS["C"]), "already known"]),
        ([{"item_id": 7_000_001}, {"item_id": 7_000_001}], ["7000001", "twice"]),
        ([{"category": 3}], ["item_id"]),
        ([{"item_id": None, "category": 3}], ["nulls"]),
        ([{"item_id": "abc"}], ["item_id"]),
        ([{"item_id": "7000009"}], ["item_id", "String"]),  # never cast: '7000009' is not 7000009
        ([{"item_id": 7_000_009.7}], ["item_id", "Float64"]),  # a strict cast would make it 7000009
        ([{"item_id": True}], ["item_id", "Boolean"]),
        ([{"item_id": 7_000_009, "categroy": 3}], ["'categroy'", "no side feature", "category"]),
        ([{"item_id": 7_000_009, "category": {"a": 1}}], ["'category'", "Struct"]),
        ([{"item_id": 7_000_009, "category": 3.0}], ["'category'", "Float64", "integers"]),
        ([{"item_id": 7_000_009, "category": "3"}], ["'category'", "String", "integers"]),
        ("items", ["expected a polars or pandas frame"]),
    ):
        with pytest.raises(ConfigError) as err:
            rec.add_items(items)
        text = one_line(err.value)
        assert all(w in text for w in words), text
    assert len(rec.raw_items) == rows  # nothing refused was added
    out = rec.add_items({"item_id": [7_000_002, 7_000_003], "category": [3, 10**9]})
    assert out["category"].to_list()[1] == 1 and out["brand"].to_list() == [1, 1]  # unseen value, missing feature
    with pytest.raises(ConfigError, match="7000002"):
        rec.add_items(pd_or_dicts([{"item_id": 7_000_002}]))  # added before


def pd_or_dicts(rows: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


# -- exclude_history ----------------------------------------------------------------------------


def test_exclude_history(pipe: dict[str, Any], tmp_path: Path) -> None:
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact")
    log = pipe["log_frame"]
    inp, missing = open_frame(rec.lookups, log)
    served = latest_sessions(inp, rec.lookups, missing, None)
    row = int(np.argmax(served.arrays["long_len"]))
    user = served.user_id[row]
    n, m = int(served.arrays["seq_len"][row]), int(served.arrays["long_len"][row])
    session = {rec.raw_items[i] for i in served.arrays["seq_item"][row][:n] if i > 1}
    history = {rec.raw_items[i] for i in served.arrays["long_item"][row][:m] if i > 1} - session
    assert history, "the fixture should give a user with a long-term window"
    events = log.filter(pl.col("user_id") == user)
    total = pipe["V"] - 2
    seen = set(rec.recommend(events, k=total, exclude_seen=True)["items"][0].to_list())
    assert not seen & session and history <= seen
    both = set(rec.recommend(events, k=total, exclude_history=True)["items"][0].to_list())
    assert not both & (session | history) and len(both) == total - len(session | history)
    # sdm recommend: the same exclusion
    path = tmp_path / "user.parquet"
    events.write_parquet(path)
    cfg = RecommendConfig(data=pipe["data"], model=pipe["model"], device="cpu", out=tmp_path / "r.parquet", k=50,
                          exclude_history=True)  # fmt: skip
    recommend(cfg, path)
    batch = set(pl.read_parquet(tmp_path / "r.parquet")["items"][0].to_list())
    assert len(batch) == 50 and not batch & (session | history)


# -- damaged cold columns -----------------------------------------------------------------------


def _edit_vectors(change: Any) -> Any:
    def run(root: Path) -> None:
        path = root / "item_vectors.parquet"
        pq.write_table(change(pq.read_table(path)), path)

    return run


def _set(table: pa.Table, name: str, values: Any) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


DAMAGE = {
    "cold is not bool": lambda t: _set(t, "cold", t.column("cold").cast(pa.int8())),
    "cold has a null": lambda t: _set(t, "cold", pa.array([None, *t.column("cold").to_pylist()[1:]], pa.bool_())),
    "a warm row is cold": lambda t: _set(t, "cold", pa.array([True, *t.column("cold").to_pylist()[1:]])),
    "a cold row is warm": lambda t: _set(t, "cold", pa.array([*t.column("cold").to_pylist()[:-1], False])),
    "cold rows without cold": lambda t: t.drop_columns(["cold"]),
    "no known_from": lambda t: t.drop_columns(["known_from"]),
    "known_from is text": lambda t: _set(t, "known_from", t.column("known_from").cast(pa.string())),
    "known_from on a warm row": lambda t: _set(
        t, "known_from", pa.array([0, *t.column("known_from").cast(pa.int64()).to_pylist()[1:]], pa.int64())
        .cast(pa.timestamp("us", tz="UTC"))),
    "known_from without a zone": lambda t: _set(t, "known_from", t.column("known_from").cast(pa.timestamp("us"))),
    "a cold row repeats a warm id": lambda t: _set(
        t, "item_id", pa.array([*t.column("item_id").to_pylist()[:-1], t.column("item_id")[0].as_py()])),
    "two cold rows of one id": lambda t: _set(
        t, "item_id", pa.array([*t.column("item_id").to_pylist()[:-1], t.column("item_id")[-2].as_py()])),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cold_columns_are_one_data_error(pipe: dict[str, Any], tmp_path: Path, case: str) -> None:
    root = tmp_path / "export"
    shutil.copytree(pipe["export"], root)
    _edit_vectors(DAMAGE[case])(root)
    with pytest.raises(SdmError) as err:
        Recommender.load(root, runtime="torch", index="exact")
    assert isinstance(err.value, DataError), type(err.value)
    assert "item_vectors.parquet" in one_line(err.value)


def test_a_damaged_catalogue_fails_export_in_one_line(pipe: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(pipe["data"], data)
    table = pl.read_parquet(data / "catalogue.parquet")
    table.with_columns(pl.col("category").cast(pl.Float64)).write_parquet(data / "catalogue.parquet")
    with pytest.raises(DataError) as err:
        export(ExportConfig(data=data, model=pipe["model"], out=tmp_path / "out", verify=False))
    assert "catalogue.parquet" in one_line(err.value)
    assert not (tmp_path / "out" / "config.json").exists()


# -- index pieces -------------------------------------------------------------------------------


def _vectors(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    vecs = np.random.default_rng(seed).normal(size=(n + 2, d)).astype(np.float32)
    vecs[:2] = 0
    return vecs


def _exact_top(vecs: np.ndarray, u: np.ndarray, k: int, ok: np.ndarray) -> list[set[int]]:
    scores = u @ vecs[2:].T
    scores[:, ~ok] = -np.inf
    return [set((np.argsort(-s)[:k] + 2).tolist()) for s in scores]


@pytest.mark.parametrize("kind", ["exact", "flat", "ivf", "hnsw"])
def test_index_allowed_rows_and_add(kind: str) -> None:
    if kind != "exact":
        pytest.importorskip("faiss")
    vecs = _vectors(300)
    more = _vectors(5, seed=1)[2:] * 3  # longer than every built vector: IVF's over-norm case
    u = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)

    def build() -> Any:
        if kind == "exact":
            return ExactIndex(vecs)
        return FaissIndex(vecs, kind=kind, nlist=4, nprobe=4) if kind == "ivf" else FaissIndex(vecs, kind=kind)

    index = build()
    index.add(more)
    full = np.concatenate([vecs, more])
    n = len(full) - 2
    assert index.num_items == n + 2 and index.params["items"] == n
    assert index.search(torch.from_numpy(u), 3).shape == (4, 3)
    limit = np.arange(n) < 300
    mask = np.arange(n) % 3 != 0
    for allowed, ok in ((None, np.ones(n, bool)), (300, limit), (mask, mask)):
        s, got = index.search_scores(torch.from_numpy(u), 10, allowed=allowed)
        assert [set(r) for r in got.tolist()] == _exact_top(full, u, 10, ok), (kind, allowed)
        want = np.take_along_axis(u @ full.T, got.numpy(), 1)
        np.testing.assert_allclose(s.numpy(), want, rtol=1e-4, atol=1e-4)
    few = np.zeros(n, bool)
    few[[5, 302]] = True
    s, got = index.search_scores(torch.from_numpy(u), 4, allowed=few)
    assert all(set(r) == {7, 304, 0} for r in got.tolist()) and torch.isneginf(s[:, 2:]).all()
