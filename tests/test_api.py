"""`Recommender` (the Python API): the same lists as `sdm recommend`, from raw events in any shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from test_recommend import build_pipeline

from sdm.config import ExportConfig, RecommendConfig
from sdm.errors import SdmError
from sdm.serve import Recommender
from sdm.serve.export import export
from sdm.serve.recommend import recommend
from sdm.serve.sessions import latest_sessions, open_frame


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    p = build_pipeline(tmp_path_factory.mktemp("api"), seed=5)
    export(ExportConfig(data=p["data"], model=p["model"], out=p["root"] / "export"))
    out = p["root"] / "recs.parquet"
    recommend(RecommendConfig(data=p["data"], model=p["model"], out=out, k=10, device="cpu"), p["log"])
    p["recs"] = pl.read_parquet(out).sort("user_id")
    p["export"] = p["root"] / "export"
    return p


def overlap(a: list[Any], b: list[Any]) -> float:
    return len(set(a) & set(b)) / max(len(b), 1)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_api_equals_sdm_recommend(pipe: dict[str, Any], runtime: str) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    rec = Recommender.load(pipe["export"], runtime=runtime, index="exact")
    assert rec.runtime == runtime
    got = rec.recommend(pl.read_parquet(pipe["log"]), k=10).sort("user_id")
    want = pipe["recs"]
    assert got["user_id"].to_list() == want["user_id"].to_list()
    assert got["session_start"].to_list() == want["session_start"].to_list()
    same = sum(a == b for a, b in zip(got["items"].to_list(), want["items"].to_list()))
    # The exported tower computes the same function in another runtime (within 1e-4):
    # identical lists except where two scores tie within float rounding.
    assert same >= 0.97 * got.height, f"{same}/{got.height} lists identical"
    for a, b in zip(got["scores"].to_list(), want["scores"].to_list()):
        assert abs(a[0] - b[0]) < 1e-3


def test_api_takes_dicts_pandas_and_one_user(pipe: dict[str, Any]) -> None:
    rec = Recommender.load(pipe["export"])
    log = pl.read_parquet(pipe["log"])
    user = log["user_id"][0]
    one = log.filter(pl.col("user_id") == user)
    from_dicts = rec.recommend(one.to_dicts(), k=5)
    assert from_dicts.height == 1 and from_dicts["user_id"][0] == user and len(from_dicts["items"][0]) == 5
    pd = pytest.importorskip("pandas")
    assert isinstance(one.to_pandas(), pd.DataFrame)
    from_pandas = rec.recommend(one.to_pandas(), k=5)
    assert from_pandas["items"].to_list() == from_dicts["items"].to_list()
    inp, missing = open_frame(rec.lookups, one)
    served = latest_sessions(inp, rec.lookups, missing, None)
    n = int(served.arrays["seq_len"][0])
    seen = {rec.raw_items[i] for i in served.arrays["seq_item"][0][:n] if i > 1}
    assert seen
    excl = rec.recommend(one, k=50, exclude_seen=True)["items"][0].to_list()
    assert len(excl) == 50 and not (set(excl) & seen)
    assert set(rec.recommend(one, k=50)["items"][0].to_list()) & seen  # the repeat head ranks them high


def test_api_errors(pipe: dict[str, Any], tmp_path: Path) -> None:
    rec = Recommender.load(pipe["export"])
    with pytest.raises(SdmError, match="missing required column"):
        rec.recommend([{"user_id": 1, "timestamp": 5}], k=3)
    with pytest.raises(SdmError, match="expected a polars or pandas frame"):
        rec.recommend(42, k=3)
    with pytest.raises(SdmError, match="k must be >= 1"):
        rec.recommend([], k=0)
    with pytest.raises(SdmError, match="not a finished `sdm export` directory"):
        Recommender.load(tmp_path)
    empty = rec.recommend(pl.read_parquet(pipe["log"]).head(0), k=3)
    assert empty.height == 0 and empty.columns == ["user_id", "session_start", "items", "scores"]


def test_readme_example_runs(pipe: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The README's `Recommender` example, pointed at this export, runs as written."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Python API: `Recommender`") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code.replace('"runs/export"', repr(str(pipe["export"]))), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("[") and len(eval(printed)) == 10


def test_single_user_requests_equal_the_batch(pipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """One user's request cuts the vocabularies and the items table to its items: same lists as the whole log."""
    monkeypatch.setattr("sdm.serve.sessions.SMALL_VOCAB", 0)  # the cut applies to every vocabulary here
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact")
    log = pl.read_parquet(pipe["log"])
    batch = rec.recommend(log, k=10).sort("user_id")
    for user in batch["user_id"].to_list()[:12]:
        one = rec.recommend(log.filter(pl.col("user_id") == user), k=10)
        want = batch.filter(pl.col("user_id") == user)
        assert one["items"].to_list() == want["items"].to_list(), user
    # ids of another integer width are cast like the sessionizer does (the filter path)
    narrow = log.with_columns(pl.col("item_id").cast(pl.Int32)).filter(pl.col("user_id") == batch["user_id"][0])
    assert rec.recommend(narrow, k=10)["items"].to_list() == batch.head(1)["items"].to_list()
