"""The README's commands stay true: every `sdm` command and flag it shows exists.

The set-up commands themselves are what `.ci/run` executes, the demo runs (reduced)
in test_demo.py, and the pipeline commands run end to end in the other tests; this
test catches a README that drifts from the CLI (a renamed flag, a removed command).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdm.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every `sdm ...` invocation inside the README's bash blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line.split("  #")[0]):
                words = shlex.split(part.strip())
                if words[:1] == ["sdm"]:
                    cmds.append(words[1:])
                elif words[:4] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m"]:
                    cmds.append(words[5:])
    return cmds


def test_readme_has_commands():
    names = {c[0] for c in readme_commands() if c}
    assert {"sessionize", "train", "evaluate", "export", "synth", "convert", "download", "demo"} <= names


@pytest.mark.parametrize("cmd", readme_commands(), ids=lambda c: " ".join(c)[:60])
def test_readme_command_and_flags_exist(cmd):
    help_text = CliRunner().invoke(app, [cmd[0], "--help"], terminal_width=200)
    assert help_text.exit_code == 0, f"sdm {cmd[0]}: {help_text.output}"
    for flag in (w.split("=")[0] for w in cmd[1:] if w.startswith("--")):
        assert flag in help_text.output, f"README uses `sdm {cmd[0]} {flag}`, which --help does not list"
