"""``[strategy]`` checked against the strategy's own parameters, before anything is written."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from flctl.aggregation import (
    BUILTIN_STRATEGIES,
    FedAdam,
    FedAvg,
    Param,
    Strategy,
    WeightedUpdate,
)
from flctl.cli import app
from flctl.coordinator import build_strategy, coordinator_context, task_strategy
from flctl.core import load_config
from flctl.core.errors import ConfigError


class Knobs(Strategy):
    """A test-only strategy with one parameter of each kind."""

    name = "test-knobs"
    params = (
        Param("mu", 0.0, "a number", low=0.0, high=1.0),
        Param("steps", 1, "an integer", low=1),
        Param("mode", "a", "a choice", choices=("a", "b")),
    )

    def __init__(self, mu: float, steps: int, mode: str) -> None:
        self.mu, self.steps, self.mode = mu, steps, mode

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        shutil.copyfile(base, out)


@pytest.fixture(autouse=True)
def knobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(BUILTIN_STRATEGIES, Knobs.name, Knobs)
    yield


def config_of(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flctl.toml"
    path.write_text(text)
    return path


def test_builds_the_named_strategy_with_its_parameters(tmp_path: Path) -> None:
    assert isinstance(build_strategy(load_config(config_of(tmp_path, ""))), FedAvg)
    text = "[strategy]\nname = 'test-knobs'\nmu = 0.5\nmode = 'b'\n"
    strategy = build_strategy(load_config(config_of(tmp_path, text)))
    assert isinstance(strategy, Knobs)
    assert (strategy.mu, strategy.steps, strategy.mode) == (0.5, 1, "b")
    # the deprecated alias names it as well
    alias = build_strategy(load_config(config_of(tmp_path, "[rounds]\nstrategy = 'test-knobs'\n")))
    assert isinstance(alias, Knobs)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[strategy]\nname = 'fedmagic'\n", "unknown strategy 'fedmagic'"),
        ("[rounds]\nstrategy = 'fedmagic'\n", "unknown strategy 'fedmagic'"),
        ("[strategy]\nmu = 0.1\n", "unknown key(s) mu for strategy 'fedavg'"),
        ("[strategy]\nname = 'test-knobs'\nnu = 0.1\n", "unknown key(s) nu"),
        ("[strategy]\nname = 'test-knobs'\nmu = 2.0\n", "mu (strategy 'test-knobs') is 2.0"),
        ("[strategy]\nname = 'test-knobs'\nsteps = 1.5\n", "must be a int, not 1.5"),
        ("[strategy]\nname = 'test-knobs'\nmode = 'c'\n", "not one of a, b"),
    ],
)
def test_refusals_name_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = config_of(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        build_strategy(load_config(path), path)
    assert needle in info.value.message and str(path) in info.value.message
    assert info.value.exit_code == 10


def test_serve_refuses_a_bad_strategy_before_writing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_of(tmp_path, "[strategy]\nname = 'test-knobs'\nmu = -1\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--insecure", "--address", "127.0.0.1:0"])
    assert result.exit_code == 10, result.output
    assert "outside [0, 1]" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flctl.toml"]


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("name", ["fedmedian", "krum", "test-knobs"])
def test_privacy_with_a_strategy_that_is_not_mean_based_is_refused(
    tmp_path: Path, mode: str, name: str
) -> None:
    privacy = f"[privacy]\nmode = '{mode}'\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n"
    text = f"{privacy}[strategy]\nname = '{name}'\n"
    path = config_of(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        build_strategy(load_config(path))
    message = caught.value.message
    assert str(path) in message
    assert f'name = "{name}" cannot be combined with [privacy] mode = "{mode}"' in message
    if name == "test-knobs":  # a strategy that does not declare itself mean-based
        assert "is_mean_based = True" in message
    else:
        assert ("one noised mean" if mode == "central" else "noise as an attack") in message
    assert "fedadam" in (caught.value.hint or "")


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam"])
def test_privacy_with_a_mean_based_strategy_is_accepted(
    tmp_path: Path, mode: str, name: str
) -> None:
    privacy = f"[privacy]\nmode = '{mode}'\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n"
    strategy = build_strategy(
        load_config(config_of(tmp_path, f"{privacy}[strategy]\nname = '{name}'\n"))
    )
    assert strategy.name == name and strategy.is_mean_based


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_strategy_fn_under_privacy_must_return_a_mean_based_strategy(
    tmp_path: Path, mode: str
) -> None:
    privacy = f"[privacy]\nmode = '{mode}'\nnoise_multiplier = 1.0\nepsilon_budget = 10.0\n"
    path = config_of(tmp_path, f"[project]\ntask = 'task.py'\n{privacy}")
    config = load_config(path)
    task = ModuleType("task")
    task.strategy_fn = lambda context: FedAdam()  # type: ignore[attr-defined]
    strategy = task_strategy(task, config, coordinator_context(config))
    assert isinstance(strategy, FedAdam)
    task.strategy_fn = lambda context: Knobs(0.0, 1, "a")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as caught:
        task_strategy(task, config, coordinator_context(config))
    message = caught.value.message
    assert "task.py defines strategy_fn, whose strategy 'test-knobs'" in message
    assert f'cannot be combined with [privacy] mode = "{mode}"' in message
    assert str(path) in message and "is_mean_based = True" in message
