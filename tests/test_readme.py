"""Every hwprune command the README shows exists, with the options it shows."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hwprune.cli import _register_commands, app

README = Path(__file__).resolve().parent.parent / "README.md"


def _commands() -> list[list[str]]:
    """The ``hwprune ...`` command lines of the README's bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
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


COMMANDS = _commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 15
    assert ["quickstart", "--out", "hwprune-quickstart"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
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
