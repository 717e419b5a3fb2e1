"""Every hwprune command the README and the docs show exists, with the options it shows."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hwprune.cli import _register_commands, app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _commands(*pages: Path) -> list[list[str]]:
    """The ``hwprune ...`` command lines of the pages' bash blocks (continuations joined)."""
    blocks = [b for page in pages for b in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    out = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                part = part.strip()
                if part.startswith("hwprune "):
                    out.append(shlex.split(part.replace("$T", "T").replace(">", " ").split("  ")[0])[1:])
    return out


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(subcommand path, options) of one command line."""
    path = []
    for a in argv:
        if a.startswith("-"):
            break
        path.append(a)
    return path, [a.split("=", 1)[0] for a in argv if a.startswith("--")]


COMMANDS = _commands(README)
DOC_COMMANDS = _commands(*DOCS)


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 15
    assert ["quickstart", "--out", "hwprune-quickstart"] in COMMANDS
    assert any(c[:1] == ["prune"] for c in DOC_COMMANDS)  # docs/gcp.md's, at least


@pytest.mark.parametrize("argv", COMMANDS + DOC_COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS + DOC_COMMANDS])
def test_readme_command_exists_with_its_options(argv):
    _register_commands()
    path, options = _split(argv)
    runner = CliRunner()
    for depth in range(len(path), 0, -1):  # positional arguments follow the subcommand path
        r = runner.invoke(app, [*path[:depth], "--help"])
        if r.exit_code == 0 and "Usage" in r.output:
            break
    assert r.exit_code == 0, f"hwprune {' '.join(path)} --help failed: {r.output[-400:]}"
    text = re.sub(r"\s+", " ", r.output)
    missing = [o for o in options if o not in text]
    assert not missing, f"hwprune {' '.join(path)} does not take {missing}"
