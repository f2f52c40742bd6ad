"""Defensive readers for an event's ``data``: the log is JSON, so keys may be missing or odd."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "format_bytes",
    "format_rate",
    "get_float",
    "get_int",
    "get_metrics",
    "get_str",
    "get_str_list",
]


def format_bytes(count: float) -> str:
    """``count`` bytes in binary units: ``512 B``, ``3.2 MiB``, ``1.4 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns at GiB


def format_rate(bytes_per_s: float) -> str:
    """A transfer rate: ``312.0 MiB/s``."""
    return f"{format_bytes(bytes_per_s)}/s"


def get_str(data: Mapping[str, Any], key: str, default: str = "") -> str:
    """Return ``data[key]`` as text, or ``default`` when it is missing or null."""
    value = data.get(key)
    if value is None:
        return default
    return value if isinstance(value, str) else str(value)


def get_int(data: Mapping[str, Any], key: str) -> int | None:
    """Return ``data[key]`` as an int, or None when it is missing or not a whole number."""
    value = data.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def get_float(data: Mapping[str, Any], key: str) -> float | None:
    """Return ``data[key]`` as a finite float, or None when it is missing or not a number."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def get_str_list(data: Mapping[str, Any], key: str) -> list[str]:
    """Return the strings of the list ``data[key]``, or an empty list."""
    value = data.get(key)
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, str)]


def get_metrics(data: Mapping[str, Any], key: str = "metrics") -> dict[str, float]:
    """Return the numeric entries of the mapping ``data[key]``; other entries are dropped."""
    value = data.get(key)
    if not isinstance(value, Mapping):
        return {}
    return {
        str(name): float(number)
        for name, number in value.items()
        if isinstance(number, int | float) and not isinstance(number, bool)
    }
