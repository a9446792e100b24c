"""Cold items: the catalogue reader, `--candidates catalogue` (availability rule, cold/warm metrics,
raw ids in the dump), `--exclude-history`, the cold-category baseline and id dropout.

The shard directory is written by hand (format 1, one side feature `category`),
with a `catalogue.parquet` of three cold items; every expected value below is
worked out from the sessions by eye.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shard_builder import file_table

from sdm.config import EvaluateConfig, TrainConfig
from sdm.errors import ConfigError, DataError
from sdm.model import SDM, ModelConfig, NegativeSampler, sdm_loss
from sdm.pipeline.baselines import BASELINES, ColdCategory, Popularity, build_baseline
from sdm.pipeline.catalogue import read_catalogue
from sdm.pipeline.dataset import SessionDataset, read_manifest
from sdm.pipeline.evaluate import evaluate
from sdm.pipeline.ranking import evaluate_model
from sdm.pipeline.scoring import ModelScorer, session_queries
from sdm.pipeline.metrics import chunked_topk, metric_sums
from sdm.pipeline.modelspec import build_model_config
from sdm.pipeline.tables import load_item_table

HOUR, MINUTE = 3_600_000_000, 60_000_000
ITEMS = {"a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "f": 7}  # the training vocabulary, V = 8
CATEGORY = {"a": 2, "b": 2, "c": 3, "d": 3, "e": 4, "f": 4, "x": 2, "y": 3, "z": 4, "w": 1}  # w: an unseen value
HASH = {"x": 101, "y": 102, "z": 103, "w": 104}  # seq_oov of the OOV items; w is in no catalogue
COLD = ["x", "y", "z"]  # candidates 8, 9, 10
# known_from: x always; y from 1000 h + 30 min; z from its first event (1001 h + 1 min)
KNOWN = {"x": None, "y": 1000 * HOUR + 30 * MINUTE, "z": 1001 * HOUR + MINUTE}
# split -> user -> sessions (start hour, items); events one minute apart; a user's earlier
# sessions of the split are the long-term window of the later ones
SESSIONS: dict[str, dict[str, list[tuple[int, list[str]]]]] = {
    "train": {"u1": [(0, ["a", "b", "c"])], "u2": [(1, ["d", "e", "f"])], "u3": [(2, ["a", "c", "e"])]},
    "valid": {},
    "test": {
        "u1": [(1000, ["a", "x", "b", "x"]), (1002, ["c", "d", "a"])],
        "u2": [(1000, ["c", "y", "d"])],
        "u3": [(1001, ["e", "z", "z"])],
        "u4": [(1003, ["b", "w", "a"])],
    },
}
USERS = ["u1", "u2", "u3", "u4"]
KS = [1, 3]


def _shard(root: Path, split: str, first_sess: int) -> tuple[dict[str, Any], int]:
    """Write split/part-00000.parquet; (its manifest entry, next session id)."""
    rows, sess_id = [], first_sess
    for user, sessions in SESSIONS[split].items():
        r: dict[str, Any] = {k: [] for k in ("ts", "seq_item", "seq_category", "seq_oov", "sess_id", "sess_start",
                                              "sess_len", "long_start", "long_end")}  # fmt: skip
        for hour, items in sessions:
            r["long_start"].append(0)
            r["long_end"].append(len(r["ts"]))
            r["sess_start"].append(len(r["ts"]))
            r["sess_len"].append(len(items))
            r["sess_id"].append(sess_id)
            sess_id += 1
            for j, raw in enumerate(items):
                r["ts"].append(hour * HOUR + j * MINUTE)
                r["seq_item"].append(ITEMS.get(raw, 1))
                r["seq_category"].append(CATEGORY[raw])
                r["seq_oov"].append(HASH.get(raw, 0))
        rows.append({"user_id": user, "user": 2 + USERS.index(user), **r})
    lists = {"ts": pa.int64(), "seq_item": pa.int32(), "seq_category": pa.int32(), "seq_oov": pa.int64(),
             "sess_id": pa.int64(), **dict.fromkeys(("sess_start", "sess_len", "long_start", "long_end"), pa.int32())}
    schema = pa.schema([("user_id", pa.string()), ("user", pa.int32()), *[(c, pa.list_(t)) for c, t in lists.items()]])
    path = f"{split}/part-00000.parquet"
    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / path)
    lens = [len(items) for sessions in SESSIONS[split].values() for _, items in sessions]
    stats = {"sessions": len(lens), "events": sum(lens), "samples": sum(max(n - 1, 0) for n in lens)}
    return {"users": len(rows), **stats, "shards": [{"path": path, "rows": len(rows), **stats}]}, sess_id


def catalogue_table(items: list[str] = COLD) -> pa.Table:
    """catalogue.parquet's table for the cold items `items`, as the format defines it."""
    return pa.table({
        "item_id": pa.array(items, pa.string()),
        "oov_hash": pa.array([HASH[i] for i in items], pa.int64()),
        "known_from": pa.array([KNOWN[i] for i in items], pa.timestamp("us", tz="UTC")),
        "category": pa.array([CATEGORY[i] for i in items], pa.int32()),
    })  # fmt: skip


