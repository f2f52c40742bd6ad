"""The bounds the coordinator enforces on what clients send, whatever the transport."""

from __future__ import annotations

from flctl.core.errors import InvalidInputError, LimitExceededError

__all__ = ["MAX_ID", "Limits", "bounded", "check_id"]

#: The largest round id, sequence number or version the store can hold (SQLite's INTEGER).
MAX_ID = (1 << 63) - 1


class Limits:
    """The bounds the coordinator enforces and announces at Join."""

    def __init__(self, *, max_chunk_bytes: int, max_update_bytes: int, max_tensors: int) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.max_update_bytes = max_update_bytes
        self.max_tensors = max_tensors
        self.max_metrics = 64
        self.max_string_bytes = 256


def check_id(label: str, value: int) -> int:
    """A round id, sequence number or version from a client, within what the store holds."""
    if value > MAX_ID:
        raise InvalidInputError(f"{label} {value} is out of range (at most {MAX_ID})")
    return int(value)


def bounded(label: str, value: str, limit: int) -> str:
    """A text field from a caller, refused when longer than ``limit`` characters."""
    if len(value) > limit:
        raise LimitExceededError(f"{label} is longer than {limit} characters")
    return value
