"""Quantization for secure aggregation: floats to integers modulo ``2**32`` or ``2**64`` and back.

SecAgg sums integers modulo ``2**M`` (masks cancel only in modular arithmetic), so each client
turns its update into integers first and the server turns the unmasked sum back into floats.
With clip range ``c`` and ``b`` quantization bits, a value ``x`` becomes

    q(x) = rint((clip(x, -c, c) + c) / delta),   delta = 2c / (2**b - 1),

an integer in ``[0, 2**b - 1]``, and a sum ``S`` of ``N`` clients' integers becomes
``S * delta - N * c``.

Error bound: rounding moves each clipped value by at most ``delta / 2``, so the dequantized
sum of ``N`` updates differs from the sum of their clipped values by at most

    N * delta / 2 = N * c / (2**b - 1)

per element (plus float64 rounding, relative ``2**-52``). At the default ``b = 24``, ``c = 1``
that is ``6.0e-8`` per client. Values outside ``[-c, c]`` are clipped first: that error is not
bounded, so pick ``c`` above the updates' largest values (or clip them on purpose).

Bound on N: the modular sum equals the true sum only while it cannot wrap, that is while
``N * (2**b - 1) < 2**M``. :attr:`Quantizer.modulus_bits` picks ``M = 32`` (a masked update is
then as large as a float32 one) when the round's ``max_clients`` fit and ``M = 64`` otherwise:
at ``b = 24``, up to 256 clients with ``M = 32`` and up to ``2**40`` with ``M = 64``.

Everything here is numpy only, so client, coordinator and aggregation code can use it; the masks
themselves live in :mod:`flctl.security` (they need its PRG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from flctl.core.errors import SecAggError

__all__ = ["Quantizer"]

_MAX_BITS = 32


@dataclass(frozen=True)
class Quantizer:
    """Maps float updates to integers modulo ``2**modulus_bits`` and sums back to floats.

    Args:
        clip_range: Values are clipped to ``[-clip_range, clip_range]``; finite, > 0.
        bits: Quantization precision, 1 to 32 bits per value.
        max_clients: The most updates that will be summed (a round's clients); it picks
            :attr:`modulus_bits`.

    Raises:
        ValueError: An argument is out of range, or ``max_clients`` updates could wrap even
            modulo ``2**64``.

    Example:
        >>> q = Quantizer(clip_range=1.0, bits=24, max_clients=2)
        >>> total = q.quantize([0.5, -0.25]) + q.quantize([0.25, 1.0])
        >>> bool(abs(q.dequantize_sum(total, 2) - [0.75, 0.75]).max() <= q.max_sum_error(2))
        True
    """

    clip_range: float
    bits: int
    max_clients: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be finite and > 0, got {self.clip_range!r}")
        if not 1 <= self.bits <= _MAX_BITS:
            raise ValueError(f"bits must be in 1..{_MAX_BITS}, got {self.bits!r}")
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients!r}")
        if self.max_clients * self.levels >= 2**64:
            raise ValueError(
                f"{self.max_clients} clients at {self.bits} bits could overflow even modulo "
                "2**64: use fewer bits"
            )

    @property
    def levels(self) -> int:
        """The largest quantized value, ``2**bits - 1``."""
        return int(2**self.bits - 1)

    @property
    def step(self) -> float:
        """The quantization step ``delta = 2 * clip_range / (2**bits - 1)``."""
        return 2.0 * self.clip_range / self.levels

    @property
    def modulus_bits(self) -> int:
        """32 when ``max_clients * (2**bits - 1) < 2**32``, else 64."""
        return 32 if self.max_clients * self.levels < 2**32 else 64

    @property
    def dtype(self) -> np.dtype[Any]:
        """``uint32`` or ``uint64``, after :attr:`modulus_bits`."""
        return np.dtype(np.uint32 if self.modulus_bits == 32 else np.uint64)

    def max_sum_error(self, num_clients: int) -> float:
        """Return the bound ``num_clients * clip_range / (2**bits - 1)`` on the sum's error.

        Args:
            num_clients: How many updates were summed.

        Returns:
            The largest absolute difference, per element, between the dequantized sum and the
            sum of the clipped values (float64 rounding aside).
        """
        return num_clients * self.step / 2.0

    def quantize(self, values: ArrayLike) -> NDArray[Any]:
        """Clip, scale and round ``values`` to integers in ``[0, 2**bits - 1]``.

        Args:
            values: Any float array (any shape; flattened).

        Returns:
            A flat array of :attr:`dtype`.

        Raises:
            ValueError: A value is NaN or infinite.
        """
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError("cannot quantize NaN or infinite values")
        c = self.clip_range
        scaled = (np.clip(x, -c, c) + c) / self.step
        # Float rounding can push the top value a hair past the last level; clip it back.
        return np.clip(np.rint(scaled), 0, self.levels).astype(self.dtype)

    def dequantize_sum(self, total: ArrayLike, num_clients: int) -> NDArray[np.float64]:
        """Turn the (unmasked) modular sum of ``num_clients`` quantized updates into floats.

        Args:
            total: The sum modulo ``2**modulus_bits``, as unsigned integers.
            num_clients: How many updates it sums, ``1 <= num_clients <= max_clients``.

        Returns:
            The float64 sum of the updates, within :meth:`max_sum_error` of their clipped sum.

        Raises:
            ValueError: ``num_clients`` is out of range, or ``total`` is not unsigned.
            SecAggError: The sum holds a value that ``num_clients`` updates cannot add up to:
                the masks were not all removed.
        """
        if not 1 <= num_clients <= self.max_clients:
            raise ValueError(f"num_clients must be in 1..{self.max_clients}, got {num_clients!r}")
        s = np.asarray(total).reshape(-1)
        if s.dtype.kind != "u":
            raise ValueError(f"the sum must be unsigned integers, got {s.dtype}")
        if s.size and int(s.max()) > num_clients * self.levels:
            raise SecAggError(
                f"the sum holds {int(s.max())}, more than {num_clients} quantized updates can "
                "add up to: masks were not all removed"
            )
        return s.astype(np.float64) * self.step - num_clients * self.clip_range
