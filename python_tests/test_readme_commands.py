"""CI runs the README's commands, verbatim.

The README's "Install and run" and "Tests" sections each open with one bash
block: the command that installs hart_fast and runs the demo, and the command
that runs every test.  .ci/run must contain each block as whole, consecutive
lines, so the commands a user copies are the commands CI checks.
"""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as f:
        return f.read()


def readme_command(section: str) -> list[str]:
    """The lines of the first ```bash block under the README's `## <section>`."""
    readme = _read("README.md")
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert match, f"README.md has no '## {section}' section"
    block = re.search(r"^```bash\n(.*?)^```", match.group(1), re.M | re.S)
    assert block, f"README.md's '## {section}' has no ```bash block"
    lines = [line.rstrip() for line in block.group(1).splitlines()]
    assert any(lines), f"README.md's '## {section}' bash block is empty"
    return lines


def contains_lines(text: str, lines: list[str]) -> bool:
    have = [line.rstrip() for line in text.splitlines()]
    n = len(lines)
    return any(have[i:i + n] == lines for i in range(len(have) - n + 1))


@pytest.mark.parametrize("section", ["Install and run", "Tests"])
def test_ci_runs_the_readme_command(section):
    command = readme_command(section)
    assert contains_lines(_read(".ci", "run"), command), (
        f".ci/run does not run README.md's '{section}' command verbatim:\n" + "\n".join(command))


def test_the_install_command_runs_the_demo():
    assert any(line.lstrip().startswith("hart-fast generate ") for line in readme_command("Install and run"))


def test_whole_lines_only():
    assert contains_lines("a\npytest\nb\n", ["pytest"])
    assert not contains_lines("pytest bench/ -q\n", ["pytest"])
    assert not contains_lines("x && \\\n  y\n", ["x &&", "  y"])
