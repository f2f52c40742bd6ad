"""Secure aggregation's side of a round: the masked sum, the mean it gives, and who may use it.

With ``[secagg] enabled`` (docs/secagg.md) the coordinator never holds one client's update: it
sums the clients' masked inputs as they arrive (:class:`MaskedSum`, modulo ``2**32`` or
``2**64``, in a scratch file, chunk by chunk) and, once the protocol gave it the terms that
remove what is left of the masks, writes the round's weighted mean
(:meth:`MaskedSum.write_mean`): ``base + (sum of r_i * delta_i) / (sum of r_i)``, tensor by
tensor. A strategy then aggregates that mean as the round's only update
(:meth:`Strategy.aggregate_mean`), which means the same to it only if its aggregate depends on
the updates through their mean: :func:`check_secure` refuses the others.

Nothing here knows the protocol's keys: the unmasking is a function handed in
(``SecAggResult.unmask`` of :mod:`flctl.security`), so this module needs neither the keys nor
``cryptography``.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from flctl.aggregation._private import _ROBUST
from flctl.aggregation._registry import BUILTIN_STRATEGIES
from flctl.aggregation._strategy import Strategy
from flctl.core.errors import ConfigError, InconsistentUpdatesError, NotEnoughUpdatesError
from flctl.privacy import gaussian_noise_like
from flctl.tensors import (
    Quantizer,
    SecureLayout,
    TensorReader,
    TensorWriter,
    iter_masked,
    read_spec,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

__all__ = ["MaskedSum", "SecureMean", "Unmasker", "check_secure"]

#: Removes the masks left in a chunk of the sum: ``(chunk, offset) -> chunk`` (a new array).
Unmasker = Callable[[NDArray[Any], int], NDArray[Any]]

_ROBUST_WHY = (
    "it chooses, trims or ranks among the individual updates, and with secure aggregation the "
    "coordinator holds only their sum: no update can be looked at on its own"
)
_NOT_MEAN_WHY = (
    "with secure aggregation the coordinator holds only the sum of the round's updates, and a "
    "strategy is given their weighted mean as its one update, which means the same to it only "
    "if it aggregates through the updates' mean; it does not declare is_mean_based = True"
)


def check_secure(strategy: Strategy | type[Strategy], *, subject: str = "") -> None:
    """Refuse a strategy that cannot run on the masked sum of secure aggregation, saying why.

    The strategy must be mean-based (:attr:`Strategy.is_mean_based`: FedAvg, FedProx,
    FedAvgM, FedAdam, FedYogi, FedAdagrad, or a custom strategy declaring it). The robust rules
    (FedMedian, FedTrimmedAvg, Krum, Multi-Krum, Bulyan) are refused even if they declare it.

    Args:
        strategy: The strategy, or its class.
        subject: What the message calls the strategy (default ``strategy 'NAME'``), such as
            ``flctl.toml: [strategy] name = "krum"``.

    Raises:
        ConfigError: The strategy needs individual updates; the message says why, the hint
            what works.
    """
    cls = strategy if isinstance(strategy, type) else type(strategy)
    is_robust = issubclass(cls, _ROBUST)
    if cls.is_mean_based and not is_robust:
        return
    name = getattr(cls, "name", cls.__name__)
    mean_based = ", ".join(n for n, c in sorted(BUILTIN_STRATEGIES.items()) if c.is_mean_based)
    raise ConfigError(
        f"{subject or f'strategy {name!r}'} cannot be combined with [secagg] enabled = true: "
        f"{_ROBUST_WHY if is_robust else _NOT_MEAN_WHY}",
        hint=f"with secure aggregation, use a mean-based strategy ({mean_based}); for a robust "
        "one, set [secagg] enabled = false (docs/secagg.md)",
    )


@dataclass(frozen=True)
class SecureMean:
    """What :meth:`MaskedSum.write_mean` wrote the model from.

    Attributes:
        num_inputs: The masked inputs in the sum.
        total_weight: The sum of the clients' weights ``r_i`` (as unmasked, quantized).
        divisor: What the sum was divided by: ``total_weight``, or central DP's denominator.
        error_bound: The largest error quantization can leave in an element of the mean
            (before the model's own dtype rounds it): see :meth:`MaskedSum.write_mean`.
        noise_std: The std of the Gaussian noise added to each element of the mean (0: none).
    """

    num_inputs: int
    total_weight: float
    divisor: float
    error_bound: float
    noise_std: float = 0.0


class MaskedSum:
    """A round's masked inputs summed modulo ``2**modulus_bits`` as they arrive.

    The sum lives in a scratch file (unlinked: it goes with the process) of ``num_elements``
    unsigned integers; each input is read and added a chunk at a time, so memory stays one
    chunk whatever the model's size. Unsigned numpy addition wraps, which is exactly the
    modular sum the masks cancel in.

    Args:
        layout: The round's flat vector (:class:`~flctl.tensors.SecureLayout` of its model).
        modulus_bits: 32 or 64.
        scratch: The scratch file's folder (default: the system's temp folder).
        chunk_elements: Elements read, added and written at a time.

    Not thread-safe: add one input at a time.
    """

    def __init__(
        self,
        layout: SecureLayout,
        modulus_bits: int,
        scratch: Path | None = None,
        *,
        chunk_elements: int = 1 << 20,
    ) -> None:
        if modulus_bits not in (32, 64):
            raise ValueError(f"modulus_bits must be 32 or 64, got {modulus_bits!r}")
        self.layout = layout
        self.modulus_bits = modulus_bits
        self._dtype = np.dtype(np.uint32 if modulus_bits == 32 else np.uint64)
        self._chunk = chunk_elements
        self._file: BinaryIO = tempfile.TemporaryFile(prefix="flctl-secagg-", dir=scratch)
        weakref.finalize(self, self._file.close)
        os.ftruncate(self._file.fileno(), layout.num_elements * self._dtype.itemsize)
        #: How many inputs the sum holds.
        self.count = 0

    def close(self) -> None:
        """Drop the scratch file (the sum is unusable afterwards)."""
        self._file.close()

    def add(self, path: Path) -> None:
        """Add the masked input in ``path`` (a whole, checked upload) to the sum.

        Raises:
            InconsistentUpdatesError: It is not a masked input of this round's length; the sum
                may then hold part of it (the round cannot be unmasked).
        """
        seen = 0
        try:
            for offset, chunk in iter_masked(path, self.modulus_bits, chunk_elements=self._chunk):
                if offset + len(chunk) > self.layout.num_elements:
                    raise InconsistentUpdatesError(f"{path.name} is longer than the round's vector")
                total = self.read(offset, len(chunk))
                np.add(total, chunk, out=total)
                self._write(offset, total)
                seen = offset + len(chunk)
        except InconsistentUpdatesError:
            raise
        except Exception as exc:
            raise InconsistentUpdatesError(f"{path.name}: {exc}") from exc
        if seen != self.layout.num_elements:
            raise InconsistentUpdatesError(
                f"{path.name} holds {seen} elements, not {self.layout.num_elements}"
            )
        self.count += 1

    def read(self, offset: int, count: int) -> NDArray[Any]:
        """Return elements ``[offset, offset + count)`` of the (masked) sum, a new array."""
        size = count * self._dtype.itemsize
        data = os.pread(self._file.fileno(), size, offset * self._dtype.itemsize)
        if len(data) != size:  # pragma: no cover - the file was laid out to its full size
            raise OSError(f"the masked sum's scratch file ends before element {offset + count}")
        return np.frombuffer(data, dtype=self._dtype).copy()

    def _write(self, offset: int, values: NDArray[Any]) -> None:
        view = memoryview(np.ascontiguousarray(values, dtype=self._dtype).tobytes())
        start = offset * self._dtype.itemsize
        done = 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], start + done)

    def write_mean(
        self,
        base: Path,
        out: Path,
        *,
        unmask: Unmasker,
        quantizer: Quantizer,
        num_inputs: int,
        denominator: float | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> SecureMean:
        """Remove the masks, dequantize, and write ``base`` plus the mean delta to ``out``.

        The weight slot gives ``W = sum of r_i`` (each client sent ``r_i * clip_range`` there);
        every floating-point tensor becomes ``base + S / W``, ``S`` its slice of the unmasked,
        dequantized sum, computed in float64 and cast to the model's dtype; integer tensors
        keep the base's values. With ``denominator`` (central DP: each client clipped its
        delta and weighed it 1) the slice is divided by it instead, and Gaussian noise of std
        ``noise_std`` is added to each element of the mean.

        Error: each element of the dequantized sum is within ``E =
        quantizer.max_sum_error(num_inputs)`` of the sum of the clipped values, ``W`` too
        (within ``E / clip_range``), so an element ``m`` of the mean is within about
        ``E * (1 + |m| / clip_range) / W`` of the exact weighted mean (``E / denominator``
        with central DP): :attr:`SecureMean.error_bound`, with the largest ``|m|``.

        Raises:
            SecAggError: A value of the sum is more than ``num_inputs`` inputs can add up to:
                a mask was not removed.
            NotEnoughUpdatesError: The sum holds no input, or its total weight is not positive.
            InconsistentUpdatesError: ``base`` is not the model the vector was laid out for.
        """
        import torch

        if num_inputs < 1 or self.count < 1:
            raise NotEnoughUpdatesError("the masked sum holds no input")
        specs = read_spec(base)
        layout = SecureLayout.of(specs)
        if layout != self.layout:
            raise InconsistentUpdatesError("the base model is not the one the round's vector is of")
        slot = layout.weight_slot
        c = quantizer.clip_range
        weight_sum = quantizer.dequantize_sum(unmask(self.read(slot, 1), slot), num_inputs)
        total_weight = float(weight_sum[0]) / c
        error = quantizer.max_sum_error(num_inputs)
        if denominator is None:
            if not total_weight > error / c:
                raise NotEnoughUpdatesError(
                    f"the round's total weight is {total_weight:g}: nothing to average"
                )
            divisor = total_weight
        else:
            divisor = float(denominator)
        where = {name: (offset, count) for name, offset, count in layout.tensors}
        largest = 0.0
        shapes = {n: (s.dtype, s.shape) for n, s in specs.items()}
        with ExitStack() as stack:
            reader = stack.enter_context(TensorReader(base))
            writer = stack.enter_context(TensorWriter(out, shapes))
            for name, spec in specs.items():
                tensor = reader.read(name)
                if name not in where:
                    writer.write(name, tensor)
                    continue
                offset, count = where[name]
                mean = np.empty(count, dtype=np.float64)
                for start in range(0, count, self._chunk):
                    n = min(self._chunk, count - start)
                    at = offset + start
                    total = unmask(self.read(at, n), at)
                    mean[start : start + n] = quantizer.dequantize_sum(total, num_inputs)
                mean /= divisor
                if count:
                    largest = max(largest, float(np.abs(mean).max()))
                value = torch.from_numpy(mean).reshape(spec.shape)
                if noise_std > 0:
                    value.add_(gaussian_noise_like(value, noise_std, generator))
                value.add_(tensor.to(torch.float64))
                writer.write(name, value.to(torch_dtype(spec.dtype)))
                del mean, value, tensor
        if denominator is None:
            bound = error * (1 + largest / c) / max(total_weight - error / c, error)
        else:
            bound = error / divisor
        return SecureMean(
            num_inputs=num_inputs,
            total_weight=total_weight,
            divisor=divisor,
            error_bound=bound if math.isfinite(bound) else math.inf,
            noise_std=noise_std,
        )
