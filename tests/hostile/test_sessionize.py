"""Hostile and careless input to `sdm sessionize`: nothing outside its own output is ever deleted or
written, a value from the data never names a file, and a bad flag or file is one `error:` line
before the old output is touched.

Each test names the defect it guards against; each failed on the sessionizer before it ran inside
`outputs.OutputDir` (data loss, files outside `--out`, exit 0 with most rows dropped, a
traceback), except the race of two real processes, which failed only in some tries (9 of 23);
its deterministic twin holds the lock in this process.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import at, write_log
from typer.testing import CliRunner

from sdm.cli import app
from sdm.names import vocab_file
from sdm.outputs import OutputDir
from sdm.sessionize import write

runner = CliRunner()


def good_log(path: Path, users: int = 3, **extra: list) -> Path:
    """Per user: a 3-event session on day 0, one on day 2 and one on day 4 (every split gets sessions)."""
    rows = [(u, 10 + (u + k) % 5, at(k, days=day)) for u in range(users) for day in (0, 2, 4) for k in range(3)]
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}, orient="row")
    return write_log(df.with_columns(**{k: pl.Series(v) for k, v in extra.items()}), path)


def sessionize(log: Path | str, out: Path | str, *flags: object) -> tuple[int, list[str]]:
    """`sdm sessionize LOG --out OUT -q FLAGS` in this process: (exit code, non-empty output lines)."""
    r = runner.invoke(app, ["sessionize", str(log), "--out", str(out), "--min-shards", "1", "-q", *map(str, flags)])
    lines = [x for x in r.output.splitlines() if x.strip()]
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        lines.append(f"Traceback: {type(r.exception).__name__}: {r.exception}")
    return r.exit_code, lines


def one_error(code: int, lines: list[str], *fragments: str) -> str:
    """The single `error:` line of a refused run (exit 1, no traceback), holding every fragment."""
    assert code == 1, lines
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and len([x for x in lines if not x.startswith(("note: ", "warning: "))]) == 1, lines
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (relative path -> file bytes, None for a folder)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# --- 1. output ownership ---------------------------------------------------------------------


def _project(root: Path) -> Path:
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git" / "objects" / "ab").write_bytes(b"\x78\x01blob")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "README.md").write_text("# my project\n")
    return root


def _home(root: Path) -> Path:
    (root / ".ssh").mkdir(parents=True)
    (root / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (root / ".bashrc").write_text("export PATH\n")
    (root / "Documents").mkdir()
    (root / "Documents" / "cv.pdf").write_bytes(b"%PDF-1.7")
    return root


@pytest.mark.parametrize("make", [_project, _home], ids=["project", "home"])
@pytest.mark.parametrize("flags", [(), ("--buckets", "2")], ids=["one-bucket", "two-buckets"])
def test_overwrite_into_a_folder_of_other_files_deletes_nothing(tmp_path, monkeypatch, make, flags):
    """`cd proj && sdm sessionize ../logs.parquet --out . --overwrite` emptied the folder (.git, ~/.ssh and all)."""
    good_log(tmp_path / "logs.parquet")
    folder = make(tmp_path / "folder")
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    line = one_error(*sessionize("../logs.parquet", ".", "--overwrite", *flags), "did not write")
    assert any(f"'{name}'" in line for name in (".git", ".ssh", ".bashrc", "README.md", "Documents", "src")), line
    assert snapshot(folder) == before  # nothing deleted, nothing added (no marker, no spill)


def test_rerun_replaces_its_own_output_and_a_killed_runs_spill(tmp_path):
    """A rerun with --overwrite replaces its own output; spill and scratch of a killed bucketed run are removed."""
    log = good_log(tmp_path / "logs.parquet")
    out = tmp_path / "data"
    assert sessionize(log, out, "--buckets", "2")[0] == 0
    one_error(*sessionize(log, out), "earlier `sdm sessionize` output", "--overwrite")
    # what a `kill -9` in the middle of a bucketed rerun leaves: spill, a half-written file
    (out / (write.WORK_PREFIX + "killed") / "input").mkdir(parents=True)
    (out / (write.WORK_PREFIX + "killed") / "input" / "b.ipc").write_bytes(b"spill")
    (out / ".sdm-tmp-999-abcd-manifest.json").write_text("{")
    code, lines = sessionize(log, out, "--buckets", "2", "--overwrite")
    assert code == 0, lines
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith((write.WORK_PREFIX, ".sdm-tmp-"))], names
    assert json.loads((out / "manifest.json").read_text())["config"]["buckets"] == 2


def test_a_second_writer_of_the_same_out_is_one_line(tmp_path):
    """Two `sdm sessionize` into one --out raced (tracebacks in 9 of 23 tries): the second is refused at once."""
    log = good_log(tmp_path / "logs.parquet")
    out = tmp_path / "data"
    with OutputDir(out, "sessionize", write.OWNS, overwrite=True):  # another run holds the output
        one_error(*sessionize(log, out, "--overwrite"), str(out), "another sdm process")
    assert not (out / "manifest.json").exists()
    assert sessionize(log, out, "--overwrite")[0] == 0  # the lock went with its holder


def test_two_concurrent_processes_one_wins_the_other_is_one_line(tmp_path):
    """The same race with two real processes: each exits 0 or with exactly one `error:` line, never a traceback."""
    n = 4000
    df = pl.DataFrame({
        "user_id": [i % 400 for i in range(n)],
        "item_id": [i % 97 for i in range(n)],
        "timestamp": [at(minutes=i) for i in range(n)],
    })
    log = write_log(df, tmp_path / "logs.parquet")
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "sdm.cli", "sessionize", str(log), "--out", str(out), "--overwrite", "-q", "--buckets", "4"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for p in procs]
    for code, text in results:
        assert "Traceback" not in text, text
        if code != 0:
            errors = [x for x in text.splitlines() if x.startswith("error: ")]
            assert code == 1 and len(errors) == 1, text
    assert any(code == 0 for code, _ in results), results
    assert json.loads((out / "manifest.json").read_text())["rows_in"] == n


# --- 2. data never names a file --------------------------------------------------------------


def test_item_feature_names_from_the_data_stay_inside_vocab(tmp_path):
    """Items-table columns `/abs/x`, `../../x`, `a/b`, `.hidden` and a 300-character name, auto-picked by
    `--items`, wrote vocabularies outside --out (or crashed with an OSError after the old output was cleared)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    names = [str(victim / "x"), "../../x", "a/b", ".hidden", "c" * 300, "plain"]
    items = pl.DataFrame({"item_id": list(range(10, 15)), **{f: [f"v{k % 2}" for k in range(5)] for f in names}})
    items_path = write_log(items, tmp_path / "in" / "items.parquet")
    log = good_log(tmp_path / "in" / "logs.parquet")
    out = tmp_path / "deep" / "down" / "data"
    assert sessionize(log, out)[0] == 0  # an earlier output: the rerun replaces it
    before = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out}
    code, lines = sessionize(log, out, "--items", items_path, "--overwrite")
    assert code == 0, lines
    assert {p for p in tmp_path.rglob("*") if out not in p.parents and p != out} == before  # nothing outside out
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["item_features"][1:]) == sorted(names)
    vocab_dir = out / "vocab"
    for f in names:
        path = out / vocab_file(f)
        assert path.parent == vocab_dir and path.is_file(), f
        assert pl.read_parquet(path).height + 2 == m["vocab_sizes"][f]
    assert (out / "vocab" / "plain.parquet").is_file()  # a plain name keeps its file name
    assert sorted(p.name for p in vocab_dir.iterdir()) == sorted(Path(vocab_file(f)).name for f in ["item", "user", *names])


