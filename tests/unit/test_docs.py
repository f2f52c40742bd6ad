"""Every code block of docs/task.md runs, and the generated project README's commands parse.

Python blocks that define ``build_model`` are whole task modules: each loads as a task, and
its model, client, one ``fit`` step (and ``evaluate``, ``server_evaluate`` when defined) run
on the CPU with one thread. Other Python blocks run in a project folder holding the first
task. TOML blocks load as ``flctl.toml``; every ``flctl`` command line in a shell block parses
(its command and options exist), here and in templates/digits/README.md.
"""

from __future__ import annotations

import math
import re
import runpy
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from typer.testing import CliRunner

from flctl.cli import app
from flctl.client import Client
from flctl.core import TaskContext, load_config, load_task

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "task.md"
PROJECT_README = REPO / "templates" / "digits" / "README.md"


def _blocks(path: Path) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown file, as (language, code)."""
    return re.findall(r"^```(\w+)\n(.*?)^```$", path.read_text(encoding="utf-8"), re.S | re.M)


BLOCKS = _blocks(DOC)
TASKS = [code for lang, code in BLOCKS if lang == "python" and "def build_model" in code]
SCRIPTS = [code for lang, code in BLOCKS if lang == "python" and "def build_model" not in code]
TOMLS = [code for lang, code in BLOCKS if lang == "toml"]
COMMANDS = [
    line
    for lang, code in [*BLOCKS, *_blocks(PROJECT_README)]
    if lang in ("bash", "sh")
    for line in code.splitlines()
    if line.startswith("flctl ")
]
FIT_CONFIG = {"server_round": 1, "local_epochs": 1, "local_steps": 2}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_page_has_the_examples_it_promises() -> None:
    assert {lang for lang, _ in BLOCKS} <= {"python", "toml", "bash"}
    assert len(TASKS) >= 2 and SCRIPTS and TOMLS and COMMANDS


def _load(tmp_path: Path, code: str) -> ModuleType:
    path = tmp_path / "task.py"
    path.write_text(code, encoding="utf-8")
    return load_task(path)


def _spec(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, torch.Size]]:
    return {name: (t.dtype, t.shape) for name, t in state.items()}


@pytest.mark.parametrize("index", range(len(TASKS)))
@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_each_task_example_trains_one_step(tmp_path: Path, index: int, partitioning: str) -> None:
    task = _load(tmp_path, TASKS[index])
    torch.manual_seed(0)
    initial = task.build_model(TaskContext(role="coordinator")).state_dict()
    context = TaskContext(
        role="client",
        client_id="c2",
        partition_id=1,
        num_partitions=3,
        partitioning=partitioning,
        config={"lr": 0.1},
    )
    client = task.client_fn(context)
    assert isinstance(client, Client)
    assert _spec(client.get_parameters()) == _spec(initial)

    trained, num_examples, metrics = client.fit(dict(initial), dict(FIT_CONFIG))
    assert _spec(trained) == _spec(initial)
    assert all(t.device.type == "cpu" for t in trained.values())
    assert isinstance(num_examples, int) and num_examples > 0
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(trained[n], initial[n]) for n in initial), "fit changed nothing"
    # reproducible: the same round on a fresh client trains to the same bits
    again, _, _ = task.client_fn(context).fit(dict(initial), dict(FIT_CONFIG))
    assert all(torch.equal(again[n], trained[n]) for n in trained)

    if type(client).evaluate is not Client.evaluate:
        loss, evaluated, local = client.evaluate(trained, {})
        assert math.isfinite(loss) and evaluated > 0 and set(local)
    if hasattr(task, "server_evaluate"):
        loss, server = task.server_evaluate(trained, TaskContext(role="coordinator"))
        assert math.isfinite(loss)
        assert server and all(math.isfinite(v) for v in server.values())


@pytest.mark.parametrize("index", range(len(SCRIPTS)))
def test_each_script_runs_in_a_project_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    (tmp_path / "task.py").write_text(TASKS[0], encoding="utf-8")
    script = tmp_path / "script.py"
    script.write_text(SCRIPTS[index], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("index", range(len(TOMLS)))
def test_each_config_loads(tmp_path: Path, index: int) -> None:
    (tmp_path / "flctl.toml").write_text(TOMLS[index], encoding="utf-8")
    (tmp_path / "task.py").write_text(TASKS[0], encoding="utf-8")
    config = load_config(tmp_path / "flctl.toml")
    assert load_task(config.task_path) is not None


@pytest.mark.parametrize("line", COMMANDS)
def test_each_command_line_parses(line: str) -> None:
    args = shlex.split(line, comments=True)[1:]
    # --help after the arguments: click refuses an unknown command or option before it helps
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
