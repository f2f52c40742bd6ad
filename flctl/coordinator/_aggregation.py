"""How a round aggregates: the strategy, its state between rounds, the updates' weights.

:class:`RoundAggregation` holds the job's strategy (``[strategy]``, docs/strategies.md) for the
round engine. Before each round it gives the strategy the state recorded with the head version
(:meth:`RoundAggregation.sync_state`); when the tasks are sent it asks for the clients' extra fit
config (:meth:`~RoundAggregation.configure_fit`).

While the round trains, for a strategy whose model is FedAvg's, the model is computed as the
updates upload (:class:`~flctl.coordinator._streaming.RoundStream`, fed by
:meth:`~RoundAggregation.upload_begun` and :meth:`~RoundAggregation.update_accepted`), and
used if the round takes exactly those updates. With ``[strategy] incremental = true`` instead,
each accepted update is added to the round's
:class:`~flctl.aggregation.RunningSum` in a worker thread (:meth:`~RoundAggregation.start_round`,
:meth:`~RoundAggregation.update_accepted`, :class:`~flctl.coordinator._scoring.RoundUpdates`,
which also scores the updates and applies ``exclude_outliers``): for a mean-based strategy
(:attr:`Strategy.is_mean_based`) the aggregation is then mostly done when the last update lands.
Once the wait ends, the updates are weighed (``num_examples`` capped by ``[rounds]``, each
clamp an ``update.clamped`` event); a mean-based strategy takes the settled running sum's mean
(:meth:`Strategy.aggregate_mean`), any other strategy reads all the updates
(:meth:`Strategy.aggregate`). The new model goes into the blob store, and the strategy's state
beside it. If adding an update failed, the round aggregates whole, which names the update.

With ``[privacy]`` on, the strategy aggregates the round's private mean instead
(:class:`~flctl.aggregation.PrivateStrategy`: DP-FedAvg's release for central DP, the mean of
the clients' noised updates for local DP), and a central release is charged to the ledger as
soon as it exists.

With ``[secagg]`` on, there are no updates to read: the round's masked sum, unmasked, gives the
weighted mean (:meth:`RoundAggregation.aggregate_secure`, with central DP's noise added to it
and charged), which the strategy aggregates as its round's one update.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flctl.aggregation import (
    DpFedAvg,
    FedAvg,
    LocalDpFedAvg,
    MaskedSum,
    PrivateStrategy,
    RunningSum,
    SecureMean,
    Strategy,
    SumOverflowError,
    Unmasker,
    WeightedUpdate,
    cap_weights,
)
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.dp import PRIVACY_PREFIX
from flctl.core.errors import IntegrityError, RoundFailedError
from flctl.privacy import SampledGaussianRound, noise_std
from flctl.store import BlobStore, ModelRecord, SqlStore
from flctl.tensors import (
    FollowingHasher,
    Quantizer,
    load_parameters,
    save_parameters,
    sha256_file,
)

from ._events import EventLog
from ._privacy_round import PrivacyRounds
from ._scoring import RoundUpdates
from ._streaming import MAX_STREAMED_UPDATES, RoundStream

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
        #: the round's accepted updates, scored (and summed) as they come
        self._updates = RoundUpdates(config=config, store=store, blobs=blobs, events=events)
        #: the round's FedAvg computed while its updates upload (``[strategy] streaming``)
        self._stream: RoundStream | None = None
        #: how the last round aggregated: "streamed" (while the updates uploaded),
        #: "incremental" (from the running sum), "whole" (every update read at the end),
        #: "private" (the strategy given the private mean) or "secure" (the unmasked mean of
        #: a secure round)
        self.last_mode = ""
        #: why the last round's model holds a NaN or an Inf ("": it does not), when the
        #: aggregation checked it as it wrote the model; None: not checked
        self.last_non_finite: str | None = None

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
        """The strategy's extra fit config per selected client, checked.

        Raises:
            RoundFailedError: It named a client that was not selected, or gave a key or value
                a task config cannot carry, or one of the ``flctl.privacy.*`` keys the engine
                sets.
        """
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
                if isinstance(key, str) and key.startswith(PRIVACY_PREFIX):
                    raise RoundFailedError(
                        f"strategy {name!r}: configure_fit gave {client_id!r} {key!r}: the "
                        f"{PRIVACY_PREFIX}* keys are the coordinator's ([privacy])"
                    )
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
        weights = self._cap(claims)
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
                extra={
                    "round": server_round,
                    "client": update.client_id,
                    "request_id": update.task_id,
                },
            )
            self._events.emit(
                ev.UpdateClamped(
                    claimed=claimed,
                    used=used,
                    bound=bound,
                    share=round(used / total, 6),
                    max_examples_per_update=rounds.max_examples_per_update,
                    max_weight_share=rounds.max_weight_share,
                ),
                server_round=server_round,
                client_id=update.client_id,
            )
        return weights

    def _cap(self, claims: list[int]) -> list[int]:
        """The weights of the claimed example counts, capped by ``[rounds]``."""
        return cap_weights(
            claims,
            max_examples=self._config.rounds.max_examples_per_update,
            max_share=self._config.rounds.max_weight_share,
        )

    # ------------------------------------------------------------------ incremental

    def start_round(
        self,
        server_round: int,
        base_digest: str,
        accepted: Sequence[Any],
        *,
        selected: Sequence[str] = (),
    ) -> None:
        """A round trains from ``base_digest``: take its updates one by one as they are accepted.

        A :class:`~flctl.aggregation.RunningSum` takes each accepted update in a worker thread
        while the round waits for the others (``accepted``: those a resumed round already
        holds, taken again in their order): for a mean-based strategy without privacy (unless
        ``[strategy] incremental = false``) it adds the update to the round's sum first, then,
        when no update waits to be added, scores it (``update.scored``); see
        :class:`RoundUpdates`.

        With ``selected`` (the round waits for exactly these clients, at most
        :data:`MAX_STREAMED_UPDATES`) and a strategy that aggregates as FedAvg does, without
        privacy or the running sum, the round's model is also computed while the updates
        upload (:class:`RoundStream`, ``[strategy] streaming``): :meth:`upload_begun` and
        :meth:`update_accepted` hand it their files.
        """
        self.end_round()
        if 0 < len(selected) <= MAX_STREAMED_UPDATES and self._streams():
            self._stream = RoundStream(
                server_round,
                selected,
                self._blobs.path(base_digest),
                base_digest,
                self._blobs,
                self._cap,
                min_free_bytes=int(self._config.server.min_free_mb * (1 << 20)),
            )
        self._updates.start(
            server_round, self._blobs.path(base_digest), keep_sum=self._incremental()
        )
        for record in accepted:
            self.update_accepted(server_round, record)

    def upload_begun(
        self, server_round: int, client_id: str, part: Path, size: int, num_examples: int
    ) -> None:
        """``client_id`` began (or resumed) uploading its update for the round to ``part``."""
        stream = self._stream
        if stream is not None and stream.server_round == server_round:
            stream.offer(client_id, part, size, num_examples)
            self._streaming_now(stream)

    def update_refused(self, server_round: int, client_id: str) -> None:
        """``client_id``'s update for the round was refused for good: the round cannot take it."""
        stream = self._stream
        if stream is not None and stream.server_round == server_round:
            stream.refused(client_id)

    def update_accepted(self, server_round: int, record: Any) -> None:
        """Add the accepted update ``record`` to the round's sum and score it, in the background."""
        stream = self._stream
        if stream is not None and stream.server_round == server_round and record.digest:
            stream.offer(
                record.client_id,
                self._blobs.path(record.digest),
                int(record.size),
                int(record.num_examples),
            )
            self._streaming_now(stream)
        weight = min(int(record.num_examples), self._config.rounds.max_examples_per_update)
        if weight <= 0 or not record.digest:
            return
        update = WeightedUpdate(self._blobs.path(record.digest), weight, record.client_id)
        self._updates.accepted(server_round, update, int(record.id))

    def end_round(self) -> None:
        """The round ended: its updates still unscored are scored in the background."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.discard()
        self._updates.end()

    async def close(self) -> None:
        """Stop scoring (the coordinator stops): updates not scored yet stay unscored."""
        self.end_round()
        await self._updates.close()

    def _streaming_now(self, stream: RoundStream) -> None:
        """A round aggregating while its updates upload scores them after it commits.

        Two cores: scoring an update (reading it whole) while the others upload and the
        stream sums them slows both, so with ``exclude_outliers = "off"`` (no score needed to
        aggregate) it waits, as it does while a round aggregates whole.
        """
        if stream.started and not stream.stale and self._config.strategy.exclude_outliers == "off":
            self._updates.pause(stream.server_round)

    def _streams(self) -> bool:
        """Whether rounds aggregate while their updates upload (:class:`RoundStream`)."""
        return (
            self._config.strategy.streaming
            and self._config.privacy.mode == "off"
            and not self._incremental()
            # the strategy's model is FedAvg's: the one computation the stream runs
            and type(self.strategy).aggregate is FedAvg.aggregate
        )

    def _incremental(self) -> bool:
        return (
            self._config.strategy.incremental
            and self._config.privacy.mode == "off"
            and self.strategy.is_mean_based
        )

    # ------------------------------------------------------------------ the aggregate

    async def aggregate(
        self,
        server_round: int,
        head: ModelRecord,
        accepted: list[Any],
        mechanism: SampledGaussianRound | None,
        connected: int,
    ) -> tuple[str, str, list[Any], list[int]]:
        """Aggregate the round's accepted updates onto ``head``.

        Returns the new model's digest, its strategy state's digest ("": none), the updates
        it took (all accepted, less the outliers ``exclude_outliers = "drop"`` left out) and
        their weights (capped). The strategy then holds a state no version records yet
        (:meth:`committed` once the round commits).

        With privacy the strategy aggregates the private mean of the round
        (:class:`~flctl.aggregation.PrivateStrategy`), and the release is charged to the
        ledger as soon as it exists, whatever happens next.
        """
        base_path = self._blobs.path(head.digest)
        accepted, whole = await self._updates.judge(
            server_round, base_path, accepted, is_mean_based=self.strategy.is_mean_based
        )
        # every strategy and the clients' metrics weigh an update as capped here, never as
        # claimed: one client's num_examples cannot buy the aggregate
        weights = self.weights(server_round, accepted)
        updates = [
            WeightedUpdate(self._blobs.path(u.digest), weight, u.client_id)
            for u, weight in zip(accepted, weights, strict=True)
        ]
        self._state_digest = None  # the strategy moves on; a round that fails reloads
        self.last_non_finite = None
        if mechanism is None:
            running = None if whole is not None else self._updates.running_sum(server_round)
            if running is not None:
                self.last_mode = "incremental"
                try:
                    digest, state_digest = await asyncio.to_thread(
                        self._aggregate_running, running, updates
                    )
                except SumOverflowError as exc:  # values near the float range: weigh first
                    log.info(
                        "round %d: %s: aggregating whole",
                        server_round,
                        exc,
                        extra={"round": server_round},
                    )
                    running = None
            stream = self._stream
            if running is None and stream is not None and stream.server_round == server_round:
                import time as _t

                _a = _t.perf_counter()
                taken = await stream.take(updates)
                _b = _t.perf_counter()
                if taken is not None:
                    temp, digest, self.last_non_finite = taken
                    self.last_mode = "streamed"
                    digest, state_digest = await asyncio.to_thread(
                        self._commit_streamed, temp, digest
                    )
                    return digest, state_digest, accepted, weights
            if running is None:
                self.last_mode = "whole"
                digest, state_digest = await asyncio.to_thread(
                    self._aggregate_stateful, base_path, updates, self.strategy
                )
            return digest, state_digest, accepted, weights
        self.last_mode = "private"
        if self._config.privacy.mode == "local":
            private = PrivateStrategy(self.strategy, LocalDpFedAvg())
            digest, state_digest = await asyncio.to_thread(
                self._aggregate_stateful, base_path, updates, private
            )
            return digest, state_digest, accepted, weights
        denominator = self._privacy.denominator(connected)
        clip_norm = self._privacy.clip_norm()
        adaptive = self._privacy.adaptive(denominator)
        z = mechanism.noise_multiplier
        release = DpFedAvg(
            clip_norm,
            z if adaptive is None else adaptive.update_noise_multiplier(z),
            denominator,
            adaptive=adaptive,
        )
        private = PrivateStrategy(self.strategy, release)
        try:
            digest, state_digest = await asyncio.to_thread(
                self._aggregate_stateful, base_path, updates, private
            )
        finally:
            if private.has_released:
                # the noisy mean exists: the round is spent, whether it commits or not
                fraction = private.last_unclipped_fraction
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
        return digest, state_digest, accepted, weights

    async def aggregate_secure(
        self,
        server_round: int,
        head: ModelRecord,
        masked: MaskedSum,
        *,
        unmask: Unmasker,
        quantizer: Quantizer,
        num_inputs: int,
        mechanism: SampledGaussianRound | None,
        connected: int,
    ) -> tuple[str, str, SecureMean]:
        """Aggregate a secure round: its unmasked weighted mean, then the strategy on it.

        Returns the new model's digest, its strategy state's digest ("": none) and what the
        mean was made of. With central DP (``mechanism``) each client clipped its delta and
        weighed it 1: the sum is divided by the round's fixed denominator and noised, and the
        release is charged as soon as it is written, whatever happens next.
        """
        base = self._blobs.path(head.digest)
        self._state_digest = None  # the strategy moves on; a round that fails reloads
        self.last_mode = "secure"
        self.last_non_finite = None
        denominator: float | None = None
        std = 0.0
        clip_norm = self._privacy.clip_norm()
        if mechanism is not None:
            denominator = self._privacy.denominator(connected)
            std = noise_std(mechanism.noise_multiplier, clip_norm, denominator)
        mean, handle = self._blobs.temp_file()
        handle.close()
        try:
            info = await asyncio.to_thread(
                masked.write_mean,
                base,
                mean,
                unmask=unmask,
                quantizer=quantizer,
                num_inputs=num_inputs,
                denominator=denominator,
                noise_std=std,
            )
            if mechanism is not None:
                # the noised mean exists: the round is spent, whether it commits or not
                await self._privacy.charge(server_round, mechanism, clip_norm=clip_norm)
            digest, state_digest = await asyncio.to_thread(self._aggregate_mean, base, mean)
        finally:
            mean.unlink(missing_ok=True)
        return digest, state_digest, info

    def _aggregate_mean(self, base: Path, mean: Path) -> tuple[str, str]:
        """The strategy's model from the round's mean (a file it may take), stored."""
        temp, handle = self._blobs.temp_file()
        handle.close()
        try:
            self.strategy.aggregate_mean(base, mean, temp)
            digest = self._blobs.commit_temp(temp, sha256_file(temp))
        finally:
            temp.unlink(missing_ok=True)
        return digest, self._store_state()

    def committed(self, state_digest: str) -> None:
        """The round committed: the strategy holds the state recorded with the new version."""
        self._state_digest = state_digest

    def _aggregate_stateful(
        self, base: Path, updates: list[WeightedUpdate], strategy: Strategy
    ) -> tuple[str, str]:
        """Aggregate with ``strategy``, all updates at once.

        Returns the model's digest and the strategy state's ("": none).
        """
        temp, handle = self._blobs.temp_file()
        handle.close()
        try:
            writer = strategy.inner if isinstance(strategy, PrivateStrategy) else strategy
            if writer.writes_in_order:
                # hashed while it is written, on the other core: no pass of its own after
                with FollowingHasher(temp) as hasher:
                    strategy.aggregate(base, updates, temp)
                digest = hasher.digest() or sha256_file(temp)
            else:
                strategy.aggregate(base, updates, temp)
                digest = sha256_file(temp)
            digest = self._blobs.commit_temp(temp, digest)
        finally:
            temp.unlink(missing_ok=True)
        return digest, self._store_state()

    def _commit_streamed(self, temp: Path, digest: str) -> tuple[str, str]:
        """Store the model the stream wrote (hashed as it was written)."""
        try:
            digest = self._blobs.commit_temp(temp, digest)
        finally:
            temp.unlink(missing_ok=True)
        return digest, self._store_state()

    def _aggregate_running(
        self, running: RunningSum, updates: list[WeightedUpdate]
    ) -> tuple[str, str]:
        """Aggregate from the running sum, settled to ``updates`` (incremental)."""
        running.settle(updates)
        mean, handle = self._blobs.temp_file()
        handle.close()
        temp, handle = self._blobs.temp_file()
        handle.close()
        try:
            running.write_mean(mean)
            self.strategy.aggregate_mean(running.base, mean, temp)
            digest = self._blobs.commit_temp(temp, sha256_file(temp))
        finally:
            mean.unlink(missing_ok=True)
            temp.unlink(missing_ok=True)
        return digest, self._store_state()

    def _store_state(self) -> str:
        """Store the strategy's state as a blob; its digest ("": the strategy keeps none)."""
        state = self.strategy.state_dict()
        if not state:
            return ""
        temp, handle = self._blobs.temp_file()
        handle.close()
        try:
            save_parameters(state, temp)
            return self._blobs.commit_temp(temp, sha256_file(temp))
        finally:
            temp.unlink(missing_ok=True)
