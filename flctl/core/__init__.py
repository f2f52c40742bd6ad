"""Standard-library-only foundations: configuration, errors, events and the task contract."""

from flctl.core._lock import COORDINATOR_LOCK, STATE_LOCK, LockHolder, read_holder, try_lock
from flctl.core.config import (
    CONFIG_FILE,
    DEFAULT_PORT,
    ClientConfig,
    Config,
    DataConfig,
    GateConfig,
    ProjectConfig,
    RoundsConfig,
    ServerConfig,
    SimulationConfig,
    StrategyConfig,
    TransportConfig,
    find_project,
    load_config,
    parse_config,
)
from flctl.core.events import Event
from flctl.core.task import TaskContext, load_task

__all__ = [
    "CONFIG_FILE",
    "COORDINATOR_LOCK",
    "ClientConfig",
    "Config",
    "DEFAULT_PORT",
    "DataConfig",
    "Event",
    "GateConfig",
    "LockHolder",
    "ProjectConfig",
    "RoundsConfig",
    "STATE_LOCK",
    "ServerConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TaskContext",
    "TransportConfig",
    "find_project",
    "load_config",
    "load_task",
    "parse_config",
    "read_holder",
    "try_lock",
]
