"""Multi-valued user features ('sports|music'): e_u holds the mean of the profile's values' embeddings.

A hand-made log of 8 users and a users table with a multi-valued `interests` and a
single-valued `age`, sessionized once, trained for two steps and exported. The expected
embeddings are computed here from the raw strings, the vocabulary files and the model's
embedding weights, never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import at, read_sessions, vocab, write_log
from hypothesis import given, settings
from hypothesis import strategies as st

from sdm.config import ExportConfig, RecommendConfig, SessionizeConfig, TrainConfig
from sdm.errors import DataError, SdmError
from sdm.model.sdm import ModelConfig
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.tables import load_user_values
from sdm.pipeline.train import build_run, train
from sdm.serve import Recommender
from sdm.serve.export import export
from sdm.serve.recommend import recommend
from sdm.sessionize import run
from sdm.sessionize.tables import value_sets

INTERESTS = {0: "sports|music", 1: "music", 2: " music| sports", 3: "", 4: None, 5: "sports|music", 6: "film|music|x",
             7: "film"}  # fmt: skip
"""User 2 lists user 0's values in another order (another set); 3 and 4 have none."""
AGE = {u: str(20 + 10 * (u % 3)) for u in range(8)}
DAYS = (0, 1, 2, 3, 4, 6, 11)  # training before day 5, validation day 6, test day 11
SCHEMA = {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}


def make_log(users: int = 8) -> pl.DataFrame:
    rows = [(u, 10 + (u * 3 + day + k) % 8, at(k, days=day)) for u in range(users) for day in DAYS for k in range(4)]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def sessionize(root: Path, interests: dict[int, str | None], log: pl.DataFrame | None = None, **kw: Any) -> Path:
    path = write_log(make_log() if log is None else log, root / "log.parquet")
    users = pl.DataFrame({"user_id": list(interests), "interests": list(interests.values()),
                          "age": [AGE.get(u, "99") for u in interests]})  # fmt: skip
    kw.setdefault("multi_valued", ["interests"])
    cfg = SessionizeConfig(
        out=root / "data", users=write_log(users, root / "users.parquet"), user_features=["interests", "age"],
        valid_start=at(days=5), test_start=at(days=10), min_shards=1, max_session_len=6, **kw,
    )  # fmt: skip
    run(cfg, path, progress=False)
    return root / "data"


