"""Local DP: a client clips and noises its own update before it leaves the machine.

The update travels as a delta (:class:`flctl.tensors.UpdateEncoding` ``"delta"``): the clipped
difference from the round's model plus Gaussian noise, tensor by tensor. The coordinator only
averages what arrives (:class:`flctl.aggregation.LocalDpFedAvg`).

What one local round costs each client that takes part (:func:`local_round`): its upload is a
Gaussian mechanism on its clipped delta. Any two deltas clipped to ``C`` differ by at most
``2C`` in L2 norm, so against the coordinator, which sees the upload and knows whom it
selected, the release is a Gaussian mechanism of sensitivity ``2C`` and noise std ``z * C``,
that is of noise multiplier ``z / 2``, with no amplification by sampling (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flctl.core.errors import InvalidInputError, PrivacyError
from flctl.privacy._accountant import SampledGaussianRound
from flctl.privacy._clipping import clip_factor
from flctl.privacy._noise import gaussian_noise_like, secure_generator

if TYPE_CHECKING:
    import torch

__all__ = ["LocalRelease", "local_round", "privatize_update"]


@dataclass(frozen=True)
class LocalRelease:
    """What :func:`privatize_update` did (it stays on the client: the norm is private).

    Attributes:
        norm: The L2 norm of the delta before clipping.
        factor: The clip factor applied, ``min(1, clip_norm / norm)``.
        noise_std: The std of the noise added to every coordinate, ``z * C``.
    """

    norm: float
    factor: float
    noise_std: float


def local_round(noise_multiplier: float) -> SampledGaussianRound:
    """One local-DP round as the accountant charges it, per client that took part.

    A Gaussian mechanism of sensitivity ``2C`` (replace-one: any two clipped deltas) with
    noise std ``z * C``, which is dp-accounting's ``GaussianDpEvent(z / 2)``, without sampling:
    the coordinator, the party local DP protects against, chose the sample. It is expressed as
    Poisson sampling at rate 1, which is that Gaussian event exactly under both RDP and PLD.

    Raises:
        PrivacyError: ``noise_multiplier`` is not a finite number > 0.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise PrivacyError(
            f"noise_multiplier must be a finite number > 0, not {noise_multiplier!r}"
        )
    return SampledGaussianRound(noise_multiplier / 2, "poisson", 1.0)


def privatize_update(
    base: Path,
    parameters: Mapping[str, torch.Tensor],
    out: Path,
    *,
    clip_norm: float,
    noise_multiplier: float,
    dtype: str = "float32",
    base_digest: str | None = None,
    generator: torch.Generator | None = None,
) -> LocalRelease:
    """Write ``clip(parameters - base) + noise`` to ``out`` as a delta update.

    Two passes over the tensors: the first takes the delta's L2 norm over every floating-point
    tensor (float64, reading the base one tensor at a time), the second writes each tensor's
    ``(p - b) * factor + N(0, (z * C)^2)``. Memory stays at ``parameters`` plus one tensor.
    Integer tensors (counters) are written from the base model, never the client's: they
    cannot be noised, so they must not leave the machine.

    Args:
        base: The round's model (safetensors).
        parameters: The trained state dict; the same names, dtypes and shapes as ``base``.
        out: Output file (removed again on error).
        clip_norm: ``C``, > 0.
        noise_multiplier: ``z``, > 0 (0 only in tests: no privacy).
        dtype: How floating-point tensors travel: ``"float32"`` (the model's own dtype),
            ``"float16"`` or ``"bfloat16"``.
        base_digest: The sha256 of ``base`` when the caller knows it.
        generator: Where the noise comes from; None draws a :func:`secure_generator` (tests
            may pass a seeded one; production code never does).

    Raises:
        PrivacyError: ``clip_norm`` or ``noise_multiplier`` out of range.
        InvalidInputError: The parameters do not match the base, hold NaN or Inf, or a noised
            value overflows the travel dtype.
    """
    import torch

    from flctl.tensors import (
        TensorReader,
        TensorWriter,
        UpdateEncoding,
        expected_update_spec,
        read_spec,
        sha256_file,
        spec_of,
        torch_dtype,
    )

    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyError(f"noise_multiplier must be finite and >= 0, not {noise_multiplier!r}")
    for name, tensor in parameters.items():
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise InvalidInputError(f"parameter {name!r} is a {kind}, not a tensor")
    model_spec = read_spec(base)
    if spec_of(parameters) != {n: (s.dtype, s.shape) for n, s in model_spec.items()}:
        raise InvalidInputError(
            "the parameters do not match the base model's tensor names, shapes or dtypes"
        )
    encoding = UpdateEncoding("delta", dtype, base_digest or sha256_file(base))
    travel = expected_update_spec(model_spec, encoding.encoding, encoding.dtype)
    # in the parameters' order, which pass 2 writes in
    specs = {n: (travel[n].dtype, travel[n].shape) for n in parameters}
    with TensorReader(base) as reader:
        # pass 1: the norm of the whole delta
        total = 0.0
        for name, tensor in parameters.items():
            if not tensor.is_floating_point():
                continue
            delta = _delta(tensor, reader.read(name)).reshape(-1)
            total += float(torch.dot(delta, delta))
            del delta
        if not math.isfinite(total):
            raise InvalidInputError("the update holds NaN or Inf values")
        norm = math.sqrt(total)
        factor = clip_factor(norm, clip_norm)
        std = noise_multiplier * clip_norm
        if generator is None:
            generator = secure_generator()
        # pass 2: clip, noise, write
        try:
            with TensorWriter(out, specs, metadata=encoding.to_metadata()) as writer:
                for name, tensor in parameters.items():
                    base_tensor = reader.read(name)
                    if not tensor.is_floating_point():
                        writer.write(name, base_tensor)
                        continue
                    value = _delta(tensor, base_tensor).mul_(factor)
                    del base_tensor
                    if std > 0:
                        value.add_(gaussian_noise_like(value, std, generator))
                    sent = value.to(torch_dtype(specs[name][0]))
                    if not bool(torch.isfinite(sent).all()):
                        raise InvalidInputError(
                            f"tensor {name!r}: the noised delta overflows {dtype}",
                            hint='set `client.update_dtype = "float32"`',
                        )
                    writer.write(name, sent)
                    del value, sent
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return LocalRelease(norm=norm, factor=factor, noise_std=std)


def _delta(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``tensor - base`` in float64, on the CPU."""
    import torch

    return tensor.detach().to("cpu", torch.float64) - base.to(torch.float64)
