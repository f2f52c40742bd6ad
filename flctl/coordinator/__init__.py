"""The coordinator: services, round engine, client registry and event log."""

from flctl.coordinator._coordinator import SERVE_FILE, Coordinator, read_serve_file

__all__ = [
    "Coordinator",
    "SERVE_FILE",
    "read_serve_file",
]
