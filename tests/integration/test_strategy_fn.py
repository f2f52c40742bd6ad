"""task.py's ``strategy_fn`` in a real round: its strategy aggregates, configures and keeps state.

The project's task is the tiny task with a ``strategy_fn`` appended whose strategy leaves marks
a round can show: it sends every client a key read from ``[task]``, writes the mean times zero,
and counts its rounds in its state. A real coordinator on 127.0.0.1 with mutual TLS and two
real clients run it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flctl.coordinator import Coordinator
from flctl.core.errors import ConfigError, TaskError
from flctl.store import BlobStore, SqlStore
from flctl.tensors import load_parameters

from .conftest import Project
from .test_strategy import _rounds

pytestmark = pytest.mark.timeout(180)

STRATEGY_FN = """

from flctl.aggregation import FedAvg, Strategy
from flctl.tensors import load_parameters, save_parameters


class Zeroing(Strategy):
    name = "zeroing"

    def __init__(self, tag):
        self.tag = tag
        self.rounds = 0

    def configure_fit(self, server_round, clients):
        return {c: {"strategy_tag": self.tag} for c in clients}

    def aggregate(self, base, updates, out):
        FedAvg().aggregate(base, updates, out)
        save_parameters({k: v * 0 for k, v in load_parameters(out).items()}, out)
        self.rounds += 1

    def state_dict(self):
        return {"rounds": torch.tensor([self.rounds])}

    def load_state_dict(self, state):
        self.rounds = int(state["rounds"].item()) if state else 0


def strategy_fn(context):
    return Zeroing(str(context.config["tag"]))
"""


def _with_strategy_fn(project: Project, source: str = STRATEGY_FN) -> None:
    task = project.root / "tiny_task.py"
    task.write_text(task.read_text() + source)


def test_the_strategy_of_strategy_fn_runs_the_rounds(project: Project) -> None:
    _with_strategy_fn(project)
    config = project.write(task={"tag": "from-strategy-fn"})
    seen: list[tuple[str, dict[str, Any]]] = []

    async def session() -> None:
        async for _coordinator, _client in _rounds(config, 2, seen):
            pass

    asyncio.run(session())
    assert sorted(c["server_round"] for _, c in seen) == [1, 1, 2, 2]
    assert all(c["strategy_tag"] == "from-strategy-fn" for _, c in seen)
    blobs = BlobStore(config.state_path / "blobs")
    with SqlStore.open(config.state_path, read_only=True) as store:
        models = [store.get_model(v) for v in (2, 3)]
    for rounds, model in enumerate(models, start=1):
        weights = load_parameters(blobs.path(model.digest))
        assert all(not t.any() for t in weights.values())  # the strategy's zeroed mean
        state = load_parameters(blobs.path(model.state_digest))
        assert int(state["rounds"].item()) == rounds
        assert model.config["strategy"] == {"name": "zeroing", "strategy_fn": True}


@pytest.mark.parametrize(
    ("source", "error", "words"),
    [
        (
            "\n\ndef strategy_fn(context):\n    raise RuntimeError('no strategy today')\n",
            TaskError,
            ["strategy_fn raised RuntimeError: no strategy today", "tiny_task.py:"],
        ),
        (
            "\n\ndef strategy_fn(context):\n    return 'fedavg'\n",
            TaskError,
            ["strategy_fn returned a builtins.str", "not a flctl.aggregation.Strategy"],
        ),
    ],
)
def test_a_bad_strategy_fn_is_refused_before_the_state_is_written(
    project: Project, source: str, error: type[Exception], words: list[str]
) -> None:
    _with_strategy_fn(project, source)
    config = project.write()

    async def start() -> None:
        coordinator = Coordinator(config)
        try:
            await coordinator.start()
        finally:
            await coordinator.stop()

    with pytest.raises(error) as caught:
        asyncio.run(start())
    for word in words:
        assert word in str(caught.value)
    assert not config.state_path.exists()


def test_strategy_fn_traceback_is_the_users(project: Project) -> None:
    _with_strategy_fn(project, "\n\ndef strategy_fn(context):\n    return 1 / 0\n")
    config = project.write()
    with pytest.raises(TaskError) as caught:
        asyncio.run(Coordinator(config).start())
    traceback = caught.value.details["traceback"]
    assert "tiny_task.py" in traceback and "ZeroDivisionError" in traceback
    assert "flctl/coordinator" not in traceback


@pytest.mark.parametrize(
    ("sections", "words"),
    [
        ({"strategy": {"name": "fedmedian"}}, ["[strategy] sets name = 'fedmedian'"]),
        (
            {"strategy": {"name": "fedprox", "proximal_mu": 0.1}},
            ["[strategy] sets name = 'fedprox', proximal_mu", "replaces"],
        ),
        (
            {"privacy": {"mode": "local", "noise_multiplier": 1.0, "epsilon_budget": 10.0}},
            ['mode = "local"', "defines strategy_fn", "is_mean_based = True"],
        ),
    ],
)
def test_strategy_fn_with_strategy_or_privacy_settings_is_refused(
    project: Project, sections: dict[str, dict[str, Any]], words: list[str]
) -> None:
    _with_strategy_fn(project)
    config = project.write(task={"tag": "x"}, **sections)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(Coordinator(config).start())
    for word in words:
        assert word in str(caught.value)
    assert not config.state_path.exists()
