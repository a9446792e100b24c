"""`sdm demo`, reduced: the full model must beat popularity and item-CF on the synthetic log."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sdm.cli import app


def test_reduced_demo_full_model_beats_baselines(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--events", "40000", "--epochs", "3", "-q"])
    assert r.exit_code == 0, r.output
    assert "| PSDMMAL-N |" in r.output and "demo done" in r.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["format"] == "sdm-metrics" and report["split"] == "test"  # the structure of `sdm evaluate`
    rows = {row["name"]: row for row in report["methods"]}
    assert set(rows) == {"PSDMMAL-N", "popularity", "itemcf", "itemcf-repeat", "stan", "vsknn"}
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    sdm = rows["PSDMMAL-N"]["hr@50"]
    # Clearly: by at least 5 points of HR@50 over popularity and classic item-CF.
    assert sdm > rows["popularity"]["hr@50"] + 0.05
    assert sdm > rows["itemcf"]["hr@50"] + 0.05
    for name in ("data/manifest.json", "model/best.pt", "report.md", "config.json", "logs.config.json"):
        assert (out / name).exists(), name
    # run again into the same folder: every file there is the demo's own (nested outputs included), so it is replaced
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--events", "3000", "--epochs", "1", "-q"])
    assert r.exit_code == 0, r.output


def test_demo_refuses_foreign_directory_without_overwrite(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-overwrite", "-q"])
    assert r.exit_code == 1
    assert "which `sdm demo` did not write" in r.output
    assert (out / "mine.txt").read_text() == "keep"
