"""Secure aggregation's side of a strategy: which strategies can run on a masked sum.

With ``[secagg] enabled`` (docs/secagg.md) the coordinator never holds one client's update: it
sums the clients' masked inputs and, once the masks are removed, holds the weighted mean of the
round's updates and nothing else. A strategy then aggregates that mean as the round's only
update (:meth:`Strategy.aggregate_mean`), which means the same to it only if its aggregate
depends on the updates through their mean. :func:`check_secure` refuses the others.
"""

from __future__ import annotations

from flctl.aggregation._private import _ROBUST
from flctl.aggregation._registry import BUILTIN_STRATEGIES
from flctl.aggregation._strategy import Strategy
from flctl.core.errors import ConfigError

__all__ = ["check_secure"]

_ROBUST_WHY = (
    "it chooses, trims or ranks among the individual updates, and with secure aggregation the "
    "coordinator holds only their sum: no update can be looked at on its own"
)
_NOT_MEAN_WHY = (
    "with secure aggregation the coordinator holds only the sum of the round's updates, and a "
    "strategy is given their weighted mean as its one update, which means the same to it only "
    "if it aggregates through the updates' mean; it does not declare is_mean_based = True"
)


def check_secure(strategy: Strategy | type[Strategy], *, subject: str = "") -> None:
    """Refuse a strategy that cannot run on the masked sum of secure aggregation, saying why.

    The strategy must be mean-based (:attr:`Strategy.is_mean_based`: FedAvg, FedProx,
    FedAvgM, FedAdam, FedYogi, FedAdagrad, or a custom strategy declaring it). The robust rules
    (FedMedian, FedTrimmedAvg, Krum, Multi-Krum, Bulyan) are refused even if they declare it.

    Args:
        strategy: The strategy, or its class.
        subject: What the message calls the strategy (default ``strategy 'NAME'``), such as
            ``flctl.toml: [strategy] name = "krum"``.

    Raises:
        ConfigError: The strategy needs individual updates; the message says why, the hint
            what works.
    """
    cls = strategy if isinstance(strategy, type) else type(strategy)
    is_robust = issubclass(cls, _ROBUST)
    if cls.is_mean_based and not is_robust:
        return
    name = getattr(cls, "name", cls.__name__)
    mean_based = ", ".join(n for n, c in sorted(BUILTIN_STRATEGIES.items()) if c.is_mean_based)
    raise ConfigError(
        f"{subject or f'strategy {name!r}'} cannot be combined with [secagg] enabled = true: "
        f"{_ROBUST_WHY if is_robust else _NOT_MEAN_WHY}",
        hint=f"with secure aggregation, use a mean-based strategy ({mean_based}); for a robust "
        "one, set [secagg] enabled = false (docs/secagg.md)",
    )
