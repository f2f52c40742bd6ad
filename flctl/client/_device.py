"""Where a client trains: ``device = "auto"`` picks CUDA when present."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(name: str) -> str:
    """Resolve ``"auto"`` to ``"cuda"`` or ``"cpu"``; check an explicit CUDA device exists.

    Raises:
        ValueError: CUDA was asked for and is not available, or the name is unknown.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        return name
    raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu' or 'cuda[:N]'")
