"""The coordinator: services, round engine, client registry and event log."""

from flctl.coordinator._coordinator import (
    SERVE_FILE,
    Coordinator,
    describe_coordinator,
    read_serve_file,
    running_serve_file,
)
from flctl.coordinator._local import LocalClients
from flctl.coordinator._strategy import (
    STRATEGY_FN,
    build_strategy,
    call_strategy_fn,
    task_strategy,
)
from flctl.coordinator._task import coordinator_context

__all__ = [
    "Coordinator",
    "LocalClients",
    "SERVE_FILE",
    "STRATEGY_FN",
    "build_strategy",
    "call_strategy_fn",
    "coordinator_context",
    "describe_coordinator",
    "read_serve_file",
    "running_serve_file",
    "task_strategy",
]
