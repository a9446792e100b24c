"""`sdm download` against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdm.cli import app
from sdm.errors import SdmError
from sdm.logs import download as dl


@pytest.fixture()
def server(tmp_path):
    """Serve tmp_path/www over HTTP; yields (base_url, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _archive(root: Path) -> tuple[Path, str]:
    """A small ml-100k-like zip (folder ml-test/ with u.data); returns path and md5."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-test/u.data", "1\t10\t5\t881250949\n2\t10\t3\t881250950\n")
        zf.writestr("ml-test/README", "x" * 300_000)  # large enough for several progress updates
    path = root / "ml-test.zip"
    path.write_bytes(buf.getvalue())
    return path, hashlib.md5(buf.getvalue()).hexdigest()


@pytest.fixture()
def registered(server, monkeypatch):
    base, root = server
    path, md5 = _archive(root)
    entry = dl.Dataset(url=f"{base}/{path.name}", algo="md5", checksum=md5, fmt="movielens", folder="ml-test")
    monkeypatch.setitem(dl.DATASETS, "ml-test", entry)
    return base, entry


def test_good_checksum_downloads_and_extracts(registered, tmp_path, capsys):
    base, _ = registered
    folder = dl.download("ml-test", tmp_path / "dl", progress=True)
    assert folder == tmp_path / "dl" / "ml-test"
    assert (folder / "u.data").read_text().startswith("1\t10")
    assert not list((tmp_path / "dl").glob("*.part"))
    assert "ml-test.zip" in capsys.readouterr().err  # the tqdm bar
    # the extracted folder converts
    from sdm.logs.convert import convert

    assert convert("movielens", [folder], tmp_path / "m" / "logs.parquet")["rows"] == 2


def test_bad_checksum_removes_file(registered, tmp_path, monkeypatch):
    _, entry = registered
    monkeypatch.setitem(dl.DATASETS, "ml-test", dl.Dataset(**{**entry.__dict__, "checksum": "0" * 32}))
    with pytest.raises(SdmError, match="checksum mismatch") as exc:
        dl.download("ml-test", tmp_path / "dl", progress=False)
    assert "\n" not in str(exc.value)
    assert not any((tmp_path / "dl").iterdir())


def test_http_404_is_one_line(registered, tmp_path):
    base, _ = registered
    with pytest.raises(SdmError, match=r"HTTP 404") as exc:
        dl.download("ml-test", tmp_path / "dl", url=f"{base}/missing.zip", progress=False)
    assert "\n" not in str(exc.value)
    assert not any((tmp_path / "dl").iterdir())


def test_unreachable_and_unknown(tmp_path):
    with pytest.raises(SdmError, match="unknown dataset 'nope'"):
        dl.download("nope", tmp_path)
    with pytest.raises(SdmError, match="download failed"):
        # port 9 on 127.0.0.1: nothing listens there
        dl.fetch("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", "md5", "0" * 32, progress=False, timeout=5)
    assert not (tmp_path / "x.zip.part").exists()


def test_registry_entries_are_well_formed():
    for name, ds in dl.DATASETS.items():
        assert ds.url.startswith("https://"), name
        assert len(ds.checksum) == hashlib.new(ds.algo).digest_size * 2, name


def test_cli(registered, tmp_path):
    r = CliRunner().invoke(app, ["download", "ml-test", "--out", str(tmp_path / "dl"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "sdm convert movielens" in r.output
    r = CliRunner().invoke(app, ["download", "nope", "--out", str(tmp_path / "dl")])
    assert r.exit_code == 1 and "unknown dataset" in r.output
    r = CliRunner().invoke(app, ["download", "--list"])
    assert r.exit_code == 0 and "movielens-1m" in r.output
