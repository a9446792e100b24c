"""bench/quality.py: the TARGETS.md parser, the quality.toml reader, the presets, the skip without shared/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGETS = """# Targets

## tiny_log

| method | HR@20 | HR@50 | NDCG@50 |
|---|---:|---:|---:|
| A | **0.30** | 0.40 | 0.10 |
| B | 0.20 | **0.45** | **0.12** |
| C | 0.10 | 0.44 | - |

## other

| method | HR@50 | NDCG@50 |
|---|---:|---:|
| C | **0.05** | **0.01** |
"""


def test_parse_targets_takes_the_best_row_of_each_column(quality, tmp_path):
    path = tmp_path / "TARGETS.md"
    path.write_text(TARGETS)
    t = quality.parse_targets(path)
    assert t["tiny_log"] == {"hr@20": (0.30, "A"), "hr@50": (0.45, "B"), "ndcg@50": (0.12, "B")}
    assert t["other"] == {"hr@50": (0.05, "C"), "ndcg@50": (0.01, "C")}


def test_load_benchmarks_resolves_paths_next_to_the_file(quality, tmp_path):
    (tmp_path / "b").mkdir()
    path = tmp_path / "b" / "quality.toml"
    path.write_text('[datasets.x]\nlog = "../d/log.parquet"\nvalid_start = "2020-01-01T00:00:00Z"\n')
    sets = quality.load_benchmarks(path)
    assert sets["x"]["log"] == (tmp_path / "d" / "log.parquet").resolve()


def test_presets_are_valid_training_settings_and_the_paper_rows_have_no_extras(quality):
    from sdm.config import TrainConfig

    for name, preset in quality.PRESETS.items():
        TrainConfig(**preset)  # a typo in a preset fails here, not after an hour of benchmark
        if name not in ("sdm", "sdm-no-residual", "sdm-no-state-query", "SASRec+repeat"):
            assert preset.get("repeat") is False, name
        if name == "sdm-paper" or name in ("SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-NoS", "DNN"):
            assert quality.PAPER.items() <= preset.items(), name  # nothing beyond the paper
    assert quality.PAPER == {"repeat": False, "user_residual": False, "state_query": False, "target_decay": 1.0}
    assert quality.PRESETS["sdm"] == {}  # the headline row is the shipped defaults


def test_without_shared_it_says_so_and_exits_0(quality, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDM_SHARED", str(tmp_path / "nowhere"))
    assert quality.main(["--results", str(tmp_path / "r")]) == 0
    assert "skipped" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_unknown_method_is_an_error(quality, tmp_path, monkeypatch, capsys):
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not (shared / "benchmarks" / "quality.toml").is_file():
        pytest.skip(f"{shared}/benchmarks/quality.toml not found (set SDM_SHARED)")
    monkeypatch.setenv("SDM_SHARED", str(shared))
    assert quality.main(["--methods", "sdm,bogus", "--results", str(tmp_path / "r")]) == 1
    assert "unknown method(s) ['bogus']" in capsys.readouterr().err


def _load_bootstrap():
    spec = importlib.util.spec_from_file_location("bench_bootstrap", SCRIPT.parent / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dump(path, rows):
    import datetime as dt

    import polars as pl

    t = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    pl.DataFrame(
        {"user_id": [r[0] for r in rows], "session_start": [t] * len(rows), "position": list(range(len(rows))),
         "target": [r[1] for r in rows], "topk": [r[2] for r in rows]}
    ).write_parquet(path)  # fmt: skip
    return path


def test_per_query_scores_and_paired_interval(tmp_path):
    import math

    b = _load_bootstrap()
    rows_a = [("u1", "x", ["x", "y"]), ("u1", "y", ["x", "y"]), ("u2", "z", ["z"]), ("u3", None, ["x"])]
    rows_b = [("u1", "x", ["y", "q"]), ("u1", "y", ["q", "r"]), ("u2", "z", ["q"]), ("u3", None, ["x"])]
    a = b.per_query(_dump(tmp_path / "a.parquet", rows_a), 2)
    assert a.get_column("hr").to_list() == [1, 1, 1, 0]
    assert a.get_column("ndcg").to_list() == pytest.approx([1, 1 / math.log2(3), 1, 0])
    same = b.paired_interval(a, a, "hr")
    assert same["diff"] == same["low"] == same["high"] == 0
    other = b.per_query(_dump(tmp_path / "b.parquet", rows_b), 2)
    ci = b.paired_interval(a, other, "hr", resamples=500)
    assert ci["diff"] == pytest.approx((1 - 0 + 1 - 0 + 1 - 0 + 0) / 4) and ci["users"] == 3
    assert 0 <= ci["low"] <= ci["diff"] <= ci["high"] <= 1
    both = b.mean_of_runs([a, other])
    assert both.get_column("hr").to_list() == [0.5, 0.5, 0.5, 0]
