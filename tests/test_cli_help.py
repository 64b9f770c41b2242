"""What a new user meets first: `jaxllm --version`, and a `--help` for every
command in which every option is explained and shows its default."""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jaxllm
from jaxllm.cli import SUBCOMMANDS, command_parser, main
from jaxllm.cli.finetune import TASKS, task_parser

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {**{f"jaxllm {name}": (command_parser, name) for name in SUBCOMMANDS},
           **{f"jaxllm finetune {task}": (task_parser, task) for task in TASKS}}


def test_version_is_pyprojects():
    # the [project] table's version line (tomllib is not in Python 3.10)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.M).group(1)
    assert jaxllm.__version__ == version
    out = subprocess.run([sys.executable, "-m", "jaxllm", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == f"jaxllm {version}\n", out


def option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The text `--help` prints for `action`, one line, whitespace collapsed."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default(command):
    make, name = PARSERS[command]
    parser = make(name)
    parser.format_help()  # renders without error
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        shown = option_help(parser, action)
        what = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{what} has no help text"
        default = action.default
        if default is None or default is False or default in ([], ""):
            continue  # nothing to show, or the help says it in words
        assert "default" in shown and str(default) in shown, \
            f"{what}: its default {default!r} is not shown: {shown}"


def test_top_level_help_and_an_unknown_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--version" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["pretrian"])
    assert done.value.code == 2 and "unknown command 'pretrian'" in capsys.readouterr().err


def test_make_help_lists_every_target():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not on PATH")
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    out = subprocess.run([make, "-s", "help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[1] for line in out.stdout.splitlines()}
    assert targets and listed == targets, (targets ^ listed)
    assert all(len(line.split()) > 2 for line in out.stdout.splitlines())  # each explained