@pytest.mark.parametrize("case", ["log feature oov", "user feature id"])
def test_colliding_feature_names_are_refused_before_the_old_output_is_touched(tmp_path, case):
    """A log feature `oov` made two `seq_oov` shard columns, a profile column `id` two `user_id` ones
    (`user_<f>`): a polars error after the old output was deleted."""
    if case == "log feature oov":
        log = good_log(tmp_path / "logs.parquet", oov=["a", "b", "c"] * 9)
        flags, fragment = ["--item-features", "oov"], "'seq_oov'"
    else:
        log = good_log(tmp_path / "logs.parquet")
        users = write_log(pl.DataFrame({"user_id": [0, 1, 2], "id": ["x", "y", "z"]}), tmp_path / "users.parquet")
        flags, fragment = ["--users", users], "'user_id'"  # `id` is auto-picked from the users table
    out = tmp_path / "data"
    assert sessionize(log, out)[0] == 0
    before = snapshot(out)
    one_error(*sessionize(log, out, "--overwrite", *flags), fragment)
    assert snapshot(out) == before


# --- 3. a self-contained data directory -----------------------------------------------------


def test_items_raw_parquet_keeps_the_items_table_inside_the_data_directory(tmp_path):
    """Serving re-read `config.items`, a path relative to where sessionize ran: moved or deleted, the
    features were gone. items_raw.parquet holds what sessionize read from it, and `sdm check` hashes it."""
    items_csv = tmp_path / "items.csv"
    items_csv.write_text(
        "item_id,brand,genres,price,note\n10,acme,a|b,1.5,x\n11,zeta,b,2.0,y\n10,other,c,9.9,z\n,nokey,a,1.0,w\n12,acme,,3.0,v\n99,solo,d,4.0,u\n"
    )
    log = good_log(tmp_path / "logs.parquet")
    out = tmp_path / "data"
    code, lines = sessionize(log, out, "--items", items_csv, "--item-features", "brand,genres", "--multi-valued", "genres")
    assert code == 0, lines
    items_csv.unlink()  # the data directory needs it no more
    raw = pl.read_parquet(out / "items_raw.parquet")
    assert raw.columns == ["item_id", "brand", "genres"]
    assert raw.schema["item_id"] == pl.Int64  # the log's item type
    # one row per item, the first row of a key wins, null keys left out, raw strings as read
    assert raw.rows() == [(10, "acme", "a|b"), (11, "zeta", "b"), (12, "acme", None), (99, "solo", "d")]
    m = json.loads((out / "manifest.json").read_text())
    assert "items_raw.parquet" in m["files"]
    assert m["items_raw"] == {"path": "items_raw.parquet", "item_col": "item_id", "features": ["brand", "genres"]}
    r = runner.invoke(app, ["check", str(out)])
    assert r.exit_code == 0, r.output


