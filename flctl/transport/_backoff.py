"""Reconnect policy: capped exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays for retrying a connection: ``initial * factor**n``, capped, with jitter.

    The jitter (a uniform draw in ``[delay / 2, delay]``) spreads the reconnects of clients that
    lost the same coordinator, so they do not come back in one burst.

    Args:
        initial: The first delay's upper bound, in seconds.
        factor: Growth per attempt.
        cap: No delay exceeds this.
        rng: Source of jitter (seed it in tests).
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.cap < self.initial:
            raise ValueError(
                f"invalid backoff: initial={self.initial!r} factor={self.factor!r} cap={self.cap!r}"
            )

    def next_delay(self) -> float:
        """Return the next delay and count the attempt."""
        bound = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return self.rng.uniform(bound / 2, bound)

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
