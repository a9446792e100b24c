"""Jobs for tests that start real worker processes (spawned children import them by module name)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def sleep_job(folder: str) -> None:
    """Record this worker's pid as a file in `folder`, then wait far longer than any test."""
    (Path(folder) / str(os.getpid())).write_text("")
    time.sleep(120)
