"""Typed maps (metrics, configs) to and from the wire's ``map<string, Value>``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flctl.core.work import check_metrics

__all__ = ["from_value_map", "metrics_from_map", "raw_value_map", "to_value_map"]

Scalar = bool | int | float | str


def to_value_map(target: Any, values: Mapping[str, Scalar]) -> None:
    """Fill a protobuf ``map<string, Value>`` field from plain Python scalars."""
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, int):
            slot.int_value = value
        elif isinstance(value, float):
            slot.double_value = value
        elif isinstance(value, str):
            slot.string_value = value
        else:
            raise TypeError(f"map value for {key!r} must be bool, int, float or str: {value!r}")


def from_value_map(source: Any) -> dict[str, Scalar]:
    """Read a protobuf ``map<string, Value>`` into plain Python scalars."""
    out: dict[str, Scalar] = {}
    for key, value in source.items():
        kind = value.WhichOneof("kind")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


def raw_value_map(source: Any) -> dict[str, object]:
    """Read a protobuf ``map<string, Value>`` as sent: an entry with no value reads as None."""
    out: dict[str, object] = {}
    for key, value in source.items():
        kind = value.WhichOneof("kind")
        out[key] = None if kind is None else getattr(value, kind)
    return out


def metrics_from_map(
    source: Any, *, max_items: int = 64, max_key_bytes: int = 128
) -> dict[str, float]:
    """Read and check a metrics map (:func:`flctl.core.work.check_metrics`).

    Raises:
        LimitExceededError: Too many entries or a key too long.
        InvalidInputError: A value is not a finite number.
    """
    return check_metrics(raw_value_map(source), max_items=max_items, max_key_bytes=max_key_bytes)
