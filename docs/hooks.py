"""mkdocs hook: give mkdocstrings a copy of the `sdm` package to read.

The repository root *is* the `sdm` package (pyproject maps `sdm` to `.`), so no
folder on disk is named `sdm`, and pointing griffe at the root would make it walk
`.venv/` and `tests/` as if they were subpackages. Before the build, this copies
the `.py` files of the packages that pyproject lists into
`build/griffe-src/sdm/...`; mkdocs.yml points mkdocstrings there (`paths`). Griffe
reads the copy statically: nothing is imported, and pydantic field docstrings are
kept.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "build" / "griffe-src"


def _copy_py(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for py in src.glob("*.py"):
        shutil.copy2(py, dst / py.name)


def copy_package() -> None:
    """Copy the package's .py files to DEST/sdm/...

    The top level and the packages pyproject lists, and below each listed
    subpackage every folder that is a package itself (has `__init__.py`); the root's
    other folders (`.venv/`, `tests/`, `bench/`, `build/`) are not part of it.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    shutil.rmtree(DEST, ignore_errors=True)
    for name in packages:
        parts = name.split(".")[1:]  # "sdm.serve" -> ["serve"]
        src = ROOT.joinpath(*parts)
        _copy_py(src, DEST.joinpath("sdm", *parts))
        if not parts:
            continue
        for init in sorted(src.rglob("__init__.py")):
            sub = init.parent
            if sub != src and "__pycache__" not in sub.parts:
                _copy_py(sub, DEST.joinpath("sdm", *parts, *sub.relative_to(src).parts))


# At import, not in `on_config`: mkdocs loads hooks while it reads mkdocs.yml, before
# any plugin runs, and mkdocstrings lists its `paths` before the hooks' on_config.
copy_package()


def on_config(config: Any) -> Any:
    """`mkdocs serve` reloads the config on every change: refresh the copy too."""
    copy_package()
    return config
