"""The coordinator: services, round engine, client registry and event log."""

from flctl.coordinator._coordinator import (
    SERVE_FILE,
    Coordinator,
    describe_coordinator,
    read_serve_file,
    running_serve_file,
)
from flctl.coordinator._strategy import build_strategy

__all__ = [
    "Coordinator",
    "SERVE_FILE",
    "build_strategy",
    "describe_coordinator",
    "read_serve_file",
    "running_serve_file",
]
