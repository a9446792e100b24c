"""Hostile and careless use of outputs: sdm deletes only what it wrote, never writes over an input,
one writer per output, every file complete or absent, and an edited data directory is refused.

Each test names the defect it guards against; all of them failed before `sdm.outputs` existed.
"""

from __future__ import annotations

import errno
import json
import shutil
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from shard_builder import build_shards, file_table
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import TrainConfig
from sdm.errors import DataError, LockedError, OutputError, SdmError, StorageError
from sdm.outputs import MARKER, OutputDir, OutputFile, atomic_path, check_disjoint
from sdm.manifest import read_manifest
from sdm.pipeline.train import train

runner = CliRunner()

TINY = ["--batch-size", "8", "--embedding-dim", "16", "--num-negatives", "8", "--epochs", "1", "--log-every", "1"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    """The CLI's answer to bad input: exit code 1 and exactly one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    data = build_shards(root / "data", n_users=16, sessions_per_user=4, session_len=5, n_shards=2)
    cfg = TrainConfig(data=data, out=root / "model", batch_size=8, embedding_dim=16, num_negatives=8, epochs=1)
    train(cfg, progress=False)
    return data, root / "model"


# -- ownership: what --overwrite may delete --------------------------------------------------


def test_overwrite_refuses_a_project_folder_and_deletes_nothing(tmp_path: Path) -> None:
    """`cd my-project && sdm ... --out . --overwrite` deleted the project, .git included."""
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "notes.md").write_text("mine")
    before = snapshot(project)
    for command in ("sessionize", "train", "evaluate", "export", "demo"):
        with pytest.raises(OutputError, match="did not write"):
            with OutputDir(project, command, ["*.pt", "config.json"], overwrite=True) as guard:
                guard.prepare()
    assert snapshot(project) == before


def test_overwrite_replaces_only_the_same_commands_output(tmp_path: Path) -> None:
    """`evaluate --out DATA --overwrite` deleted the data directory's config.json."""
    out = tmp_path / "o"
    with OutputDir(out, "sessionize", ["config.json", "manifest.json"], overwrite=False) as guard:
        guard.prepare()
        (out / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="holds the output of `sdm sessionize`"):
        with OutputDir(out, "evaluate", ["config.json"], overwrite=True):
            pass
    assert (out / "config.json").exists()
    with OutputDir(out, "sessionize", ["config.json", "manifest.json"], overwrite=True) as guard:
        assert guard.existing == ["config.json"]
        guard.prepare()
    assert not (out / "config.json").exists() and (out / MARKER).exists()


@pytest.mark.parametrize("inside", ["vocab/mine.txt", "train/mine.txt", "test/deep/z.parquet"])
def test_overwrite_refuses_a_file_put_inside_an_own_folder(tmp_path: Path, inside: str) -> None:
    """An own folder is replaced whole: `vocab/mine.txt` was deleted with it."""
    from sdm.sessionize.write import OWNS

    out = tmp_path / "o"
    with OutputDir(out, "sessionize", OWNS, overwrite=False) as guard:
        guard.prepare()
        for rel in ("vocab/item.parquet", "train/part-00000.parquet", "test/part-00000.parquet", "manifest.json"):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text("x")
    with OutputDir(out, "sessionize", OWNS, overwrite=True) as guard:  # its own files only: replaced
        assert guard.existing == ["manifest.json", "test", "train", "vocab"]
    (out / inside).parent.mkdir(parents=True, exist_ok=True)
    (out / inside).write_text("mine")
    (out / "vocab" / ".sdm-tmp-x").write_text("scratch of a killed run: not foreign")
    before = snapshot(out)
    with pytest.raises(OutputError, match=f"holds '{inside}', which `sdm sessionize` did not write"):
        with OutputDir(out, "sessionize", OWNS, overwrite=True) as guard:
            guard.prepare()
    assert {k: v for k, v in snapshot(out).items() if ".sdm-tmp-" not in k} == {
        k: v for k, v in before.items() if ".sdm-tmp-" not in k}


def test_export_and_demo_refuse_a_file_inside_their_folders(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    data, model = trained
    out = tmp_path / "e"
    assert run("export", "--data", data, "--model", model, "--out", out, "--no-onnx", "--no-faiss").exit_code == 0
    (out / "vocab" / "mine.txt").write_text("mine")
    err = one_error_line(run("export", "--data", data, "--model", model, "--out", out, "--no-onnx", "--no-faiss",
                             "--overwrite"))  # fmt: skip
    assert "vocab/mine.txt" in err and (out / "vocab" / "mine.txt").read_text() == "mine"
    from sdm.pipeline.demo import OWN

    demo = tmp_path / "d"
    (demo / "data" / "vocab").mkdir(parents=True)
    (demo / "data" / "vocab" / "item.parquet").write_text("x")
    (demo / "model").mkdir()
    (demo / "model" / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="model/notes.md"):
        with OutputDir(demo, "demo", OWN, overwrite=True) as guard:
            guard.prepare()
    assert (demo / "model" / "notes.md").exists()


def test_earlier_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with OutputDir(out, "train", ["best.pt"], overwrite=False) as guard:
        guard.prepare()
        (out / "best.pt").write_text("x")
    with pytest.raises(OutputError, match="pass --overwrite"):
        with OutputDir(out, "train", ["best.pt"], overwrite=False):
            pass


def test_refused_output_leaves_no_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with OutputDir(out, "train", ["best.pt"], overwrite=False):
            raise RuntimeError("input refused")
    assert not (tmp_path / "a").exists()


# -- --out never overlaps an input ------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_may_not_overlap_an_input(tmp_path: Path, where: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    out = {"same": data, "inside": data / "model", "contains": tmp_path}[where]
    with pytest.raises(OutputError, match="data directory"):
        check_disjoint(out, {"data directory": data})


def test_out_through_a_symlink_to_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(OutputError):
        check_disjoint(tmp_path / "link", {"data directory": data})


def test_train_out_data_is_refused_without_touching_it(trained: tuple[Path, Path]) -> None:
    """`train --out DATA` (no flag) overwrote the data directory."""
    data, _ = trained
    before = snapshot(data)
    line = one_error_line(run("train", "--data", data, "--out", data, *TINY))
    assert "data directory" in line
    line = one_error_line(run("train", "--data", data, "--out", data / "model", "--overwrite", *TINY))
    assert "lies inside the data directory" in line
    assert snapshot(data) == before


def test_evaluate_out_data_overwrite_is_refused(trained: tuple[Path, Path]) -> None:
    data, model = trained
    before = snapshot(data)
    one_error_line(run("evaluate", "--data", data, "--model", model, "--out", data, "--overwrite"))
    one_error_line(run("evaluate", "--data", data, "--model", model, "--out", model, "--overwrite"))
    assert snapshot(data) == before and (model / "best.pt").exists()


def test_config_file_inside_out_is_refused(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    """sessionize --overwrite deleted its own --config file when that sat in --out."""
    data, _ = trained
    out = tmp_path / "model"
    out.mkdir()
    config = out / "train.toml"
    config.write_text("[train]\nepochs = 1\n")
    line = one_error_line(run("train", "--data", data, "--out", out, "--overwrite", "--config", config))
    assert "--config file" in line and config.exists()


def test_synth_out_over_an_input_of_convert_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw.csv"
    raw.write_text("a,b\n1,2\n")
    line = one_error_line(run("convert", "movielens", raw, "--out", raw, "--overwrite"))
    assert "writes Parquet" in line and raw.read_text() == "a,b\n1,2\n"  # a CSV name: refused before any read


@pytest.mark.parametrize(("command", "name", "message"), [
    ("synth", "logs.csv", "writes Parquet; name the log *.parquet"),
    ("synth", "items.parquet", "the log would be its own items or users table"),
    ("convert", "users.parquet", "the log would be its own items or users table"),
])  # fmt: skip
def test_a_log_named_as_it_is_not_written_is_refused(tmp_path: Path, command: str, name: str, message: str) -> None:
    """`synth --out logs.csv` wrote Parquet under a .csv name; `--out items.parquet` collided with its own table."""
    args = ["synth", "--events", "500"] if command == "synth" else ["convert", "movielens", tmp_path]
    line = one_error_line(run(*args, "--out", tmp_path / name))
    assert message in line and name in line
    assert not (tmp_path / name).exists()


# -- one writer per output -----------------------------------------------------------------


def test_second_writer_of_a_directory_is_refused(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    """Two concurrent `train --overwrite` into one folder mixed two runs' files."""
    data, _ = trained
    out = tmp_path / "model"
    with OutputDir(out, "train", ["best.pt"], overwrite=True):
        line = one_error_line(run("train", "--data", data, "--out", out, "--overwrite", *TINY))
        assert "another sdm process" in line
    assert not (out / "best.pt").exists()


def test_a_model_still_being_trained_is_not_read(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    """export and evaluate read best.pt of a run still training: an epoch's model, without its neighbour weight."""
    data, model = trained
    with OutputDir(model, "train", ["*"], overwrite=False, keep=True):  # what a running `sdm train` holds
        for args in (("export", "--data", data, "--model", model, "--out", tmp_path / "e"),
                     ("evaluate", "--data", data, "--model", model, "--out", tmp_path / "v")):  # fmt: skip
            assert "still writing this model directory" in one_error_line(run(*args))
    assert run("evaluate", "--data", data, "--model", model, "--out", tmp_path / "v").exit_code == 0  # released


def test_second_writer_of_a_file_is_refused(tmp_path: Path) -> None:
    """Two concurrent `recommend` into one file wrote an unreadable Parquet file (exit 0)."""
    out = tmp_path / "recs.parquet"
    with OutputFile(out, "recommend", overwrite=True):
        with pytest.raises(LockedError):
            with OutputFile(out, "recommend", overwrite=True):
                pass
    assert not list(tmp_path.iterdir())  # the lock file is gone with its run


def test_synth_while_another_synth_writes_the_same_file(tmp_path: Path) -> None:
    out = tmp_path / "logs.parquet"
    with OutputFile(out, "synth", overwrite=True):
        line = one_error_line(run("synth", "--out", out, "--events", "2000", "--overwrite", "-q"))
        assert "another sdm process" in line


# -- every file complete or absent ------------------------------------------------------------


def test_atomic_path_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "metrics.json"
    final.write_text("old")
    with pytest.raises(StorageError, match="metrics.json"):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert final.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_scratch(
    tmp_path: Path, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: train printed a traceback and left last.tmp and no last.pt."""
    data, _ = trained
    out = tmp_path / "model"

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    line = one_error_line(run("train", "--data", data, "--out", out, *TINY))
    assert "No space left on device" in line and ".pt" in line
    assert not [p for p in out.iterdir() if p.name.startswith(".sdm-tmp-") or p.suffix == ".tmp"]


def test_a_killed_runs_scratch_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """A killed run's scratch (a full copy of the log in recommend's case) was never removed."""
    out = tmp_path / "o"
    out.mkdir()
    (out / ".sdm-tmp-123-abcd-topk.parquet").write_bytes(b"PAR1 half")
    (out / ".sdm-tmp-123-abcd-work").mkdir()
    with OutputDir(out, "evaluate", ["topk.parquet"], overwrite=False) as guard:
        guard.prepare()
    assert os.listdir(out) == [MARKER]
    (tmp_path / ".sdm-tmp-9-ff-recs.parquet").write_bytes(b"x")
    with OutputFile(tmp_path / "recs.parquet", "recommend", overwrite=False):
        pass
    assert not (tmp_path / ".sdm-tmp-9-ff-recs.parquet").exists()


def test_evaluate_never_leaves_a_topk_file_under_its_final_name(
    tmp_path: Path, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate wrote topk*.parquet under the final name: a kill left a footerless file."""
    from sdm.pipeline import evaluate as ev
    from sdm.pipeline import topkdump

    data, model = trained
    out = tmp_path / "eval"
    seen = []

    def write(self, batch, q, topk):
        seen.append(sorted(p.name for p in out.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(topkdump.TopkWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(ev.EvaluateConfig(data=data, model=model, out=out, dump_topk=True))
    assert seen and "topk.parquet" not in seen[0]
    assert not out.exists()  # the folder this run created held nothing finished: it is gone


# -- integrity of what is read ---------------------------------------------------------------


def _edit_manifest(data: Path, change) -> None:
    m = json.loads((data / "manifest.json").read_text())
    change(m)
    (data / "manifest.json").write_text(json.dumps(m))


@pytest.fixture()
def data_copy(tmp_path: Path) -> Path:
    return build_shards(tmp_path / "data", n_users=16, sessions_per_user=4, session_len=5, n_shards=2)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(splits=[]), lambda m: m["splits"]["train"].update(shards=None), lambda m: m.update(vocab_sizes="x"),
    lambda m: m.update(cutoffs=5), lambda m: m.update(item_features=None), lambda m: m.update(config=None),
    lambda m: m.update(dropped=[1]), lambda m: m.update(side_tables=7),
])  # fmt: skip
def test_inspect_of_an_edited_manifest_is_one_line(data_copy: Path, edit) -> None:
    """`sdm inspect` printed a traceback where `sdm check` gave one line."""
    m = json.loads((data_copy / "manifest.json").read_text())
    edit(m)
    (data_copy / "manifest.json").write_text(json.dumps(m))
    assert str(data_copy) in one_error_line(run("inspect", data_copy))
    from sdm.serve.inspect import inspect_path

    with pytest.raises(SdmError):
        inspect_path(data_copy)


def test_inspect_of_an_empty_or_odd_checkpoint_is_one_line(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    model = tmp_path / "m"
    shutil.copytree(trained[1], model)
    (model / "best.pt").write_bytes(b"")
    assert "best.pt: not a readable checkpoint" in one_error_line(run("inspect", model))
    torch.save({"model_config": "x", "model": {}}, model / "best.pt")
    assert "not an sdm checkpoint" in one_error_line(run("inspect", model))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0])), "listed twice"),
        (lambda m: m["splits"]["train"]["shards"][0].update(path="/etc/passwd"), "not a file of train/"),
        (lambda m: m["splits"]["train"]["shards"][0].update(path="train/../../x.parquet"), "not a file of train/"),
        (lambda m: m["files"].update({"../outside": {"size": 1, "sha256": "0"}}), "not a file inside"),
        (lambda m: m.update(files=[1, 2]), "files must map"),
    ],
)
def test_edited_manifest_is_refused(data_copy: Path, change, message: str) -> None:
    _edit_manifest(data_copy, change)
    with pytest.raises(DataError, match=message):
        read_manifest(data_copy)


def test_edited_length_cap_is_refused(tmp_path: Path) -> None:
    """An edited manifest (max_session_len 50 -> 5) was accepted."""
    from conftest import at, write_log

    import polars as pl

    log = write_log(
        pl.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [1, 2, 3, 1, 3, 2],
                      "timestamp": [at(m) for m in (0, 1, 2, 0, 1, 2)]}),
        tmp_path / "log.parquet",
    )  # fmt: skip
    data = tmp_path / "data"
    assert run("sessionize", log, "--out", data, "-q").exit_code == 0
    read_manifest(data)
    _edit_manifest(data, lambda m: m.update(max_session_len=5))
    with pytest.raises(DataError, match="max_session_len"):
        read_manifest(data)
    _edit_manifest(data, lambda m: (m.update(max_session_len=5), m["config"].update(max_session_len=5)))
    with pytest.raises(DataError, match="fingerprint"):
        read_manifest(data)


