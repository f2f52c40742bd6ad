"""How a round aggregates: the strategy, its state between rounds, the updates' weights.

:class:`RoundAggregation` holds the job's strategy (``[strategy]``, docs/strategies.md) for the
round engine. Before each round it gives the strategy the state recorded with the head version
(:meth:`RoundAggregation.sync_state`); when the tasks are sent it asks for the clients' extra fit
config (:meth:`~RoundAggregation.configure_fit`); once the updates are in, it weighs them
(``num_examples`` capped by ``[rounds]``, each clamp an ``update.clamped`` event) and has the
strategy write the new model into the blob store, and its state beside it. With ``[privacy]``
on, DP-FedAvg (central) or the local-DP average aggregates instead, and the release is charged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flctl.aggregation import DpFedAvg, LocalDpFedAvg, Strategy, WeightedUpdate, cap_weights
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.errors import IntegrityError, RoundFailedError
from flctl.privacy import SampledGaussianRound
from flctl.store import BlobStore, ModelRecord, SqlStore
from flctl.tensors import load_parameters, save_parameters, sha256_file

from ._events import EventLog
from ._privacy_round import PrivacyRounds

__all__ = ["RoundAggregation"]

log = logging.getLogger("flctl.coordinator")


class RoundAggregation:
    """The strategy of a job and everything a round asks of it."""

    def __init__(
        self,
        *,
        config: Config,
        store: SqlStore,
        blobs: BlobStore,
        events: EventLog,
        privacy: PrivacyRounds,
        strategy: Strategy,
        new_strategy: Callable[[], Strategy] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._blobs = blobs
        self._events = events
        self._privacy = privacy
        self.strategy = strategy
        #: builds the strategy afresh, for a head that has no state (default: ``strategy``
        #: loads an empty state)
        self._new_strategy = new_strategy
        #: the state digest the strategy holds ("" none: as built); None: unknown (it
        #: aggregated a round that did not commit)
        self._state_digest: str | None = ""

    def sync_state(self) -> None:
        """Give the strategy the state recorded with the head version, if it lacks it.

        A head without a state gets a strategy as built (anew, when it held another state).

        Raises:
            ConfigError: The stored state does not belong to the strategy (it was changed).
            IntegrityError: The state's blob is missing.
        """
        head = self._store.head()
        wanted = "" if head is None else head.state_digest
        if wanted == self._state_digest:
            return
        if wanted:
            if not self._blobs.has(wanted):
                raise IntegrityError(
                    f"the strategy state of version {head.version if head else '?'} "
                    f"(blob {wanted[:12]}) is missing",
                    hint="roll back to a version whose state is present, or restore a backup",
                )
            self.strategy.load_state_dict(load_parameters(self._blobs.path(wanted)))
        elif self._new_strategy is not None:
            self.strategy = self._new_strategy()
        else:
            self.strategy.load_state_dict({})
        self._state_digest = wanted
        log.info("strategy state: %s", wanted[:12] or "none (as built)")

    def configure_fit(self, server_round: int, selected: list[str]) -> dict[str, dict[str, Any]]:
        """The strategy's extra fit config per selected client, checked (none with privacy).

        Raises:
            RoundFailedError: It named a client that was not selected, or gave a key or value
                a task config cannot carry.
        """
        if self._config.privacy.mode != "off":
            return {}
        answer = self.strategy.configure_fit(server_round, list(selected))
        name = getattr(self.strategy, "name", type(self.strategy).__name__)
        out: dict[str, dict[str, Any]] = {}
        for client_id, entries in answer.items():
            if client_id not in selected:
                raise RoundFailedError(
                    f"strategy {name!r}: configure_fit gave config to {client_id!r}, "
                    "which was not selected"
                )
            for key, value in entries.items():
                if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
                    raise RoundFailedError(
                        f"strategy {name!r}: configure_fit gave {client_id!r} {key!r} = "
                        f"{value!r}: a fit config holds booleans, numbers and strings"
                    )
            if entries:
                out[client_id] = dict(entries)
        return out

    def weights(self, server_round: int, accepted: list[Any]) -> list[int]:
        """The weights of the round's updates, capped by ``[rounds]``; each clamp an event.

        An ``update.clamped`` event per update that weighs less than it claimed says which
        bound lowered it: ``max_examples_per_update``, or ``max_weight_share`` (which may
        also lower an update already bounded by the first).
        """
        rounds = self._config.rounds
        claims = [int(u.num_examples) for u in accepted]
        weights = cap_weights(
            claims,
            max_examples=rounds.max_examples_per_update,
            max_share=rounds.max_weight_share,
        )
        total = sum(weights)
        for update, claimed, used in zip(accepted, claims, weights, strict=True):
            if used == claimed:
                continue
            bound = (
                "max_weight_share"
                if used < min(claimed, rounds.max_examples_per_update)
                else "max_examples_per_update"
            )
            log.warning(
                "round %d: update from %s claims %d examples, weighs as %d (%s)",
                server_round,
                update.client_id,
                claimed,
                used,
                bound,
            )
            self._events.emit(
                ev.UPDATE_CLAMPED,
                server_round=server_round,
                client_id=update.client_id,
                data={
                    "claimed": claimed,
                    "used": used,
                    "bound": bound,
                    "share": round(used / total, 6),
                    "max_examples_per_update": rounds.max_examples_per_update,
                    "max_weight_share": rounds.max_weight_share,
                },
            )
        return weights

    async def aggregate(
        self,
        server_round: int,
        head: ModelRecord,
        accepted: list[Any],
        mechanism: SampledGaussianRound | None,
        connected: int,
    ) -> tuple[str, str, list[int]]:
        """Aggregate the round's accepted updates onto ``head``.

        Returns the new model's digest, its strategy state's digest ("": none) and the
        updates' weights (capped).

        Without privacy the strategy aggregates, and then holds a state no version records
        yet (:meth:`committed` once the round commits). With privacy the release is charged to
        the ledger as soon as it exists, whatever happens next.
        """
        is_local = mechanism is not None and self._config.privacy.mode == "local"
        base_path = self._blobs.path(head.digest)
        # every strategy and the clients' metrics weigh an update as capped here, never as
        # claimed: one client's num_examples cannot buy the aggregate
        weights = self.weights(server_round, accepted)
        updates = [
            WeightedUpdate(self._blobs.path(u.digest), weight, u.client_id)
            for u, weight in zip(accepted, weights, strict=True)
        ]
        state_digest = ""
        if mechanism is None:
            self._state_digest = None  # the strategy moves on; a round that fails reloads
            digest, state_digest = await asyncio.to_thread(
                self._aggregate_stateful, base_path, updates
            )
        elif is_local:
            local = LocalDpFedAvg()
            digest = await asyncio.to_thread(self._aggregate, base_path, updates, local)
        else:
            denominator = self._privacy.denominator(connected)
            clip_norm = self._privacy.clip_norm()
            adaptive = self._privacy.adaptive(denominator)
            z = mechanism.noise_multiplier
            strategy = DpFedAvg(
                clip_norm,
                z if adaptive is None else adaptive.update_noise_multiplier(z),
                denominator,
                adaptive=adaptive,
            )
            digest = await asyncio.to_thread(self._aggregate, base_path, updates, strategy)
            fraction = strategy.last_unclipped_fraction
            # the noisy aggregate exists: the round is spent, whether it commits or not
            await self._privacy.charge(
                server_round,
                mechanism,
                clip_norm=clip_norm,
                unclipped_fraction=fraction,
                next_clip_norm=(
                    None
                    if adaptive is None or fraction is None
                    else adaptive.next_clip_norm(clip_norm, fraction)
                ),
            )

        return digest, state_digest, weights

    def committed(self, state_digest: str) -> None:
        """The round aggregated without privacy committed: the strategy holds its state."""
        self._state_digest = state_digest

    def _aggregate_stateful(self, base: Path, updates: list[WeightedUpdate]) -> tuple[str, str]:
        """Aggregate with the strategy; return the model's digest and its state's ("": none)."""
        digest = self._aggregate(base, updates)
        state = self.strategy.state_dict()
        if not state:
            return digest, ""
        temp, handle = self._blobs.temp_file()
        handle.close()
        try:
            save_parameters(state, temp)
            return digest, self._blobs.commit_temp(temp, sha256_file(temp))
        finally:
            temp.unlink(missing_ok=True)

    def _aggregate(
        self, base: Path, updates: list[WeightedUpdate], strategy: Strategy | None = None
    ) -> str:
        temp, handle = self._blobs.temp_file()
        handle.close()
        try:
            (strategy or self.strategy).aggregate(base, updates, temp)
            return self._blobs.commit_temp(temp, sha256_file(temp))
        finally:
            temp.unlink(missing_ok=True)
