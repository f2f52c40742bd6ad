"""Clipping a client's update to an L2 bound over all its tensors, one tensor at a time.

An update's *delta* is the update minus the round's base model. Its L2 norm is taken over the
floating-point tensors only: integer tensors (counters such as BatchNorm's
``num_batches_tracked``) are not trained parameters and cannot be noised, so the DP aggregation
must take them from the base model, never from a client. Norms are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.core.errors import InvalidInputError, PrivacyError

if TYPE_CHECKING:
    import torch

__all__ = ["clip_factor", "clipped_delta", "delta_norm", "l2_norm"]


def clip_factor(total_norm: float, clip_norm: float) -> float:
    """The factor that scales an update of L2 norm ``total_norm`` to at most ``clip_norm``.

    ``min(1, clip_norm / total_norm)``, and 1.0 for a zero update. Multiplying every tensor of
    the delta by it bounds the delta's L2 norm by ``clip_norm`` (up to float64 rounding, a
    relative 1e-15 or so).

    Args:
        total_norm: The L2 norm of the whole delta, finite and >= 0.
        clip_norm: The bound ``C``, finite and > 0.

    Raises:
        PrivacyError: A value is out of range (a NaN norm means the update holds NaN).
    """
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise PrivacyError(f"clip_norm must be a finite number > 0, not {clip_norm!r}")
    if not math.isfinite(total_norm) or total_norm < 0:
        raise PrivacyError(f"an update's norm must be finite and >= 0, not {total_norm!r}")
    if total_norm <= clip_norm:
        return 1.0
    return clip_norm / total_norm


def l2_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of several tensors taken as one vector (float64; integer tensors skipped)."""
    import torch

    total = 0.0
    for tensor in tensors:
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1).to(torch.float64)
        total += float(torch.dot(flat, flat))
        del flat
    return math.sqrt(total)


def clipped_delta(update: torch.Tensor, base: torch.Tensor, factor: float) -> torch.Tensor:
    """``(update - base) * factor`` in float64: one tensor of a clipped delta.

    Args:
        update: A tensor of the client's model.
        base: The same tensor of the round's base model.
        factor: The update's :func:`clip_factor`.

    Raises:
        PrivacyError: ``factor`` is not in [0, 1], or a tensor is not floating-point.
    """
    import torch

    if not 0 <= factor <= 1:
        raise PrivacyError(f"a clip factor must be in [0, 1], not {factor!r}")
    if not (update.is_floating_point() and base.is_floating_point()):
        raise PrivacyError("only floating-point tensors are clipped")
    delta = update.detach().to(torch.float64) - base.detach().to(torch.float64)
    return delta.mul_(factor)


def delta_norm(update_path: Path, base_path: Path) -> float:
    """The L2 norm of ``update - base`` over every floating-point tensor of two model files.

    Streams the two safetensors files one tensor at a time (``pread``, no memory map), so
    memory stays near the size of the largest tensor whatever the model's size.

    Args:
        update_path: The client's model (safetensors).
        base_path: The round's base model (safetensors).

    Raises:
        InvalidInputError: The files disagree on tensor names, dtypes or shapes, or the update
            holds NaN or Inf.
    """
    import torch

    from flctl.tensors import TensorReader

    with TensorReader(update_path) as update, TensorReader(base_path) as base:
        theirs = {n: (s.dtype, s.shape) for n, s in update.specs.items()}
        ours = {n: (s.dtype, s.shape) for n, s in base.specs.items()}
        if theirs != ours:
            raise InvalidInputError(
                f"{update_path.name} does not match the model's tensor names, shapes or dtypes"
            )
        total = 0.0
        for name in base.specs:
            u = update.read(name)
            if not u.is_floating_point():
                continue
            d = u.to(torch.float64).sub_(base.read(name).to(torch.float64)).reshape(-1)
            total += float(torch.dot(d, d))
            del u, d
    if not math.isfinite(total):
        raise InvalidInputError(f"{update_path.name} holds NaN or Inf values")
    return math.sqrt(total)
