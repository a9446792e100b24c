"""Multi-valued item features ('A|B'): the model embeds an item's feature as the mean of its values' embeddings.

One hand-made log (a log feature `tags`) and items table (`genres`), both multi-valued,
sessionized once, trained for two steps and exported; the expected vectors are computed
here from the raw strings, the vocabulary files and the model's embedding weights,
never from the code under test. Cold items: 30 ('A|D') and 31 ('X|B', X unseen) of
the items table, 20 of the test split only (tags 't1|t3').
"""

from __future__ import annotations

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
from conftest import at, read_sessions, vocab, write_log

from sdm.config import ExportConfig, SessionizeConfig, TrainConfig
from sdm.errors import DataError, SdmError
from sdm.model.embeddings import MAX_VALUES
from sdm.model.loss import NegativeSampler, sdm_loss
from sdm.model.repeat import copy_scores
from sdm.model.sdm import SDM, ModelConfig
from sdm.pipeline.catalogue import cold_item_vectors, read_catalogue
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.dataset import SessionDataset, read_manifest
from sdm.pipeline.modelspec import build_model_config
from sdm.pipeline.tables import load_item_table, load_item_values, pad_values
from sdm.pipeline.train import build_run, train
from sdm.serve import Recommender
from sdm.serve.export import export
from sdm.sessionize import run

GENRES = {10: "A|B", 11: "B", 12: "C|A", 13: "A", 14: "B|C|D", 15: None, 16: "D|A", 17: "C", 30: "A|D", 31: "X|B"}
TAGS = {10: "t1|t2", 11: "t2", 12: "t3|t1|t2", 13: "t1", 14: "t2|t3", 15: "t3", 16: "t1|t2", 17: "t2", 18: "t3|t2", 19: "t1",
        20: "t1|t3"}
DAYS = (0, 1, 2, 3, 4, 6, 11)  # training before day 5, validation day 6, test day 11
SCHEMA = {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC"), "tags": pl.String}


def make_log(items: int = 8) -> pl.DataFrame:
    """8 users, 4 events a day on DAYS over items 10 .. 10 + items - 1; user 0's test session
    also holds item 20, outside the vocabulary (an OOV event with its own tags)."""
    rows = []
    for u in range(8):
        for day in DAYS:
            for k in range(4):
                item = 10 + (u * 3 + day + k) % items
                rows.append((u, item, at(k, days=day), TAGS[item]))
    rows.append((0, 20, at(5, days=11), TAGS[20]))
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def sessionize(root: Path, log: pl.DataFrame, genres: dict[int, str | None], **kw: Any) -> Path:
    path = write_log(log, root / "log.parquet")
    items = write_log(pl.DataFrame({"item_id": list(genres), "genres": list(genres.values())}), root / "items.parquet")
    kw.setdefault("multi_valued", ["genres", "tags"])
    cfg = SessionizeConfig(
        out=root / "data", items=items, item_features=["genres", "tags"], valid_start=at(days=5),
        test_start=at(days=10), min_shards=1, max_session_len=6, **kw,
    )  # fmt: skip
    run(cfg, path, progress=False)
    return root / "data"


def train_cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(data=data, out=out, batch_size=8, embedding_dim=16, num_negatives=8, epochs=1, max_steps=2,
                       device="cpu", **kw)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("multivalued")
    data = sessionize(root, make_log(), GENRES)
    train(train_cfg(data, root / "model", cold_scale=1.0), progress=False)  # cold vectors: the tower's own
    manifest = read_manifest(data)
    model = load_model(root / "model", data, manifest, torch.device("cpu"))  # evaluate's model
    export(ExportConfig(data=data, model=root / "model", out=root / "export", faiss=False))
    return {"root": root, "data": data, "model_dir": root / "model", "manifest": manifest, "model": model,
            "export": root / "export"}  # fmt: skip


def weight(model: SDM, feature: str) -> torch.Tensor:
    return model.item_emb.tables[model.item_features.index(feature)].weight.detach()


def pooled(model: SDM, data: Path, feature: str, raw: str | None) -> torch.Tensor:
    """The expected embedding of a raw multi-valued string: the mean of its values' rows (an
    unseen value: row 1), or row 1 (OOV) when it holds no value, as its first value would be."""
    index = vocab(data, feature)
    values = [v.strip() for v in (raw or "").split("|") if v.strip()]
    rows = [index.get(v, 1) for v in values] or [1]
    return weight(model, feature)[rows].mean(0)


def expected_vector(model: SDM, data: Path, genres: str | None, tags: str | None, item: int = 0) -> torch.Tensor:
    """item_proj([id row; pooled genres; pooled tags]) (id row 0 = a cold item's neutral id)."""
    parts = [weight(model, "item")[item], pooled(model, data, "genres", genres), pooled(model, data, "tags", tags)]
    return model.item_proj(torch.cat(parts)).detach()


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text.strip(), text
    return text


def test_item_tower_embeds_the_mean_of_the_values(world: dict[str, Any]) -> None:
    model, data = world["model"], world["data"]
    assert model.config.multi_valued == ["genres", "tags"]
    items = vocab(data, "item")
    values = model.item_values.rows(None)
    g = vocab(data, "genres")
    assert values["genres"][items[14]].tolist() == [g["B"], g["C"], g["D"]]
    assert values["genres"][items[15]].tolist() == [0, 0, 0]  # no value: the single index (1) is embedded
    assert not values["genres"][:2].any()  # padding and OOV keep the index the event carries
    with torch.no_grad():
        all_vectors = model.all_item_vectors()
        for raw, i in items.items():  # (every event of an item carries the same tags here)
            want = expected_vector(model, data, GENRES[raw], TAGS[raw], i)
            torch.testing.assert_close(model.item_vectors(torch.tensor([i]))[0], want, rtol=0, atol=1e-6)
            torch.testing.assert_close(all_vectors[i], want, rtol=0, atol=1e-6)


def first_value_twin(model: SDM, data: Path) -> tuple[SDM, dict[str, int]]:
    """A model without multi-valued features (today's single-value path), equal to `model` but for
    one extra row per item in each multi-valued table: the mean of the item's values' embeddings,
    computed here from items.parquet; its item table points at those rows. Returns the twin and
    each feature's first extra row (the row of item i is that + i)."""
    cfg = model.config
    n = cfg.item_vocab["item"]
    items = pl.read_parquet(data / "items.parquet")
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("item_values.")}
    table = model.item_table.clone()
    sizes = dict(cfg.item_vocab)
    first = {}
    for f in cfg.multi_valued:
        j = model.item_features.index(f)
        w = weight(model, f)
        rows = w[table[:, j]].clone()  # an item without values: its single index
        for i, vals in zip(items["item"].to_list(), items[f"{f}_values"].to_list()):
            if vals:
                rows[i] = w[vals].mean(0)
        first[f] = sizes[f]
        state[f"item_emb.tables.{j}.weight"] = torch.cat([w, rows])
        table[2:, j] = first[f] + torch.arange(2, n)
        sizes[f] += n
    twin = SDM(ModelConfig(**{**cfg.model_dump(), "item_vocab": sizes, "multi_valued": []}), table)
    twin.load_state_dict({**state, "item_table": table})
    return twin.eval(), first