def _vocab(path: Path, raws: list[str], counts: list[int]) -> None:
    """A vocabulary file: raw values at indices 2, 3, ... with their training counts."""
    index = pa.array(range(2, 2 + len(raws)), pa.int32())
    pq.write_table(pa.table({"raw": raws, "index": index, "count": pa.array(counts, pa.int64())}), path)


def write_data(root: Path, catalogue: pa.Table | None = None, items: int | None = None) -> Path:
    """The shard directory, with `catalogue` (default: the three cold items) as catalogue.parquet."""
    root.mkdir(parents=True, exist_ok=True)
    splits, sess = {}, 0
    for split in ("train", "valid", "test"):
        splits[split], sess = _shard(root, split, sess)
    (root / "vocab").mkdir(exist_ok=True)
    raws = list(ITEMS)
    _vocab(root / "vocab/item.parquet", raws, [10 - ITEMS[r] for r in raws])  # popularity a > b > ... > f
    _vocab(root / "vocab/category.parquet", ["c1", "c2", "c3"], [5, 3, 1])
    _vocab(root / "vocab/user.parquet", USERS, [1, 1, 1, 1])
    item_table = {"item": pa.array([ITEMS[r] for r in raws], pa.int32()), "item_id": raws,
                  "category": pa.array([CATEGORY[r] for r in raws], pa.int32())}  # fmt: skip
    pq.write_table(pa.table(item_table), root / "items.parquet")
    table = catalogue_table() if catalogue is None else catalogue
    pq.write_table(table, root / "catalogue.parquet")
    manifest = {
        "format": "sdm-shards", "version": 1, "fingerprint": "fp-cold", "item_features": ["item", "category"],
        "user_features": ["user"], "vocab_sizes": {"item": 8, "category": 5, "user": 6}, "num_items": 8,
        "max_session_len": 50, "max_long_len": 50, "splits": splits, "dropped": {},
        "catalogue": {"path": "catalogue.parquet", "items": table.num_rows if items is None else items},
    }  # fmt: skip
    manifest["files"] = file_table(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("cold") / "data")


class FixedScorer:
    """The same scores for every query: x > y > z > a > b > ... > f (candidate j scores -j, cold items +100)."""

    name = "fixed"
    scores_cold = True

    def __init__(self, total: int = 11) -> None:
        self.scores = -torch.arange(total, dtype=torch.float32)
        self.scores[8:] += 100

    def begin_batch(self, batch: dict[str, Any]) -> None:
        return None

    def score_fn(self, state: Any, qb: torch.Tensor, qp: torch.Tensor, prefix: torch.Tensor):
        return lambda start, end: self.scores[start:end].expand(len(qb), -1).clone()


def _model(seed: int = 0, **kw: Any) -> SDM:
    torch.manual_seed(seed)
    cfg = ModelConfig(variant="PSDMMAL-N", item_vocab={"item": 8, "category": 5}, user_vocab={"user": 6},
                      embedding_dim=8, **kw)  # fmt: skip
    table = torch.tensor([[0, 0], [1, 1]] + [[ITEMS[r], CATEGORY[r]] for r in ITEMS])  # row i: item i, its category
    return SDM(cfg, table).eval()


