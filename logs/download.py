"""Download public datasets with a stable address (`sdm download`).

Only datasets whose files sit at a permanent public URL are listed (GroupLens'
MovieLens archives). The others (Taobao, Diginetica, YOOCHOOSE, REES46, OTTO)
need a login or a Kaggle/Tianchi client; download them by hand and run
`sdm convert`.

The archive is streamed to `<dest>/<file>.part` with a progress bar, its
checksum verified, then renamed and extracted. A failed download or a checksum
mismatch leaves no file behind and raises an `SdmError`. Only the standard
library (urllib) is used.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sdm.errors import SdmError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    """One downloadable archive.

    Attributes:
        url: permanent address of the archive.
        algo: hashlib name of the checksum algorithm.
        checksum: expected hex digest of the archive.
        fmt: the `sdm convert` format of its contents.
        folder: the directory the archive extracts to.
    """

    url: str
    algo: str
    checksum: str
    fmt: str
    folder: str


# GroupLens publishes an MD5 next to every archive (`<url>.md5`); the values
# below are those, as also pinned independently by other projects' download
# code (e.g. eli-osherovich/papers_with_code datasets/movielens/dl_config.py).
# They could not be re-checked against the live files from this machine.
DATASETS: dict[str, Dataset] = {
    "movielens-100k": Dataset(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        algo="md5",
        checksum="0e33842e24a9c977be4e0107933c0723",
        fmt="movielens",
        folder="ml-100k",
    ),
    "movielens-1m": Dataset(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        algo="md5",
        checksum="c4d9eecfca2ab87c1945afe126590906",
        fmt="movielens",
        folder="ml-1m",
    ),
    "movielens-20m": Dataset(
        url="https://files.grouplens.org/datasets/movielens/ml-20m.zip",
        algo="md5",
        checksum="cd245b17a1ae2cc31bb14903e1204af3",
        fmt="movielens",
        folder="ml-20m",
    ),
    "movielens-25m": Dataset(
        url="https://files.grouplens.org/datasets/movielens/ml-25m.zip",
        algo="md5",
        checksum="6b51fb2759a8657d3bfcbfc42b592ada",
        fmt="movielens",
        folder="ml-25m",
    ),
}


def fetch(url: str, path: Path, algo: str, checksum: str, progress: bool = True, timeout: float = 60.0) -> Path:
    """Stream `url` to `path`, verifying its digest; nothing is left behind on failure.

    Args:
        url: address to fetch (http, https or file).
        path: final file path; the download goes to `path.part` first.
        algo: hashlib algorithm name ("md5", "sha256").
        checksum: expected hex digest.
        progress: show a progress bar (tqdm, sized from Content-Length).
        timeout: socket timeout in seconds.

    Returns:
        `path`.

    Raises:
        SdmError: HTTP or network error, or checksum mismatch (one line, naming the URL).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    digest = hashlib.new(algo)
    bar = None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as fh:
            total = resp.headers.get("Content-Length")
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=path.name)
            while block := resp.read(CHUNK):
                fh.write(block)
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise SdmError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise SdmError(f"{url}: download failed ({reason})") from None
    finally:
        if bar is not None:
            bar.close()
    got = digest.hexdigest()
    if got != checksum.lower():
        part.unlink(missing_ok=True)
        raise SdmError(f"{url}: checksum mismatch ({algo} {got}, expected {checksum}); the file was removed")
    part.replace(path)
    return path


def download(name: str, dest: Path, url: str | None = None, progress: bool = True) -> Path:
    """Download, verify and extract dataset `name` into `dest`.

    An archive already present with the right checksum is not fetched again.

    Args:
        name: a key of DATASETS.
        dest: directory for the archive and its extracted folder.
        url: override the address (a mirror, or a local server in tests); the
            checksum is still the registered one.
        progress: show a progress bar.

    Returns:
        The extracted folder (give it to `sdm convert <fmt>`).

    Raises:
        SdmError: unknown name, download failure, checksum mismatch, bad archive.
    """
    if name not in DATASETS:
        raise SdmError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    ds = DATASETS[name]
    dest = Path(dest)
    archive = dest / Path(ds.url).name
    if not (archive.is_file() and _digest(archive, ds.algo) == ds.checksum):
        fetch(url or ds.url, archive, ds.algo, ds.checksum, progress=progress)
    folder = dest / ds.folder
    tmp = dest / (ds.folder + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # extractall drops absolute and '..' member paths
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SdmError(f"{archive}: not a valid zip archive ({exc})") from None
    inner = tmp / ds.folder
    shutil.rmtree(folder, ignore_errors=True)
    (inner if inner.is_dir() else tmp).replace(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()