# --- 4. --behaviors ---------------------------------------------------------------------------


def test_a_behavior_matching_nothing_is_an_error(tmp_path):
    """`--behaviors pv,biy` (a one-letter typo) dropped every `buy` row with exit 0."""
    kinds = ["pv", "buy", "cart"] * 9
    log = good_log(tmp_path / "logs.parquet", behavior=kinds)
    out = tmp_path / "data"
    line = one_error(*sessionize(log, out, "--behaviors", "pv,biy"), "'biy'", "'buy'", "'cart'", "'pv'")
    assert "'pv'" not in line.split("match")[0]  # only the value that matched nothing is blamed
    assert not out.exists()


def test_behaviors_are_checked_over_the_whole_log_not_per_bucket(tmp_path):
    """With buckets, a value present in one bucket only is fine; one in no bucket is still an error."""
    kinds = ["pv"] * 24 + ["buy"] * 3  # only the last user buys
    log = good_log(tmp_path / "logs.parquet", behavior=kinds)
    code, lines = sessionize(log, tmp_path / "a", "--behaviors", "pv,buy", "--buckets", "3")
    assert code == 0, lines
    one_error(*sessionize(log, tmp_path / "b", "--behaviors", "pv,fav", "--buckets", "3"), "'fav'")


def test_numeric_behaviors_compare_by_value(tmp_path):
    """On a float behavior column `--behaviors 4,4.5,5` kept only 4.5 (the string '4' is not 4.0)."""
    log = good_log(tmp_path / "logs.parquet", behavior=[4.0, 4.5, 5.0] * 9)
    out = tmp_path / "data"
    code, lines = sessionize(log, out, "--behaviors", "4,4.5,5")
    assert code == 0, lines
    m = json.loads((out / "manifest.json").read_text())
    assert m["dropped"]["behavior"] == 0 and m["rows_kept"] == 27
    code, lines = sessionize(log, tmp_path / "d2", "--behaviors", "4.50")
    assert code == 0 and json.loads((tmp_path / "d2" / "manifest.json").read_text())["rows_kept"] == 9
    one_error(*sessionize(log, tmp_path / "d3", "--behaviors", "4,four"), "'four'", "not a number")
    ints = good_log(tmp_path / "ints.parquet", behavior=[1, 2, 3] * 9)
    code, lines = sessionize(ints, tmp_path / "d4", "--behaviors", "1.0,2")
    assert code == 0 and json.loads((tmp_path / "d4" / "manifest.json").read_text())["rows_kept"] == 18
    one_error(*sessionize(ints, tmp_path / "d5", "--behaviors", "1,2.5"), "'2.5'")


