"""Hostile and careless use of serving: `sdm export`, `sdm recommend` and `Recommender`.

Each test names the defect (1-7) it guards against, and each defect has tests
that failed before this version; a few cases guard behaviour that was already
right (damage to files serving never reads, the CLI's own flag checks). One small
synth pipeline (sessionize, an untrained checkpoint) is exported once per module;
every test that changes an export works on a copy.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_recommend import build_pipeline
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import ExportConfig, RecommendConfig
from sdm.errors import ConfigError, DataError, LockedError, OutputError, SdmError, StorageError
from sdm.names import vocab_file
from sdm.outputs import OutputDir, OutputFile
from sdm.serve import Recommender
from sdm.serve.export import OUTPUTS, _copy_lookups, export
from sdm.serve.recommend import recommend

runner = CliRunner()
K = 5


def run(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: Any) -> str:
    """The CLI's answer to bad input: exit code 1 and exactly one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip(), text
    return text


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile_serve")
    p = build_pipeline(root, seed=7)
    assert (p["data"] / "items_raw.parquet").is_file()  # sessionize keeps the items table it read
    p["export"] = root / "export"
    export(ExportConfig(data=p["data"], model=p["model"], out=p["export"]))
    log = pl.read_parquet(p["log"])
    users = log["user_id"].unique().sort().head(3)
    p["events"] = log.filter(pl.col("user_id").is_in(users.implode()))
    p["want"] = Recommender.load(p["export"], runtime="torch", index="exact").recommend(p["events"], k=K)["items"].to_list()
    return p


@pytest.fixture
def export_copy(pipe: dict[str, Any], tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(pipe["export"], out)
    return out


# -- 1. no unpickling ---------------------------------------------------------------------------


def craft_pt2(src: Path, dst: Path, marker: Path) -> None:
    """`src` with its first weight stored as a pickle that writes `marker` when unpickled.

    `torch.export.load` reads a weight whose config says `use_pickle` with
    `torch.load(weights_only=False)`: loading this file runs the code.
    """

    class Payload:
        def __reduce__(self) -> Any:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    buf = io.BytesIO()
    torch.save(Payload(), buf)
    with zipfile.ZipFile(src) as zin:
        cfg_name = next(n for n in zin.namelist() if n.endswith("weights/model_weights_config.json"))
        cfg = json.loads(zin.read(cfg_name))
        first = next(iter(cfg["config"]))
        cfg["config"][first]["use_pickle"] = True
        weight = cfg_name.rsplit("/", 1)[0] + "/" + cfg["config"][first]["path_name"]
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                data = json.dumps(cfg).encode() if info.filename == cfg_name else data
                zout.writestr(info.filename, buf.getvalue() if info.filename == weight else data)


def test_a_crafted_pt2_never_runs_code(pipe: dict[str, Any], export_copy: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defect 1: `Recommender.load(runtime="torch")` (and "auto" without ONNX) unpickled user_tower.pt2."""
    marker = tmp_path / "ran"
    craft_pt2(pipe["export"] / "user_tower.pt2", export_copy / "user_tower.pt2", marker)
    got = Recommender.load(export_copy, runtime="torch", index="exact").recommend(pipe["events"], k=K)
    assert not marker.exists()
    assert got["items"].to_list() == pipe["want"]
    (export_copy / "user_tower.onnx").unlink()
    rec = Recommender.load(export_copy)  # auto: no ONNX file, so the torch runtime
    assert rec.runtime == "torch" and rec.recommend(pipe["events"], k=K)["items"].to_list() == pipe["want"]
    assert not marker.exists()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.export.load must never be called: it unpickles")

    monkeypatch.setattr(torch.export, "load", refuse)
    Recommender.load(export_copy, runtime="torch").recommend(pipe["events"], k=K)


def test_an_export_without_the_weights_file_asks_to_re_export(export_copy: Path) -> None:
    """Defect 1: an export of an older sdm (no user_tower.weights.pt) is one line, not a fallback to the .pt2."""
    (export_copy / "user_tower.weights.pt").unlink()
    (export_copy / "user_tower.onnx").unlink()
    with pytest.raises(DataError, match=r"user_tower.weights.pt: .*re-run `sdm export`") as err:
        Recommender.load(export_copy)
    one_line(err.value)


def test_a_pickle_in_the_weights_file_never_runs(pipe: dict[str, Any], export_copy: Path, tmp_path: Path) -> None:
    """Defect 1: the weights file is read with weights_only=True: a pickled object in it is refused, not run."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> Any:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"format": "sdm-user-tower-weights", "state_dict": Payload()}, export_copy / "user_tower.weights.pt")
    with pytest.raises(DataError, match="user_tower.weights.pt"):
        Recommender.load(export_copy, runtime="torch")
    assert not marker.exists()


# -- 2. every damaged export file is one line ----------------------------------------------------

EXPORT_FILES = [
    "config.json", "index.json", "item_vectors.parquet", "items.faiss", "items.parquet", "items_raw.parquet",
    "lookups.json", "user_tower.json", "user_tower.onnx", "user_tower.pt2", "user_tower.weights.pt", "users.parquet",
    "vocab/item.parquet", "vocab/category.parquet", "vocab/brand.parquet", "vocab/user.parquet", "vocab/age.parquet",
    "vocab/gender.parquet",
]  # fmt: skip
# Files serving does not read: damage to them must not matter (the .pt2 is for other consumers; user
# vocabularies are not needed, users.parquet holds the encoded profiles).
NOT_READ = {"user_tower.pt2", "vocab/user.parquet", "vocab/age.parquet", "vocab/gender.parquet"}
# Files an export may lack: serving goes on without them.
OPTIONAL = {"items_raw.parquet"}


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, max(len(data), 64), dtype=np.uint8).tobytes())


