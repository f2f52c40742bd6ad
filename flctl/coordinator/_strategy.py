"""The coordinator's strategy, built from the ``[strategy]`` table of flctl.toml."""

from __future__ import annotations

from pathlib import Path

from flctl.aggregation import Strategy, make_strategy
from flctl.core import CONFIG_FILE, Config
from flctl.core.errors import ConfigError

__all__ = ["build_strategy"]


def build_strategy(config: Config, source: Path | None = None) -> Strategy:
    """Build the strategy ``[strategy]`` names, with its parameters checked.

    Args:
        config: The project's configuration.
        source: The file it was read from, named in errors (default: flctl.toml in its root).

    Raises:
        ConfigError: An unknown strategy, a key it does not take, or a bad value; the message
            names the file.
    """
    where = source or config.root / CONFIG_FILE
    try:
        return make_strategy(config.strategy.name, config.strategy.params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint, details=exc.details) from None
