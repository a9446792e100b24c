"""The Ray engine: output identical to the in-process engine, on a local 2-CPU Ray.

Needs the `ray` extra (`pip install -e '.[ray]'`, which CI installs); skipped,
saying so, without it.
"""

from __future__ import annotations

import pytest
from test_sessionize_scale import _cfg, _random_log, _same_output

from sdm.errors import SdmError
from sdm.sessionize import run

ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray of 2 CPUs for the module (a Ray already started in this process is reused by the engine)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("buckets", [1, 3])
def test_ray_engine_equals_local(tmp_path, local_ray, buckets):
    log, users = _random_log(tmp_path, 6)
    one = run(_cfg(tmp_path / "local", users, buckets=buckets), log, progress=False)
    m = run(_cfg(tmp_path / "ray", users, buckets=buckets, engine="ray"), log, progress=False)
    _same_output(tmp_path / "local", tmp_path / "ray", one, m)
    assert m["config"]["engine"] == "ray"
    assert not list((tmp_path / "ray").glob(".sdm-work-*")), "spill folder left behind"


def test_ray_engine_reads_a_directory_of_parts(tmp_path, local_ray):
    import polars as pl

    log, users = _random_log(tmp_path, 7)
    one = run(_cfg(tmp_path / "local", users), log, progress=False)
    df = pl.read_parquet(log)
    (tmp_path / "parts").mkdir()
    df.head(250).write_parquet(tmp_path / "parts" / "a.parquet")
    df.slice(250).write_parquet(tmp_path / "parts" / "b.parquet")
    m = run(_cfg(tmp_path / "ray", users, buckets=2, engine="ray"), tmp_path / "parts", progress=False)
    _same_output(tmp_path / "local", tmp_path / "ray", one, m)


def test_ray_task_errors_are_one_line(tmp_path, local_ray):
    """A bad value found inside a task (here an out-of-range epoch) comes back as the same one-line error."""
    import polars as pl

    log = tmp_path / "bad.parquet"
    pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1, 10**15]}).write_parquet(log)
    with pytest.raises(SdmError, match="outside years 1-9999"):
        run(_cfg(tmp_path / "o", None, engine="ray", time_unit="s", item_features=[], user_features=[]), log, progress=False)