def load_and_recommend(root: Path, name: str, events: pl.DataFrame) -> list[list[Any]]:
    """Load the export the way that reads `name`, and answer `events`."""
    if name == "user_tower.onnx":
        pytest.importorskip("onnxruntime")
    if name in ("items.faiss", "index.json"):
        pytest.importorskip("faiss")
    runtime = "onnx" if name == "user_tower.onnx" else "torch"
    index = "faiss" if name in ("items.faiss", "index.json") else "exact"
    return Recommender.load(root, runtime=runtime, index=index).recommend(events, k=K)["items"].to_list()


def test_the_damage_list_covers_every_export_file(pipe: dict[str, Any]) -> None:
    """Defect 2: a file export writes that no damage test covers would go unchecked."""
    written = {p.relative_to(pipe["export"]).as_posix() for p in pipe["export"].rglob("*") if p.is_file()}
    written.discard(".sdm-output.json")
    assert written <= set(EXPORT_FILES)
    assert set(EXPORT_FILES) - written <= {"items.faiss", "index.json", "user_tower.onnx"}  # extras not installed


@pytest.mark.parametrize("how", ["missing", "empty", "truncated", "garbage"])
@pytest.mark.parametrize("name", EXPORT_FILES)
def test_every_damaged_export_file_is_one_data_error(pipe: dict[str, Any], export_copy: Path, name: str, how: str) -> None:
    """Defect 2: damaged export files raised raw pyarrow / torch / json / faiss / onnxruntime exceptions."""
    path = export_copy / name
    if not path.is_file():
        pytest.skip(f"{name} not written (its extra is not installed)")
    damage(path, how)
    if name in NOT_READ or (name in OPTIONAL and how == "missing"):
        assert load_and_recommend(export_copy, name, pipe["events"]) == pipe["want"]
        return
    with pytest.raises(SdmError) as err:
        load_and_recommend(export_copy, name, pipe["events"])
    assert isinstance(err.value, (DataError, ConfigError)), type(err.value)
    assert Path(name).name in one_line(err.value), err.value