def _dump(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(user, position) -> row of a top-K dump (every test session of a user starts at another time)."""
    rows = pq.read_table(path).to_pylist()
    return {(r["user_id"], r["session_start"].hour, r["position"]): r for r in rows}  # type: ignore[misc]


# -- the catalogue file --------------------------------------------------------------


def test_read_catalogue(data: Path) -> None:
    cat = read_catalogue(data, read_manifest(data))
    assert len(cat) == 3 and cat.candidates == 11 and cat.item_id.to_pylist() == COLD
    assert cat.oov_hash.tolist() == [101, 102, 103] and cat.features["category"].tolist() == [2, 3, 4]
    assert cat.known_from[0] == torch.iinfo(torch.int64).min and cat.known_from[1:].tolist() == [KNOWN["y"], KNOWN["z"]]


@pytest.mark.parametrize(
    "table, items, message",
    [
        (catalogue_table().select(["oov_hash", "item_id", "known_from", "category"]), None, "columns"),
        (catalogue_table().set_column(1, "oov_hash", pa.array([101, 102, 103], pa.int32())), None, "oov_hash is int32"),
        (catalogue_table().set_column(2, "known_from", pa.array([1, 2, 3], pa.timestamp("us"))), None, "known_from"),
        (catalogue_table().set_column(3, "category", pa.array([2, 5, 4], pa.int32())), None, "outside 1 .. 4"),
        (catalogue_table().set_column(3, "category", pa.array([2, 0, 4], pa.int32())), None, "outside"),
        (catalogue_table().set_column(1, "oov_hash", pa.array([101, 101, 103], pa.int64())), None, "occurs twice"),
        (catalogue_table().set_column(0, "item_id", pa.array(["x", "x", "z"])), None, "item_id occurs twice"),
        (catalogue_table().set_column(1, "oov_hash", pa.array([101, None, 103], pa.int64())), None, "nulls"),
        (catalogue_table().set_column(0, "item_id", pa.array(["x", "b", "z"])), None, "item 'b' is in the item vocabulary"),
        (catalogue_table().set_column(0, "item_id", pa.array([7, 8, 9])), None, "item_id holds integers"),
        (catalogue_table(), 4, "4"),
    ],
)
def test_bad_catalogue_is_one_line(tmp_path: Path, table: pa.Table, items: int | None, message: str) -> None:
    root = write_data(tmp_path / "data", table, items)
    with pytest.raises(DataError, match=message) as err:
        read_catalogue(root, read_manifest(root))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", ["/etc/catalogue.parquet", "../other/catalogue.parquet", "vocab/../catalogue.parquet", 7])
def test_a_catalogue_path_outside_the_directory_is_refused(tmp_path: Path, path: Any) -> None:
    """The manifest's catalogue path is data: it never leads outside the data directory."""
    root = write_data(tmp_path / "data")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["catalogue"]["path"] = path
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="catalogue path .* is not a file inside the directory"):
        read_manifest(root)


def test_an_unlisted_catalogue_is_refused(tmp_path: Path) -> None:
    root = write_data(tmp_path / "data")
    pq.write_table(catalogue_table(), root / "other.parquet")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["catalogue"]["path"] = "other.parquet"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no entry in its files table"):
        read_manifest(root)


