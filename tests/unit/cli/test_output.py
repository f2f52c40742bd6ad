"""The CLI's error layer: flctl errors render once with their exit code; anything else is one
line plus a log file holding the traceback, never a traceback on the terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flctl.cli._output import BROKEN_PIPE_EXIT_CODE, command, log_dir, settings
from flctl.core.errors import NotFoundError

app = typer.Typer()


@app.command()
@command()
def boom(json_output: bool = typer.Option(False, "--json"), kind: str = "bug") -> None:
    if kind == "pipe":
        raise BrokenPipeError(32, "Broken pipe")
    if kind == "bug":
        raise RuntimeError("secret=hunter2 went wrong")
    raise NotFoundError("model version 9 not found", hint="run `flctl models ls`")


runner = CliRunner()


def test_unexpected_error_is_one_line_and_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "debug", False)
    result = runner.invoke(app, [])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    match = re.search(r"traceback in (\S+?)\)", result.output)
    assert match, result.output
    log = Path(match.group(1)).read_text()
    assert "RuntimeError: secret=hunter2 went wrong" in log and "Traceback" in log


def test_unexpected_error_json_is_one_document(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "debug", False)
    result = runner.invoke(app, ["--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == "internal" and Path(doc["error"]["log"]).is_file()


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "debug", True)
    result = runner.invoke(app, [])
    assert result.exit_code == 1
    assert "RuntimeError" in result.output


def test_flctl_error_renders_with_its_exit_code() -> None:
    result = runner.invoke(app, ["--kind", "known"])
    assert result.exit_code == NotFoundError.exit_code == 71
    assert "model version 9 not found" in result.output and "flctl models ls" in result.output
    as_json = runner.invoke(app, ["--kind", "known", "--json"])
    assert json.loads(as_json.stdout)["error"] == {
        "code": "not_found",
        "exit_code": 71,
        "message": "model version 9 not found",
        "hint": "run `flctl models ls`",
    }


@pytest.mark.parametrize("args", [[], ["--json"]])
def test_a_closed_pipe_ends_quietly(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(settings, "debug", False)
    result = runner.invoke(app, ["--kind", "pipe", *args])
    assert result.exit_code == BROKEN_PIPE_EXIT_CODE == 141
    assert result.output == ""
    assert not log_dir().exists() or not any(log_dir().iterdir())