def test_session_and_long_term_inputs_pool_like_the_item_tower(world: dict[str, Any]) -> None:
    model, data = world["model"], world["data"]
    twin, first = first_value_twin(model, data)
    dataset = SessionDataset(data, "test", 64, list(model.item_features), [], shuffle=False, manifest=world["manifest"])
    batch = next(iter(dataset))
    assert (batch["seq"]["item"] == 1).any() and batch["long_len"].min() > 0  # an OOV event; long-term windows
    moved = {part: dict(batch[part]) for part in ("seq", "long")}
    for part in ("seq", "long"):
        item = batch[part]["item"]
        for f, row in first.items():  # a known item reads its pooled row; padding and OOV keep their index
            moved[part][f] = torch.where(item > 1, row + item, batch[part][f])
    with torch.no_grad():
        got = model(batch)
        want = twin({**batch, **moved})
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.all_item_vectors(), twin.all_item_vectors(), rtol=0, atol=1e-6)
        # the session input alone, and the long-term encoder's per-feature embeddings
        values = model.item_values.rows(batch["seq"]["item"])
        ids = [batch["seq"][f] for f in model.item_features]
        torch.testing.assert_close(model.item_input(ids, values), twin.item_input([moved["seq"][f] for f in model.item_features]))
        long = model.item_embs([batch["long"][f] for f in model.item_features], model.item_values.rows(batch["long"]["item"]))
        for got_f, want_f in zip(long, twin.item_emb([moved["long"][f] for f in model.item_features])):
            torch.testing.assert_close(got_f, want_f, rtol=0, atol=1e-6)


