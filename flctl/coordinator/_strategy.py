"""The coordinator's strategy: the ``[strategy]`` table of flctl.toml, or task.py's own.

A project's task.py may define ``strategy_fn(context) -> Strategy``; the coordinator then uses
the strategy it returns instead of the one ``[strategy]`` names (and refuses a ``[strategy]``
table that sets anything but ``name = "fedavg"``, so that no setting is silently ignored).

Privacy: with ``[privacy] mode = "central"`` or ``"local"`` the strategy runs inside
:class:`flctl.aggregation.PrivateStrategy`, stepping on the round's private mean. The
combinations that are unsound (robust rules, a custom strategy that does not declare itself
mean-based) are refused here, at load, by :func:`flctl.aggregation.check_private`.

Secure aggregation: with ``[secagg] enabled`` the strategy aggregates the round's unmasked mean,
so the same holds: :func:`flctl.aggregation.check_secure` refuses the strategies that need
individual updates.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from flctl.aggregation import Strategy, check_private, check_secure, make_strategy
from flctl.core import CONFIG_FILE, Config, TaskContext
from flctl.core.errors import ConfigError, TaskError
from flctl.core.usercode import describe_failure

__all__ = [
    "STRATEGY_FN",
    "build_strategy",
    "call_strategy_fn",
    "strategy_name",
    "task_strategy",
]

#: The optional function of task.py that returns the project's own strategy.
STRATEGY_FN = "strategy_fn"


def strategy_name(strategy: Strategy) -> str:
    """The strategy's ``name``, or its class's name where it sets none."""
    return str(getattr(strategy, "name", type(strategy).__name__))


def build_strategy(config: Config, source: Path | None = None) -> Strategy:
    """Build the strategy ``[strategy]`` names, with its parameters checked.

    Args:
        config: The project's configuration.
        source: The file it was read from, named in errors (default: flctl.toml in its root).

    Raises:
        ConfigError: An unknown strategy, a key it does not take, or a bad value; a strategy
            that cannot run with ``[privacy]`` on (:func:`flctl.aggregation.check_private`)
            or with ``[secagg]`` on (:func:`flctl.aggregation.check_secure`). The message
            names the file.
    """
    where = source or config.root / CONFIG_FILE
    try:
        strategy = make_strategy(config.strategy.name, config.strategy.params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint, details=exc.details) from None
    check_private(
        strategy,
        config.privacy.mode,
        subject=f'{where}: [strategy] name = "{config.strategy.name}"',
    )
    if config.secagg.enabled:
        check_secure(strategy, subject=f'{where}: [strategy] name = "{config.strategy.name}"')
    return strategy


def call_strategy_fn(
    fn: Callable[[TaskContext], Any], context: TaskContext, path: Path
) -> Strategy:
    """Call task.py's ``strategy_fn`` and check that it returned a strategy.

    Args:
        fn: The task module's ``strategy_fn``.
        context: What it is told (the coordinator's context).
        path: The task file, named in errors.

    Raises:
        TaskError: It raised (the message is its one-line reason, the details hold the user's
            traceback without flctl's frames), or returned something that is not a
            :class:`flctl.aggregation.Strategy`.
    """
    try:
        strategy = fn(context)
    except Exception as exc:  # user code: report it in the user's terms
        failure = describe_failure(exc, STRATEGY_FN)
        raise TaskError(
            f"{path}: {failure.reason}", details={"traceback": failure.traceback}
        ) from exc
    if not isinstance(strategy, Strategy):
        kind = type(strategy)
        raise TaskError(
            f"{path}: {STRATEGY_FN} returned a {kind.__module__}.{kind.__qualname__}, "
            "not a flctl.aggregation.Strategy",
            hint="return an instance of a Strategy subclass, e.g. `return FedAvg()`",
        )
    return strategy


def task_strategy(
    task: ModuleType, config: Config, context: TaskContext, source: Path | None = None
) -> Strategy | None:
    """The strategy task.py's ``strategy_fn`` returns, or None when it defines none.

    Args:
        task: The project's task module.
        config: The project's configuration.
        context: What ``strategy_fn`` is told (the coordinator's context).
        source: The config file, named in errors (default: flctl.toml in its root).

    Raises:
        ConfigError: ``[strategy]`` sets a strategy or parameters, which ``strategy_fn``
            replaces; or its strategy cannot run with ``[privacy]`` or ``[secagg]`` on
            (:func:`flctl.aggregation.check_private`, :func:`~flctl.aggregation.check_secure`).
        TaskError: ``strategy_fn`` is not a function, raises, or returns no Strategy.
    """
    fn = getattr(task, STRATEGY_FN, None)
    if fn is None:
        return None
    path = config.task_path
    if not callable(fn):
        raise TaskError(f"{path}: `{STRATEGY_FN}` must be a function, not {fn!r}")
    where = source or config.root / CONFIG_FILE
    table = config.strategy
    if table.name != "fedavg" or table.params:
        keys = ", ".join(
            [f"name = {table.name!r}"] * (table.name != "fedavg") + sorted(table.params)
        )
        raise ConfigError(
            f"{where}: [strategy] sets {keys}, but {path.name} defines {STRATEGY_FN}, whose "
            "strategy replaces the one [strategy] names",
            hint=f"remove those keys from [strategy] (the strategy_fn reads its own settings "
            f"from context.config, the [task] table), or remove {STRATEGY_FN} from {path.name}",
        )
    strategy = call_strategy_fn(fn, context, path)
    check_private(
        strategy,
        config.privacy.mode,
        subject=f"{path} defines {STRATEGY_FN}, whose strategy {strategy_name(strategy)!r} "
        f"({where})",
    )
    if config.secagg.enabled:
        check_secure(
            strategy,
            subject=f"{path} defines {STRATEGY_FN}, whose strategy {strategy_name(strategy)!r} "
            f"({where})",
        )
    return strategy
