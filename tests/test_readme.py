"""The README and the documentation stay true to the code and to CI.

- every `sdm ...` line in a bash block of the README or of `docs/` names a real
  command, uses only flags its `--help` lists, and parses (argument count, types);
- every command of the CLI has an example in the docs;
- the README's install and test commands are exactly what `.ci/run` executes, and
  the getting-started page installs the same way;
- every relative link of the README points to a file that exists;
- the README stays a front door: at most 300 lines, no development history.

The set-up commands themselves run in CI (`.ci/run`), the demo runs (reduced) in
test_demo.py, the README's `Recommender` example in test_api.py, and the pipeline
commands end to end in the other tests; `mkdocs build --strict` (also in CI) checks
the links inside the site.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sdm.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
MAX_README_LINES = 300


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def shell_lines(block: str) -> list[str]:
    """The commands of a bash block: continuations joined, comments dropped, split on `&&` and `;`."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        out += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return out


def sdm_commands(path: Path) -> list[list[str]]:
    """Every `sdm ...` invocation in the file's bash blocks (torchrun's `-m sdm.cli` too), as argv."""
    cmds = []
    for block in bash_blocks(path.read_text()):
        for part in shell_lines(block):
            words = shlex.split(part)
            if words[:1] == ["sdm"]:
                cmds.append(words[1:])
            elif words[:1] == ["torchrun"] and "-m" in words:
                i = words.index("-m")
                if words[i + 1 : i + 2] == ["sdm.cli"]:
                    cmds.append(words[i + 2 :])
    return cmds


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole line) up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(level + " ")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def ci_commands() -> list[str]:
    """What `.ci/run` executes after moving to the repository root."""
    cmds = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("set ") or line.startswith("cd "):
            continue
        cmds += [part.strip() for part in line.split("&&")]
    return cmds


ALL_COMMANDS = [(p, c) for p in [README, *DOCS] for c in sdm_commands(p)]


def _id(item: tuple[Path, list[str]]) -> str:
    path, cmd = item
    return f"{path.relative_to(ROOT)}: sdm {' '.join(cmd)}"[:90]


def test_readme_shows_the_pipeline():
    names = {c[0] for c in sdm_commands(README) if c}
    assert {"sessionize", "train", "evaluate", "export", "recommend", "demo"} <= names


def test_every_cli_command_has_a_documented_example():
    documented = {c[0] for _, c in ALL_COMMANDS if c}
    cli = set(typer.main.get_command(app).commands)
    assert cli - documented == set(), f"commands without an example in README.md or docs/: {sorted(cli - documented)}"
    assert documented - cli == set(), f"docs show commands the CLI does not have: {sorted(documented - cli)}"


@pytest.mark.parametrize("item", ALL_COMMANDS, ids=_id)
def test_documented_command_flags_exist_and_parse(item: tuple[Path, list[str]]):
    path, cmd = item
    assert cmd, f"{path.name}: a bare `sdm` line"
    help_text = CliRunner().invoke(app, [cmd[0], "--help"], terminal_width=200)
    assert help_text.exit_code == 0, f"sdm {cmd[0]}: {help_text.output}"
    for flag in (w.split("=")[0] for w in cmd[1:] if w.startswith("--")):
        assert flag in help_text.output, f"{path.name} uses `sdm {cmd[0]} {flag}`, which --help does not list"
    command = typer.main.get_command(app).commands[cmd[0]]
    try:  # parse only: arguments, option names, value types; nothing runs
        command.make_context(cmd[0], list(cmd[1:]))
    except Exception as exc:  # noqa: BLE001 - typer's vendored click raises its own types
        pytest.fail(f"{path.name}: `sdm {' '.join(cmd)}` does not parse: {exc}")


def test_readme_install_and_test_commands_are_what_ci_runs():
    text = README.read_text()
    install = shell_lines(bash_blocks(section(text, "## Install"))[0])
    tests = shell_lines(bash_blocks(section(text, "## Tests and documentation"))[0])
    assert install + tests == ci_commands(), (
        f"README install {install} + tests {tests} differ from .ci/run {ci_commands()}"
    )
    assert "mkdocs build --strict" in tests


def test_getting_started_installs_like_the_readme():
    readme = shell_lines(bash_blocks(section(README.read_text(), "## Install"))[0])
    guide = shell_lines(bash_blocks(section((ROOT / "docs" / "getting-started.md").read_text(), "## Install"))[0])
    assert guide == readme


def test_readme_links_exist():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert any(link.startswith("docs/") for link in local), "the README links into docs/"
    missing = [link for link in local if link and not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_stays_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, (
        f"README.md has {len(text.splitlines())} lines (at most {MAX_README_LINES}): move detail into docs/"
    )
    for pattern in (r"\bissue \d+", r"\b(this|last|previous|earlier) stop\b", r"TARGETS\.md", r"\bthis session\b"):
        assert not re.search(pattern, text, flags=re.I), f"README.md reads like a lab notebook: /{pattern}/"
