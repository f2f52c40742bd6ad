"""Where the head model moves besides a commit: rollbacks, now or deferred, and the gate's verdicts.

An admin's rollback applies at once when no round runs, else it waits in the store
(``pending_rollbacks``) until the running round ends (:meth:`Heads.apply_pending`). A round the
validation gate rejects (:meth:`Heads.reject`, docs/registry.md) is stored as a ``rejected``
version and the head stays; after ``gate.rollback_after`` rejections in a row the policy rolls
back to the best version, with author ``policy``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from flctl.core import Config
from flctl.core import events as ev
from flctl.core.errors import FlctlError
from flctl.store import ModelRecord, PendingRollbackRecord, SqlStore

from ._events import EventLog
from ._gate import (
    Verdict,
    best_version,
    check_metrics,
    metric_value,
    reference_version,
    rejected_streak,
)

__all__ = ["POLICY_AUTHOR", "Heads", "PendingRollback"]

log = logging.getLogger("flctl.coordinator")

#: The author of the rollbacks the validation gate's policy makes (``gate.rollback_after``).
POLICY_AUTHOR = "policy"

#: A rollback asked for while a round ran (kept in the store: it survives a restart).
PendingRollback = PendingRollbackRecord


class Heads:
    """Rollbacks and the gate's rejections: every move of the head but a round's commit."""

    def __init__(
        self,
        config: Config,
        store: SqlStore,
        events: EventLog,
        busy_round: Callable[[], int | None],
    ) -> None:
        self._config = config
        self._store = store
        self._events = events
        #: the round being run, if any (a rollback asked meanwhile waits for it)
        self._busy_round = busy_round

    @property
    def pending(self) -> list[PendingRollback]:
        """Rollbacks waiting for the running round to end (read from the store)."""
        return self._store.pending_rollbacks()

    def rollback(
        self, source: int, *, author: str, reason: str = ""
    ) -> ModelRecord | PendingRollback:
        """Make version ``source``'s weights the head: now, or when the running round ends.

        A deferred rollback is stored with its ``model.rollback_deferred`` event, in one
        transaction, so that a coordinator restarted before the round ends still applies it.

        Returns:
            The new head version, or the :class:`PendingRollback` queued behind the round.

        Raises:
            NotFoundError: No such version.
            ConflictError: The head already holds those weights (applied at once only).
        """
        busy = self._busy_round()
        if busy is None:
            return self.apply_rollback(source, author=author, reason=reason)
        with self._store.transaction():
            target = self._store.get_model(source)
            pending = self._store.defer_rollback(
                source, author=author, reason=reason, server_round=busy
            )
            self._events.emit(
                ev.ModelRollbackDeferred(
                    source=source,
                    digest=target.digest,
                    server_round=busy,
                    author=author,
                    reason=reason,
                ),
                server_round=busy,
            )
        log.info("rollback to version %d deferred until round %d ends", source, busy)
        return pending

    def apply_rollback(
        self, source: int, *, author: str, reason: str, pending_id: int | None = None
    ) -> ModelRecord:
        """Move the head, record the event and drop the pending row: one transaction."""
        with self._store.transaction():
            previous = self._store.head()
            new = self._store.set_head(source, author=author, reason=reason)
            self._events.emit(
                ev.ModelRollback(
                    version=new.version,
                    digest=new.digest,
                    source=source,
                    previous_head=None if previous is None else previous.version,
                    author=author,
                    reason=reason,
                )
            )
            if pending_id is not None:
                self._store.drop_pending_rollback(pending_id)
        log.info("rolled back to version %d: head is version %d", source, new.version)
        return new

    def apply_pending(self, *, keep_round: int | None = None) -> None:
        """Apply the deferred rollbacks in order, but those waiting for ``keep_round``.

        ``keep_round`` is a round still open (resumed after a restart). A rollback that cannot
        apply is dropped with a ``model.rollback_failed`` event.
        """
        for item in self._store.pending_rollbacks():
            if keep_round is not None and item.server_round == keep_round:
                continue
            try:
                self.apply_rollback(
                    item.source, author=item.author, reason=item.reason, pending_id=item.id
                )
            except FlctlError as exc:
                log.warning("deferred rollback to version %d failed: %s", item.source, exc.message)
                with self._store.transaction():
                    self._events.emit(
                        ev.ModelRollbackFailed(
                            source=item.source,
                            server_round=item.server_round,
                            author=item.author,
                            reason=item.reason,
                            error=exc.message,
                        ),
                        server_round=item.server_round,
                    )
                    self._store.drop_pending_rollback(item.id)

    def check_metrics(self, metrics: Mapping[str, float], head: ModelRecord) -> Verdict:
        """The gate's verdict on a round's metrics, against the reference version."""
        gate = self._config.gate
        reference = None
        if gate.mode == "metric":
            models = [] if gate.against == "head" else self._store.list_models()
            reference = reference_version(gate, head=head, models=models)
        return check_metrics(gate, metrics, reference)

    def reject(
        self,
        server_round: int,
        digest: str,
        metrics: Mapping[str, float],
        num_clients: int,
        started: float,
        verdict: Verdict,
    ) -> None:
        """Store the aggregate as a rejected version; the head stays; then the policy."""
        kept = {k: v for k, v in metrics.items() if math.isfinite(v)}  # JSON has no NaN
        with self._store.transaction():
            model = self._store.commit_round(
                server_round,
                digest=digest,
                metrics=kept,
                num_clients=num_clients,
                status="rejected",
                reason=verdict.reason,
            )
            self._events.emit(
                verdict.rejected_event(model, kept, self._config.gate), server_round=server_round
            )
            self._events.emit(
                ev.RoundRejected(
                    model_version=model.version,
                    metrics=kept,
                    num_clients=num_clients,
                    duration_s=time.time() - started,
                    reason=verdict.reason,
                ),
                server_round=server_round,
            )
        log.warning(
            "round %d rejected by the validation gate: model version %d kept, head stays: %s",
            server_round,
            model.version,
            verdict.reason,
            extra={"round": server_round},
        )
        self._rollback_policy(server_round)

    def _rollback_policy(self, server_round: int) -> None:
        """After ``gate.rollback_after`` rejected rounds in a row, roll back to the best version.

        It acts at every multiple of ``rollback_after``, so when it cannot (the head already
        holds the best weights, no version has the metric) it says so once per streak of that
        length instead of once per round. A rollback an admin asked for during this round
        takes precedence: it is applied when the round ends.
        """
        gate = self._config.gate
        head = self._store.head()
        if not gate.rollback_after or head is None:
            return
        models = self._store.list_models()
        streak = rejected_streak(models, head)
        if not streak or len(streak) % gate.rollback_after:
            return
        if any(p.server_round == server_round for p in self._store.pending_rollbacks()):
            log.info(
                "rollback policy skipped: a rollback asked for during round %d comes first",
                server_round,
            )
            return
        rounds = ", ".join(str(m.server_round) for m in streak[-gate.rollback_after :])
        best = best_version(models, gate.metric, gate.better)
        why = ""
        if best is None:
            why = f"no version has a finite {gate.metric!r}"
        elif best.digest == head.digest:
            why = f"the head (version {head.version}) already holds the best version's weights"
        if best is None or why:
            message = (
                f"rollback policy: {len(streak)} rounds in a row rejected by the validation "
                f"gate (last {rounds}), but {why}: the head stays"
            )
            log.warning("%s", message)
            self._events.emit(
                ev.CoordinatorWarning(message=message, author=POLICY_AUTHOR),
                server_round=server_round,
            )
            return
        value = metric_value(best, gate.metric)
        reason = (
            f"rollback_after: {gate.rollback_after} rounds in a row rejected by the validation "
            f"gate (rounds {rounds}); version {best.version} has the best {gate.metric} "
            f"({value:.4f})"
        )
        try:
            self.apply_rollback(best.version, author=POLICY_AUTHOR, reason=reason)
        except FlctlError as exc:  # the store refused: report it, the round itself is over
            log.warning("rollback policy failed: %s", exc.message)
            self._events.emit(
                ev.CoordinatorWarning(
                    message=f"rollback policy failed: {exc.message}", author=POLICY_AUTHOR
                ),
                server_round=server_round,
            )