# --- 5. CSV ------------------------------------------------------------------------------------


def _csv_log(path: Path, stamp: str) -> Path:
    rows = [f"{u},{10 + (u + k) % 5},{stamp.format(day=1 + 2 * d, minute=k)}" for u in range(3) for d in range(3) for k in range(3)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return path


def test_readme_time_format_example_reads_a_csv(tmp_path):
    """README: `2024-01-10 08:59:12 UTC` in a CSV with `--time-format '%Y-%m-%d %H:%M:%S UTC'` could not be read
    (CSV date guessing took the column for datetimes and failed on ` UTC`)."""
    log = _csv_log(tmp_path / "logs.csv", "2024-01-{day:02d} 08:{minute:02d}:12 UTC")
    out = tmp_path / "data"
    code, lines = sessionize(log, out, "--time-format", "%Y-%m-%d %H:%M:%S UTC")
    assert code == 0, lines
    assert json.loads((out / "manifest.json").read_text())["rows_kept"] == 27
    # without the flag: one line asking for it, with a sample
    one_error(*sessionize(log, tmp_path / "o2"), "'2024-01-01 08:00:12 UTC'", "--time-format")
    # a plain ISO column needs no flag
    iso = _csv_log(tmp_path / "iso.csv", "2024-01-{day:02d}T08:{minute:02d}:12")
    assert sessionize(iso, tmp_path / "o3")[0] == 0


def test_csv_with_a_duplicated_header_is_refused(tmp_path):
    """A CSV header `user_id,item_id,item_id,timestamp` silently used the first item_id column."""
    log = tmp_path / "logs.csv"
    rows = [f"{u},{10 + k},{99},2024-01-0{1 + 2 * d}T08:0{k}:00" for u in range(3) for d in range(3) for k in range(3)]
    log.write_text("user_id,item_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    one_error(*sessionize(log, tmp_path / "data"), str(log), "'item_id' twice")
    assert not (tmp_path / "data").exists()


# --- 6. --buckets ------------------------------------------------------------------------------


def test_more_buckets_than_rows_is_refused_at_once(tmp_path):
    """`--buckets 100000` over 4,000 events ran for more than 10 minutes; it is refused naming both numbers."""
    log = good_log(tmp_path / "logs.parquet")
    one_error(*sessionize(log, tmp_path / "data", "--buckets", "100"), "--buckets 100 ", "27 rows")
    assert not (tmp_path / "data").exists()
    assert sessionize(log, tmp_path / "ok", "--buckets", "27")[0] == 0


# --- 7. a write the operating system refuses ---------------------------------------------------


@pytest.mark.parametrize("target", ["shard", "table"])
def test_no_space_left_is_one_line_naming_the_file_and_leaves_no_manifest(tmp_path, monkeypatch, target):
    """An OSError while writing (disk full, read-only) was a traceback; now one line naming the path."""
    log = good_log(tmp_path / "logs.parquet")
    out = tmp_path / "data"
    assert sessionize(log, out)[0] == 0
    real = pl.DataFrame.write_parquet

    def full(self, file, *a, **k):
        is_shard = "part-" in str(file)
        if str(out) in str(file) and is_shard == (target == "shard"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, file, *a, **k)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    line = one_error(*sessionize(log, out, "--overwrite"), "No space left on device")
    assert str(out) in line
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob(".sdm-tmp-*")]  # no half-written file left behind
