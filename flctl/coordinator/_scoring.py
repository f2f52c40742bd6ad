"""A round's updates taken one at a time as they are accepted: scores, outliers, running sum.

:class:`RoundUpdates` keeps, for the round in training, a :class:`~flctl.aggregation.RunningSum`
and the worker that hands it each accepted update in a worker thread while the round waits for
the others: with ``[strategy] incremental = true`` it adds the update to the round's sum first,
then, when no update waits to be added, scores it (``update.scored``). When the wait ends,
:meth:`RoundUpdates.judge` waits for what the aggregate needs and applies ``[strategy]
exclude_outliers`` (docs/strategies.md, Byzantine detection). Updates a round did not score
before it ended are scored after it, in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.aggregation import (
    AnomalyScores,
    RunningSum,
    WeightedUpdate,
    find_outliers,
    round_median_distances,
)
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.errors import FlctlError, RoundFailedError
from flctl.store import BlobStore, SqlStore

from ._events import EventLog

__all__ = ["RoundUpdates"]

log = logging.getLogger("flctl.coordinator")


class RoundUpdates:
    """The accepted updates of the round in training, scored (and summed) as they come."""

    def __init__(
        self, *, config: Config, store: SqlStore, blobs: BlobStore, events: EventLog
    ) -> None:
        self._config = config
        self._store = store
        self._blobs = blobs
        self._events = events
        #: the round's running sum (incremental aggregation) and scores, while it trains
        self._running: _Running | None = None
        #: workers still scoring (a round's, and those of ended rounds finishing their scores)
        self._workers: set[asyncio.Task[None]] = set()

    def start(self, server_round: int, base: Path, *, keep_sum: bool) -> None:
        """A round trains from ``base``: take its updates one by one as they are accepted.

        With ``keep_sum``, each update is added to the round's running sum before it is scored.
        """
        self.end()
        running = RunningSum(base, self._blobs.tmp_dir, keep_sum=keep_sum)
        self._running = _Running(server_round, running)
        self._running.worker = asyncio.create_task(
            self._take_updates(self._running), name=f"flctl-round-{server_round}-updates"
        )
        self._workers.add(self._running.worker)
        self._running.worker.add_done_callback(self._workers.discard)

    def accepted(self, server_round: int, update: WeightedUpdate, update_id: int) -> None:
        """Add the accepted ``update`` to the round's sum and score it, in the background."""
        running = self._running
        if running is None or running.server_round != server_round:
            return
        if running.sum.keep_sum:
            running.to_add.append(update)
        running.to_score.append((update, update_id))
        running.poke()

    def pause(self, server_round: int) -> None:
        """Score nothing new until the round ends (it aggregates now, and needs no score)."""
        running = self._running
        if running is not None and running.server_round == server_round:
            running.paused = True

    def end(self) -> None:
        """The round ended: its updates still unscored are scored in the background."""
        running, self._running = self._running, None
        if running is not None:
            running.to_add.clear()
            running.ended = True
            running.paused = False
            running.poke()

    async def close(self) -> None:
        """Stop scoring (the coordinator stops): updates not scored yet stay unscored."""
        self.end()
        workers = list(self._workers)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    def running_sum(self, server_round: int) -> RunningSum | None:
        """The round's running sum, if it keeps one."""
        running = self._running
        if running is None or running.server_round != server_round or not running.sum.keep_sum:
            return None
        return running.sum

    async def _take_updates(self, running: _Running) -> None:
        """Add each update to the sum, and score each when none waits to be added."""
        try:
            while True:
                if running.to_add and not running.broken:
                    update = running.to_add.popleft()
                    running.busy = "add"
                    try:
                        await asyncio.to_thread(running.sum.add, update)
                    except Exception as exc:  # the whole-round pass reports it, naming the client
                        running.broken = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
                        log.info(
                            "round %d: aggregating whole: %s",
                            running.server_round,
                            exc,
                            extra={"round": running.server_round},
                        )
                elif running.to_score and not running.unscored and not running.paused:
                    update, update_id = running.to_score.popleft()
                    running.busy = "score"
                    try:
                        scores = await asyncio.to_thread(running.sum.score, update)
                    except Exception as exc:  # the round goes on without scores
                        running.unscored = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
                        log.warning(
                            "round %d: updates not scored: %s",
                            running.server_round,
                            exc,
                            extra={"round": running.server_round},
                        )
                    else:
                        running.scores[update.client_id] = (update_id, scores)
                        self._record_scores(
                            running.server_round, update.client_id, update_id, scores
                        )
                elif running.ended:
                    return
                else:
                    running.busy = ""
                    running.progress.set()
                    await running.wake.wait()
                    running.wake.clear()
                    continue
                running.busy = ""
                running.progress.set()
        finally:
            # not running.sum.close(): a pass cancelled here may still run in its thread; the
            # scratch file closes when the last reference to the sum goes (weakref.finalize)
            running.to_add.clear()
            running.to_score.clear()

    async def _settled(self, running: _Running, *, scores: bool) -> None:
        """Wait until every accepted update is in the sum (and scored, with ``scores``)."""
        while True:
            summed = running.broken or not (running.to_add or running.busy == "add")
            scored = (
                not scores
                or bool(running.unscored)
                or not (running.to_score or running.busy == "score")
            )
            if summed and scored:
                return
            running.progress.clear()
            await running.progress.wait()

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
        try:
            with self._store.transaction():
                self._store.set_update_scores(
                    update_id, scores.to_dict(), outlier=outlier, excluded=excluded
                )
                if not outlier:
                    self._events.emit(
                        ev.UpdateScored(**scores.to_dict()),
                        server_round=server_round,
                        client_id=client_id,
                        durable=False,
                    )
        except FlctlError as exc:  # the store is closing, the disk is full: scores are extra
            log.warning(
                "round %d: scores of %s not recorded: %s",
                server_round,
                client_id,
                exc,
                extra={"round": server_round, "client": client_id},
            )

    async def judge(
        self, server_round: int, base: Path, accepted: list[Any], *, is_mean_based: bool
    ) -> tuple[list[Any], str | None]:
        """Wait for the round's sum (and scores), and apply ``exclude_outliers``.

        Returns the accepted updates the aggregate takes (all but those ``"drop"`` leaves
        out), and why the round cannot aggregate from its running sum (None: it can).

        With ``exclude_outliers = "off"`` the round does not wait for its scores: those not
        taken yet are taken after it commits.

        Raises:
            RoundFailedError: Dropping the outliers left fewer than ``min_clients`` updates.
        """
        running = self._running
        if running is None or running.server_round != server_round:
            return accepted, "no running sum"
        mode = self._config.strategy.exclude_outliers
        # "off": the round needs no score; scoring waits for the commit (two cores: it would
        # slow the aggregate down)
        running.paused = mode == "off"
        await self._settled(running, scores=mode != "off")
        whole = running.broken or (None if running.sum.keep_sum else "no sum kept")
        if mode == "off":
            return accepted, whole
        if running.unscored:
            log.warning(
                "round %d: exclude_outliers %s skipped: %s",
                server_round,
                mode,
                running.unscored,
                extra={"round": server_round},
            )
            return accepted, whole
        ids = {u.client_id for u in accepted}
        scores = {c: s for c, (_, s) in running.scores.items() if c in ids}
        if not is_mean_based and scores:
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
        outliers = find_outliers(scores, threshold=self._config.strategy.outlier_threshold)
        for client_id, outlier in sorted(outliers.items()):
            log.warning(
                "round %d: %s's update: %s",
                server_round,
                client_id,
                outlier.reason,
                extra={"round": server_round, "client": client_id},
            )
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
                    ev.UpdateExcluded(**outlier.to_dict(), mode=mode),
                    server_round=server_round,
                    client_id=client_id,
                )
        if mode != "drop" or not outliers:
            return accepted, whole
        kept = [u for u in accepted if u.client_id not in outliers]
        need = self._config.rounds.min_clients
        if len(kept) < need:
            raise RoundFailedError(
                f"{len(kept)} of {len(accepted)} updates left after dropping "
                f"{len(outliers)} outliers ({', '.join(sorted(outliers))}), fewer than "
                f"min_clients ({need})"
            )
        return kept, whole


@dataclass
class _Running:
    """A round's running sum and the worker that takes its accepted updates, one at a time."""

    server_round: int
    sum: RunningSum
    #: accepted updates not yet in the sum, in the order they were accepted
    to_add: deque[WeightedUpdate] = field(default_factory=deque)
    #: accepted updates (and their row ids) not yet scored, in the order they were accepted
    to_score: deque[tuple[WeightedUpdate, int]] = field(default_factory=deque)
    #: what the worker is doing: "add", "score" or "" (waiting)
    busy: str = ""
    #: why the sum cannot be used (an update failed to add): the round aggregates whole
    broken: str = ""
    #: why the round's updates are not scored (an update failed to score)
    unscored: str = ""
    #: the round ended: score what is left, then stop
    ended: bool = False
    #: score nothing new until the round ends (it aggregates without scores)
    paused: bool = False
    #: client id -> (update id, scores), as the updates were scored
    scores: dict[str, tuple[int, AnomalyScores]] = field(default_factory=dict)
    worker: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def poke(self) -> None:
        """Tell the worker there is something new."""
        self.wake.set()
