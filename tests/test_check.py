"""Damaged shard directories: `read_manifest` refuses them in one line, `sdm check` verifies every hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import at, write_log
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.manifest import check_data_dir
from sdm.pipeline.dataset import SessionDataset, read_manifest
from sdm.sessionize import run


def make_data(root: Path, users: int = 6, shift: int = 0) -> Path:
    rows = [(u, 10 + (u + k + shift) % 7, at(k, days=d)) for u in range(users) for d in (0, 2, 4) for k in range(3)]
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}, orient="row")
    log = write_log(df, root / "log.parquet")
    items = write_log(pl.DataFrame({"item_id": list(range(10, 17)), "brand": list("abcabca")}), root / "items.parquet")
    run(SessionizeConfig(out=root / "data", min_shards=2, items=items), log, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pristine"))


@pytest.fixture()
def data(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def edit(d: Path, fn) -> None:
    m = manifest(d)
    m = fn(m) or m
    (d / "manifest.json").write_text(json.dumps(m))


def check_cli(d: Path) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["check", str(d)])
    return r.exit_code, r.output.strip()


def test_manifest_records_size_and_hash_of_every_file(data):
    files = manifest(data)["files"]
    # every file but the manifest and the output marker (`.sdm-output.json`, not data)
    on_disk = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file() and p.name not in ("manifest.json", ".sdm-output.json"))
    assert sorted(files) == on_disk
    assert all(set(v) == {"size", "sha256"} and len(v["sha256"]) == 64 for v in files.values())
    code, out = check_cli(data)
    assert code == 0 and out.startswith(f"ok: {data}: {len(files)} files")


def first_shard(d: Path) -> Path:
    return d / manifest(d)["splits"]["train"]["shards"][0]["path"]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: (d / "manifest.json").write_text("[1, 2]"), "a JSON list, expected an object"),
        (lambda d: edit(d, lambda m: m.pop("num_items") and None), "missing key(s) num_items"),
        (lambda d: edit(d, lambda m: m.update(num_items=m["num_items"] + 5)), "num_items"),
        (lambda d: edit(d, lambda m: m["vocab_sizes"].update(item=m["vocab_sizes"]["item"] + 5, ) or m.update(num_items=m["vocab_sizes"]["item"])), "vocab/item.parquet"),
        (lambda d: edit(d, lambda m: m["vocab_sizes"].update(brand=99)), "vocab_sizes['brand'] is 99"),
        (lambda d: edit(d, lambda m: m["splits"].pop("valid") and None), "splits must hold train, valid and test"),
        (lambda d: edit(d, lambda m: m.update(format="sdm-other")), "format 'sdm-other', expected 'sdm-shards'"),
        (lambda d: first_shard(d).unlink(), "missing from the data directory"),
        (lambda d: first_shard(d).write_bytes(first_shard(d).read_bytes()[:-10]), "truncated or replaced"),
        (lambda d: (d / "vocab" / "item.parquet").unlink(), "vocab/item.parquet: missing"),
        (lambda d: (d / "items.parquet").unlink(), "items.parquet: missing"),
        (lambda d: (d / "vocab" / "brand.parquet").unlink(), "vocab/brand.parquet: missing"),
    ],
)
def test_damaged_directory_is_one_line(data, damage, fragment):
    damage(data)
    with pytest.raises(SdmError, match=None) as exc:
        read_manifest(data)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    code, out = check_cli(data)
    assert code == 1 and out.startswith("error: ") and fragment in out and "\n" not in out


def test_version_message_names_the_version(data):
    edit(data, lambda m: m.update(version=7))
    with pytest.raises(SdmError, match="unsupported version 7, expected one of 1, 2"):
        read_manifest(data)


def test_corrupted_shard_of_the_same_size_is_found_by_check(data):
    shard = first_shard(data)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    read_manifest(data)  # sizes match: the cheap check on open passes
    with pytest.raises(SdmError, match=r"1 of \d+ files differ from their recorded sha256: train/part-"):
        check_data_dir(data)
    assert check_cli(data)[0] == 1


def test_shard_swapped_in_from_another_dataset(data, tmp_path):
    other = make_data(tmp_path / "other", users=9, shift=3)
    shutil.copy(first_shard(other), first_shard(data))
    with pytest.raises(SdmError, match="truncated or replaced"):
        read_manifest(data)


def test_unreadable_shard_while_streaming_is_one_line(data):
    shard = first_shard(data)
    size = shard.stat().st_size
    shard.write_bytes(b"\0" * size)  # same size: passes the open check
    ds = SessionDataset(data, "train", batch_size=4, shuffle=False)
    with pytest.raises(SdmError, match=r"damaged shard .*sdm check"):
        list(ds)


def test_more_loader_workers_than_shards_is_one_line(data):
    ds = SessionDataset(data, "train", batch_size=4, shuffle=False)
    n = len(ds.shards)
    it = iter(DataLoader(ds, batch_size=None, num_workers=n + 1))
    try:
        with pytest.raises(SdmError) as exc:
            next(it)
    finally:
        it._shutdown_workers()  # now, not at garbage collection in a later test
    msg = str(exc.value)
    assert "\n" not in msg and f"{n} shards for 1 rank(s) x {n + 1} loader worker(s)" in msg


def test_old_manifest_without_file_table_still_opens_but_check_says_why(data):
    edit(data, lambda m: m.pop("files") and None)
    read_manifest(data)
    code, out = check_cli(data)
    assert code == 1 and "records no file hashes" in out


def test_bucketed_outputs_pass_check(tmp_path):
    src = make_data(tmp_path / "one")
    log = tmp_path / "one" / "log.parquet"
    run(SessionizeConfig(out=tmp_path / "b3", buckets=3, min_shards=2), log, progress=False)
    assert check_data_dir(tmp_path / "b3")["files"] == len(manifest(tmp_path / "b3")["files"])
    assert src.exists()