def test_no_catalogue_in_manifest(tmp_path: Path) -> None:
    root = write_data(tmp_path / "data")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["catalogue"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no cold-item catalogue"):
        evaluate_model(FixedScorer(), root, "test", KS, candidates="catalogue")


# -- --candidates vocabulary: today's numbers --------------------------------------------


def _reference(scorer: Any, data: Path, ks: list[int], exclude_seen: bool = False) -> dict[str, float]:
    """The evaluation loop as it was before cold candidates (vocabulary only), for exact comparison."""
    ds = SessionDataset(data, "test", 256, shuffle=False)
    sums: dict[str, float] = {}
    n = 0
    for batch in ds:
        q = session_queries(batch["seq"]["item"], batch["seq_len"], batch.get("seq_oov"))
        state = scorer.begin_batch(batch)
        fn = scorer.score_fn(state, q.qb, q.qp, q.prefix)
        topk = chunked_topk(fn, 8, max(ks), 1024, q.prefix if exclude_seen else None)
        for k, v in metric_sums(topk, q.target, q.targets, ks).items():
            sums[k] = sums.get(k, 0.0) + v
        n += len(q)
    return {k: v / n for k, v in sums.items()}


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_vocabulary_candidates_give_todays_numbers(data: Path, exclude_seen: bool) -> None:
    model = _model()
    out = evaluate_model(model, data, "test", KS, exclude_seen=exclude_seen)
    ref = _reference(ModelScorer(model), data, KS, exclude_seen)
    assert {k: out[k] for k in ref} == ref  # exactly, not approximately
    assert out["candidates"] == "vocabulary" and "targets" not in out and out["queries"] == 11
    assert out["oov_target_share"] == 6 / 11  # x, x, y, z, z, w: none of them in the vocabulary
    pop = Popularity.from_data(data)
    out = evaluate_model(pop, data, "test", KS, exclude_seen=exclude_seen)
    assert {k: out[k] for k in ref} == _reference(pop, data, KS, exclude_seen)


# -- --candidates catalogue ------------------------------------------------------------


def test_catalogue_candidates_by_hand(data: Path, tmp_path: Path) -> None:
    out = evaluate_model(FixedScorer(), data, "test", KS, candidates="catalogue", dump_topk=tmp_path / "t.parquet")
    # 11 queries: cold targets x (u1 t=2), x (u1 t=4), y (u2 t=2), z (u3 t=2), z (u3 t=3); w (u4 t=2) is in no catalogue.
    assert out["queries"] == 11 and out["cold_items"] == 3
    assert out["targets"]["cold"]["queries"] == 5 and out["targets"]["warm"]["queries"] == 5
    assert out["cold_target_share"] == 5 / 11 and out["oov_target_share"] == 6 / 11
    # K=1: x (always known) is everyone's first item, so only the two x targets hit.
    assert out["hr@1"] == 2 / 11 and out["targets"]["cold"]["hr@1"] == 2 / 5 and out["targets"]["warm"]["hr@1"] == 0
    rows = _dump(tmp_path / "t.parquet")
    # u2 at 1000 h: y is known from 1000 h + 30 min only, z later still: the list is x, a, b.
    assert rows[("u2", 16, 2)]["topk"] == ["x", "a", "b"] and rows[("u2", 16, 2)]["target"] == "y"
    assert rows[("u2", 16, 2)]["target_oov"] == 102
    # u3's first z is z's first event anywhere: a miss (z unknown at 1001 h); one minute later z is known.
    assert rows[("u3", 17, 2)]["topk"] == ["x", "y", "a"]
    assert rows[("u3", 17, 3)]["topk"] == ["x", "y", "z"] and rows[("u3", 17, 3)]["target"] == "z"
    assert rows[("u4", 19, 2)]["target"] is None and rows[("u4", 19, 2)]["target_oov"] == 104  # w stays unknown
    # HR@3: u1 t=2 (x), u1 t=4 (x), u3 t=3 (z) of the cold; u1 t=3 (b in x, a, b) of the warm
    assert out["targets"]["cold"]["hr@3"] == 3 / 5 and out["targets"]["warm"]["hr@3"] == 1 / 5
    assert out["hr@3"] == 4 / 11


def test_catalogue_prefix_cold_items_are_excluded_with_exclude_seen(data: Path, tmp_path: Path) -> None:
    dump = tmp_path / "t.parquet"
    evaluate_model(FixedScorer(), data, "test", KS, candidates="catalogue", exclude_seen=True, dump_topk=dump)
    rows = _dump(tmp_path / "t.parquet")
    assert rows[("u1", 16, 3)]["topk"] == ["b", "c", "d"]  # prefix a, x: x (cold, seen) and a masked; y, z not known yet


def test_exclude_history(data: Path, tmp_path: Path) -> None:
    # u1's second session (1002 h) has the first as its long-term window: a, x, b, x.
    for candidates, expected in (("vocabulary", ["d", "e", "f"]), ("catalogue", ["y", "z", "d"])):
        dump = tmp_path / f"{candidates}.parquet"
        evaluate_model(FixedScorer(11 if candidates == "catalogue" else 8), data, "test", KS, candidates=candidates,
                       exclude_history=True, dump_topk=dump)  # fmt: skip
        rows = _dump(dump)
        assert rows[("u1", 18, 2)]["topk"] == expected  # prefix c, history a, x, b: all masked
        seen_only = tmp_path / f"{candidates}-seen.parquet"
        evaluate_model(FixedScorer(11 if candidates == "catalogue" else 8), data, "test", KS, candidates=candidates,
                       exclude_seen=True, dump_topk=seen_only)  # fmt: skip
        assert _dump(seen_only)[("u1", 18, 2)]["topk"][0] == ("x" if candidates == "catalogue" else "a")


def test_model_scores_cold_items_by_their_side_features(data: Path) -> None:
    model = _model()
    cat = read_catalogue(data, read_manifest(data))
    scorer = ModelScorer(model, catalogue=cat)
    assert scorer.items.shape == (11, 8)
    with torch.no_grad():
        by_hand = model.item_input([torch.zeros(3, dtype=torch.long), torch.tensor([2, 3, 4])])
        assert torch.equal(scorer.items[:8], model.all_item_vectors())
    torch.testing.assert_close(scorer.items[8:], by_hand)
    out = evaluate_model(model, data, "test", KS, candidates="catalogue")
    assert out["targets"]["cold"]["queries"] == 5 and 0 <= out["targets"]["cold"]["hr@3"] <= 1


def test_repeat_head_copies_cold_items(data: Path, tmp_path: Path) -> None:
    model = _model(repeat=True, repeat_prior=50.0)  # a huge recency copy bonus: the last prefix item ranks first
    out = evaluate_model(model, data, "test", [1], candidates="catalogue", dump_topk=tmp_path / "t.parquet")
    rows = _dump(tmp_path / "t.parquet")
    assert rows[("u3", 17, 3)]["topk"] == ["z"] and rows[("u1", 16, 3)]["topk"] == ["x"]  # prefixes e, z and a, x
    assert rows[("u1", 16, 4)]["topk"] == ["b"]  # a vocabulary item is copied as before
    assert out["targets"]["cold"]["hr@1"] == 1 / 5  # the z after z


def test_faiss_with_catalogue_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exact index only") as err:
        cfg = EvaluateConfig(data=data, out=tmp_path / "e", baseline=["popularity"], candidates="catalogue", index="faiss")
        evaluate(cfg)
    assert "\n" not in str(err.value)


def test_evaluate_report_has_cold_and_warm_rows(data: Path, tmp_path: Path) -> None:
    cfg = EvaluateConfig(data=data, out=tmp_path / "e", baseline=["popularity"], candidates="catalogue", k=[1, 3],
                         dump_topk=True, exclude_history=True)  # fmt: skip
    res = evaluate(cfg)
    report = json.loads((cfg.out / "metrics.json").read_text())
    assert report["candidates"] == "catalogue" and report["catalogue"] == 6 + 3 and report["cold_items"] == 3
    method = report["methods"][0]
    assert method["exclude_seen"] and method["exclude_history"]
    assert set(method["targets"]) == {"cold", "warm"}
    assert method["targets"]["cold"]["hr@3"] == 0.0  # popularity cannot know cold items
    assert "| popularity | cold (5) | 3 |" in res["table"] and "| popularity | warm (5) | 1 |" in res["table"]
    assert "| popularity | all (11) | 1 |" in res["table"]
    assert (cfg.out / "topk_popularity.parquet").is_file()


# -- the cold-category baseline ----------------------------------------------------------


def test_cold_category_baseline(data: Path, tmp_path: Path) -> None:
    assert "cold-category" in BASELINES
    scorer = build_baseline("cold-category", data)
    assert isinstance(scorer, ColdCategory) and scorer.feature == "category"
    dump = tmp_path / "t.parquet"
    out = evaluate_model(scorer, data, "test", KS, candidates="catalogue", dump_topk=dump)
    rows = _dump(dump)
    # u1 at 1000 h, prefix a (category c1): c1's cold x (n=1) first, then c1's warm a, b by popularity;
    assert rows[("u1", 16, 2)]["topk"] == ["x", "a", "b"]
    # u3 at 1001 h + 1 min, prefix e, z (c3, c3): z (cold c3, n=2), then e, f (warm c3), by popularity
    assert rows[("u3", 17, 3)]["topk"] == ["z", "e", "f"]
    # u1 at 1002 h, prefix c (c2): y (cold c2, newest) first
    assert rows[("u1", 18, 2)]["topk"] == ["y", "c", "d"]
    assert out["targets"]["cold"]["hr@1"] == 3 / 5  # x (u1 t=2), x (u1 t=4), z (u3 t=3)
    vocab = evaluate_model(scorer, data, "test", KS, dump_topk=tmp_path / "v.parquet")
    assert _dump(tmp_path / "v.parquet")[("u1", 16, 2)]["topk"] == ["a", "b", "c"]  # no cold items: a, b (c1) first
    assert vocab["hr@1"] <= out["hr@1"]


# -- id dropout -------------------------------------------------------------------------


def _batch() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    items = torch.randint(2, 8, (3, 5), generator=g)
    cats = torch.tensor([[0, 2, 2, 3, 3, 4, 4, 2][i] for i in items.flatten().tolist()]).view(3, 5)
    return {"seq": {"item": items, "category": cats}, "seq_len": torch.tensor([5, 4, 2]),
            "long": {"item": items[:, :2], "category": cats[:, :2]}, "long_len": torch.tensor([2, 0, 1]),
            "user": {"user": torch.tensor([2, 3, 4])}}  # fmt: skip


def _loss(model: SDM, loss: str) -> torch.Tensor:
    model.train()
    torch.manual_seed(7)
    sampler = NegativeSampler(torch.ones(8), num_negatives=6)
    gen = torch.Generator().manual_seed(3)
    batch = _batch()
    return sdm_loss(model, batch, model(batch), loss=loss, sampler=sampler, generator=gen)


@pytest.mark.parametrize("loss", ["full", "sampled", "inbatch"])
def test_id_dropout_zero_is_todays_loss(loss: str) -> None:
    """id_dropout 0: the loss and every later random draw are those of the item tower without
    the option (its plain lookup of the item table, as before)."""
    before = _model(dropout=0.3)
    before._drop_ids = lambda rows: rows  # the item tower as it was
    plain = _loss(before, loss)
    after = torch.rand(4)
    model = _model(dropout=0.3, id_dropout=0.0)
    assert torch.equal(_loss(model, loss), plain) and torch.equal(torch.rand(4), after)
    assert torch.equal(model.all_item_vectors(), model.item_input(model.item_table.unbind(-1)))


def test_id_dropout_drops_ids_in_training_only() -> None:
    model = _model(id_dropout=0.5)
    ids = torch.arange(2, 8).repeat(50)  # 300 occurrences
    side = model.cold_item_vectors(model.item_table[ids][:, 1:])
    full = model.item_input(model.item_table[ids].unbind(-1))
    model.eval()
    assert torch.equal(model.item_vectors(ids), full)  # evaluation: never dropped
    model.train()
    torch.manual_seed(0)
    vecs = model.item_vectors(ids)
    dropped = (vecs - side).abs().amax(1) < 1e-6
    kept = (vecs - full).abs().amax(1) < 1e-6
    assert (dropped ^ kept).all() and 100 < int(dropped.sum()) < 200  # each occurrence alone, about half
    assert not torch.equal(_loss(model, "full"), _loss(_model(), "full"))


def test_id_dropout_reaches_the_model_config(data: Path) -> None:
    manifest = read_manifest(data)
    cfg = build_model_config(TrainConfig(data=data, id_dropout=0.3), manifest)
    assert cfg.id_dropout == 0.3 and build_model_config(TrainConfig(data=data), manifest).id_dropout == 0.0
    with pytest.raises(ValueError, match="id_dropout"):
        ModelConfig(item_vocab={"item": 8}, id_dropout=1.0)
    old = {k: v for k, v in cfg.model_dump().items() if k != "id_dropout"}  # a checkpoint written before the option
    assert ModelConfig(**old).id_dropout == 0.0
    assert load_item_table(data, manifest).shape == (8, 2)
