"""`sdm sessionize` through the CLI: the good path, the TOML config, and every bad input
as one line on stderr with exit code 1 and no manifest left behind."""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import at, write_log
from typer.testing import CliRunner

from sdm.cli import app


def good_log(path):
    return write_log(
        pl.DataFrame(
            {
                "user_id": [1, 1, 1, 2, 2, None],
                "item_id": [10, 11, 12, 10, 13, 14],
                "timestamp": [at(0), at(1), at(2), at(days=3), at(days=3, minutes=1), at(5)],
                "behavior": ["click"] * 6,
            }
        ),
        path,
    )


def invoke(*args):
    return CliRunner().invoke(app, ["sessionize", *map(str, args), "-q"])


def test_good_path_prints_summary_and_writes_manifest(tmp_path):
    log = good_log(tmp_path / "log.parquet")
    out = tmp_path / "data"
    r = invoke(log, "--out", out, "--valid-fraction", "0", "--test-fraction", "0")
    assert r.exit_code == 0, r.output
    assert "sessionized 6 events" in r.output and "dropped: null_user 1" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_in"] == 6 and m["rows_kept"] == 5 and m["dropped"]["null_user"] == 1
    assert json.loads((out / "config.json").read_text())["valid_fraction"] == 0


def test_toml_config_and_flag_precedence(tmp_path):
    log = good_log(tmp_path / "log.parquet")
    toml = tmp_path / "sdm.toml"
    toml.write_text(f'[sessionize]\nout = "{tmp_path / "from_toml"}"\ngap = "1m"\nmax-session-len = 2\n')
    r = invoke(log, "--config", toml, "--gap", "5m")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "from_toml" / "config.json").read_text())
    assert cfg["gap"] == "5m" and cfg["max_session_len"] == 2


def bad_inputs(tmp_path):
    """(name, args, expected message fragment) for every bad input of issue 2."""
    log = good_log(tmp_path / "log.parquet")
    not_parquet = tmp_path / "text.parquet"
    not_parquet.write_text("user_id,item_id\n1,2\n")
    no_item = write_log(pl.DataFrame({"user_id": [1], "timestamp": [at(0)]}), tmp_path / "noitem.parquet")
    str_time = write_log(pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": ["2024-01-01"]}), tmp_path / "s.parquet")
    empty = write_log(
        pl.DataFrame({"user_id": [], "item_id": [], "timestamp": []},
                     schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}),
        tmp_path / "empty.parquet",
    )  # fmt: skip
    items = write_log(pl.DataFrame({"sku": [10], "brand": ["b"]}), tmp_path / "items.parquet")
    users = write_log(pl.DataFrame({"uid": [1], "age": [30]}), tmp_path / "users.parquet")
    return [
        ("missing file", [tmp_path / "nope.parquet"], "nope.parquet: log file not found"),
        ("not parquet", [not_parquet], "not a readable Parquet file"),
        ("missing column", [no_item], "item_id"),
        ("string timestamp", [str_time], "timestamp"),
        ("empty log", [empty], "empty"),
        ("items without key", [log, "--items", items, "--item-features", "brand"], "item_id"),
        ("users without key", [log, "--users", users, "--user-features", "age"], "user_id"),
        ("unknown feature", [log, "--item-features", "colour"], "colour"),
        ("bad duration", [log, "--gap", "ten"], "invalid duration 'ten'"),
        ("unknown toml key", [log, "--config", tmp_path / "bad.toml"], "unknown config key 'gapp'"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_input_is_one_line_exit_1_no_manifest(tmp_path, case):
    (tmp_path / "bad.toml").write_text("[sessionize]\ngapp = '5m'\n")
    name, args, fragment = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    r = invoke(*args, "--out", out)
    assert r.exit_code == 1, f"{name}: {r.output}"
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {r.output}"
    assert fragment in lines[0], f"{name}: {lines[0]}"
    assert "Traceback" not in r.output
    assert not (out / "manifest.json").exists()


def test_non_empty_out_refused_without_overwrite(tmp_path):
    log = good_log(tmp_path / "log.parquet")
    out = tmp_path / "data"
    assert invoke(log, "--out", out).exit_code == 0
    r = invoke(log, "--out", out)
    assert r.exit_code == 1 and "earlier `sdm sessionize` output" in r.output and "--overwrite" in r.output
    assert invoke(log, "--out", out, "--overwrite").exit_code == 0
    (out / "other.txt").write_text("x")  # not sdm's: refused even with --overwrite, and kept
    r = invoke(log, "--out", out, "--overwrite")
    assert r.exit_code == 1 and "'other.txt'" in r.output and (out / "other.txt").exists()