def train_cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(data=data, out=out, batch_size=8, embedding_dim=16, num_negatives=8, epochs=1, max_steps=2,
                       device="cpu", repeat=False, neighbours=0, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("multivalued_users")
    data = sessionize(root, INTERESTS)
    train(train_cfg(data, root / "model"), progress=False)
    manifest = read_manifest(data)
    model = load_model(root / "model", data, manifest, torch.device("cpu"))
    export(ExportConfig(data=data, model=root / "model", out=root / "export", faiss=False))
    return {"root": root, "data": data, "model_dir": root / "model", "manifest": manifest, "model": model,
            "export": root / "export"}  # fmt: skip


def values_of(raw: str | None) -> list[str]:
    return [v.strip() for v in (raw or "").split("|") if v.strip()]


def expected_e_u(model: Any, data: Path, user: int) -> torch.Tensor:
    """[mean of the interests' rows (an unseen value: row 1; none: row 1); the age's row]."""
    index = vocab(data, "interests")
    rows = [index.get(v, 1) for v in values_of(INTERESTS[user])] or [1]
    tables = dict(zip(model.user_features, model.user_emb.tables))
    interests = tables["interests"].weight.detach()[rows].mean(0)
    age = tables["age"].weight.detach()[vocab(data, "age")[AGE[user]]]
    return torch.cat([interests, age])


def test_users_table_holds_value_sets_and_the_vocabulary_the_values(world: dict[str, Any]) -> None:
    data, manifest = world["data"], world["manifest"]
    index = vocab(data, "interests")
    assert set(index) == {"sports", "music", "film", "x"}  # values, never whole strings
    users = pl.read_parquet(data / "users.parquet").sort("user_id")
    raw = {i: r for r, i in index.items()}
    by_user = {int(u): (s, v) for u, s, v in zip(users["user_id"], users["interests"], users["interests_values"])}
    for u, text in INTERESTS.items():
        s, v = by_user[u]
        assert [raw[i] for i in v] == values_of(text)
        assert (s == 1) == (not values_of(text))
    assert by_user[0][0] == by_user[5][0] != by_user[2][0]  # equal lists share a set; another order is another set
    sets = {s for s, _ in by_user.values()}
    assert manifest["multi_valued"]["interests"] == {"sep": "|", "users_column": "interests_values", "sets": max(sets) + 1}
    assert sets - {1} == set(range(2, max(sets) + 1))
    # the shards carry the set index, as users.parquet does
    for s in read_sessions(data):
        assert s["user_interests"] == by_user[int(s["user_id"])][0]


def test_e_u_is_the_mean_of_the_values_embeddings(world: dict[str, Any]) -> None:
    model, data = world["model"], world["data"]
    assert model.config.multi_valued == ["interests"] and model.user_multi_valued == ["interests"]
    users = pl.read_parquet(data / "users.parquet")
    columns = {"interests": torch.tensor(users["interests"].to_list()), "age": torch.tensor(users["age"].to_list())}
    with torch.no_grad():
        got = model.user_vector(columns, users.height)
    for row, u in enumerate(users["user_id"].to_list()):
        torch.testing.assert_close(got[row], expected_e_u(model, data, int(u)), rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # the profile is read


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_recommender_scores_like_the_model(world: dict[str, Any], runtime: str) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    model, data = world["model"], world["data"]
    rec = Recommender.load(world["export"], runtime=runtime)
    raw = {i: r for r, i in vocab(data, "item").items()}
    for user in (0, 2, 3):
        (s,) = [x for x in read_sessions(data) if x["split"] == "test" and x["user_id"] == str(user)]
        batch = {
            "seq": {"item": torch.tensor([s["items"]])}, "seq_len": torch.tensor([len(s["items"])]),
            "long": {"item": torch.tensor([s["long_items"]])}, "long_len": torch.tensor([len(s["long_items"])]),
            "user": {"interests": torch.tensor([s["user_interests"]]), "age": torch.tensor([s["user_age"]])},
        }  # fmt: skip
        with torch.no_grad():
            scores = model.all_item_vectors() @ model(batch)[0, -1]
        expected = {raw[i]: float(scores[i]) for i in raw}
        out = rec.recommend(make_log().filter(pl.col("user_id") == user), k=len(expected), at=at(days=12))
        served = dict(zip(out["items"][0].to_list(), out["scores"][0].to_list()))
        assert served.keys() == expected.keys()
        for item, score in expected.items():
            assert served[item] == pytest.approx(score, abs=1e-4), (user, item)


def test_sdm_recommend_scores_like_the_recommender(world: dict[str, Any], tmp_path: Path) -> None:
    log = write_log(make_log(), tmp_path / "log.parquet")
    recommend(RecommendConfig(data=world["data"], model=world["model_dir"], k=5, device="cpu", out=tmp_path / "r.parquet"),
              log)  # fmt: skip
    batch = pl.read_parquet(tmp_path / "r.parquet").sort("user_id")
    served = Recommender.load(world["export"], runtime="torch").recommend(pl.read_parquet(log), k=5).sort("user_id")
    assert batch["user_id"].cast(pl.String).to_list() == served["user_id"].cast(pl.String).to_list()
    for x, y in zip(batch["scores"].to_list(), served["scores"].to_list()):
        assert x == pytest.approx(y, abs=1e-4)


def test_vocab_from_keeps_the_values_and_a_warm_start_takes_the_new_sets(world: dict[str, Any], tmp_path: Path) -> None:
    interests = {**INTERESTS, 8: "chess|sports", 9: "music|film"}
    data_b = sessionize(tmp_path, interests, make_log(users=10), vocab_from=world["data"])
    old, new = vocab(world["data"], "interests"), vocab(data_b, "interests")
    assert all(new[v] == i for v, i in old.items()) and new["chess"] == max(old.values()) + 1
    run_b = build_run(train_cfg(data_b, tmp_path / "m2", init_from=world["model_dir"]), 0, 1, 0.0)
    want = load_user_values(data_b, read_manifest(data_b), ["interests"])["interests"]
    assert torch.equal(run_b.model.user_values.rows(None)["interests"], want)
    assert run_b.warm.carried == run_b.warm.total
    users = pl.read_parquet(data_b / "users.parquet")
    row = users.filter(pl.col("user_id") == "8")
    assert want[row["interests"][0]].tolist()[:2] == [new["chess"], new["sports"]]


def test_bad_value_sets_and_settings_are_one_line_errors(world: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "copy"
    data.mkdir()
    users = pq.read_table(world["data"] / "users.parquet")
    broken = users.set_column(users.schema.get_field_index("interests"), "interests",
                              pa.array([99] * users.num_rows, pa.int32()))  # fmt: skip
    pq.write_table(broken, data / "users.parquet")
    with pytest.raises(DataError, match="users.parquet: column 'interests' has value-set indices outside") as exc:
        load_user_values(data, world["manifest"], ["interests"])
    assert "\n" not in str(exc.value)
    for sets in (10**9, 1, "5"):  # a manifest whose set count the users table cannot hold, or not a count
        manifest = {**world["manifest"], "multi_valued": {"interests": {**world["manifest"]["multi_valued"]["interests"], "sets": sets}}}
        with pytest.raises(DataError, match="users.parquet: the manifest's multi_valued.'interests'. sets"):
            load_user_values(world["data"], manifest, ["interests"])
    with pytest.raises(ValueError, match="multi_valued must name"):
        ModelConfig(item_vocab={"item": 5}, user_vocab={"user": 4}, multi_valued=["user"])
    with pytest.raises(SdmError, match="'interests' is Int64; it must be a string column"):
        frame = pl.DataFrame({"user_id": list(range(8)), "interests": list(range(8)), "age": list(AGE.values())})
        cfg = SessionizeConfig(out=tmp_path / "x", users=write_log(frame, tmp_path / "u.parquet"),
                               user_features=["interests", "age"], multi_valued=["interests"], valid_start=at(days=5),
                               test_start=at(days=10))  # fmt: skip
        run(cfg, write_log(make_log(), tmp_path / "log.parquet"), progress=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5), max_size=3), max_size=12))
def test_value_sets_number_the_distinct_lists(lists: list[list[int]]) -> None:
    got = value_sets(pl.Series(lists, dtype=pl.List(pl.Int32))).to_list()
    distinct = sorted({tuple(x) for x in lists if x}, key=lambda t: ",".join(map(str, t)))
    want = [1 if not x else 2 + distinct.index(tuple(x)) for x in lists]
    assert got == want


def test_the_export_describes_the_value_sets(world: dict[str, Any]) -> None:
    spec = json.loads((world["export"] / "lookups.json").read_text())
    assert spec["multi_valued"]["interests"]["sets"] == world["manifest"]["multi_valued"]["interests"]["sets"]
    assert np.array_equal(pl.read_parquet(world["export"] / "users.parquet")["interests"].to_numpy(),
                          pl.read_parquet(world["data"] / "users.parquet")["interests"].to_numpy())  # fmt: skip
