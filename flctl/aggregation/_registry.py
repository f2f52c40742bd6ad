"""The built-in strategies by name, and building one from the ``[strategy]`` table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flctl.aggregation._bulyan import Bulyan
from flctl.aggregation._fedadagrad import FedAdagrad
from flctl.aggregation._fedadam import FedAdam
from flctl.aggregation._fedavg import FedAvg
from flctl.aggregation._fedavgm import FedAvgM
from flctl.aggregation._fedmedian import FedMedian
from flctl.aggregation._fedprox import FedProx
from flctl.aggregation._fedtrimmedavg import FedTrimmedAvg
from flctl.aggregation._fedyogi import FedYogi
from flctl.aggregation._krum import Krum, MultiKrum
from flctl.aggregation._strategy import Strategy
from flctl.core.errors import ConfigError

__all__ = ["BUILTIN_STRATEGIES", "make_strategy"]

#: Every built-in strategy, by its ``name`` (what ``[strategy] name`` and
#: ``flctl strategies ls`` use). A new built-in is added here.
BUILTIN_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedProx,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedMedian,
        FedTrimmedAvg,
        Krum,
        MultiKrum,
        Bulyan,
    )
}


def make_strategy(name: str, values: Mapping[str, Any] | None = None) -> Strategy:
    """Build the built-in strategy ``name`` from its ``[strategy]`` parameters.

    Raises:
        ConfigError: An unknown strategy, or a parameter it does not take or cannot use.
    """
    cls = BUILTIN_STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown strategy {name!r}",
            hint=f"the built-in strategies are: {', '.join(sorted(BUILTIN_STRATEGIES))} "
            "(`flctl strategies ls`)",
        )
    return cls.from_params(values or {})
