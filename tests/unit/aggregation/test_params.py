"""A strategy's [strategy] parameters: defaults, types, ranges, choices, unknown keys."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from flctl.aggregation import Param, Strategy, WeightedUpdate, make_strategy
from flctl.core.errors import ConfigError


class Tunable(Strategy):
    name = "tunable"
    params = (
        Param("mu", 0.01, "proximal term", low=0.0),
        Param("beta", 0.1, "trim fraction", low=0.0, high=0.5),
        Param("k", 3, "how many", low=1),
        Param("rule", "mad", "outlier rule", choices=("mad", "iqr")),
    )

    def __init__(self, mu: float, beta: float, k: int, rule: str) -> None:
        self.mu, self.beta, self.k, self.rule = mu, beta, k, rule

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        raise AssertionError("not called")


def test_defaults_and_given_values() -> None:
    made = Tunable.from_params({"mu": 1, "rule": "iqr"})
    assert isinstance(made, Tunable)
    assert (made.mu, made.beta, made.k, made.rule) == (1.0, 0.1, 3, "iqr")
    assert isinstance(made.mu, float)  # an int is taken for a float


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"nu": 1.0},
            r"unknown key\(s\) nu for strategy 'tunable' \(it takes: beta, k, mu, rule\)",
        ),
        ({"mu": "high"}, r"\[strategy\] mu \(strategy 'tunable'\) must be a float"),
        ({"k": 2.5}, r"\[strategy\] k \(strategy 'tunable'\) must be a int"),
        ({"k": True}, r"must be a int"),
        ({"beta": 0.7}, r"beta \(strategy 'tunable'\) is 0.7, outside \[0, 0.5\]"),
        ({"mu": -1.0}, r"is -1.0, outside \[0, inf\]"),
        ({"rule": "zscore"}, r"is 'zscore', not one of mad, iqr"),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Tunable.from_params(values)


def test_a_built_in_strategy_by_name() -> None:
    assert make_strategy("fedavg").name == "fedavg"
    with pytest.raises(ConfigError, match="unknown key"):
        make_strategy("fedavg", {"mu": 0.1})
    with pytest.raises(ConfigError, match="unknown strategy 'krumm'"):
        make_strategy("krumm")


def test_a_stateless_strategy_refuses_a_stored_state() -> None:
    import torch

    strategy = make_strategy("fedavg")
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ConfigError, match="keeps no state"):
        strategy.load_state_dict({"m": torch.zeros(1)})
    assert strategy.configure_fit(1, ["c1"]) == {}