def _json_edit(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return change


def _parquet_edit(name: str, edit: Callable[[pl.DataFrame], pl.DataFrame]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / name
        edit(pl.read_parquet(path)).write_parquet(path)

    return change


def _copy_from(src: str, dst: str) -> Callable[[Path], None]:
    return lambda root: shutil.copyfile(root / src, root / dst)


def _narrow_vectors(root: Path) -> None:
    table = pq.read_table(root / "item_vectors.parquet")
    flat = np.stack(table.column("vector").to_numpy(zero_copy_only=False))[:, :8].astype(np.float32).reshape(-1)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(flat), 8)
    pq.write_table(table.set_column(2, "vector", vec), root / "item_vectors.parquet")


def _small_faiss(root: Path) -> None:
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(16)
    index.add(np.ones((5, 16), dtype=np.float32))
    faiss.write_index(index, str(root / "items.faiss"))


def _other_weights(root: Path) -> None:
    blob = torch.load(root / "user_tower.weights.pt", weights_only=True)
    cfg = json.loads(blob["model_config"])
    cfg["embedding_dim"] = 32
    blob["model_config"] = json.dumps(cfg)
    torch.save(blob, root / "user_tower.weights.pt")


def _foreign_onnx(path: Path) -> None:
    """A valid ONNX tower of another model: it reads seq_item only and gives vectors of dim 8."""
    pytest.importorskip("onnx")

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(300, 8)

        def forward(self, seq_item: torch.Tensor) -> torch.Tensor:
            return self.emb(seq_item)[:, 0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes
        torch.onnx.export(Tower(), (torch.ones(2, 2, dtype=torch.long),), str(path), input_names=["seq_item"],
                          output_names=["user_vector"], dynamic_axes={"seq_item": {0: "B", 1: "T"}}, dynamo=False)  # fmt: skip


def _other_catalogue(root: Path) -> None:
    """The weights of a model of the same shape trained on a catalogue with one item more."""
    blob = torch.load(root / "user_tower.weights.pt", weights_only=True)
    cfg = json.loads(blob["model_config"])
    cfg["item_vocab"]["item"] += 1
    blob["model_config"] = json.dumps(cfg)
    state = blob["state_dict"]
    table = state["item_table"]
    state["item_table"] = torch.cat([table, torch.tensor([[len(table)] + [1] * (table.shape[1] - 1)])])
    state["item_emb.tables.0.weight"] = torch.cat([state["item_emb.tables.0.weight"], torch.zeros(1, 16)])
    torch.save(blob, root / "user_tower.weights.pt")


WRONG_CONTENT = {
    "spec is a list": ("user_tower.json", _json_edit("user_tower.json", lambda s: [s])),
    "spec without inputs": ("user_tower.json", _json_edit("user_tower.json", lambda s: {k: v for k, v in s.items() if k != "inputs"})),
    "spec dim": ("user_tower.json", _json_edit("user_tower.json", lambda s: {**s, "embedding_dim": 32})),
    "lookups num_items": ("lookups.json", _json_edit("lookups.json", lambda s: {**s, "num_items": "x"})),
    "lookups config": ("lookups.json", _json_edit("lookups.json", lambda s: {**s, "config": {"gap": "soon"}})),
    "index spec items": ("index.json", _json_edit("index.json", lambda s: {**s, "items": 3})),
    "config is a list": ("config.json", _json_edit("config.json", lambda s: [1, 2])),
    "vectors of another schema": ("item_vectors.parquet", _copy_from("users.parquet", "item_vectors.parquet")),
    "vectors of another dim": ("item_vectors.parquet", _narrow_vectors),
    "vectors of fewer items": ("item_vectors.parquet", lambda root: pq.write_table(
        pq.read_table(root / "item_vectors.parquet").slice(0, 10), root / "item_vectors.parquet")),
    "faiss of another catalogue": ("items.faiss", _small_faiss),
    "vocab of another schema": ("item.parquet", _copy_from("users.parquet", "vocab/item.parquet")),
    "vocab index out of range": ("item.parquet", _parquet_edit("vocab/item.parquet", lambda v: v.with_columns(pl.col("index") + 10_000))),
    "items feature out of range": ("items.parquet", _parquet_edit("items.parquet", lambda v: v.with_columns(pl.col("category") + 999))),
    "users of another schema": ("users.parquet", _copy_from("items.parquet", "users.parquet")),
    "items_raw of another schema": ("items_raw.parquet", _copy_from("users.parquet", "items_raw.parquet")),
    "weights of another model": ("user_tower.weights.pt", _other_weights),
    "weights of another catalogue": ("user_tower.weights.pt", _other_catalogue),
    "spec of other data": ("user_tower.json", _json_edit("user_tower.json", lambda s: {**s, "fingerprint": "other"})),
    "onnx of another model": ("user_tower.onnx", lambda root: _foreign_onnx(root / "user_tower.onnx")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WRONG_CONTENT))
def test_foreign_or_mismatched_export_files_are_one_data_error(pipe: dict[str, Any], export_copy: Path, case: str) -> None:
    """Defect 2: wrong JSON types / keys, foreign Parquet schemas, dims or sizes that do not match."""
    name, change = WRONG_CONTENT[case]
    if not (export_copy / name).exists() and not list(export_copy.rglob(name)):
        pytest.skip(f"{name} not written (its extra is not installed)")
    change(export_copy)
    with pytest.raises(SdmError) as err:
        load_and_recommend(export_copy, name, pipe["events"])
    assert isinstance(err.value, DataError), type(err.value)
    assert name in one_line(err.value) or "items table" in str(err.value), err.value


def test_inspect_of_a_damaged_export_is_one_line(export_copy: Path) -> None:
    """Defect 2, `sdm inspect`: a user_tower.json holding a list raised AttributeError; a damaged index.json KeyError."""
    from sdm.serve.inspect import inspect_path

    (export_copy / "index.json").write_text('{"kind": "ivf"}')
    assert "index: ivf over ? items" in inspect_path(export_copy)
    (export_copy / "user_tower.json").write_text("[1, 2]")
    assert "user_tower.json" in one_error_line(run("inspect", export_copy))


# -- 3. bad arguments are ConfigError --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 2.5}, {"k": "5"}, {"k": 0}, {"k": -1}, {"k": True}, {"k": None}, {"at": 5}, {"at": 1.5e9},
     {"at": "garbage"}, {"at": [1]}, {"at": "9999-12-31T00:00:00Z"}, {"at": dt.datetime(1500, 1, 1)},
     {"at": "NaT-placeholder"}, {"exclude_seen": "yes"}],
    ids=str,
)  # fmt: skip
def test_bad_arguments_are_config_errors(pipe: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Defect 3: k=2.5, k="5", k=True, at=5, at="garbage" raised TypeError / AttributeError."""
    rec = Recommender.load(pipe["export"], runtime="torch")
    if kwargs.get("at") == "NaT-placeholder":  # pandas' missing time: not "no cut-off" (None is)
        pd = pytest.importorskip("pandas")
        kwargs = {"at": pd.NaT}
    with pytest.raises(ConfigError) as err:
        rec.recommend(pipe["events"], **{"k": K, **kwargs})
    one_line(err.value)


def test_bad_events_are_config_errors(pipe: dict[str, Any]) -> None:
    """Defect 3: an item id beyond int64 raised a polars InvalidOperationError; bad shapes one line each."""
    rec = Recommender.load(pipe["export"], runtime="torch")
    rows = pipe["events"].head(3).to_dicts()
    for events in (
        [{**r, "item_id": 2**70} for r in rows],  # beyond int64
        42, "events", b"x", {"user_id": [1, 2], "item_id": [1]},
    ):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            rec.recommend(events, k=K)
        one_line(err.value)
    for events in ([{**r, "user_id": [r["user_id"]]} for r in rows], [[1, 2], {"a": 1}], [1, 2, 3]):
        with pytest.raises(SdmError) as err:  # a nested user id, rows of no table: one line
            rec.recommend(events, k=K)
        one_line(err.value)


def test_good_arguments_still_work(pipe: dict[str, Any]) -> None:
    """The checks refuse only bad values: numpy ints, ISO strings and a k beyond the catalogue still answer."""
    rec = Recommender.load(pipe["export"], runtime="torch", index="exact")
    assert rec.recommend(pipe["events"], k=np.int64(K))["items"].to_list() == pipe["want"]
    last = pipe["events"]["timestamp"].max()
    by_string = rec.recommend(pipe["events"], k=K, at=last.isoformat())["items"].to_list()
    assert by_string == rec.recommend(pipe["events"], k=K, at=last)["items"].to_list()
    huge = rec.recommend(pipe["events"], k=10**12)  # at most the catalogue, never a 8 TB allocation
    assert max(len(x) for x in huge["items"].to_list()) <= len(rec.raw_items) - 2


@pytest.mark.parametrize(
    "flags", [["--k", "2.5"], ["--k", "5x"], ["--k", "0"], ["--k", "-1"], ["--at", "garbage"], ["--k", "100000"]], ids=str
)
def test_cli_bad_arguments_are_one_line(pipe: dict[str, Any], tmp_path: Path, flags: list[str]) -> None:
    """Defect 3, the CLI side: the same bad values are one `error:` line and nothing is written."""
    out = tmp_path / "r.parquet"
    result = run("recommend", pipe["log"], "--data", pipe["data"], "--model", pipe["model"], "--out", out, "-q", *flags)
    one_error_line(result)
    assert not out.exists()


def test_cli_item_id_beyond_int64_is_one_line(pipe: dict[str, Any], tmp_path: Path) -> None:
    """Defect 3, the CLI side: a log whose item ids do not fit int64 is one line, not a polars traceback."""
    log = pl.read_parquet(pipe["log"]).head(20).with_columns(pl.lit(2**64 - 1, dtype=pl.UInt64).alias("item_id"))
    log.write_parquet(tmp_path / "log.parquet")
    out = tmp_path / "r.parquet"
    one_error_line(run("recommend", tmp_path / "log.parquet", "--data", pipe["data"], "--model", pipe["model"],
                       "--out", out, "--device", "cpu", "-q"))  # fmt: skip
    assert not out.exists()


# -- 4. export output ownership ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data", "model", "inside data"])
def test_export_never_writes_over_its_inputs(pipe: dict[str, Any], where: str) -> None:
    """Defect 4: `sdm export --out DATA --overwrite` deleted the data directory's vocab, items and config."""
    out = {"data": pipe["data"], "model": pipe["model"], "inside data": pipe["data"] / "vocab"}[where]
    before = snapshot(pipe["data"]), snapshot(pipe["model"])
    line = one_error_line(run("export", "--data", pipe["data"], "--model", pipe["model"], "--out", out,
                              "--overwrite", "-q", "--no-onnx", "--no-faiss"))  # fmt: skip
    assert re.search(r"(is|contains|lies inside) the (data|model) directory", line), line
    assert (snapshot(pipe["data"]), snapshot(pipe["model"])) == before


def test_export_refuses_a_folder_with_a_foreign_file(pipe: dict[str, Any], tmp_path: Path) -> None:
    """Defect 4: `--overwrite` replaced export files in a folder that also held the user's own files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "items.faiss").write_text("stale")
    before = snapshot(out)
    line = one_error_line(run("export", "--data", pipe["data"], "--model", pipe["model"], "--out", out,
                              "--overwrite", "-q", "--no-onnx", "--no-faiss"))  # fmt: skip
    assert "notes.txt" in line
    assert snapshot(out) == before


def test_a_second_export_into_the_same_folder_is_refused(pipe: dict[str, Any], tmp_path: Path) -> None:
    """Defect 4: two exports into one folder wrote over each other's files."""
    out = tmp_path / "out"
    cfg = ExportConfig(data=pipe["data"], model=pipe["model"], out=out, overwrite=True, onnx=False, faiss=False)
    with OutputDir(out, "export", OUTPUTS, overwrite=True):  # another export holds the folder
        with pytest.raises(LockedError) as err:
            export(cfg)
        one_line(err.value)
        args = ["export", "--data", pipe["data"], "--model", pipe["model"], "--out", out, "--overwrite", "-q"]
        assert "another sdm process" in one_error_line(run(*args))
    assert not (out / "config.json").exists()


def test_a_refused_model_leaves_the_earlier_export(pipe: dict[str, Any], export_copy: Path, tmp_path: Path) -> None:
    """Defect 4: the earlier export is deleted only after the new model and data were checked."""
    foreign = tmp_path / "foreign"
    shutil.copytree(pipe["model"], foreign)
    ckpt = torch.load(foreign / "best.pt", weights_only=True)
    ckpt["data_fingerprint"] = "another"
    torch.save(ckpt, foreign / "best.pt")
    before = snapshot(export_copy)
    one_error_line(run("export", "--data", pipe["data"], "--model", foreign, "--out", export_copy, "--overwrite", "-q"))
    assert snapshot(export_copy) == before


def test_export_copies_items_raw_and_vocabularies_by_their_safe_names(pipe: dict[str, Any], tmp_path: Path) -> None:
    """Defect 4 / 6: items_raw.parquet travels with the export; vocabularies are found by `vocab_file`, and a
    feature name like `../x` or `a/b` never becomes a path outside vocab/."""
    assert (pipe["export"] / "items_raw.parquet").read_bytes() == (pipe["data"] / "items_raw.parquet").read_bytes()
    data, out = tmp_path / "data", tmp_path / "deep" / "out"
    names = ["item", "a/b", "../x", "/etc/y"]
    for name in names:
        (data / vocab_file(name)).parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"raw": [name], "index": [2]}).write_parquet(data / vocab_file(name))
    out.mkdir(parents=True)
    manifest = {"item_features": ["item", "a/b"], "user_features": ["../x"], "vocab_sizes": {n: 3 for n in names}}
    got = _copy_lookups(data, out, manifest)
    assert got == {n: vocab_file(n) for n in names}
    for name in names:
        assert (out / vocab_file(name)).read_bytes() == (data / vocab_file(name)).read_bytes()
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]


