"""Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping").

Each round, every update contributes one bit, ``b_i = 1`` when its delta's norm is at most the
current clip norm ``C``. The coordinator releases the noised fraction of unclipped updates

    b = (sum_i (b_i - 1/2) + N(0, count_stddev^2)) / denominator + 1/2

(the centred sum changes by at most 1/2 when one client is added or removed) and moves the clip
norm geometrically towards the ``target_quantile`` of the update norms:

    C <- C * exp(-learning_rate * (b - target_quantile))

Accounting: the bits and the deltas are computed on the same sampled clients, so the two
Gaussian releases are one Gaussian mechanism whose noise multiplier ``z`` satisfies
``z^-2 = z_delta^-2 + (2 * count_stddev)^-2``. flctl keeps the configured ``noise_multiplier``
as that total (what the ledger charges, and what ``flctl dp`` plans for) and noises the deltas
with ``z_delta = (z^-2 - (2 * count_stddev)^-2)^-1/2``, a little more than ``z``: the budget
is split, and the clip-norm estimate costs no extra epsilon (the paper's Theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flctl.core.errors import PrivacyError
from flctl.privacy._noise import secure_generator

if TYPE_CHECKING:
    import torch

__all__ = ["COUNT_STDDEV_DIVISOR", "AdaptiveClipping", "default_count_stddev"]

COUNT_STDDEV_DIVISOR = 20.0
"""With no ``clip_count_stddev`` configured, the count's noise std is the expected number of
clients per round divided by this (the paper's recommendation)."""


@dataclass(frozen=True)
class AdaptiveClipping:
    """The clip-norm update rule and its share of the noise.

    Example:
        ```python
        adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=1.0)
        z_delta = adaptive.update_noise_multiplier(1.0)   # 1.1547: the deltas' noise
        fraction = adaptive.noisy_fraction(unclipped=7, updates=10, denominator=10.0)
        clip = adaptive.next_clip_norm(clip, fraction)
        ```

    Args:
        target_quantile: ``gamma``, the fraction of updates that should be unclipped, in (0, 1).
        learning_rate: ``eta``, the geometric step, > 0.
        count_stddev: ``sigma_b``, the std of the noise on the count of unclipped updates, > 0.

    Raises:
        PrivacyError: A value is out of range.
    """

    target_quantile: float
    learning_rate: float
    count_stddev: float

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise PrivacyError(f"target_quantile must be in (0, 1), not {self.target_quantile!r}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise PrivacyError(
                f"clip_learning_rate must be a finite number > 0, not {self.learning_rate!r}"
            )
        if not math.isfinite(self.count_stddev) or self.count_stddev <= 0:
            raise PrivacyError(
                f"the count's noise std must be a finite number > 0, not {self.count_stddev!r}"
            )

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """``z_delta``: the deltas' noise multiplier that leaves ``noise_multiplier`` in total.

        Raises:
            PrivacyError: ``2 * count_stddev <= noise_multiplier``: the count alone would spend
                the whole budget.
        """
        z = noise_multiplier
        if not math.isfinite(z) or z <= 0:
            raise PrivacyError(f"noise_multiplier must be a finite number > 0, not {z!r}")
        share = z**-2 - (2 * self.count_stddev) ** -2
        if share <= 0:
            raise PrivacyError(
                f"adaptive clipping needs 2 * clip_count_stddev > noise_multiplier: "
                f"2 * {self.count_stddev:g} <= {z:g}",
                hint="raise privacy.clip_count_stddev (more noise on the count), or lower "
                "privacy.noise_multiplier",
            )
        return float(share**-0.5)

    def noisy_fraction(
        self,
        unclipped: int,
        updates: int,
        denominator: float,
        generator: torch.Generator | None = None,
    ) -> float:
        """The released fraction of unclipped updates, ``b`` above (may leave [0, 1]).

        Args:
            unclipped: How many updates had a norm at most the clip norm.
            updates: How many updates were aggregated.
            denominator: The fixed denominator of the round (the expected number of clients).
            generator: Where the noise comes from; None draws a :func:`secure_generator`.
        """
        import torch

        if not 0 <= unclipped <= updates:
            raise PrivacyError(f"unclipped ({unclipped}) must be in [0, updates ({updates})]")
        if not math.isfinite(denominator) or denominator <= 0:
            raise PrivacyError(f"denominator must be a finite number > 0, not {denominator!r}")
        if generator is None:
            generator = secure_generator()
        noise = float(torch.randn((), generator=generator, dtype=torch.float64))
        centred = unclipped - updates / 2 + noise * self.count_stddev
        return centred / denominator + 0.5

    def next_clip_norm(self, clip_norm: float, fraction: float) -> float:
        """``C * exp(-learning_rate * (fraction - target_quantile))``.

        More updates unclipped than the target (``fraction > target_quantile``): the clip norm
        shrinks; fewer: it grows.
        """
        if not math.isfinite(clip_norm) or clip_norm <= 0:
            raise PrivacyError(f"clip_norm must be a finite number > 0, not {clip_norm!r}")
        if not math.isfinite(fraction):
            raise PrivacyError(f"the unclipped fraction must be finite, not {fraction!r}")
        return clip_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile))


def default_count_stddev(expected_clients: float) -> float:
    """The count's noise std when none is configured: expected clients per round / 20."""
    if not math.isfinite(expected_clients) or expected_clients <= 0:
        raise PrivacyError(
            f"expected_clients must be a finite number > 0, not {expected_clients!r}"
        )
    return expected_clients / COUNT_STDDEV_DIVISOR
