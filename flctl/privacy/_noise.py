"""Gaussian noise for DP-FedAvg, drawn from a generator seeded by the operating system.

The project's seed (``project.seed``, ``--seed``) never reaches these generators: noise that
anyone could regenerate from a seed in a config file would protect nothing.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING

from flctl.core.errors import PrivacyError

if TYPE_CHECKING:
    import torch

__all__ = ["gaussian_noise_like", "noise_std", "secure_generator"]


def noise_std(noise_multiplier: float, clip_norm: float, denominator: float) -> float:
    """The std of the Gaussian noise added to an average of clipped deltas.

    ``noise_multiplier * clip_norm / denominator``: the noise is calibrated to the sum of the
    clipped deltas (sensitivity ``clip_norm``) and divided by the same denominator as the sum.

    Args:
        noise_multiplier: ``z``, >= 0.
        clip_norm: ``C``, > 0.
        denominator: What the sum of clipped deltas is divided by, > 0 (central DP: the
            expected number of clients per round; local DP: see docs/privacy.md).

    Raises:
        PrivacyError: A value is out of range.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyError(f"noise_multiplier must be finite and >= 0, not {noise_multiplier!r}")
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise PrivacyError(f"clip_norm must be a finite number > 0, not {clip_norm!r}")
    if not math.isfinite(denominator) or denominator <= 0:
        raise PrivacyError(f"denominator must be a finite number > 0, not {denominator!r}")
    return noise_multiplier * clip_norm / denominator


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the operating system's CSPRNG (``secrets``).

    The seed is unpredictable, and never derived from the project's seed. The generator itself
    is torch's (Mersenne Twister on CPU, Philox on CUDA): fast, not a cryptographic generator.
    """
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return generator


def gaussian_noise_like(
    tensor: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise of mean 0 and std ``std``, with ``tensor``'s shape, dtype and device.

    Args:
        tensor: A floating-point tensor (the accumulator the noise is added to).
        std: The standard deviation, finite and >= 0 (see :func:`noise_std`).
        generator: Where the noise comes from; None draws a fresh :func:`secure_generator`.
            Pass one generator for all the tensors of a round; tests may pass a seeded one.

    Raises:
        PrivacyError: ``std`` is out of range, or ``tensor`` is not floating-point.
    """
    import torch

    if not math.isfinite(std) or std < 0:
        raise PrivacyError(f"the noise std must be finite and >= 0, not {std!r}")
    if not tensor.is_floating_point():
        raise PrivacyError(f"noise can only be added to floating-point tensors, not {tensor.dtype}")
    if generator is None:
        generator = secure_generator(tensor.device)
    noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype, device=tensor.device)
    return noise.mul_(std)