# -- 5. recommend output -------------------------------------------------------------------------


def recommend_args(pipe: dict[str, Any], out: Path, *extra: Any) -> list[Any]:
    return ["recommend", pipe["log"], "--data", pipe["data"], "--model", pipe["model"], "--out", out, "--k", K,
            "--device", "cpu", "-q", *extra]  # fmt: skip


@pytest.mark.parametrize("target", ["log", "checkpoint", "data manifest"])
def test_recommend_never_writes_over_its_inputs(pipe: dict[str, Any], target: str) -> None:
    """Defect 5: `--out LOG --overwrite` replaced the log; `--out MODEL/best.pt` the checkpoint."""
    out = {"log": pipe["log"], "checkpoint": pipe["model"] / "best.pt", "data manifest": pipe["data"] / "manifest.json"}[target]
    before = out.read_bytes()
    line = one_error_line(run(*recommend_args(pipe, out, "--overwrite")))
    assert re.search(r"(is|lies inside) the (log|model directory|data directory)", line), line
    assert out.read_bytes() == before
    assert not list(out.parent.glob(".sdm-tmp-*")) and not list(out.parent.glob(".sdm-lock-*"))


def test_recommend_refuses_the_items_table_as_out(pipe: dict[str, Any], tmp_path: Path) -> None:
    """Defect 5: `--items T --out T --overwrite` replaced the items table it was reading."""
    table = tmp_path / "items.parquet"
    shutil.copyfile(pipe["log"].parent / "items.parquet", table)
    before = table.read_bytes()
    with pytest.raises(OutputError, match="items table"):
        recommend(RecommendConfig(data=pipe["data"], model=pipe["model"], out=table, items=table, overwrite=True,
                                  k=K, device="cpu"), pipe["log"])  # fmt: skip
    assert table.read_bytes() == before


