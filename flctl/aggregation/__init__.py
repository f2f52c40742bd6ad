"""Aggregation strategies over streamed updates."""

from flctl.aggregation._dpfedavg import DpFedAvg
from flctl.aggregation._fedavg import FedAvg, fedavg_in_memory
from flctl.aggregation._localdpfedavg import LocalDpFedAvg
from flctl.aggregation._strategy import Strategy, WeightedUpdate
from flctl.aggregation._weights import cap_weights

__all__ = [
    "DpFedAvg",
    "FedAvg",
    "LocalDpFedAvg",
    "Strategy",
    "WeightedUpdate",
    "cap_weights",
    "fedavg_in_memory",
    "strategy_for",
]


def strategy_for(name: str) -> Strategy:
    """Return the strategy a config names (``rounds.strategy``)."""
    strategies: dict[str, type[Strategy]] = {FedAvg.name: FedAvg}
    try:
        return strategies[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}") from None
