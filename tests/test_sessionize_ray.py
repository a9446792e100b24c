"""The Ray engine: output identical to the in-process engine, on a local 2-CPU Ray.

Each Ray run is `sdm sessionize --engine ray` in its own process, which starts a
local Ray of 2 CPUs and takes it down on exit: nothing of Ray (processes,
environment) outlives the test. Needs the `ray` extra (`pip install -e
'.[ray]'`, which CI installs); skipped, saying so, without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from test_sessionize_scale import _cfg, _random_log, _same_output

from sdm.sessionize import run

pytest.importorskip("ray", reason="the Ray engine needs the ray extra: pip install -e '.[ray]'")

RAY_INIT = "import ray; ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR', log_to_driver=False)"


def ray_sessionize(log: Path, out: Path, users: Path | None, *flags: str) -> subprocess.CompletedProcess:
    """`sdm sessionize` with the test config's flags and `--engine ray`, in a child process with a 2-CPU Ray."""
    args = [
        str(log), "--out", str(out), "--engine", "ray", "--max-session-len", "3", "--max-long-len", "4",
        "--rows-per-shard", "5", "--min-shards", "4", "-q", *flags,
    ]  # fmt: skip
    if users is not None:
        args += ["--users", str(users), "--item-features", "category", "--user-features", "age"]
    code = f"{RAY_INIT}\nimport sys\nfrom sdm.cli import main\nsys.argv = ['sdm', 'sessionize', *{args!r}]\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("buckets", [1, 3])
def test_ray_engine_equals_local(tmp_path, buckets):
    log, users = _random_log(tmp_path, 6)
    one = run(_cfg(tmp_path / "local", users, buckets=buckets), log, progress=False)
    r = ray_sessionize(log, tmp_path / "ray", users, "--buckets", str(buckets))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    _same_output(tmp_path / "local", tmp_path / "ray", one, m)
    assert m["config"]["engine"] == "ray"
    assert not list((tmp_path / "ray").glob(".sdm-work-*")), "spill folder left behind"


def test_ray_engine_reads_a_directory_of_parts(tmp_path):
    log, users = _random_log(tmp_path, 7)
    one = run(_cfg(tmp_path / "local", users), log, progress=False)
    df = pl.read_parquet(log)
    (tmp_path / "parts").mkdir()
    df.head(250).write_parquet(tmp_path / "parts" / "a.parquet")
    df.slice(250).write_parquet(tmp_path / "parts" / "b.parquet")
    r = ray_sessionize(tmp_path / "parts", tmp_path / "ray", users, "--buckets", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    _same_output(tmp_path / "local", tmp_path / "ray", one, m)


def test_ray_task_errors_are_one_line(tmp_path):
    """A bad value found inside a task (here an out-of-range epoch) comes back as the same one-line error."""
    log = tmp_path / "bad.parquet"
    pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1, 10**15]}).write_parquet(log)
    r = ray_sessionize(log, tmp_path / "o", None, "--time-unit", "s")
    assert r.returncode == 1
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "outside years 1-9999" in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_failed_ray_run_awaits_its_tasks_and_shuts_the_ray_it_started(tmp_path):
    """`run` started the Ray, so it takes it down, even when a task fails; no output is left."""
    script = f"""
import os, polars as pl
from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize import run
os.chdir({str(tmp_path)!r})
n = 40
pl.DataFrame({{"user_id": list(range(n)), "item_id": [1] * n, "timestamp": [1] * (n - 1) + [10**15]}}).write_parquet("bad.parquet")
try:
    run(SessionizeConfig(out="o", engine="ray", buckets=4, time_unit="s"), "bad.parquet", progress=False)
except SdmError as e:
    print("ERR", e)
import ray
print("INIT", ray.is_initialized(), "OUT", os.path.exists("o"))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERR" in r.stdout and "outside years 1-9999" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "INIT False OUT False" in r.stdout
    assert "Traceback" not in r.stderr and "Unhandled error" not in r.stderr, r.stderr[-2000:]