def test_cold_items_pool_their_catalogue_values(world: dict[str, Any], tmp_path: Path) -> None:
    model, data = world["model"], world["data"]
    assert float(model.cold_scale) == 1.0
    cat = read_catalogue(data, world["manifest"])
    ids = cat.item_id.to_pylist()
    g, t = vocab(data, "genres"), vocab(data, "tags")
    raw = pq.read_table(data / "catalogue.parquet")
    assert raw.column_names[-2:] == ["genres_values", "tags_values"]
    lists = dict(zip(ids, raw.column("genres_values").to_pylist()))
    assert lists[30] == [g["A"], g["D"]] and lists[31] == [1, g["B"]] and lists[20] == []
    assert dict(zip(ids, raw.column("tags_values").to_pylist()))[20] == [t["t1"], t["t3"]]
    assert dict(zip(ids, cat.features["genres"].tolist()))[30] == g["A"]  # the single column: the first value
    buckets = sessionize(tmp_path, make_log(), GENRES, buckets=3)  # each bucket's first events, combined
    assert pl.read_parquet(buckets / "catalogue.parquet").equals(pl.read_parquet(data / "catalogue.parquet"))
    with torch.no_grad():
        got = cold_item_vectors(model, cat)
    for j, item in enumerate(ids):
        want = expected_vector(model, data, GENRES.get(item), TAGS.get(item) if item == 20 else None)
        torch.testing.assert_close(got[j], want, rtol=0, atol=1e-6)


def test_a_catalogue_without_value_lists_embeds_first_values(world: dict[str, Any], tmp_path: Path) -> None:
    """catalogue.parquet of an sdm that wrote one value per feature: read, its cold items embed that value."""
    model, data = world["model"], tmp_path / "data"
    shutil.copytree(world["data"], data)
    pl.read_parquet(data / "catalogue.parquet").drop("genres_values", "tags_values").write_parquet(data / "catalogue.parquet")
    cat = read_catalogue(data, world["manifest"])
    assert cat.values(["genres", "tags"]) == {}
    ids = cat.item_id.to_pylist()
    first = {30: ("A", None), 31: ("X", None), 20: (None, "t1")}
    with torch.no_grad():
        got = cold_item_vectors(model, cat)
    for j, item in enumerate(ids):
        torch.testing.assert_close(got[j], expected_vector(model, data, *first[item]), rtol=0, atol=1e-6)


