"""`--vocab-from PREV_DATA`: stable vocabularies for daily retraining.

Checked: an unchanged log gives the plain run's files byte for byte; on random
logs A and B (B adds and drops items, users and feature values) every value of
A keeps its index in B, B's new values follow in count order, and B's shards,
items table and catalogue mean what a plain run of B means (a reference built
from the two plain runs); wrong PREV_DATA is refused in one line; buckets and
the Ray engine give the one-bucket result.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import vocab, write_log
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sessionize_scale import _cfg, _random_log, _same_output

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.names import vocab_file
from sdm.manifest import file_table, read_manifest
from sdm.sessionize import encode, run

BASE = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
FEATURES = {"item_features": ["category", "brand"], "user_features": ["age"]}


def _write(tmp: Path, name: str, case: dict[str, Any]) -> dict[str, Path]:
    """A case's log (category in the log), items table (brand) and users table (age) as Parquet files."""
    rows = case["events"]
    log = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [BASE + dt.timedelta(seconds=r[2]) for r in rows],
            "category": [case["category"][r[1]] for r in rows],
        },
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC"), "category": pl.String},
    )
    items = pl.DataFrame({"item_id": list(case["brand"]), "brand": list(case["brand"].values())}, schema={"item_id": pl.Int64, "brand": pl.Int64})
    users = pl.DataFrame({"user_id": list(case["age"]), "age": list(case["age"].values())}, schema={"user_id": pl.Int64, "age": pl.Int64})
    return {
        "log": write_log(log, tmp / name / "log.parquet"),
        "items": write_log(items, tmp / name / "items.parquet"),
        "users": write_log(users, tmp / name / "users.parquet"),
    }


def _sessionize(files: dict[str, Path], out: Path, **kw: Any) -> dict[str, Any]:
    cfg = SessionizeConfig(out=out, items=files["items"], users=files["users"], min_shards=2, max_session_len=3, **FEATURES, **kw)
    return run(cfg, files["log"], progress=False)


def _rows(out: Path, name: str) -> list[tuple[Any, int, int]]:
    """A vocabulary as (raw, index, count) rows in index order."""
    return pl.read_parquet(out / vocab_file(name)).sort("index").rows()


