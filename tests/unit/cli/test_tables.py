"""One table style for every listing: rich on a terminal, tab-separated lines when piped."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flctl.cli import _output, app
from flctl.cli._output import Output
from flctl.store import SqlStore

runner = CliRunner()

#: The rule under a table's header in the one table style (rich's SIMPLE_HEAD box).
HEADER_RULE = re.compile(r"^ *─[─ ]*$")


def _header_rule(lines: list[str]) -> int:
    """Where the rule under the (first) table's header is."""
    return next(i for i, line in enumerate(lines) if HEADER_RULE.match(line))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with certificates, two model versions and two clients, no coordinator."""
    (tmp_path / "flctl.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    config = {"rounds": {"strategy": "fedavg", "min_clients": 2}, "task": {"lr": 0.1}}
    with SqlStore.open(tmp_path / ".flctl") as store:
        store.add_model(digest="ab" * 32, kind="initial", set_head=True, config=config)
        store.add_model(
            digest="cd" * 32,
            kind="aggregate",
            parent=1,
            metrics={"accuracy": 0.8},
            set_head=True,
            config=config,
        )
        store.upsert_client("c1", add_rounds=2, add_bytes_up=3 << 20)
        store.upsert_client("c2")
    gen = runner.invoke(app, ["certs", "gen", "--clients", "1"])
    assert gen.exit_code == 0, gen.output
    return tmp_path


def test_piped_table_is_a_header_and_tab_separated_rows() -> None:
    out = Output()
    stdout, stderr = io.StringIO(), io.StringIO()
    out.err = Console(file=stderr)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", stdout)
        out.table(["a", "b"], [["1", "two\twords\nand a line"], ["3", ""]], title="things")
    assert stdout.getvalue() == "a\tb\n1\ttwo words and a line\n3\t\n"
    assert stderr.getvalue() == "things\n"


def test_terminal_table_and_pairs_share_one_style() -> None:
    out = Output()
    out.is_terminal = True
    out.console = Console(file=io.StringIO(), width=80)
    out.table(["name", "n"], [["[bold]x[/bold]", "1"]], title="things", right=["n"])
    out.pairs([("key", "value")], title="pairs")
    lines = out.console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    rule = _header_rule(lines)
    assert lines[0].strip() == "things" and lines[rule - 1].split() == ["name", "n"]
    assert "[bold]x[/bold]" in lines[rule + 1]  # cells are text, not markup
    assert any(re.match(r"^ *key +value *$", line) for line in lines[rule + 2 :])


@pytest.mark.parametrize("command", [["models", "ls"], ["clients", "ls"], ["certs", "ls"]])
def test_listings_piped_are_tab_separated(project: Path, command: list[str]) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert rows and "\t" in header
    assert all(row.count("\t") == header.count("\t") for row in rows), result.stdout


def test_models_ls_piped_marks_the_head_in_its_kind(project: Path) -> None:
    header, newest, oldest = runner.invoke(app, ["models", "ls"]).stdout.splitlines()
    fields = dict(zip(header.split("\t"), newest.split("\t"), strict=True))
    assert fields["version"] == "2" and fields["kind"] == "aggregate (head)"
    assert fields["accuracy"] == "0.8000" and fields["parent"] == "1"
    assert oldest.split("\t")[4] == "initial"


@pytest.mark.parametrize("command", [["models", "ls"], ["clients", "ls"], ["certs", "ls"]])
def test_listings_on_a_terminal_share_one_table_style(
    project: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setattr(_output, "stdout_is_terminal", lambda: True)
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "\t" not in result.stdout and "…" not in result.stdout
    assert lines[_header_rule(lines) + 1].split()[0] in ("2", "c1", "admin"), result.stdout


def test_models_show_prints_the_config_as_rows(project: Path) -> None:
    result = runner.invoke(app, ["models", "show", "2"])
    assert result.exit_code == 0, result.output
    assert "{" not in result.stdout
    assert "config.rounds.strategy: fedavg" in result.stdout
    assert "config.rounds.min_clients: 2" in result.stdout
    assert "config.task.lr: 0.1" in result.stdout