def test_a_second_recommend_into_the_same_file_is_refused(pipe: dict[str, Any], tmp_path: Path) -> None:
    """Defect 5: two concurrent recommends into one file left an unreadable Parquet file, exit code 0."""
    out = tmp_path / "recs.parquet"
    with OutputFile(out, "recommend", overwrite=True):  # another recommend is writing it
        with pytest.raises(LockedError) as err:
            recommend(RecommendConfig(data=pipe["data"], model=pipe["model"], out=out, k=K, device="cpu"), pipe["log"])
        one_line(err.value)
        assert "another sdm process" in one_error_line(run(*recommend_args(pipe, out, "--overwrite")))
    assert not out.exists()


def test_a_killed_recommends_scratch_is_removed_by_the_next_run(pipe: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defect 5: a killed recommend left a full copy of the log in `.sdm-recommend-*` that no rerun removed."""
    import sdm.sessionize.read as read

    out = tmp_path / "recs.parquet"
    left = [tmp_path / ".sdm-tmp-1-dead-recs.parquet", tmp_path / ".sdm-tmp-2-beef-recs.parquet"]
    (left[0] / "input").mkdir(parents=True)  # a killed run's bucket split
    (left[0] / "input" / "part.parquet").write_bytes(pipe["log"].read_bytes())
    left[1].write_bytes(b"PAR1 half a file")  # a killed run's unfinished output
    other = tmp_path / ".sdm-tmp-3-cafe-other.parquet"  # scratch of another output: not ours to remove
    other.write_bytes(b"x")
    seen: list[Path] = []
    real_split = read.split_log

    def spy(inp: Any, n: int, where: Path) -> None:
        seen.append(where)
        real_split(inp, n, where)

    monkeypatch.setattr("sdm.sessionize.read.split_log", spy)
    cfg = RecommendConfig(data=pipe["data"], model=pipe["model"], out=out, k=K, device="cpu", bucket_events=1500)
    assert recommend(cfg, pipe["log"])["buckets"] > 1
    assert seen and all(p.parent.name.startswith(".sdm-tmp-") and p.parent.name.endswith("-recs.parquet") for p in seen)
    assert not any(p.exists() for p in left) and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".sdm-tmp-3-cafe-other.parquet", "recs.config.json",
                                                                 "recs.parquet"])  # fmt: skip
    pl.read_parquet(out)


# -- 6. a self-contained data directory ------------------------------------------------------------


def test_answers_do_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 6: serving read the manifest's relative `config.items` path: from a folder holding another file
    at that path, 0 of 80 lists matched."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    monkeypatch.chdir(home)
    p = build_pipeline(Path("."), seed=9)  # sessionize reads the items table by a relative path
    manifest = json.loads((home / "data" / "manifest.json").read_text())
    assert not Path(manifest["config"]["items"]).is_absolute()
    data, model, log = home / "data", home / "model", home / p["log"]
    base = dict(data=data, model=model, k=10, device="cpu")
    recommend(RecommendConfig(**base, out=tmp_path / "home.parquet"), log)

    items = pl.read_parquet(home / "synth" / "items.parquet")
    fake = items.with_columns(pl.col(c).shuffle(seed=1) for c in items.columns if c != "item_id")
    (elsewhere / "synth").mkdir(parents=True)
    fake.write_parquet(elsewhere / "synth" / "items.parquet")  # another table at the manifest's relative path
    monkeypatch.chdir(elsewhere)
    recommend(RecommendConfig(**base, out=tmp_path / "elsewhere.parquet"), log)
    a = pl.read_parquet(tmp_path / "home.parquet").sort("user_id")
    b = pl.read_parquet(tmp_path / "elsewhere.parquet").sort("user_id")
    assert a["items"].to_list() == b["items"].to_list()


def test_the_api_never_reads_the_recorded_items_path(pipe: dict[str, Any], export_copy: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defect 6, the API: an export answered from the table at `config.items`, relative to the working directory."""
    lookups = json.loads((export_copy / "lookups.json").read_text())
    lookups["config"]["items"] = "items.parquet"  # as recorded by `sdm sessionize LOG --items items.parquet`
    (export_copy / "lookups.json").write_text(json.dumps(lookups))
    items = pl.read_parquet(pipe["log"].parent / "items.parquet")
    items.with_columns(pl.col(c).shuffle(seed=2) for c in items.columns if c != "item_id").write_parquet(
        tmp_path / "items.parquet"
    )
    monkeypatch.chdir(tmp_path)
    got = Recommender.load(export_copy, runtime="torch", index="exact").recommend(pipe["events"], k=K)
    assert got["items"].to_list() == pipe["want"]
    (export_copy / "items_raw.parquet").unlink()  # an older export: the encoded items.parquet, never config.items
    got = Recommender.load(export_copy, runtime="torch", index="exact").recommend(pipe["events"], k=K)
    assert got["items"].to_list() == pipe["want"]


# -- 7. storage errors ---------------------------------------------------------------------------


def no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_export_is_one_line_and_leaves_no_half_export(pipe: dict[str, Any], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defect 7: an OSError while exporting was a traceback and left half an export."""
    monkeypatch.setattr("sdm.serve.export.shutil.copyfile", no_space)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="No space left on device") as err:
        export(ExportConfig(data=pipe["data"], model=pipe["model"], out=out, onnx=False, faiss=False))
    assert str(out) in one_line(err.value)
    assert not out.exists()  # what it wrote is removed, and the folder it created


def test_a_failed_tower_write_is_a_storage_error(pipe: dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defect 7: torch reports a failed write as RuntimeError; it is a StorageError naming the file."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("sdm.serve.export.torch.save", fail)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="user_tower.weights.pt") as err:
        export(ExportConfig(data=pipe["data"], model=pipe["model"], out=out, onnx=False, faiss=False))
    one_line(err.value)
    assert not out.exists()


def test_a_full_disk_during_recommend_is_one_line_and_leaves_nothing(pipe: dict[str, Any], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Defect 7: an OSError while writing recommendations was a traceback and could leave a partial file."""
    monkeypatch.setattr("sdm.serve.recommend._Writer.write", no_space)
    out = tmp_path / "recs.parquet"
    with pytest.raises(StorageError, match="No space left on device") as err:
        recommend(RecommendConfig(data=pipe["data"], model=pipe["model"], out=out, k=K, device="cpu"), pipe["log"])
    assert str(out) in one_line(err.value)
    assert list(tmp_path.iterdir()) == []
    result = run(*recommend_args(pipe, out))
    assert "No space left on device" in one_error_line(result)
