"""`sdm convert`: every format on tiny hand-written files and on the real samples in ../shared."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from sdm.cli import app
from sdm.errors import SdmError
from sdm.logs.convert import FORMATS, convert

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDM_SHARED", REPO.parent / "shared")) / "datasets"
UTC = pl.Datetime("us", "UTC")


def _write(dir_: Path, name: str, text: str) -> Path:
    path = dir_ / name
    path.write_text(text)
    return path


def _tiny(fmt: str, d: Path) -> list[Path]:
    """Hand-written raw files, a few rows each, in the format's real layout."""
    if fmt == "taobao":
        return [
            _write(d, "UserBehavior.csv",
                   "1,10,100,pv,1511658000\n1,11,100,cart,1511658060\n2,10,100,buy,1511744400\n"
                   "2,12,101,fav,1511744460\n3,12,101,pv,1505088000\n")  # last: 2017-09-11, out of range
        ]  # fmt: skip
    if fmt == "diginetica":
        return [
            _write(d, "train-item-views.csv",
                   "sessionId;userId;itemId;timeframe;eventdate\n1;NA;10;0;2016-05-09\n1;NA;11;60000;2016-05-09\n"
                   "2;7;10;0;2016-05-10\n2;7;12;1500;2016-05-10\n"),
            _write(d, "product-categories.csv", "itemId;categoryId\n10;5\n11;5\n12;6\n"),
        ]  # fmt: skip
    if fmt == "yoochoose":
        return [
            _write(d, "yoochoose-clicks.dat",
                   "1,2014-04-07T10:51:09.277Z,10,0\n1,2014-04-07T10:54:09.868Z,11,S\n"
                   "2,2014-04-08T09:00:00.000Z,10,0\n2,2014-04-08T09:01:00.000Z,10,0\n")
        ]  # fmt: skip
    if fmt == "movielens":
        return [
            _write(d, "ratings.dat", "1::10::5::978300760\n1::11::3::978300800\n2::10::4::978400000\n"),
            _write(d, "movies.dat", "10::Toy Story (1995)::Animation|Children's|Comedy\n11::Heat (1995)::Action|Crime\n"),
            _write(d, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n"),
        ]  # fmt: skip
    if fmt == "rees46":
        return [
            _write(d, "2019-Oct.csv",
                   "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
                   "2019-10-01 00:00:00 UTC,view,10,2053013555631882655,electronics.smartphone,samsung,409.02,7,aaa\n"
                   "2019-10-01 00:01:00 UTC,cart,10,2053013555631882655,electronics.smartphone,samsung,409.02,7,aaa\n"
                   "2019-10-01 00:02:00 UTC,purchase,11,2103807459595387724,,,35.79,8,bbb\n")
        ]  # fmt: skip
    if fmt == "otto":
        lines = [
            {"session": 0, "events": [{"aid": 10, "ts": 1659304800025, "type": "clicks"}, {"aid": 11, "ts": 1659304904511, "type": "carts"}]},
            {"session": 1, "events": [{"aid": 10, "ts": 1659304800000, "type": "orders"}]},
        ]  # fmt: skip
        return [_write(d, "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")]
    raise AssertionError(fmt)


TINY_EXPECT = {
    # format: (rows, users or None, has items, has users, behaviors)
    "taobao": (4, 2, True, False, {"click", "cart", "buy", "fav"}),
    "diginetica": (4, 2, True, False, {"click"}),
    "yoochoose": (4, None, True, False, {"click"}),
    "movielens": (3, 2, True, True, None),
    "rees46": (3, 2, True, False, {"click", "cart", "buy"}),
    "otto": (3, 2, False, False, {"click", "cart", "buy"}),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_raw_files(fmt, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    files = _tiny(fmt, raw)
    out = tmp_path / "out" / "logs.parquet"
    s = convert(fmt, files, out)
    rows, users, has_items, has_users, behaviors = TINY_EXPECT[fmt]
    log = pl.read_parquet(out)
    assert log.height == rows == s["rows"]
    assert log.schema["timestamp"] == UTC and log.schema["item_id"] == pl.Int64
    assert s["users"] == users
    if behaviors is not None:
        assert set(log["behavior"]) == behaviors
    assert (s["items_path"] is not None) == has_items == (out.parent / "items.parquet").exists()
    assert (s["users_path"] is not None) == has_users == (out.parent / "users.parquet").exists()
    if has_items:
        items = pl.read_parquet(s["items_path"])
        assert items["item_id"].is_unique().all()
        assert log.join(items, on="item_id", how="anti").height == 0


def test_tiny_values(tmp_path):
    """Field-level checks of the conversions that compute something."""
    for fmt in FORMATS:
        (tmp_path / fmt).mkdir()
    s = convert("taobao", _tiny("taobao", tmp_path / "taobao"), tmp_path / "t" / "logs.parquet")
    assert s["dropped"] == 1
    t = pl.read_parquet(s["out"])
    assert t["timestamp"][0] == pl.Series(["2017-11-26T01:00:00Z"]).str.to_datetime(time_zone="UTC").cast(UTC)[0]

    d = pl.read_parquet(convert("diginetica", _tiny("diginetica", tmp_path / "diginetica"), tmp_path / "d" / "logs.parquet")["out"])
    assert d["user_id"].to_list() == [-1, -1, 7, 7]  # anonymous session 1 -> user -1
    assert (d["timestamp"][1] - d["timestamp"][0]).total_seconds() == 60
    assert str(d["timestamp"][0]) == "2016-05-09 00:00:00+00:00"

    m = convert("movielens", _tiny("movielens", tmp_path / "movielens"), tmp_path / "m" / "logs.parquet")
    items = pl.read_parquet(m["items_path"]).sort("item_id")
    assert items["genre"].to_list() == ["Animation", "Action"] and items["release_year"].to_list() == [1995, 1995]
    users = pl.read_parquet(m["users_path"]).sort("user_id")
    assert users["age"].to_list() == [1, 56] and users["gender"].to_list() == ["F", "M"]

    r = convert("rees46", _tiny("rees46", tmp_path / "rees46"), tmp_path / "r" / "logs.parquet")
    ri = pl.read_parquet(r["items_path"]).sort("item_id")
    assert ri["category_l1"].to_list() == ["electronics", None] and ri["brand"].to_list() == ["samsung", None]
    assert pl.read_parquet(r["out"])["session_id"].to_list() == ["aaa", "aaa", "bbb"]

    o = pl.read_parquet(convert("otto", _tiny("otto", tmp_path / "otto"), tmp_path / "o" / "logs.parquet")["out"])
    assert "session_id" not in o.columns  # OTTO sessions are long-lived: they are users
    assert str(o["timestamp"][0]) == "2022-07-31 22:00:00.025000+00:00"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(SdmError, match="nope.csv: raw file not found"):
        convert("taobao", [tmp_path / "nope.csv"], tmp_path / "o.parquet")
    with pytest.raises(SdmError, match="unknown format 'foo'"):
        convert("foo", [tmp_path], tmp_path / "o.parquet")
    bad = _write(tmp_path, "bad.csv", "a;b\n1;2\n")
    for fmt, msg in [
        ("taobao", "expected 5 comma-separated"),
        ("diginetica", "not a Diginetica file"),
        ("yoochoose", "expected yoochoose-clicks.dat"),
        ("rees46", "missing column"),
        ("otto", "not OTTO JSONL"),
    ]:
        with pytest.raises(SdmError, match=rf"bad.csv: .*{msg}"):
            convert(fmt, [bad], tmp_path / "o.parquet")
    with pytest.raises(SdmError, match="no MovieLens ratings"):
        convert("movielens", [bad], tmp_path / "o.parquet")
    # malformed rows are caught at conversion time, still naming the file
    broken = _write(tmp_path, "broken.csv", "1,10,100,pv,1511658000\n1,x,100,pv,1511658000\n")
    with pytest.raises(SdmError, match="broken.csv"):
        convert("taobao", [broken], tmp_path / "o2.parquet")


def test_refuses_existing_output(tmp_path):
    files = _tiny("otto", tmp_path)
    convert("otto", files, tmp_path / "o" / "logs.parquet")
    with pytest.raises(SdmError, match="already exists"):
        convert("otto", files, tmp_path / "o" / "logs.parquet")
    convert("otto", files, tmp_path / "o" / "logs.parquet", overwrite=True)


def test_cli_good_and_bad(tmp_path):
    files = _tiny("taobao", tmp_path)
    out = tmp_path / "t" / "logs.parquet"
    r = CliRunner().invoke(app, ["convert", "taobao", *map(str, files), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "converted taobao: 4 events" in r.output and "dropped 1 rows" in r.output
    r = CliRunner().invoke(app, ["convert", "taobao", str(tmp_path / "missing.csv"), "--out", str(out)])
    assert r.exit_code == 1 and "missing.csv: raw file not found" in r.output


def test_shipped_otto_sample_matches_shared():
    ours = REPO / "data" / "otto_sample.jsonl"
    assert ours.exists() and (REPO / "data" / "OTTO_ATTRIBUTION.md").exists()
    theirs = SHARED / "otto_sample" / "raw" / "train_fixture.jsonl"
    if theirs.exists():
        assert ours.read_bytes() == theirs.read_bytes()


# ---------------------------------------------------------------- real samples

REAL = {
    # name: (format, raw files relative to SHARED, expected rows)
    "taobao": ("taobao", ["taobao_userbehavior/raw/UserBehavior_head_fattydelivery.csv"], 4_268),
    "diginetica": ("diginetica", ["diginetica/raw/sample_train-item-views.csv", "diginetica/raw/product-categories.csv"], 12_391),
    "yoochoose": ("yoochoose", ["yoochoose_rsc15_100k/raw/yoochoose-clicks-sample.dat"], 500),
    "yoochoose_tsv": ("yoochoose", ["yoochoose_rsc15_100k/raw/yoochoose-clicks-100k_train_full.txt", "yoochoose_rsc15_100k/raw/yoochoose-clicks-100k_test.txt"], 83_846),
    "movielens": ("movielens", ["movielens_100k/raw"], 100_000),
    "movielens_1m": ("movielens", ["movielens_1m_side_info/raw"], 233),
    "rees46": ("rees46", ["rees46_ecommerce_sample/raw/2019-Oct_head.csv"], 17_435),
    "otto": ("otto", ["otto_sample/raw/train_fixture.jsonl"], 862),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL))
def test_real_sample_then_sessionize(name, tmp_path, monkeypatch):
    fmt, rel, rows = REAL[name]
    raw = [SHARED / r for r in rel]
    if not all(p.exists() for p in raw):
        pytest.skip(f"shared dataset sample not found under {SHARED} (set SDM_SHARED)")
    # The configs use paths relative to the working directory (runs/<fmt>/...).
    monkeypatch.chdir(tmp_path)
    s = convert(fmt, raw, Path("runs") / fmt / "logs.parquet")
    assert s["rows"] == rows
    log = pl.read_parquet(s["out"])
    assert log.schema["timestamp"] == UTC
    try:
        from sdm.sessionize import run  # noqa: F401
    except ImportError:
        pytest.skip("sdm.sessionize.run not available yet")
    config = REPO / "data" / f"{fmt}.toml"
    r = CliRunner().invoke(app, ["sessionize", s["out"], "--config", str(config), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "sessionized" in r.output
    assert (Path("runs") / fmt / "data" / "manifest.json").exists()


def test_synth_config_sessionizes(tmp_path, monkeypatch):
    try:
        from sdm.sessionize import run  # noqa: F401
    except ImportError:
        pytest.skip("sdm.sessionize.run not available yet")
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "data" / "synth.toml")
    r = CliRunner().invoke(app, ["synth", "--config", config, "--events", "20000", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["sessionize", "runs/synth/logs.parquet", "--config", config, "--quiet"])
    assert r.exit_code == 0, r.output
