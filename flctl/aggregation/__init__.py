"""Aggregation strategies over streamed updates."""

from flctl.aggregation._dpfedavg import DpFedAvg
from flctl.aggregation._fedavg import FedAvg, fedavg_in_memory
from flctl.aggregation._localdpfedavg import LocalDpFedAvg
from flctl.aggregation._registry import BUILTIN_STRATEGIES, make_strategy
from flctl.aggregation._strategy import Param, Strategy, WeightedUpdate
from flctl.aggregation._weights import cap_weights

__all__ = [
    "BUILTIN_STRATEGIES",
    "DpFedAvg",
    "FedAvg",
    "LocalDpFedAvg",
    "Param",
    "Strategy",
    "WeightedUpdate",
    "cap_weights",
    "fedavg_in_memory",
    "make_strategy",
    "strategy_for",
]


def strategy_for(name: str) -> Strategy:
    """Return the built-in strategy ``name`` with its default parameters.

    Raises:
        ConfigError: No built-in strategy has that name.
    """
    return make_strategy(name)