def test_a_shard_replaced_by_a_valid_file_of_the_same_size_is_refused(data_copy: Path, tmp_path: Path) -> None:
    """Shards replaced by valid files of the same size went unnoticed by train and evaluate (HR@20 0.63 -> 0.54)."""
    a, b = sorted((data_copy / "train").glob("*.parquet"))
    table = pq.read_table(a)
    pq.write_table(table.slice(0, table.num_rows), a)  # same rows, rewritten: other bytes
    m = json.loads((data_copy / "manifest.json").read_text())
    rel = a.relative_to(data_copy).as_posix()
    m["files"][rel]["size"] = a.stat().st_size  # a careful forger keeps the size right
    (data_copy / "manifest.json").write_text(json.dumps(m))
    before = file_table(data_copy)[rel]["sha256"]
    if before == m["files"][rel]["sha256"]:
        pytest.skip("pyarrow rewrote the shard byte for byte")
    line = one_error_line(run("train", "--data", data_copy, "--out", tmp_path / "m", *TINY))
    assert "sha256" in line and rel in line
    assert run("train", "--data", data_copy, "--out", tmp_path / "m2", "--no-verify", *TINY).exit_code == 0


def test_api_errors_are_sdm_errors() -> None:
    for cls in (DataError, OutputError, LockedError, StorageError):
        assert issubclass(cls, SdmError) and issubclass(cls, ValueError)


def test_convert_overwrite_never_deletes_a_side_table_it_does_not_write(tmp_path: Path) -> None:
    """convert --overwrite deleted a users.parquet beside the log when the dataset had no users table."""
    raw = tmp_path / "s.jsonl"
    raw.write_text('{"session": 1, "events": [{"aid": 1, "ts": 1659304800, "type": "clicks"}]}\n')
    theirs = tmp_path / "users.parquet"
    theirs.write_text("somebody's table")
    line = one_error_line(run("convert", "otto", raw, "--out", tmp_path / "logs.parquet", "--overwrite"))
    assert "users.parquet" in line and theirs.read_text() == "somebody's table"


def test_a_deeply_nested_manifest_is_one_line(data_copy: Path) -> None:
    (data_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read_manifest(data_copy)


def test_a_vocabulary_size_without_its_file_is_refused(data_copy: Path) -> None:
    """A manifest could otherwise ask for an embedding table of any size (an out-of-memory traceback)."""
    (data_copy / "vocab" / "age.parquet").unlink()
    _edit_manifest(data_copy, lambda m: (m["files"].pop("vocab/age.parquet"), m["vocab_sizes"].update(age=10**12)))
    with pytest.raises(DataError, match="age"):
        read_manifest(data_copy)