@st.composite
def log_pair(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Logs A and B: B's items, users and feature values overlap A's, with some gone and some new."""

    def one(items: range, users: range, categories: list[str]) -> dict[str, Any]:
        n = draw(st.integers(3, 25))
        t, events = 0, []
        for _ in range(n):
            t += draw(st.sampled_from([0, 30, 700, 86_400]))
            events.append((draw(st.sampled_from(users)), draw(st.sampled_from(items)), t))
        pool = list(items) + [items.stop + 1, items.stop + 2]  # the items table may know items without events
        return {
            "events": events,
            "category": {i: draw(st.sampled_from(categories)) for i in items},
            "brand": {i: draw(st.integers(1, 5)) for i in draw(st.lists(st.sampled_from(pool), unique=True, max_size=8))},
            "age": {u: draw(st.sampled_from([20, 30, 40, 50])) for u in draw(st.lists(st.sampled_from(users), unique=True))},
        }

    return one(range(1, 10), range(1, 6), ["x", "y", "z"]), one(range(4, 14), range(3, 9), ["y", "z", "w", "v"])


def _expected_vocab(a: list[tuple], b: list[tuple]) -> list[tuple]:
    """The reference: A's values at A's indices with B's counts (0 if gone), then B's new values by (-count, raw)."""
    counts = {raw: c for raw, _, c in b}
    old = [(raw, i, counts.get(raw, 0)) for raw, i, _ in a]
    known = {raw for raw, _, _ in a}
    new = sorted(((raw, c) for raw, _, c in b if raw not in known), key=lambda rc: (-rc[1], rc[0]))
    return old + [(raw, len(a) + 2 + k, c) for k, (raw, c) in enumerate(new)]


def _decoded(out: Path, log_items: list[int], plain: Path) -> list[dict[str, Any]]:
    """Every session of `out` with raw values: items (an OOV one through its `seq_oov` hash), category, user, age.

    A feature value is kept only when the plain run `plain` knows it (else None, as 1 decodes there), so
    a run that knows more values decodes like one that knows fewer.
    """
    def inverse(name: str) -> dict[int, Any]:
        known = set(vocab(plain, name))
        return {i: (r if r in known else None) for r, i in vocab(out, name).items()}

    items = {i: r for r, i in vocab(out, "item").items()}
    by_hash = dict(zip(encode.oov_hash(pl.Series(log_items, dtype=pl.Int64)).to_list(), log_items))
    cats, users, ages = inverse("category"), inverse("user"), inverse("age")
    sessions = []
    for path in sorted(out.glob("*/part-*.parquet")):
        for row in pl.read_parquet(path).iter_rows(named=True):
            raw = [items[i] if i != 1 else by_hash[h] for i, h in zip(row["seq_item"], row["seq_oov"])]
            cat = [cats.get(c) for c in row["seq_category"]]
            for k, sid in enumerate(row["sess_id"]):
                a, n, lo, hi = row["sess_start"][k], row["sess_len"][k], row["long_start"][k], row["long_end"][k]
                sessions.append({
                    "sess_id": sid, "split": path.parent.name, "user_id": row["user_id"], "user": users.get(row["user"]),
                    "age": ages.get(row["user_age"]), "ts": row["ts"][a : a + n], "items": raw[a : a + n],
                    "long": raw[lo:hi], "category": cat[a : a + n],
                })  # fmt: skip
    return sorted(sessions, key=lambda s: s["sess_id"])


def _check_items_table(a: Path, b: Path, vf: Path, b_case: dict[str, Any]) -> None:
    """items.parquet of the --vocab-from run: B's description where B has one, else A's row, else 1.

    category comes from the item's last training event (B's, when B trained on
    the item), brand from the items table (B's, when it has the item).
    """
    plain = vocab(b, "category")
    plain_inv = {i: r for r, i in plain.items()}
    inv = {i: r for r, i in vocab(vf, "category").items()}
    brands = vocab(vf, "brand")
    rows_a = {r["item"]: r for r in pl.read_parquet(a / "items.parquet").iter_rows(named=True)}
    rows_b = {r["item_id"]: r for r in pl.read_parquet(b / "items.parquet").iter_rows(named=True)}
    rows = pl.read_parquet(vf / "items.parquet").rows(named=True)
    assert [r["item"] for r in rows] == list(range(2, len(rows) + 2))
    for r in rows:
        old = rows_a.get(r["item"])  # the row of A's item at this index, if there was one
        if old is not None:
            assert old["item_id"] == r["item_id"]
        if r["item_id"] in rows_b:  # trained on in B: the plain run's value, in the values it knows
            raw = inv.get(r["category"])
            assert plain_inv.get(rows_b[r["item_id"]]["category"]) == (raw if raw in plain else None), r
        else:  # no training event in B: A's value
            assert r["category"] == old["category"], r
        if r["item_id"] in b_case["brand"]:
            assert r["brand"] == brands.get(b_case["brand"][r["item_id"]], 1), r
        else:
            assert r["brand"] == (old["brand"] if old is not None else 1), r


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(log_pair())
def test_indices_stay_and_new_values_follow_against_a_reference(tmp_path_factory, pair):
    tmp = tmp_path_factory.mktemp("vf")
    case_a, case_b = pair
    fa, fb = _write(tmp, "a", case_a), _write(tmp, "b", case_b)
    ma = _sessionize(fa, tmp / "A")
    mb = _sessionize(fb, tmp / "B")
    mv = _sessionize(fb, tmp / "V", vocab_from=tmp / "A")
    for name in ma["vocab_sizes"]:
        old = {raw: i for raw, i, _ in _rows(tmp / "A", name)}
        now = {raw: i for raw, i, _ in _rows(tmp / "V", name)}
        assert {raw: now[raw] for raw in old} == old, name
        assert _rows(tmp / "V", name) == _expected_vocab(_rows(tmp / "A", name), _rows(tmp / "B", name)), name
    # the shards mean what the plain run's mean: same sessions, same raw items, same known values
    log_items = sorted({e[1] for e in case_b["events"]})
    assert _decoded(tmp / "V", log_items, tmp / "B") == _decoded(tmp / "B", log_items, tmp / "B")
    _check_items_table(tmp / "A", tmp / "B", tmp / "V", case_b)
    # cold: what B knows of (events, items table) outside the kept vocabulary
    cold = set(pl.read_parquet(tmp / "V" / "catalogue.parquet")["item_id"].to_list())
    assert cold == (set(log_items) | set(case_b["brand"])) - set(vocab(tmp / "V", "item"))
    assert mv["vocab_from"] == {"path": str(tmp / "A"), "fingerprint": ma["fingerprint"], "vocab_sizes": ma["vocab_sizes"]}
    assert mb["vocab_from"] is None
    read_manifest(tmp / "V")  # the manifest (config with vocab_from) passes the readers' checks


def _fixed(tmp_path: Path) -> dict[str, Path]:
    case = {
        "events": [(1, 1, 0), (1, 2, 30), (2, 1, 86_400), (2, 3, 86_430), (3, 2, 200_000), (3, 4, 200_030), (1, 5, 400_000)],
        "category": {1: "x", 2: "y", 3: "x", 4: "z", 5: "y"},
        "brand": {1: 1, 2: 2, 3: 1, 9: 3},
        "age": {1: 20, 2: 30},
    }
    return _write(tmp_path, "in", case)


def test_unchanged_log_gives_the_plain_run_byte_for_byte(tmp_path):
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    m = _sessionize(files, tmp_path / "V", vocab_from=tmp_path / "A")
    compared = [rel for rel in m["files"] if rel.split("/")[0] in ("train", "valid", "test", "vocab")]
    assert len([r for r in compared if r.startswith("vocab/")]) == 5 and len(compared) > 5
    compared += ["items.parquet", "users.parquet", "catalogue.parquet"]
    for rel in compared:
        assert (tmp_path / "A" / rel).read_bytes() == (tmp_path / "V" / rel).read_bytes(), rel
    assert sorted(m["files"]) == sorted(read_manifest(tmp_path / "A")["files"])


def test_refused_when_the_feature_sets_differ(tmp_path):
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    cfg = SessionizeConfig(
        out=tmp_path / "V", items=files["items"], users=files["users"], item_features=["brand"], user_features=["age"],
        vocab_from=tmp_path / "A",
    )  # fmt: skip
    with pytest.raises(SdmError, match=r"features or settings differ \(item features: 'category' only in .*/A\)") as err:
        run(cfg, files["log"], progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "V").exists()
    cfg = cfg.model_copy(update={"item_features": ["category", "brand"], "user_features": []})
    with pytest.raises(SdmError, match=r"user features: 'age' only in"):
        run(cfg, files["log"], progress=False)


def test_refused_when_out_is_the_previous_directory(tmp_path):
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    before = {p: p.read_bytes() for p in (tmp_path / "A").rglob("*") if p.is_file()}
    with pytest.raises(SdmError, match="vocab-from"):
        _sessionize(files, tmp_path / "A", vocab_from=tmp_path / "A", overwrite=True)
    assert {p: p.read_bytes() for p in (tmp_path / "A").rglob("*") if p.is_file()} == before


def test_refused_when_the_previous_directory_was_edited(tmp_path):
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    good = tmp_path / "A" / "manifest.json"
    m = json.loads(good.read_text())
    shutil.copytree(tmp_path / "A", tmp_path / "E")
    m["config"]["gap"] = "1h"
    (tmp_path / "E" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SdmError, match=r"--vocab-from: .*manifest was edited"):
        _sessionize(files, tmp_path / "V", vocab_from=tmp_path / "E")
    # a vocabulary rewritten with the same size: only its sha256 tells
    shutil.rmtree(tmp_path / "E")
    shutil.copytree(tmp_path / "A", tmp_path / "E")
    item = tmp_path / "E" / vocab_file("category")
    data = bytearray(item.read_bytes())
    at = data.index(b"x")
    data[at : at + 1] = b"q"
    item.write_bytes(bytes(data))
    with pytest.raises(SdmError, match=r"--vocab-from: .*differ from their recorded sha256: vocab/category.parquet"):
        _sessionize(files, tmp_path / "V", vocab_from=tmp_path / "E")
    with pytest.raises(SdmError, match="data directory not found"):
        _sessionize(files, tmp_path / "V", vocab_from=tmp_path / "nothing")
    assert not (tmp_path / "V").exists()


@pytest.mark.parametrize(("raws", "message"), [(["x", "x", "z"], "raw value 'x' has two indices"), (["x", None, "z"], "a null raw value")])
def test_refused_when_a_previous_vocabulary_repeats_or_lacks_a_value(tmp_path, raws, message):
    """A vocabulary rewritten and re-hashed (so the files table agrees) is still refused when a
    value has two indices or none: its index would not be kept, or be kept twice."""
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    path = tmp_path / "A" / vocab_file("category")
    table = pl.read_parquet(path).sort("index")
    assert table.height == 3
    table.with_columns(pl.Series("raw", raws, dtype=pl.String)).write_parquet(path)
    manifest = json.loads((tmp_path / "A" / "manifest.json").read_text())
    manifest["files"] = file_table(tmp_path / "A")
    (tmp_path / "A" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SdmError, match=message):
        _sessionize(files, tmp_path / "V", vocab_from=tmp_path / "A")
    assert not (tmp_path / "V").exists()


def test_refused_when_raw_types_differ(tmp_path):
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    log = pl.read_parquet(files["log"])
    cfg = SessionizeConfig(out=tmp_path / "V", item_features=["category"], vocab_from=tmp_path / "A")
    with pytest.raises(SdmError, match="features or settings differ"):  # brand and age come from tables this run lacks
        run(cfg, files["log"], progress=False)
    # item ids as strings (the items table's keys too)
    strings = write_log(log.with_columns(pl.col("item_id").cast(pl.String)), tmp_path / "s" / "log.parquet")
    items = write_log(pl.read_parquet(files["items"]).with_columns(pl.col("item_id").cast(pl.String)), tmp_path / "s" / "items.parquet")
    with pytest.raises(SdmError, match=r"raw values of 'item' are integers there \(Int64\) but strings in this run \(String\)"):
        _sessionize({**files, "log": strings, "items": items}, tmp_path / "V", vocab_from=tmp_path / "A")
    # a feature's values as integers
    codes = write_log(log.with_columns(pl.col("category").replace_strict({"x": 1, "y": 2, "z": 3})), tmp_path / "c" / "log.parquet")
    with pytest.raises(SdmError, match=r"raw values of 'category' are strings there \(String\) but integers"):
        _sessionize({**files, "log": codes}, tmp_path / "V", vocab_from=tmp_path / "A")
    assert not (tmp_path / "V").exists()


def test_int32_ids_keep_an_int64_vocabulary(tmp_path):
    """Integers of another width are the same ids: kept, in this run's type."""
    files = _fixed(tmp_path)
    _sessionize(files, tmp_path / "A")
    narrow = write_log(pl.read_parquet(files["log"]).with_columns(pl.col("item_id").cast(pl.Int32)), tmp_path / "n" / "log.parquet")
    _sessionize({**files, "log": narrow}, tmp_path / "V", vocab_from=tmp_path / "A")
    assert vocab(tmp_path / "V", "item") == vocab(tmp_path / "A", "item")
    assert pl.read_parquet(tmp_path / "V" / vocab_file("item")).schema["raw"] == pl.Int32


def _shifted_log(tmp_path: Path) -> tuple[Path, Path]:
    """The scale tests' random log (seed 1) with items 10 higher and categories 2 higher: new and gone values."""
    log, users = _random_log(tmp_path, 1)
    df = pl.read_parquet(log).with_columns(pl.col("item_id") + 10, pl.col("category") + 2)
    df.write_parquet(log)
    return log, users


@pytest.mark.parametrize("buckets", [2, 3])
def test_buckets_equal_one_bucket(tmp_path, buckets):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    log_a, users_a = _random_log(tmp_path / "a", 0)
    run(_cfg(tmp_path / "A", users_a), log_a, progress=False)
    log_b, users_b = _shifted_log(tmp_path / "b")
    one = run(_cfg(tmp_path / "V1", users_b, vocab_from=tmp_path / "A"), log_b, progress=False)
    many = run(_cfg(tmp_path / "Vn", users_b, buckets=buckets, vocab_from=tmp_path / "A"), log_b, progress=False)
    _same_output(tmp_path / "V1", tmp_path / "Vn", one, many)
    assert pl.read_parquet(tmp_path / "V1" / "catalogue.parquet").equals(pl.read_parquet(tmp_path / "Vn" / "catalogue.parquet"))
    assert one["vocab_from"] == many["vocab_from"] and one["catalogue"] == many["catalogue"]
    # the A items the shifted log no longer has were kept, counted 0
    counts = dict(pl.read_parquet(tmp_path / "V1" / vocab_file("item")).select("raw", "count").rows())
    assert {i for i in range(10) if i in counts} and all(counts[i] == 0 for i in range(10) if i in counts)


def test_ray_engine_equals_local(tmp_path):
    pytest.importorskip("ray", reason="the Ray engine needs the ray extra: pip install -e '.[ray]'")
    from test_sessionize_ray import ray_sessionize

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    log_a, users_a = _random_log(tmp_path / "a", 0)
    run(_cfg(tmp_path / "A", users_a), log_a, progress=False)
    log_b, users_b = _shifted_log(tmp_path / "b")
    local = run(_cfg(tmp_path / "L", users_b, buckets=2, vocab_from=tmp_path / "A"), log_b, progress=False)
    proc = ray_sessionize(log_b, tmp_path / "R", users_b, "--buckets", "2", "--vocab-from", str(tmp_path / "A"))
    assert proc.returncode == 0, proc.stderr
    ray = json.loads((tmp_path / "R" / "manifest.json").read_text())
    _same_output(tmp_path / "L", tmp_path / "R", local, ray)
    assert pl.read_parquet(tmp_path / "L" / "catalogue.parquet").equals(pl.read_parquet(tmp_path / "R" / "catalogue.parquet"))
    assert ray["vocab_from"] == local["vocab_from"]
