"""Every command's --help: complete one-line summaries, and values named, not typed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from flctl.cli import app

runner = CliRunner()

#: Typer's type placeholders (``<int>``, ``<list[str]>``, ``<float range>``) and its braces
#: around required arguments (``{name}``).
PLACEHOLDERS = ("{", "<list", "<float", "<int", "<text", "<path", "<str", "<bool")


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, (*path, name))


COMMANDS = dict(_walk(typer.main.get_command(app)))
GROUPS = [path for path, command in COMMANDS.items() if getattr(command, "commands", None)]


def _help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "flctl")
def test_help_names_every_value(path: tuple[str, ...]) -> None:
    text = _help(path)
    found = [p for p in PLACEHOLDERS if p in text]
    assert not found, f"flctl {' '.join(path)} --help shows {found}:\n{text}"


@pytest.mark.parametrize("path", GROUPS, ids=lambda p: " ".join(p) or "flctl")
def test_command_summaries_are_whole_sentences(path: tuple[str, ...]) -> None:
    """A group's list shows each command's whole first paragraph: one short sentence."""
    listing = _help(path).split("Commands:\n", 1)[1]
    for name, command in COMMANDS[path].commands.items():
        first = " ".join((command.help or "").split("\n\n", 1)[0].split())
        [line] = [row for row in listing.splitlines() if row.split()[:1] == [name]]
        summary = line.split(None, 1)[1] if len(line.split()) > 1 else ""
        assert not summary.endswith("..."), f"cut: {line.strip()!r}"
        assert summary == first and summary.endswith("."), f"not one sentence: {first!r}"


def test_init_help_lists_the_templates() -> None:
    from flctl.cli._init import available_templates

    text = _help(("init",))
    assert "flctl.toml" in text and "task.py" in text and ".gitignore" in text
    for name in available_templates():
        assert f"  {name}  " in text
