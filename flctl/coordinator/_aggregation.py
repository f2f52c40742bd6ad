"""How a round aggregates: the strategy, its state between rounds, the updates' weights.

:class:`RoundAggregation` holds the job's strategy (``[strategy]``, docs/strategies.md) for the
round engine. Before each round it gives the strategy the state recorded with the head version
(:meth:`RoundAggregation.sync_state`); when the tasks are sent it asks for the clients' extra fit
config (:meth:`~RoundAggregation.configure_fit`).

While the round trains, each accepted update is added to the round's
:class:`~flctl.aggregation.RunningSum` in a worker thread (:meth:`~RoundAggregation.start_round`,
:meth:`~RoundAggregation.update_accepted`): for a mean-based strategy
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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.aggregation import (
    AnomalyScores,
    DpFedAvg,
    LocalDpFedAvg,
    PrivateStrategy,
    RunningSum,
    Strategy,
    SumOverflowError,
    WeightedUpdate,
    cap_weights,
    find_outliers,
    round_median_distances,
)
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.dp import PRIVACY_PREFIX
from flctl.core.errors import FlctlError, IntegrityError, RoundFailedError
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
        #: the round's running sum (incremental aggregation), while it trains
        self._running: _Running | None = None
        #: how the last round aggregated: "incremental" (from the running sum), "whole" (every
        #: update read at the end) or "private" (the strategy given the private mean)
        self.last_mode = ""

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

    # ------------------------------------------------------------------ incremental

    def start_round(self, server_round: int, base_digest: str, accepted: Sequence[Any]) -> None:
        """A round trains from ``base_digest``: take its updates one by one as they are accepted.

        A :class:`~flctl.aggregation.RunningSum` scores each accepted update (``update.scored``)
        in a worker thread while the round waits for the others (``accepted``: those a resumed
        round already holds, scored again in their order), and, for a mean-based strategy
        without privacy, adds it to the round's sum unless ``[strategy] incremental = false``.
        """
        self.end_round()
        running = RunningSum(
            self._blobs.path(base_digest), self._blobs.tmp_dir, keep_sum=self._incremental()
        )
        self._running = _Running(server_round, running, asyncio.Queue())
        self._running.worker = asyncio.create_task(
            self._take_updates(self._running), name=f"flctl-round-{server_round}-updates"
        )
        for record in accepted:
            self.update_accepted(server_round, record)

    def update_accepted(self, server_round: int, record: Any) -> None:
        """Score the accepted update ``record`` and add it to the round's sum, in the background."""
        running = self._running
        if running is None or running.server_round != server_round or running.broken:
            return
        weight = min(int(record.num_examples), self._config.rounds.max_examples_per_update)
        if weight <= 0 or not record.digest:
            return
        update = WeightedUpdate(self._blobs.path(record.digest), weight, record.client_id)
        running.queue.put_nowait((update, int(record.id)))

    def end_round(self) -> None:
        """Drop the round's running sum (the round ended)."""
        running, self._running = self._running, None
        if running is not None and running.worker is not None:
            running.worker.cancel()

    def _incremental(self) -> bool:
        return (
            self._config.strategy.incremental
            and self._config.privacy.mode == "off"
            and self.strategy.is_mean_based
        )

    async def _take_updates(self, running: _Running) -> None:
        while True:
            update, update_id = await running.queue.get()
            try:
                if not running.broken:
                    scores = await asyncio.to_thread(running.sum.add, update)
                    running.scores[update.client_id] = (update_id, scores)
                    self._record_scores(running.server_round, update.client_id, update_id, scores)
            except FlctlError as exc:  # the whole-round pass reports it, naming the client
                running.broken = exc.message
                log.info("round %d: updates not scored: %s", running.server_round, exc)
            except Exception as exc:  # never lose the round to this shortcut
                running.broken = f"{type(exc).__name__}: {exc}"
                log.exception("round %d: scoring an update failed", running.server_round)
            finally:
                running.queue.task_done()

    def _record_scores(
        self,
        server_round: int,
        client_id: str,
        update_id: int,
        scores: AnomalyScores,
        *,
        outlier: str = "",
        excluded: bool = False,
    ) -> None:
        """Store an update's scores (and the rule's verdict); ``update.scored`` when scored."""
        with self._store.transaction():
            self._store.set_update_scores(
                update_id, scores.to_dict(), outlier=outlier, excluded=excluded
            )
            if not outlier:
                self._events.emit(
                    ev.UPDATE_SCORED,
                    server_round=server_round,
                    client_id=client_id,
                    data=scores.to_dict(),
                    durable=False,
                )

    async def _judge(
        self, server_round: int, base: Path, accepted: list[Any]
    ) -> tuple[list[Any], str | None]:
        """Wait for the round's scores and apply ``exclude_outliers``.

        Returns the accepted updates the aggregate takes (all but those ``"drop"`` leaves
        out), and why the round cannot aggregate from its running sum (None: it can).

        Raises:
            RoundFailedError: Dropping the outliers left fewer than ``min_clients`` updates.
        """
        running = self._running
        if running is None or running.server_round != server_round:
            return accepted, "no running sum"
        await running.queue.join()
        if running.broken:
            return accepted, running.broken
        ids = {u.client_id for u in accepted}
        scores = {c: s for c, (_, s) in running.scores.items() if c in ids}
        if not self.strategy.is_mean_based and self._config.privacy.mode == "off" and scores:
            # whole-round strategies: each update's distance to the round's median
            distances = await asyncio.to_thread(
                round_median_distances,
                base,
                [WeightedUpdate(self._blobs.path(u.digest), 1, u.client_id) for u in accepted],
            )
            for client_id, distance in distances.items():
                if client_id in scores:
                    scores[client_id] = scores[client_id].with_median_distance(distance)
                    update_id = running.scores[client_id][0]
                    self._record_scores(server_round, client_id, update_id, scores[client_id])
        mode = self._config.strategy.exclude_outliers
        if mode == "off":
            return accepted, None
        outliers = find_outliers(scores, threshold=self._config.strategy.outlier_threshold)
        for client_id, outlier in sorted(outliers.items()):
            log.warning("round %d: %s's update: %s", server_round, client_id, outlier.reason)
            with self._store.transaction():
                self._record_scores(
                    server_round,
                    client_id,
                    running.scores[client_id][0],
                    scores[client_id],
                    outlier=outlier.reason,
                    excluded=mode == "drop",
                )
                self._events.emit(
                    ev.UPDATE_EXCLUDED,
                    server_round=server_round,
                    client_id=client_id,
                    data={**outlier.to_dict(), "mode": mode},
                )
        if mode != "drop" or not outliers:
            return accepted, None
        kept = [u for u in accepted if u.client_id not in outliers]
        need = self._config.rounds.min_clients
        if len(kept) < need:
            raise RoundFailedError(
                f"{len(kept)} of {len(accepted)} updates left after dropping "
                f"{len(outliers)} outliers ({', '.join(sorted(outliers))}), fewer than "
                f"min_clients ({need})"
            )
        return kept, None

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
        accepted, whole = await self._judge(server_round, base_path, accepted)
        # every strategy and the clients' metrics weigh an update as capped here, never as
        # claimed: one client's num_examples cannot buy the aggregate
        weights = self.weights(server_round, accepted)
        updates = [
            WeightedUpdate(self._blobs.path(u.digest), weight, u.client_id)
            for u, weight in zip(accepted, weights, strict=True)
        ]
        self._state_digest = None  # the strategy moves on; a round that fails reloads
        if mechanism is None:
            running = None
            if whole is None and self._running is not None and self._running.sum.keep_sum:
                running = self._running.sum
            if running is not None:
                self.last_mode = "incremental"
                try:
                    digest, state_digest = await asyncio.to_thread(
                        self._aggregate_running, running, updates
                    )
                except SumOverflowError as exc:  # values near the float range: weigh first
                    log.info("round %d: %s: aggregating whole", server_round, exc)
                    running = None
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
            strategy.aggregate(base, updates, temp)
            digest = self._blobs.commit_temp(temp, sha256_file(temp))
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


@dataclass
class _Running:
    """A round's running sum and the worker that adds its accepted updates, one at a time."""

    server_round: int
    sum: RunningSum
    #: accepted updates and their row ids, in the order they were accepted
    queue: asyncio.Queue[tuple[WeightedUpdate, int]]
    worker: asyncio.Task[None] | None = None
    #: why the sum cannot be used (an update failed to add): the round aggregates whole
    broken: str = ""
    #: client id -> (update id, scores), as the updates were taken
    scores: dict[str, tuple[int, AnomalyScores]] = field(default_factory=dict)
