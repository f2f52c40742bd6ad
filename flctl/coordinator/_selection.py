"""Who trains in a round: the wait for a quorum, the sample, the number of updates that end it.

Without privacy a round asks ``clients_per_round`` (or ``fraction_per_round`` of those
connected) plus ``over_selection`` clients, chosen at random, and commits with the first N to
report. With ``[privacy] mode = "central"`` the accountant's sampling is followed exactly
(Poisson or fixed-size, from the OS's CSPRNG, no over-selection).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

from flctl.core import Config
from flctl.core.errors import RoundFailedError

from ._registry import Registry

__all__ = ["Selection"]


class Selection:
    """The selection policy of ``[rounds]`` and ``[privacy]``, over the connected clients."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        *,
        stopping: Callable[[], bool],
        cancelled: Callable[[int], str | None],
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._stopping = stopping
        self._cancelled = cancelled
        #: the OS's randomness (no client can predict a draw); a seeded generator where a
        #: run must repeat (``flctl simulate``)
        self._rng = rng or random.SystemRandom()

    async def wait_for_quorum(self, server_round: int) -> list[str]:
        rounds = self._config.rounds
        deadline = time.monotonic() + rounds.quorum_timeout_s
        while True:
            connected = [s.client_id for s in self._registry.connected()]
            if len(connected) >= rounds.min_clients:
                return connected
            remaining = deadline - time.monotonic()
            if self._cancelled(server_round) is not None:
                return connected
            if self._stopping():
                raise RoundFailedError(
                    f"coordinator stopped while waiting for clients: {len(connected)} "
                    f"connected, min_clients is {rounds.min_clients}"
                )
            if remaining <= 0:
                raise RoundFailedError(
                    f"not enough clients: {len(connected)} connected, min_clients is "
                    f"{rounds.min_clients} (waited {rounds.quorum_timeout_s:g} s)"
                )
            changed = self._registry.changed
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass

    def select(self, connected: list[str]) -> list[str]:
        privacy = self._config.privacy
        if privacy.mode == "central":
            # the accountant's sampling, exactly: no over-selection, from the OS's CSPRNG
            if privacy.sampling == "poisson":
                return [c for c in connected if self._rng.random() < privacy.sampling_rate]
            if len(connected) < privacy.sample_size:
                raise RoundFailedError(
                    f"fixed-size sampling needs {privacy.sample_size} connected clients, "
                    f"{len(connected)} are connected"
                )
            return sorted(self._rng.sample(connected, privacy.sample_size))
        rounds = self._config.rounds
        count = rounds.clients_per_round
        if rounds.fraction_per_round:
            count = max(rounds.min_clients, math.ceil(rounds.fraction_per_round * len(connected)))
        if count <= 0:
            return list(connected)
        # over-selection: ask count + k, commit with the first count to report
        asked = count + rounds.over_selection
        if asked >= len(connected):
            return list(connected)
        return sorted(self._rng.sample(connected, asked))

    def target(self, selected: int) -> int:
        """How many updates end the wait early: all selected, or the N of N + over_selection."""
        rounds = self._config.rounds
        if not rounds.over_selection or self._config.privacy.mode != "off":
            return selected
        return max(rounds.min_clients, selected - rounds.over_selection)