def user0_session(data: Path) -> dict[str, Any]:
    (session,) = [s for s in read_sessions(data) if s["split"] == "test" and s["user_id"] == "0"]
    return session


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_train_export_recommender_round_trip(world: dict[str, Any], runtime: str) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    model, data = world["model"], world["data"]
    vectors = pq.read_table(world["export"] / "item_vectors.parquet")
    got = torch.from_numpy(np.stack(vectors.column("vector").to_numpy(zero_copy_only=False)))
    cat = read_catalogue(data, world["manifest"])
    with torch.no_grad():
        want = torch.cat([model.all_item_vectors()[2:], cold_item_vectors(model, cat)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    s = user0_session(data)  # evaluate's view: the shards' session and long-term window
    assert 1 in s["items"] and len(s["long_items"]) > 0
    batch = {
        "seq": {f: torch.tensor([s[key]]) for f, key in (("item", "items"), ("genres", "genres"), ("tags", "tags"))},
        "seq_len": torch.tensor([len(s["items"])]),
        "long": {f: torch.tensor([s[key]]) for f, key in (("item", "long_items"), ("genres", "long_genres"), ("tags", "long_tags"))},
        "long_len": torch.tensor([len(s["long_items"])]),
        "user": {},
    }  # fmt: skip
    with torch.no_grad():
        users, history = model(batch, with_history=True)
        scores = model.all_item_vectors() @ users[0, -1]  # (V,)
        if history is not None:  # the repeat head: a history item j scores logaddexp(u . v_j, R_j)
            items, copy = copy_scores(history, torch.tensor([0]), torch.tensor([len(s["items"]) - 1]))
            for j, r in zip(items[0].tolist(), copy[0]):
                if j > 1:
                    scores[j] = torch.logaddexp(scores[j], r)
        if model.neighbours.active:  # the neighbour term training chose (its formula: tests/test_neighbours.py)
            seq = torch.tensor([s["items"]])
            for j, b in zip(*(x[0].tolist() for x in model.neighbours.bonus(seq, torch.tensor([seq.shape[1] - 1])))):
                if j > 1:
                    scores[j] += b
    raw = {i: r for r, i in vocab(data, "item").items()}
    expected = {raw[i]: float(scores[i]) for i in raw}

    rec = Recommender.load(world["export"], runtime=runtime)
    assert rec.runtime == runtime
    log = make_log().filter(pl.col("user_id") == 0)
    out = rec.recommend(log, k=len(expected), at=at(days=12))
    served = dict(zip(out["items"][0].to_list(), out["scores"][0].to_list()))
    assert served.keys() == expected.keys()
    for item, score in expected.items():
        assert served[item] == pytest.approx(score, abs=1e-4), item


def test_add_items_pools_a_split_string(world: dict[str, Any]) -> None:
    model, data = world["model"], world["data"]
    rec = Recommender.load(world["export"], runtime="torch")
    added = rec.add_items([{"item_id": 40, "genres": "C| D", "tags": "t1|zzz"}, {"item_id": 41}])
    g, t = vocab(data, "genres"), vocab(data, "tags")
    assert added["genres"].to_list() == [g["C"], 1] and added["tags"].to_list() == [t["t1"], 1]  # the first value
    assert added["genres_values"].to_list() == [[g["C"], g["D"]], []]
    assert added["tags_values"].to_list() == [[t["t1"], 1], []]  # zzz: unseen, 1
    assert float(model.cold_scale) == 1.0
    torch.testing.assert_close(rec.item_vecs[-2], expected_vector(model, data, "C|D", "t1|zzz"), rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.item_vecs[-1], expected_vector(model, data, None, None), rtol=0, atol=1e-6)


def test_vocab_from_refuses_another_value_separator(world: dict[str, Any], tmp_path: Path) -> None:
    """The kept values were split with '|': split with ';', 'A|B' would be appended as one new value."""
    genres = {k: v.replace("|", ";") if v else v for k, v in GENRES.items()}
    with pytest.raises(SdmError, match=r"--value-sep: '\|' in .*, ';' in this run"):
        sessionize(tmp_path, make_log(items=10), genres, vocab_from=world["data"], value_sep=";")
    assert not (tmp_path / "data").exists()
    with pytest.raises(SdmError, match="--value-sep ';' splits the values of --multi-valued features, and none is named"):
        sessionize(tmp_path, make_log(items=10), genres, multi_valued=[], value_sep=";")


def test_warm_start_takes_the_new_datas_value_buffers(world: dict[str, Any], tmp_path: Path) -> None:
    genres = {**GENRES, 18: "D|B", 19: "A|C|B|D"}
    data_b = sessionize(tmp_path, make_log(items=10), genres, vocab_from=world["data"])
    run_b = build_run(train_cfg(data_b, tmp_path / "m2", init_from=world["model_dir"]), 0, 1, 0.0)
    want = load_item_values(data_b, read_manifest(data_b), ["genres", "tags"])
    old = world["model"].item_values.rows(None)
    new = run_b.model.item_values.rows(None)
    g = vocab(data_b, "genres")
    for f in ("genres", "tags"):
        assert torch.equal(new[f], want[f])
        n, k = old[f].shape
        assert new[f].shape[0] == n + 2 and torch.equal(new[f][:n, :k], old[f])  # the old items keep their values
    assert new["genres"][vocab(data_b, "item")[19]].tolist() == [g["A"], g["C"], g["B"], g["D"]]
    assert run_b.warm.items_before == 10 and run_b.warm.items_after == 12
    assert run_b.warm.carried == run_b.warm.total

    # a checkpoint of a model that read first values only (no multi_valued, no buffers) loads as that model,
    # and seeds a model that pools
    ckpt = torch.load(world["model_dir"] / "best.pt", weights_only=True)
    ckpt["model_config"].pop("multi_valued")
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("item_values.")}
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    torch.save(ckpt, old_dir / "best.pt")
    first = load_model(old_dir, world["data"], world["manifest"], torch.device("cpu"))
    assert first.config.multi_valued == [] and not list(first.item_values.buffers())
    run_c = build_run(train_cfg(data_b, tmp_path / "m3", init_from=old_dir), 0, 1, 0.0)
    assert torch.equal(run_c.model.item_values.rows(None)["genres"], want["genres"])


def test_without_multi_valued_features_the_model_is_unchanged(tmp_path: Path) -> None:
    """Data without multi-valued features builds today's model (no buffer, the single-value path); the
    same log declared multi-valued with one value per item gives a bit-identical model: the same
    parameters in the same order from the same seed, the same random draws (dropout, id dropout),
    outputs, loss and gradients."""
    single = {i: (g or "").split("|")[0] or None for i, g in GENRES.items()}
    log = make_log().with_columns(pl.col("tags").str.split("|").list.first())
    plain = sessionize(tmp_path / "plain", log, single, multi_valued=[])
    multi = sessionize(tmp_path / "multi", log, single)
    models = []
    for data in (plain, multi):
        manifest = read_manifest(data)
        cfg = build_model_config(TrainConfig(data=data, embedding_dim=16, id_dropout=0.5, repeat=True), manifest)
        torch.manual_seed(0)
        model = SDM(cfg, load_item_table(data, manifest, list(cfg.item_vocab)), load_item_values(data, manifest, cfg.multi_valued))
        models.append(model.train())
    plain_model, multi_model = models
    assert plain_model.config.multi_valued == [] and multi_model.config.multi_valued == ["genres", "tags"]
    assert not [k for k in plain_model.state_dict() if k.startswith("item_values.")]
    params = [list(m.named_parameters()) for m in models]
    assert [n for n, _ in params[0]] == [n for n, _ in params[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*params))
    batch = next(iter(SessionDataset(plain, "train", 16, ["item", "genres", "tags"], [], shuffle=False)))
    results = []
    for model in models:
        torch.manual_seed(1)
        user, history = model(batch, with_history=True)
        # the full softmax reads every item's vector, the sampled one the tower of the targets and negatives
        loss = sdm_loss(model, batch, user, loss="full", history=history) + sdm_loss(
            model, batch, user, loss="sampled", sampler=NegativeSampler(torch.ones(model.config.item_vocab["item"]), 8)
        )
        loss.backward()
        results.append([user, loss, *[p.grad for p in model.parameters()], torch.rand(4)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_values_beyond_the_cap_are_dropped() -> None:
    lists = pa.array([list(range(2, 2 + MAX_VALUES + 5)), [3], None, []], pa.list_(pa.int32()))
    padded = pad_values(lists)
    assert padded.shape == (4, MAX_VALUES)
    assert padded[0].tolist() == list(range(2, 2 + MAX_VALUES)) and padded[1].tolist() == [3] + [0] * (MAX_VALUES - 1)
    assert not padded[2:].any()


@pytest.mark.parametrize(
    ("file", "column", "values", "message"),
    [
        ("catalogue.parquet", "genres_values", "beyond", "column 'genres_values' has indices in"),
        ("catalogue.parquet", "tags_values", "zero", "column 'tags_values' has indices in [0,"),
        ("catalogue.parquet", "genres_values", "strings", "expected lists of int32 value indices"),
        ("items.parquet", "genres_values", "beyond", "column 'genres_values' has indices in"),
    ],
)
def test_bad_value_lists_are_one_line_data_errors(world: dict[str, Any], tmp_path: Path, file: str, column: str,
                                                  values: str, message: str) -> None:  # fmt: skip
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    manifest = read_manifest(data)
    table = pl.read_parquet(data / file)
    size = manifest["vocab_sizes"][column.removesuffix("_values")]
    bad = {"beyond": [[2, size]], "zero": [[0]], "strings": [["A"]]}[values]
    rows = bad + table[column].to_list()[1:]
    if values == "strings":
        rows = [[str(v) for v in row] for row in rows]
    table = table.with_columns(pl.Series(column, rows, dtype=pl.List(pl.String if values == "strings" else pl.Int32)))
    table.write_parquet(data / file)
    with pytest.raises(DataError) as exc:
        if file == "catalogue.parquet":
            read_catalogue(data, manifest)
        else:
            load_item_values(data, manifest, ["genres", "tags"])
    assert message in one_line(exc) and file in str(exc.value)


def test_model_refuses_bad_multi_valued_settings() -> None:
    vocab_sizes = {"item": 5, "genres": 4}
    with pytest.raises(ValueError, match="multi_valued must name"):
        ModelConfig(item_vocab=vocab_sizes, multi_valued=["item"])
    with pytest.raises(ValueError, match="multi_valued must name"):
        ModelConfig(item_vocab=vocab_sizes, multi_valued=["brand"])
    cfg = ModelConfig(item_vocab=vocab_sizes, multi_valued=["genres"], embedding_dim=8)
    table = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3], [4, 1]])
    with pytest.raises(ValueError, match="lacks the multi-valued features"):
        SDM(cfg, table)
    with pytest.raises(ValueError, match="outside its vocabulary"):
        SDM(cfg, table, {"genres": torch.tensor([[0], [0], [2], [4], [0]])})
    with pytest.raises(ValueError, match="rows 0 .padding. and 1 .OOV."):
        SDM(cfg, table, {"genres": torch.tensor([[0], [2], [2], [3], [0]])})
    assert json.loads(ModelConfig(item_vocab=vocab_sizes).model_dump_json())["multi_valued"] == []
