"""Bounding how much one update weighs in a round's aggregate, whatever its client claims."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["cap_weights"]


def cap_weights(claims: Sequence[int], *, max_examples: int, max_share: float) -> list[int]:
    """Return the weights a round's updates aggregate with, from the example counts claimed.

    A client says how many examples its update was trained on, and FedAvg weighs the update by
    that number: unchecked, one client claiming 2^40 examples makes the aggregate its own
    model. Two bounds apply, in this order:

    1. A claim above ``max_examples`` counts as ``max_examples``.
    2. No update keeps more than ``max_share`` of the round's total weight. The heaviest
       updates are lowered, just enough, to the same weight ``w``, with
       ``w = max_share * total`` where ``total`` includes them at ``w``; the other updates
       keep their claims, so their proportions to each other do not change. ``w`` is rounded
       down (weights are whole examples), which keeps each share at most ``max_share``.
       With N updates a share below 1/N cannot be reached: they then all weigh as the
       lightest one. One update, or ``max_share = 1``, is not capped.

    The arithmetic is exact (fractions, not floats): the same claims give the same weights.

    Args:
        claims: Each update's ``num_examples``, positive.
        max_examples: The largest claim counted as it is (``rounds.max_examples_per_update``).
        max_share: The largest share of the total one update may have, in (0, 1]
            (``rounds.max_weight_share``).

    Returns:
        One weight per claim, in the same order, each between 1 and its claim.

    Raises:
        ValueError: A claim is not positive, or a bound is out of range.

    Example:
        >>> cap_weights([64, 64, 2**40], max_examples=10**9, max_share=0.5)
        [64, 64, 128]
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be at least 1, not {max_examples!r}")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], not {max_share!r}")
    if any(c < 1 for c in claims):
        raise ValueError(f"every claim must be positive, not {list(claims)!r}")
    bounded = [min(c, max_examples) for c in claims]
    n = len(bounded)
    if n < 2 or max_share >= 1:
        return bounded
    share = Fraction(max_share)
    if share * n <= 1:
        return [min(bounded)] * n
    order = sorted(range(n), key=lambda i: bounded[i], reverse=True)
    uncapped = sum(bounded)
    for capped in range(n):
        # the `capped` heaviest weigh w each; w = share * (uncapped + capped * w)
        total = uncapped / (1 - capped * share)
        if bounded[order[capped]] <= share * total:
            weight = max(1, math.floor(share * total))
            out = list(bounded)
            for i in order[:capped]:
                out[i] = weight
            return out
        uncapped -= bounded[order[capped]]
    raise AssertionError("unreachable: the lightest update always fits")  # pragma: no cover
