"""The round engine: an explicit state machine, every transition persisted as it happens.

```
queued -> selecting -> training -> aggregating -> evaluating -> committed | rejected (reason)
              |            |             |              |
              +------------+-------------+--------------+-----> failed (reason) | cancelled
```

Rounds run one at a time, in id order. A round waits up to ``quorum_timeout_s`` for
``min_clients`` connected clients, sends each selected client a task, and waits until every
selected client still connected has answered or the deadline passes; it then commits if it has
at least ``min_clients`` accepted updates, and fails with the reason otherwise. The head model
only moves by a committed round, or by a rollback an admin asks for: one asked while a round
runs (from selecting to evaluating) waits in :attr:`RoundEngine.pending` and is applied as soon
as that round ends, committed or failed, before the next round reads the head.

With a ``[gate]`` (docs/registry.md), the aggregate must pass the validation gate
(``_gate.py``) before the round commits: one that holds NaN or Inf, or whose metric regressed
past ``gate.max_regression``, is stored as a version with status ``rejected`` and the round
ends ``rejected`` with the reason (``model.rejected`` and ``round.rejected`` events); the head
stays. After ``gate.rollback_after`` rejected rounds in a row the engine rolls back to the best
version, with author ``policy`` (a ``model.rollback`` event like any other).

An update aggregates with its client's ``num_examples`` as weight, bounded first: by
``rounds.max_examples_per_update``, then so that none holds more than
``rounds.max_weight_share`` of the round's total (:func:`~flctl.aggregation.cap_weights`); each
update weighed less than it claimed is an ``update.clamped`` event. An update the upload path
refused as malformed is final for its task: the round sends that client no task again and
answers a new upload for the task at once (:meth:`RoundEngine.refuse`); it stops waiting for
the client when the client reports the task failed (flctl's client does), as for any failed
task, or at the deadline.

With ``[privacy] mode = "central"`` (docs/privacy.md), before a round selects anyone the engine
computes the epsilon the privacy ledger would reach with this round; above ``epsilon_budget``
the round fails ("privacy budget exhausted: ...") with a ``privacy.refused`` event and nothing
is sent. Otherwise clients are sampled as ``privacy.sampling`` says (no over-selection), the
updates are aggregated with :class:`~flctl.aggregation.DpFedAvg`, and the round is charged to
the ``dp_ledger`` table as soon as the noisy aggregate exists, whatever happens next. With
``adaptive_clip`` the clip norm moves after each charged round (the ledger keeps it).

With ``mode = "local"`` the same budget check runs before each round; the task tells each
client to clip and noise its own update (:class:`~flctl.core.dp.TaskPrivacy`), the updates are
averaged with :class:`~flctl.aggregation.LocalDpFedAvg`, and the round is charged as soon as
one noised update has been accepted (at the latest when the wait for updates ends, and at the
next start for a round a crash interrupted: :meth:`charge_released`).

No round starts from a head model whose blob no longer hashes to its digest (or is missing):
:class:`~flctl.coordinator._integrity.ModelCheck` hashes the head before it is first served,
and each round queued meanwhile fails at once with its reason (which names the digest and the
rollback that restores service), without selecting anyone and without a retry.

A restarted coordinator resumes the round that was open when it stopped (:meth:`resume`): the
selected clients, their task ids and the deadline are persisted when training starts, and
updates are durable once acknowledged, so the round carries on waiting (clients that have not
reconnected yet are given ``rounds.rejoin_grace_s`` to come back) and commits as it would
have. The same grace applies to any selected client whose task stream closes mid-round: the
round waits that long for it to rejoin (its task is sent again) before going on without it.
A client whose task stream opens while it is selected and has not reported is sent its task
again.

The strategy (``[strategy]``, docs/strategies.md) is asked at fixed points of a round. When the
tasks are sent, :meth:`Strategy.configure_fit` may add config for each selected client (its
keys win over ``[task]``'s; ``server_round`` and the privacy entries stay the engine's); what it
answered is stored with the round, so a resumed round sends the same. After a round commits,
the strategy's :meth:`Strategy.state_dict`, when not empty, is stored as a safetensors blob
recorded with the new version (``models.state_digest``). Before each round the strategy holds
the state recorded with the version the head points at (:meth:`RoundEngine.sync_state`): after
a restart, a rollback or a round that did not commit, it gets that state back with
:meth:`Strategy.load_state_dict` (or starts over, built anew, where the head has none). With
``[privacy]`` on, DP-FedAvg aggregates instead, and the strategy is not asked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.aggregation import (
    DpFedAvg,
    EvaluateResult,
    LocalDpFedAvg,
    Strategy,
    WeightedUpdate,
    cap_weights,
)
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.dp import TaskPrivacy
from flctl.core.errors import BudgetExhaustedError, FlctlError, IntegrityError, RoundFailedError
from flctl.privacy import (
    Accountant,
    AccountantName,
    AdaptiveClipping,
    SampledGaussianRound,
    default_count_stddev,
    local_round,
)
from flctl.store import (
    BlobStore,
    LedgerRecord,
    ModelRecord,
    PendingRollbackRecord,
    RoundRecord,
    SqlStore,
    charge,
    ledger,
)
from flctl.tensors import load_parameters, save_parameters, sha256_file
from flctl.transport.grpc import pb, to_value_map

from ._events import EventLog
from ._gate import (
    Verdict,
    best_version,
    check_metrics,
    metric_value,
    non_finite_tensors,
    reference_version,
    rejected_streak,
)
from ._integrity import ModelCheck
from ._registry import Registry
from ._uploads import PartialUploads

__all__ = ["Evaluator", "PendingRollback", "RoundEngine", "end_round"]

log = logging.getLogger("flctl.coordinator")

#: The author of the rollbacks the validation gate's policy makes (``gate.rollback_after``).
POLICY_AUTHOR = "policy"

#: Server-side evaluation: model file -> (loss, metrics). Runs in a worker thread.
Evaluator = Callable[[Path], tuple[float, dict[str, float]]]


@dataclass
class _OpenRound:
    """What the engine and the upload path share about the round in training."""

    server_round: int
    base_digest: str
    selected: dict[str, str]  # client id -> task id
    deadline: float
    changed: asyncio.Event
    model_size: int = 0
    #: accepted updates that end the wait (N of N + over_selection); 0: every selected client
    target: int = 0
    #: selected clients without an open task stream, and since when (rejoin grace)
    absent_since: dict[str, float] = field(default_factory=dict)
    #: clients whose update was accepted (kept in memory: the upload path asks on every call)
    reported: set[str] = field(default_factory=set)
    #: clients whose update for their task was refused as malformed, and why: final
    refused: dict[str, str] = field(default_factory=dict)
    #: client id -> the extra fit config the strategy gave it (configure_fit)
    fit_config: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Evaluation:
    """The clients' evaluation of a round's new model, while the engine waits for it."""

    server_round: int
    digest: str
    model_size: int
    tasks: dict[str, str]  # client id -> task id
    deadline: float
    config: dict[str, dict[str, Any]]
    changed: asyncio.Event
    results: dict[str, EvaluateResult] = field(default_factory=dict)
    #: client id -> why its evaluation failed (its evaluate raised, its report was refused)
    failed: dict[str, str] = field(default_factory=dict)

    def answered(self, client_id: str) -> bool:
        return client_id in self.results or client_id in self.failed


#: A rollback asked for while a round ran (kept in the store: it survives a restart).
PendingRollback = PendingRollbackRecord


class RoundEngine:
    """Runs queued rounds; see the module docstring for the state machine."""

    def __init__(
        self,
        *,
        config: Config,
        store: SqlStore,
        blobs: BlobStore,
        events: EventLog,
        registry: Registry,
        strategy: Strategy,
        evaluator: Evaluator | None,
        uploads: PartialUploads | None = None,
        check: ModelCheck | None = None,
        new_strategy: Callable[[], Strategy] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._blobs = blobs
        self._events = events
        self._registry = registry
        self._strategy = strategy
        #: builds the strategy afresh, for a head that has no state (default: ``strategy``
        #: loads an empty state)
        self._new_strategy = new_strategy
        #: the state digest the strategy holds ("" none: as built); None: unknown (it
        #: aggregated a round that did not commit)
        self._state_digest: str | None = ""
        self._evaluator = evaluator
        self._uploads = uploads
        self._check = check
        self._resume: RoundRecord | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        #: (when, what) the last write that did not fit on the disk; cleared by the next
        #: accepted update (round status shows it meanwhile)
        self.storage_warning: tuple[float, str] | None = None
        self._draining = False
        self._cancel: tuple[int, str] | None = None  # (round, reason) asked to end
        self._rng = random.SystemRandom()
        self.open: _OpenRound | None = None
        #: the round whose clients are evaluating its new model (rounds.evaluate "clients")
        self.evaluation: _Evaluation | None = None
        self.current: int | None = None

    # ------------------------------------------------------------------ control

    def notify(self) -> None:
        """A round was queued: look at the queue again."""
        self._wake.set()

    @property
    def min_clients(self) -> int:
        """The quorum a round needs to commit."""
        return self._config.rounds.min_clients

    def resume(self, record: RoundRecord) -> None:
        """Carry on with ``record`` (open when the coordinator stopped) before queued rounds."""
        self._resume = record

    def task_for(self, client_id: str) -> pb.Task | None:
        """The open round's task for ``client_id``, if selected and it has not reported."""
        evaluation = self.evaluation
        if evaluation is not None and client_id in evaluation.tasks:
            if evaluation.answered(client_id):
                return None
            return self._evaluate_task(evaluation, client_id)
        open_round = self.open
        if open_round is None or client_id not in open_round.selected:
            return None
        if client_id in open_round.reported or client_id in open_round.refused:
            return None
        return self._task(open_round, client_id)

    def _task(self, open_round: _OpenRound, client_id: str) -> pb.Task:
        task = pb.Task(
            server_round=open_round.server_round,
            task_id=open_round.selected[client_id],
            kind="fit",
            model_digest=open_round.base_digest,
            model_size=open_round.model_size,
            deadline_unix=open_round.deadline,
        )
        to_value_map(
            task.config,
            {
                **self._config.task,
                **open_round.fit_config.get(client_id, {}),
                "server_round": open_round.server_round,
                # the client applies these (local DP: clip and noise before upload)
                **TaskPrivacy.of(self._config.privacy).task_entries(),
            },
        )
        return task

    def _evaluate_task(self, evaluation: _Evaluation, client_id: str) -> pb.Task:
        task = pb.Task(
            server_round=evaluation.server_round,
            task_id=evaluation.tasks[client_id],
            kind="evaluate",
            model_digest=evaluation.digest,
            model_size=evaluation.model_size,
            deadline_unix=evaluation.deadline,
        )
        to_value_map(
            task.config,
            {
                **self._config.task,
                **evaluation.config.get(client_id, {}),
                "server_round": evaluation.server_round,
            },
        )
        return task

    def evaluation_arrived(
        self,
        client_id: str,
        server_round: int,
        task_id: str,
        *,
        loss: float = 0.0,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
        failure: str = "",
    ) -> str | None:
        """Take a client's evaluation (or why it failed); None, or why it is refused.

        Refused: no evaluation of that round asked that client for that task, or it answered.
        """
        evaluation = self.evaluation
        if evaluation is None or evaluation.server_round != server_round:
            return f"round {server_round} is not evaluating"
        if evaluation.tasks.get(client_id) != task_id:
            return f"no evaluate task {task_id!r} was sent to this client in round {server_round}"
        if evaluation.answered(client_id):
            return "this evaluation was already reported"
        if failure:
            evaluation.failed[client_id] = failure
            self._events.emit(
                ev.EVALUATION_FAILED,
                server_round=server_round,
                client_id=client_id,
                data={"task_id": task_id, "reason": failure},
            )
        else:
            result = EvaluateResult(client_id, float(loss), int(num_examples), dict(metrics or {}))
            evaluation.results[client_id] = result
            self._events.emit(
                ev.EVALUATION_REPORTED,
                server_round=server_round,
                client_id=client_id,
                data={
                    "task_id": task_id,
                    "loss": result.loss,
                    "num_examples": result.num_examples,
                    "metrics": dict(result.metrics),
                },
                durable=False,
            )
        evaluation.changed.set()
        return None

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
            self._strategy.load_state_dict(load_parameters(self._blobs.path(wanted)))
        elif self._new_strategy is not None:
            self._strategy = self._new_strategy()
        else:
            self._strategy.load_state_dict({})
        self._state_digest = wanted
        log.info("strategy state: %s", wanted[:12] or "none (as built)")

    def _configure_fit(self, server_round: int, selected: list[str]) -> dict[str, dict[str, Any]]:
        """The strategy's extra fit config per selected client, checked (none with privacy).

        Raises:
            RoundFailedError: It named a client that was not selected, or gave a key or value
                a task config cannot carry.
        """
        if self._config.privacy.mode != "off":
            return {}
        answer = self._strategy.configure_fit(server_round, list(selected))
        name = getattr(self._strategy, "name", type(self._strategy).__name__)
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

    def update_arrived(self, client_id: str = "") -> None:
        """An update from ``client_id`` was accepted, or (no id) a selected client went away."""
        if self.open is not None:
            if client_id:
                self.open.reported.add(client_id)
            self.open.changed.set()
        if self.evaluation is not None:
            self.evaluation.changed.set()

    def refuse(self, server_round: int, client_id: str, task_id: str, reason: str) -> None:
        """Make the refusal of ``client_id``'s update for ``task_id`` final for the open round.

        Only for the open round's task of that client (another round's or task's upload was
        refused for that already). The client gets no task again this round, and
        :meth:`refusal` answers its next upload for the task. The round still waits for the
        client until it reports the task failed: a refusal alone does not end a round.
        """
        open_round = self.open
        if (
            open_round is None
            or open_round.server_round != server_round
            or open_round.selected.get(client_id) != task_id
            or client_id in open_round.reported
        ):
            return
        open_round.refused.setdefault(client_id, reason)

    def refusal(self, client_id: str) -> str | None:
        """Why the open round refused ``client_id``'s update, if it did: None otherwise."""
        return None if self.open is None else self.open.refused.get(client_id)

    def has_reported(self, client_id: str) -> bool:
        """Whether the open round already holds an accepted update of ``client_id``."""
        return self.open is not None and client_id in self.open.reported

    def cancel(self, server_round: int, reason: str) -> str | None:
        """Ask the running round to end as cancelled; return why it cannot, or None.

        The round ends at its next step: while selecting or training at once, never once it
        aggregates (its model is being made; it commits or fails as it would have).
        """
        if self.busy_round() != server_round:
            return f"round {server_round} is not running"
        record = self._store.get_round(server_round)
        if record.status in ("aggregating", "evaluating"):
            return f"round {server_round} is {record.status}: too late to cancel"
        self._cancel = (server_round, reason)
        self._registry.notify()
        self.update_arrived()
        return None

    def _cancelled(self, server_round: int) -> str | None:
        if self._cancel is not None and self._cancel[0] == server_round:
            return self._cancel[1]
        return None

    def drain(self) -> int | None:
        """Start no new round (queued ones stay queued); return the round still running."""
        self._draining = True
        self._wake.set()
        return self.busy_round()

    def stop(self) -> None:
        """Stop after (or during) the current round; it is failed if still open."""
        self._stopping = True
        self._wake.set()
        self.update_arrived()

    def busy_round(self) -> int | None:
        """The round being run (selecting, training, aggregating or evaluating), or None."""
        if self.open is not None:
            return self.open.server_round
        return self.current

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
        busy = self.busy_round()
        if busy is None:
            return self._apply_rollback(source, author=author, reason=reason)
        with self._store.transaction():
            target = self._store.get_model(source)
            pending = self._store.defer_rollback(
                source, author=author, reason=reason, server_round=busy
            )
            self._events.emit(
                ev.MODEL_ROLLBACK_DEFERRED,
                server_round=busy,
                data={
                    "source": source,
                    "digest": target.digest,
                    "server_round": busy,
                    "author": author,
                    "reason": reason,
                },
            )
        log.info("rollback to version %d deferred until round %d ends", source, busy)
        return pending

    def _apply_rollback(
        self, source: int, *, author: str, reason: str, pending_id: int | None = None
    ) -> ModelRecord:
        """Move the head, record the event and drop the pending row: one transaction."""
        with self._store.transaction():
            previous = self._store.head()
            new = self._store.set_head(source, author=author, reason=reason)
            self._events.emit(
                ev.MODEL_ROLLBACK,
                data={
                    "version": new.version,
                    "digest": new.digest,
                    "source": source,
                    "previous_head": None if previous is None else previous.version,
                    "author": author,
                    "reason": reason,
                },
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
                self._apply_rollback(
                    item.source, author=item.author, reason=item.reason, pending_id=item.id
                )
            except FlctlError as exc:
                log.warning("deferred rollback to version %d failed: %s", item.source, exc.message)
                with self._store.transaction():
                    self._events.emit(
                        ev.MODEL_ROLLBACK_FAILED,
                        server_round=item.server_round,
                        data={
                            "source": item.source,
                            "server_round": item.server_round,
                            "author": item.author,
                            "reason": item.reason,
                            "error": exc.message,
                        },
                    )
                    self._store.drop_pending_rollback(item.id)

    async def run(self) -> None:
        """Run rounds until :meth:`stop`."""
        while not self._stopping:
            if self._draining:
                return
            resumed, self._resume = self._resume, None
            record = resumed or self._store.next_queued_round()
            if record is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.current = record.id
            refusal: str | None = None
            try:
                refusal = await self._head_refusal()
                if refusal is not None:  # refused, not started: no retry either
                    self._fail(record.id, refusal)
                elif resumed is not None:
                    await self._resume_round(record)
                else:
                    await self._run_round(record)
            except FlctlError as exc:
                self._fail(record.id, exc.message)
            except asyncio.CancelledError:
                self._fail(record.id, "coordinator stopped")
                raise
            except Exception as exc:  # keep serving: one broken round must not end the job
                log.exception("round %d crashed", record.id)
                self._fail(record.id, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.open = None
                self.current = None
                self._cancel = None
                if self._uploads is not None:
                    self._uploads.discard_round(record.id)
                self.apply_pending()
            if refusal is None and not self._stopping and not self._draining:
                self._retry(record.id)
        for record in self._store.open_rounds():
            self._fail(record.id, "coordinator stopped")

    async def _head_refusal(self) -> str | None:
        """Why no round may start from the head (its blob is corrupt or missing), or None."""
        head = self._store.head()
        if self._check is None or head is None:
            return None
        return await self._check.check(head)

    # ------------------------------------------------------------------ one round

    def _retry(self, server_round: int) -> None:
        """Queue a failed round again, up to ``rounds.retries`` times (a new round id)."""
        record = self._store.get_round(server_round)
        if record.status != "failed" or record.reason.startswith(
            BudgetExhaustedError.reason_prefix
        ):
            return
        attempt = int(record.config.get("attempt", 0) or 0)
        if attempt >= self._config.rounds.retries:
            return
        first = int(record.config.get("retry_of", 0) or 0) or server_round
        with self._store.transaction():
            (new,) = self._store.create_rounds(
                1, {**record.config, "attempt": attempt + 1, "retry_of": first}
            )
            self._events.emit(
                ev.ROUND_QUEUED,
                server_round=new,
                data={"retry_of": server_round, "attempt": attempt + 1, "reason": record.reason},
            )
        log.info("round %d failed: queued again as round %d", server_round, new)

    def _status(self, server_round: int, status: str, **fields: Any) -> RoundRecord:
        with self._store.transaction():
            record = self._store.set_round_status(server_round, status, **fields)
            self._events.emit(ev.ROUND_STATUS, server_round=server_round, data={"status": status})
        return record

    def _fail(self, server_round: int, reason: str, *, status: str = "failed") -> None:
        try:
            end_round(self._store, self._events, server_round, reason, status=status)
        except FlctlError:
            return  # already terminal
        log.info("round %d %s: %s", server_round, status, reason)

    async def _wait_for_quorum(self, server_round: int) -> list[str]:
        rounds = self._config.rounds
        deadline = time.monotonic() + rounds.quorum_timeout_s
        while True:
            connected = [s.client_id for s in self._registry.connected()]
            if len(connected) >= rounds.min_clients:
                return connected
            remaining = deadline - time.monotonic()
            if self._cancelled(server_round) is not None:
                return connected
            if self._stopping:
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

    def _select(self, connected: list[str]) -> list[str]:
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

    def _target(self, selected: int) -> int:
        """How many updates end the wait early: all selected, or the N of N + over_selection."""
        rounds = self._config.rounds
        if not rounds.over_selection or self._config.privacy.mode != "off":
            return selected
        return max(rounds.min_clients, selected - rounds.over_selection)

    async def _run_round(self, record: RoundRecord) -> None:
        server_round = record.id
        rounds = self._config.rounds
        started = time.time()
        mechanism = self._mechanism()
        if mechanism is not None and not await self._within_budget(server_round, mechanism):
            return
        self._status(server_round, "selecting", started=started)
        try:
            connected = await self._wait_for_quorum(server_round)
        except RoundFailedError as exc:
            self._fail(server_round, exc.message)
            return
        if (reason := self._cancelled(server_round)) is not None:
            self._fail(server_round, reason, status="cancelled")
            return
        selected = self._select(connected)
        if mechanism is not None and len(selected) < rounds.min_clients:
            self._fail(
                server_round,
                f"privacy sampling selected {len(selected)} of {len(connected)} connected "
                f"clients, fewer than min_clients ({rounds.min_clients})",
            )
            return
        # adaptive clipping's noise split, checked before any client trains for nothing
        self._adaptive(self._denominator(len(connected)))
        head = self._store.head()
        if head is None:  # pragma: no cover - the coordinator writes version 1 at start
            raise RoundFailedError("no head model")
        self.sync_state()
        fit_config = self._configure_fit(server_round, selected)
        deadline = time.time() + rounds.deadline_s
        tasks = {client_id: uuid.uuid4().hex for client_id in selected}
        model_size = self._blobs.size(head.digest)
        self.open = _OpenRound(
            server_round,
            head.digest,
            tasks,
            deadline,
            asyncio.Event(),
            model_size,
            target=self._target(len(tasks)),
            fit_config=fit_config,
        )
        with self._store.transaction():
            self._store.set_round_status(
                server_round,
                "training",
                base_version=head.version,
                selected=selected,
                deadline=deadline,
                tasks=tasks,
                fit_config=fit_config,
            )
            self._events.emit(
                ev.ROUND_STARTED,
                server_round=server_round,
                data={
                    "base_version": head.version,
                    "selected": selected,
                    "deadline_unix": deadline,
                    "min_clients": rounds.min_clients,
                },
            )
        for client_id in tasks:
            self._send_task(client_id)
        await self._finish_round(server_round, head, started, mechanism, len(connected))

    def _send_task(self, client_id: str) -> None:
        open_round = self.open
        session = self._registry.get(client_id)
        if open_round is None or session is None or not session.streaming:
            return  # its task stream sends the task when it opens
        session.queue.put_nowait(self._task(open_round, client_id))
        self._events.emit(
            ev.TASK_SENT,
            server_round=open_round.server_round,
            client_id=client_id,
            data={
                "task_id": open_round.selected[client_id],
                "kind": "fit",
                "model_digest": open_round.base_digest,
            },
            durable=False,
        )

    async def _resume_round(self, record: RoundRecord) -> None:
        """Carry on with a round a stopped coordinator left open (see :meth:`resume`).

        A round stopped while selecting sent no task yet: it selects again from the clients
        that come back. One stopped later keeps its tasks, deadline and accepted updates.
        """
        server_round = record.id
        if record.status == "selecting":
            self._events.emit(
                ev.ROUND_RESUMED,
                server_round=server_round,
                data={"selected": [], "accepted": 0, "reselect": True},
            )
            log.info("round %d resumed: selecting again", server_round)
            await self._run_round(record)
            return
        head = self._store.head()
        if head is None or record.deadline is None:  # pragma: no cover - checked by resumable
            raise RoundFailedError("coordinator restarted")
        self.sync_state()
        self.open = _OpenRound(
            server_round,
            head.digest,
            dict(record.tasks),
            record.deadline,
            asyncio.Event(),
            self._blobs.size(head.digest),
            absent_since=dict.fromkeys(record.tasks, time.time()),
            target=self._target(len(record.tasks)),
            reported={
                u.client_id for u in self._store.updates_for_round(server_round, status="accepted")
            },
            fit_config=dict(record.fit_config),
        )
        accepted = len(self.open.reported)
        with self._store.transaction():
            self._status(server_round, "training")
            self._events.emit(
                ev.ROUND_RESUMED,
                server_round=server_round,
                data={
                    "selected": sorted(record.tasks),
                    "accepted": accepted,
                    "deadline_unix": record.deadline,
                },
            )
        log.info("round %d resumed with %d accepted updates", server_round, accepted)
        for client_id, session in self._registry.items():
            if session.streaming and (task := self.task_for(client_id)) is not None:
                session.queue.put_nowait(task)
        await self._finish_round(
            server_round, head, record.started or time.time(), None, len(record.tasks)
        )

    def resumable(self, record: RoundRecord) -> str | None:
        """Why ``record`` (open at a restart) cannot be resumed, or None if it can."""
        head = self._store.head()
        if record.status == "selecting":
            return None  # no task was sent: select again
        if record.status not in ("training", "aggregating", "evaluating"):
            return f"coordinator restarted while {record.status}"
        if not record.tasks or record.deadline is None:
            return "coordinator restarted (the round's tasks were not recorded)"
        if self._config.privacy.mode != "off":
            return "coordinator restarted (rounds with differential privacy are not resumed)"
        if head is None or head.version != record.base_version:
            return "coordinator restarted (the head model moved)"
        accepted = self._store.updates_for_round(record.id, status="accepted")
        for update in accepted:
            if not update.digest or not self._blobs.has(update.digest):
                return f"coordinator restarted (the update of {update.client_id} is missing)"
        if time.time() >= record.deadline and len(accepted) < self._config.rounds.min_clients:
            return (
                f"coordinator restarted after the deadline with {len(accepted)} of "
                f"{self._config.rounds.min_clients} required updates"
            )
        return None

    async def _finish_round(
        self,
        server_round: int,
        head: ModelRecord,
        started: float,
        mechanism: SampledGaussianRound | None,
        connected: int,
    ) -> None:
        """Wait for the updates, then aggregate, evaluate and commit (or fail)."""
        rounds = self._config.rounds
        assert self.open is not None
        deadline = self.open.deadline
        is_local = mechanism is not None and self._config.privacy.mode == "local"
        try:
            accepted = await self._wait_for_updates(server_round)
        except BaseException:
            if is_local:  # stopped while waiting: the noised updates already accepted count
                self.charge_released(server_round)
            raise
        selected = sorted(self.open.selected)
        refused = dict(self.open.refused)
        self.open = None
        if is_local and accepted:
            assert mechanism is not None
            # noised updates left their clients: the round is spent, whatever happens next
            await self._charge(server_round, mechanism, clip_norm=self._config.privacy.clip_norm)
        if (reason := self._cancelled(server_round)) is not None:
            self._fail(server_round, reason, status="cancelled")
            return
        if self._stopping and len(accepted) < rounds.min_clients:
            self._fail(server_round, "coordinator stopped")
            return
        if len(accepted) < rounds.min_clients:
            late = time.time() >= deadline
            why = "the deadline passed" if late else "selected clients left"
            failed = self._task_failures(server_round, selected, refused)
            if failed:
                # the clients' own words: "c1: fit raised NameError: ... (task.py:57)"
                count = sum(len(ids) for ids in failed.values())
                said = "; ".join(f"{', '.join(ids)}: {reason}" for reason, ids in failed.items())
                why = f"{count} of {len(selected)} selected clients failed ({said})"
                if late:
                    why += " and the deadline passed"
            self._fail(
                server_round,
                f"{why} with {len(accepted)} of {rounds.min_clients} required updates",
            )
            return
        if self._stopping:
            self._fail(server_round, "coordinator stopped")
            return

        self._status(server_round, "aggregating")
        aggregating = time.perf_counter()
        base_path = self._blobs.path(head.digest)
        # every strategy and the clients' metrics weigh an update as capped here, never as
        # claimed: one client's num_examples cannot buy the aggregate
        weights = self._weights(server_round, accepted)
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
            denominator = self._denominator(connected)
            clip_norm = self._clip_norm()
            adaptive = self._adaptive(denominator)
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
            await self._charge(
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

        aggregate_s = time.perf_counter() - aggregating
        gate = self._config.gate
        # the gate's first check: the aggregate of finite updates can still overflow
        non_finite = ""
        if gate.mode != "off":
            non_finite = await asyncio.to_thread(non_finite_tensors, self._blobs.path(digest))
        metrics: dict[str, float] = {}
        evaluate_s: float | None = None
        on_server = rounds.evaluate in ("server", "both") and self._evaluator is not None
        on_clients = rounds.evaluate in ("clients", "both")
        if on_server or on_clients:
            if not non_finite:  # evaluating a model that holds NaN or Inf tells nothing
                self._status(server_round, "evaluating")
                evaluating = time.perf_counter()
                if on_server:
                    assert self._evaluator is not None
                    loss, server_metrics = await asyncio.to_thread(
                        self._evaluator, self._blobs.path(digest)
                    )
                    metrics = {
                        "loss": float(loss),
                        **{k: float(v) for k, v in server_metrics.items()},
                    }
                if on_clients:
                    clients = await self._evaluate_on_clients(
                        server_round, digest, [u.client_id for u in accepted]
                    )
                    # "clients": the round's metrics are the clients'; "both": beside the
                    # server's, under "clients."
                    prefix = "clients." if rounds.evaluate == "both" else ""
                    metrics.update({prefix + k: v for k, v in clients.items()})
                evaluate_s = time.perf_counter() - evaluating
        else:
            metrics = _weighted_client_metrics(accepted, weights)
        if gate.mode != "off":
            verdict = Verdict(non_finite) if non_finite else self._check_metrics(metrics, head)
            if verdict.is_rejected:
                self._reject(server_round, digest, metrics, len(accepted), started, verdict)
                return
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise RoundFailedError(f"evaluation returned non-finite metrics: {', '.join(bad)}")

        with self._store.transaction():  # the model, the head and their events, or nothing
            model = self._store.commit_round(
                server_round,
                digest=digest,
                metrics=metrics,
                num_clients=len(accepted),
                state_digest=state_digest,
            )
            self._events.emit(
                ev.MODEL_CREATED,
                server_round=server_round,
                data={
                    "version": model.version,
                    "digest": model.digest,
                    "kind": model.kind,
                    "parent": model.parent,
                    "metrics": metrics,
                    "head": True,
                },
            )
            self._events.emit(
                ev.ROUND_COMMITTED,
                server_round=server_round,
                data={
                    "model_version": model.version,
                    "metrics": metrics,
                    "num_clients": len(accepted),
                    "duration_s": time.time() - started,
                    # the coordinator's phases: aggregation (reading the updates, writing,
                    # hashing and storing the new model) and server-side evaluation
                    "aggregate_s": round(aggregate_s, 4),
                    "evaluate_s": None if evaluate_s is None else round(evaluate_s, 4),
                },
            )
        if mechanism is None:
            self._state_digest = state_digest  # the strategy holds what the head records
        log.info("round %d committed: model version %d %s", server_round, model.version, metrics)

    def _weights(self, server_round: int, accepted: list[Any]) -> list[int]:
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

    # ------------------------------------------------------------------ federated evaluation

    async def _evaluate_on_clients(
        self, server_round: int, digest: str, clients: list[str]
    ) -> dict[str, float]:
        """Ask ``clients`` still connected to evaluate ``digest``; return their aggregate.

        The engine waits up to ``rounds.evaluate_timeout_s`` and goes on with the evaluations
        that arrived: ``{"loss": ..., **metrics}`` from :meth:`Strategy.aggregate_evaluate`
        over them (each weighed by its examples, bounded as an update's weight is), or ``{}``
        when none did. A client whose evaluation failed, or that did not answer, fails only its
        own evaluation: an ``evaluation.failed`` event, and a line in the round's reason.
        """
        rounds = self._config.rounds
        connected = []
        for client_id in clients:
            session = self._registry.get(client_id)
            if session is not None and session.streaming:
                connected.append(client_id)
        if not connected:
            self._note_evaluation(server_round, {}, 0, "no client left to evaluate")
            return {}
        asked = self._strategy.configure_evaluate(server_round, connected)
        config = {c: dict(asked[c]) for c in connected if c in asked}
        evaluation = _Evaluation(
            server_round,
            digest,
            self._blobs.size(digest),
            {client_id: uuid.uuid4().hex for client_id in connected},
            time.time() + rounds.evaluate_timeout_s,
            config,
            asyncio.Event(),
        )
        self.evaluation = evaluation
        try:
            for client_id, task_id in evaluation.tasks.items():
                session = self._registry.get(client_id)
                if session is None or not session.streaming:
                    continue
                session.queue.put_nowait(self._evaluate_task(evaluation, client_id))
                self._events.emit(
                    ev.TASK_SENT,
                    server_round=server_round,
                    client_id=client_id,
                    data={"task_id": task_id, "kind": "evaluate", "model_digest": digest},
                    durable=False,
                )
            while True:
                evaluation.changed.clear()
                now = time.time()
                waiting = [
                    c
                    for c in evaluation.tasks
                    if not evaluation.answered(c)
                    and (session := self._registry.get(c)) is not None
                    and session.streaming
                ]
                if (
                    not waiting
                    or now >= evaluation.deadline
                    or self._stopping
                    or self._cancelled(server_round) is not None
                ):
                    break
                try:
                    await asyncio.wait_for(evaluation.changed.wait(), evaluation.deadline - now)
                except TimeoutError:
                    pass
        finally:
            self.evaluation = None
        for client_id, task_id in evaluation.tasks.items():
            if evaluation.answered(client_id):
                continue
            session = self._registry.get(client_id)
            gone = session is None or not session.streaming
            reason = (
                "left before its evaluation arrived"
                if gone
                else f"no evaluation within {rounds.evaluate_timeout_s:g} s "
                "(rounds.evaluate_timeout_s)"
            )
            evaluation.failed[client_id] = reason
            self._events.emit(
                ev.EVALUATION_FAILED,
                server_round=server_round,
                client_id=client_id,
                data={"task_id": task_id, "reason": reason},
            )
        results = list(evaluation.results.values())
        self._note_evaluation(server_round, evaluation.failed, len(evaluation.tasks))
        if not results:
            return {}
        # as for updates: one client's num_examples cannot buy the clients' metrics
        weights = cap_weights(
            [r.num_examples for r in results],
            max_examples=rounds.max_examples_per_update,
            max_share=rounds.max_weight_share,
        )
        results = [
            EvaluateResult(r.client_id, r.loss, w, r.metrics)
            for r, w in zip(results, weights, strict=True)
        ]
        loss, metrics = self._strategy.aggregate_evaluate(results)
        return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

    def _note_evaluation(
        self, server_round: int, failed: Mapping[str, str], asked: int, note: str = ""
    ) -> None:
        """Record in the round's reason which clients' evaluations failed, and why."""
        if failed:
            said = "; ".join(f"{c}: {why}" for c, why in sorted(failed.items()))
            note = f"evaluation failed on {len(failed)} of {asked} clients ({said})"
        if note:
            self._status(server_round, "evaluating", reason=note)

    # ------------------------------------------------------------------ validation gate

    def _check_metrics(self, metrics: Mapping[str, float], head: ModelRecord) -> Verdict:
        """The gate's verdict on a round's metrics, against the reference version."""
        gate = self._config.gate
        reference = None
        if gate.mode == "metric":
            models = [] if gate.against == "head" else self._store.list_models()
            reference = reference_version(gate, head=head, models=models)
        return check_metrics(gate, metrics, reference)

    def _reject(
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
                ev.MODEL_REJECTED,
                server_round=server_round,
                data={
                    "version": model.version,
                    "digest": model.digest,
                    "parent": model.parent,
                    "metrics": kept,
                    **verdict.event_data(self._config.gate),
                },
            )
            self._events.emit(
                ev.ROUND_REJECTED,
                server_round=server_round,
                data={
                    "model_version": model.version,
                    "metrics": kept,
                    "num_clients": num_clients,
                    "duration_s": time.time() - started,
                    "reason": verdict.reason,
                },
            )
        log.warning(
            "round %d rejected by the validation gate: model version %d kept, head stays: %s",
            server_round,
            model.version,
            verdict.reason,
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
                ev.COORDINATOR_WARNING,
                server_round=server_round,
                data={"message": message, "author": POLICY_AUTHOR},
            )
            return
        value = metric_value(best, gate.metric)
        reason = (
            f"rollback_after: {gate.rollback_after} rounds in a row rejected by the validation "
            f"gate (rounds {rounds}); version {best.version} has the best {gate.metric} "
            f"({value:.4f})"
        )
        try:
            self._apply_rollback(best.version, author=POLICY_AUTHOR, reason=reason)
        except FlctlError as exc:  # the store refused: report it, the round itself is over
            log.warning("rollback policy failed: %s", exc.message)
            self._events.emit(
                ev.COORDINATOR_WARNING,
                server_round=server_round,
                data={"message": f"rollback policy failed: {exc.message}", "author": POLICY_AUTHOR},
            )

    def _task_failures(
        self, server_round: int, selected: list[str], refused: Mapping[str, str]
    ) -> dict[str, list[str]]:
        """Selected clients whose task failed this round, grouped by the reason they gave.

        A client whose update was refused as malformed is one of them, with the refusal.
        """
        failed: dict[str, list[str]] = {}
        for client_id in selected:
            session = self._registry.get(client_id)
            if client_id in refused:
                failed.setdefault(f"update refused: {refused[client_id]}", []).append(client_id)
            elif session is not None and session.failed_round == server_round:
                failed.setdefault(session.failure, []).append(client_id)
        return failed

    async def _wait_for_updates(self, server_round: int) -> list[Any]:
        open_round = self.open
        assert open_round is not None
        grace = self._config.rounds.rejoin_grace_s
        while True:
            open_round.changed.clear()
            reported = open_round.reported
            now = time.time()
            wake_at = open_round.deadline
            outstanding = []
            for client_id in open_round.selected:
                if client_id in reported:
                    continue
                session = self._registry.get(client_id)
                if session is not None and session.streaming:
                    open_round.absent_since.pop(client_id, None)
                    if session.failed_round != server_round:
                        outstanding.append(client_id)
                    continue
                # gone: it may come back (reconnect, restart) within the grace
                back_by = open_round.absent_since.setdefault(client_id, now) + grace
                if now < back_by:
                    outstanding.append(client_id)
                    wake_at = min(wake_at, back_by + 0.01)
            if open_round.target and len(reported) >= open_round.target:
                # over-selection: the first N to report make the round
                accepted = self._store.updates_for_round(server_round, status="accepted")
                return sorted(accepted, key=lambda u: u.id)[: open_round.target]
            if (
                not outstanding
                or now >= open_round.deadline
                or self._stopping
                or self._cancelled(server_round) is not None
            ):
                return self._store.updates_for_round(server_round, status="accepted")
            try:
                await asyncio.wait_for(open_round.changed.wait(), wake_at - now)
            except TimeoutError:
                pass

    def _mechanism(self) -> SampledGaussianRound | None:
        """This job's round as the accountant charges it; None without privacy.

        Local DP: each participating client's own release (:func:`flctl.privacy.local_round`).
        """
        p = self._config.privacy
        if p.mode == "local":
            return local_round(p.noise_multiplier)
        if p.mode != "central":
            return None
        if p.sampling == "fixed":
            return SampledGaussianRound(
                p.noise_multiplier, "fixed", population=p.population, sample_size=p.sample_size
            )
        return SampledGaussianRound(p.noise_multiplier, "poisson", p.sampling_rate)

    def _denominator(self, connected: int) -> float:
        """The expected number of clients per round, that DP-FedAvg divides the sum by.

        Fixed-size sampling: ``sample_size``. Poisson: ``sampling_rate * population``, with the
        number of clients connected at selection standing for an undeclared population.
        """
        p = self._config.privacy
        if p.sampling == "fixed":
            return float(p.sample_size)
        return p.sampling_rate * float(p.population or connected)

    def _clip_norm(self) -> float:
        """The clip norm of the next central round: with adaptive clipping, the ledger's latest.

        The ledger row of each charged round keeps the clip norm the next round starts from,
        so a restarted coordinator carries on from it; without one, ``clip_norm`` (the start).
        """
        p = self._config.privacy
        if p.adaptive_clip:
            for row in reversed(ledger(self._store)):
                if row.next_clip_norm is not None:
                    return row.next_clip_norm
        return p.clip_norm

    def _adaptive(self, denominator: float) -> AdaptiveClipping | None:
        """Adaptive clipping's rule for a round of ``denominator`` expected clients, or None.

        Raises:
            PrivacyError: The count's noise (``clip_count_stddev``, or expected clients / 20)
                would take the whole ``noise_multiplier``.
        """
        p = self._config.privacy
        if p.mode != "central" or not p.adaptive_clip:
            return None
        stddev = p.clip_count_stddev or default_count_stddev(denominator)
        adaptive = AdaptiveClipping(p.target_quantile, p.clip_learning_rate, stddev)
        adaptive.update_noise_multiplier(p.noise_multiplier)  # fail before any noise is drawn
        return adaptive

    def charge_released(self, server_round: int) -> LedgerRecord | None:
        """Charge a local-DP round whose clients' noised updates were accepted, if not yet.

        For a round that ends outside the normal path: the coordinator stopped while it waited
        for updates, or (called at start) a crash interrupted it. Synchronous: it must not be
        lost to a cancellation.
        """
        p = self._config.privacy
        mechanism = self._mechanism()
        if p.mode != "local" or mechanism is None:
            return None
        if not self._store.updates_for_round(server_round, status="accepted"):
            return None
        records = ledger(self._store)
        if any(r.round_id == server_round for r in records):
            return None
        accountant = Accountant(
            p.target_delta, [SampledGaussianRound(**r.mechanism_args()) for r in records]
        )
        accountant.charge(mechanism)
        return self._write_charge(
            server_round, mechanism, accountant.epsilons(), clip_norm=p.clip_norm
        )

    def _accountant(self) -> Accountant:
        return Accountant(
            self._config.privacy.target_delta,
            [SampledGaussianRound(**r.mechanism_args()) for r in ledger(self._store)],
        )

    async def _within_budget(self, server_round: int, mechanism: SampledGaussianRound) -> bool:
        """Whether this round keeps epsilon within budget; if not, fail it with the reason."""
        p = self._config.privacy

        accountant = self._accountant()  # the store is read here, the arithmetic in a thread
        reached = await asyncio.to_thread(
            accountant.epsilon_after, mechanism, accountant=p.accountant
        )
        if reached <= p.epsilon_budget:
            return True
        reason = (
            f"{BudgetExhaustedError.reason_prefix}: epsilon would reach {reached:.6g} > budget "
            f"{p.epsilon_budget:g} ({p.accountant}, delta {p.target_delta:g})"
        )
        self._events.emit(
            ev.PRIVACY_REFUSED,
            server_round=server_round,
            data={
                "reason": reason,
                "epsilon": reached,
                "budget": p.epsilon_budget,
                "accountant": p.accountant,
                "delta": p.target_delta,
            },
        )
        self._fail(server_round, reason)
        return False

    async def _charge(
        self,
        server_round: int,
        mechanism: SampledGaussianRound,
        *,
        clip_norm: float,
        unclipped_fraction: float | None = None,
        next_clip_norm: float | None = None,
    ) -> LedgerRecord:
        """Append the round to the privacy ledger, with the epsilon the ledger reaches."""
        accountant = self._accountant()
        accountant.charge(mechanism)

        def write(spent: Mapping[AccountantName, float | None]) -> LedgerRecord:
            return self._write_charge(
                server_round,
                mechanism,
                spent,
                clip_norm=clip_norm,
                unclipped_fraction=unclipped_fraction,
                next_clip_norm=next_clip_norm,
            )

        try:
            spent = await asyncio.to_thread(accountant.epsilons)
        except asyncio.CancelledError:
            # the noisy release exists: charge it even when the coordinator is stopping
            write(accountant.epsilons())
            raise
        return write(spent)

    def _write_charge(
        self,
        server_round: int,
        mechanism: SampledGaussianRound,
        spent: Mapping[AccountantName, float | None],
        *,
        clip_norm: float,
        unclipped_fraction: float | None = None,
        next_clip_norm: float | None = None,
    ) -> LedgerRecord:
        p = self._config.privacy
        rdp = spent["rdp"]
        assert rdp is not None  # RDP accounts for every sampling
        is_local = p.mode == "local"
        # local: the row keeps the clients' z and no sampling; mechanism_args() rebuilds
        # local_round(z) from it
        noise_multiplier = p.noise_multiplier if is_local else mechanism.noise_multiplier
        with self._store.transaction():  # the ledger row and its event, or neither
            record = self._charge_row(
                server_round,
                mechanism,
                spent,
                noise_multiplier=noise_multiplier,
                clip_norm=clip_norm,
                unclipped_fraction=unclipped_fraction,
                next_clip_norm=next_clip_norm,
            )
        log.info("round %d charged to the privacy ledger: epsilon %s", server_round, spent)
        return record

    def _charge_row(
        self,
        server_round: int,
        mechanism: SampledGaussianRound,
        spent: Mapping[AccountantName, float | None],
        *,
        noise_multiplier: float,
        clip_norm: float,
        unclipped_fraction: float | None,
        next_clip_norm: float | None,
    ) -> LedgerRecord:
        p = self._config.privacy
        rdp = spent["rdp"]
        assert rdp is not None
        is_local = p.mode == "local"
        record = charge(
            self._store,
            server_round,
            mechanism="local" if is_local else "central",
            noise_multiplier=noise_multiplier,
            sampling=mechanism.sampling,
            sampling_rate=mechanism.rate,
            population=mechanism.population,
            sample_size=mechanism.sample_size,
            clip_norm=clip_norm,
            epsilon_rdp=rdp,
            epsilon_pld=spent["pld"],
            delta=p.target_delta,
            unclipped_fraction=unclipped_fraction,
            next_clip_norm=next_clip_norm,
        )
        chosen = spent.get(p.accountant)
        self._events.emit(
            ev.PRIVACY_CHARGED,
            server_round=server_round,
            data={
                "epsilon": chosen if chosen is not None else rdp,
                "accountant": p.accountant if chosen is not None else "rdp",
                "epsilon_rdp": rdp,
                "epsilon_pld": spent["pld"],
                "budget": p.epsilon_budget,
                "delta": p.target_delta,
                "noise_multiplier": noise_multiplier,
                "mechanism": record.mechanism,
                "clip_norm": clip_norm,
                **({} if next_clip_norm is None else {"next_clip_norm": next_clip_norm}),
            },
        )
        return record

    def _aggregate_stateful(self, base: Path, updates: list[WeightedUpdate]) -> tuple[str, str]:
        """Aggregate with the strategy; return the model's digest and its state's ("": none)."""
        digest = self._aggregate(base, updates)
        state = self._strategy.state_dict()
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
            (strategy or self._strategy).aggregate(base, updates, temp)
            return self._blobs.commit_temp(temp, sha256_file(temp))
        finally:
            temp.unlink(missing_ok=True)


def _weighted_client_metrics(updates: list[Any], weights: list[int]) -> dict[str, float]:
    total = sum(weights) or 1
    keys = set.intersection(*(set(u.metrics) for u in updates)) if updates else set()
    return {
        k: sum(u.metrics[k] * w for u, w in zip(updates, weights, strict=True)) / total
        for k in sorted(keys)
    }


def end_round(
    store: SqlStore, events: EventLog, server_round: int, reason: str, *, status: str = "failed"
) -> RoundRecord:
    """Fail (or cancel) a round with its ``round.failed`` (``round.cancelled``) event.

    Both are written in one transaction.

    Raises:
        ConflictError: The round is already terminal.
        NotFoundError: No such round.
    """
    with store.transaction():
        record = store.fail_round(server_round, reason, status=status)
        events.emit(
            ev.ROUND_CANCELLED if status == "cancelled" else ev.ROUND_FAILED,
            server_round=server_round,
            data={"reason": reason, "duration_s": record.duration_s},
        )
    return record
