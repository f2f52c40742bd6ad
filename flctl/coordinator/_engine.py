"""The round engine: an explicit state machine, every transition persisted as it happens.

```
queued -> selecting -> training -> aggregating -> evaluating -> committed | rejected (reason)
              |            |             |              |
              +------------+-------------+--------------+-----> failed (reason) | cancelled
```

This module runs the state machine; each policy it applies lives in its own module:
``_selection.py`` (quorum, sampling, over-selection), ``_aggregation.py`` (the strategy, its
state, the updates' weights: how a round aggregates), ``_evaluation.py`` (the clients'
evaluation of a round's model), ``_heads.py`` (rollbacks and the validation gate's verdicts)
and ``_privacy_round.py`` (the privacy budget and ledger).

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
private mean of the updates is released with :class:`~flctl.aggregation.DpFedAvg` and the
strategy aggregates it (:class:`~flctl.aggregation.PrivateStrategy`), and the round is charged
to the ``dp_ledger`` table as soon as the noisy mean exists, whatever happens next. With
``adaptive_clip`` the clip norm moves after each charged round (the ledger keeps it).

With ``mode = "local"`` the same budget check runs before each round; the task tells each
client to clip and noise its own update (:class:`~flctl.core.dp.TaskPrivacy`), the strategy
aggregates the mean of the noised updates (:class:`~flctl.aggregation.LocalDpFedAvg`), and
the round is charged as soon as one noised update has been accepted (at the latest when the
wait for updates ends, and at the next start for a round a crash interrupted:
:meth:`charge_released`).

With ``[secagg] enabled`` (docs/secagg.md) each round runs a :class:`SecAggRound`
(``_secagg_round.py``) from the moment it selects: every fit task carries the round's SecAgg
task, the clients' key stages run while they train, each accepted update is a masked input
added to the round's masked sum, and once the wait ends the engine closes the masked inputs,
collects the survivors' shares, and aggregates the unmasked mean (``aggregating``): the
strategy, the gate and the commit are as without it. A round whose secure aggregation cannot
go on (fewer than ``threshold`` share holders left at some stage) fails with the reason, and a
restarted coordinator fails an open secure round instead of resuming it: its keys and shares
were in memory only, so nothing of it can be unmasked.

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
answered is stored with the round, so a resumed round sends the same. While the round waits,
each accepted update is added to the round's running sum (incremental aggregation, for a
mean-based strategy without privacy: ``_aggregation.py``). After a round commits, the
strategy's :meth:`Strategy.state_dict`, when not empty, is stored as a safetensors blob
recorded with the new version (``models.state_digest``). Before each round the strategy holds
the state recorded with the version the head points at (:meth:`RoundEngine.sync_state`): after
a restart, a rollback or a round that did not commit, it gets that state back with
:meth:`Strategy.load_state_dict` (or starts over, built anew, where the head has none).
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
    Strategy,
)
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.dp import TaskPrivacy
from flctl.core.errors import (
    BudgetExhaustedError,
    FlctlError,
    RoundFailedError,
)
from flctl.core.work import SecAggAnswer, Task
from flctl.privacy import (
    SampledGaussianRound,
)
from flctl.security import SecAggSetup, SecAggTask
from flctl.store import (
    BlobStore,
    LedgerRecord,
    ModelRecord,
    RoundRecord,
    SqlStore,
    UpdateRecord,
)
from flctl.tensors import SecureLayout, read_spec

from ._aggregation import RoundAggregation
from ._evaluation import ClientEvaluation
from ._events import EventLog
from ._gate import (
    Verdict,
    non_finite_tensors,
)
from ._heads import Heads, PendingRollback
from ._integrity import ModelCheck
from ._privacy_round import PrivacyRounds
from ._registry import Registry
from ._secagg_round import SecAggRound
from ._selection import Selection
from ._tasks import build_task
from ._uploads import PartialUpload, PartialUploads

__all__ = ["Evaluator", "PendingRollback", "RoundEngine", "end_round"]

log = logging.getLogger("flctl.coordinator")

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
    #: selected clients waited for until then however long they are absent: those of a
    #: resumed round, until its deadline (they could not reach a stopped coordinator, and may
    #: still be training); until seen again
    waited_until: dict[str, float] = field(default_factory=dict)
    #: clients whose update was accepted (kept in memory: the upload path asks on every call)
    reported: set[str] = field(default_factory=set)
    #: clients whose update for their task was refused as malformed, and why: final
    refused: dict[str, str] = field(default_factory=dict)
    #: client id -> the extra fit config the strategy gave it (configure_fit)
    fit_config: dict[str, dict[str, Any]] = field(default_factory=dict)


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
        selection_rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._blobs = blobs
        self._events = events
        self._registry = registry
        self._evaluator = evaluator
        self._uploads = uploads
        self._check = check
        self._privacy = PrivacyRounds(config, store, events)
        self._aggregation = RoundAggregation(
            config=config,
            store=store,
            blobs=blobs,
            events=events,
            privacy=self._privacy,
            strategy=strategy,
            new_strategy=new_strategy,
        )
        self._heads = Heads(config, store, events, self.busy_round)
        self._selection = Selection(
            config,
            registry,
            stopping=lambda: self._stopping,
            cancelled=self._cancelled,
            rng=selection_rng,
        )
        #: the clients' evaluation of each round's model (rounds.evaluate "clients", "both")
        self._evaluation = ClientEvaluation(
            config=config,
            blobs=blobs,
            events=events,
            registry=registry,
            strategy=lambda: self._aggregation.strategy,
            status=self._status,
            stopping=lambda: self._stopping,
            cancelled=self._cancelled,
        )
        self._resume: RoundRecord | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        #: (when, what) the last write that did not fit on the disk; cleared by the next
        #: accepted update (round status shows it meanwhile)
        self.storage_warning: tuple[float, str] | None = None
        self._draining = False
        self._cancel: tuple[int, str] | None = None  # (round, reason) asked to end
        self.open: _OpenRound | None = None
        self.current: int | None = None
        #: the running round's secure aggregation ([secagg] enabled), from selection to its end
        self.secagg: SecAggRound | None = None
        self._secagg_driver: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ control

    def charge_released(self, server_round: int) -> LedgerRecord | None:
        """Charge a local-DP round a crash interrupted (:meth:`PrivacyRounds.charge_released`)."""
        return self._privacy.charge_released(server_round)

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

    def task_for(self, client_id: str) -> Task | None:
        """The open round's task for ``client_id``, if selected and it has not reported."""
        evaluation = self._evaluation.current
        if evaluation is not None and client_id in evaluation.tasks:
            if evaluation.answered(client_id):
                return None
            return evaluation.task(client_id, self._config.task)
        open_round = self.open
        if open_round is None or client_id not in open_round.selected:
            return None
        if client_id in open_round.reported or client_id in open_round.refused:
            return None
        return self._task(open_round, client_id)

    def _task(self, open_round: _OpenRound, client_id: str) -> Task:
        return build_task(
            "fit",
            open_round.server_round,
            open_round.selected[client_id],
            open_round.base_digest,
            open_round.model_size,
            open_round.deadline,
            {
                **self._config.task,
                **open_round.fit_config.get(client_id, {}),
                # the client applies these (local DP: clip and noise before upload)
                **TaskPrivacy.of(self._config.privacy).task_entries(),
                # secure aggregation: the round's setup and how the client masks its update
                **self._secagg_entry(open_round.server_round),
            },
        )

    def _secagg_entry(self, server_round: int) -> dict[str, Any]:
        secagg = self.secagg
        if secagg is None or secagg.server_round != server_round:
            return {}
        return secagg.entry()

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

        See :meth:`ClientEvaluation.evaluation_arrived`.
        """
        return self._evaluation.evaluation_arrived(
            client_id,
            server_round,
            task_id,
            loss=loss,
            num_examples=num_examples,
            metrics=metrics,
            failure=failure,
        )

    @property
    def strategy(self) -> Strategy:
        """The job's strategy (built anew when the head holds no state of it)."""
        return self._aggregation.strategy

    def sync_state(self) -> None:
        """Give the strategy the state recorded with the head version, if it lacks it.

        See :meth:`RoundAggregation.sync_state`.
        """
        self._aggregation.sync_state()

    def update_arrived(self, client_id: str = "", record: UpdateRecord | None = None) -> None:
        """An update from ``client_id`` was accepted, or (no id) a selected client went away.

        ``record`` is the accepted update, when the caller holds it (else it is looked up).
        """
        if self.open is not None:
            if client_id:
                self.open.reported.add(client_id)
                server_round = self.open.server_round
                if record is None or record.server_round != server_round:
                    accepted = self._store.updates_for_round(server_round, status="accepted")
                    record = next((u for u in accepted if u.client_id == client_id), None)
                secagg = self.secagg
                if secagg is not None and secagg.server_round == server_round:
                    if record is not None and record.digest:
                        secagg.masked_input_arrived(client_id, self._blobs.path(record.digest))
                elif record is not None:
                    self._aggregation.update_accepted(server_round, record)
            self.open.changed.set()
        if self.secagg is not None:
            self.secagg.changed.set()  # a client went away, or its input arrived
        if self._evaluation.current is not None:
            self._evaluation.current.changed.set()

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
        self._aggregation.update_refused(server_round, client_id)
        if self.secagg is not None and self.secagg.server_round == server_round:
            self.secagg.masked_input_refused(client_id, reason)
            open_round.changed.set()

    async def secagg_message(
        self, client_id: str, server_round: int, task_id: str, stage: str, payload: bytes
    ) -> SecAggAnswer:
        """A client's message of a secure-aggregation stage (see :meth:`SecAggRound.message`)."""
        secagg = self.secagg
        if secagg is None or secagg.server_round != server_round:
            return SecAggAnswer(False, f"round {server_round} has no secure aggregation running")
        if secagg.tasks.get(client_id) != task_id:
            return SecAggAnswer(
                False, f"task {task_id[:16]!r} is not {client_id}'s task for round {server_round}"
            )
        return await secagg.message(client_id, stage, payload)

    def upload_begun(self, record: PartialUpload, part: Path) -> None:
        """``record``'s bytes are arriving in ``part`` (a stream began or resumed)."""
        if self.open is not None and record.server_round == self.open.server_round:
            self._aggregation.upload_begun(
                record.server_round, record.client_id, part, record.size, record.num_examples
            )

    def secagg_upload(self, server_round: int) -> tuple[int, int] | None:
        """The masked input's length and modulus bits, if ``server_round`` is a secure round."""
        secagg = self.secagg
        if secagg is None or secagg.server_round != server_round:
            return None
        return secagg.setup.num_elements, secagg.setup.modulus_bits

    def secagg_refusal(self, server_round: int, client_id: str) -> str | None:
        """Why ``client_id`` may not upload its masked input for ``server_round`` now."""
        secagg = self.secagg
        if secagg is None or secagg.server_round != server_round:
            return f"round {server_round} has no secure aggregation running"
        return secagg.upload_refusal(client_id)

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

    async def close(self) -> None:
        """Stop the work a round left running (scores taken after its commit)."""
        await self._aggregation.close()

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
        return self._heads.pending

    def rollback(
        self, source: int, *, author: str, reason: str = ""
    ) -> ModelRecord | PendingRollback:
        """Make version ``source``'s weights the head: now, or when the running round ends.

        See :meth:`Heads.rollback`.
        """
        return self._heads.rollback(source, author=author, reason=reason)

    def apply_pending(self, *, keep_round: int | None = None) -> None:
        """Apply the deferred rollbacks but those waiting for ``keep_round`` (still open)."""
        self._heads.apply_pending(keep_round=keep_round)

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
                log.exception("round %d crashed", record.id, extra={"round": record.id})
                self._fail(record.id, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self._end_secagg(record.id)
                self.open = None
                self.current = None
                self._cancel = None
                self._aggregation.end_round()
                if self._uploads is not None:
                    self._uploads.discard_round(record.id)
                self.apply_pending()
            if refusal is None and not self._stopping and not self._draining:
                self._retry(record.id)
        for record in self._store.open_rounds():
            self._fail(record.id, "coordinator stopped")
        await self.close()  # updates not scored yet stay unscored

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
                ev.RoundQueued(retry_of=server_round, attempt=attempt + 1, reason=record.reason),
                server_round=new,
            )
        log.info(
            "round %d failed: queued again as round %d",
            server_round,
            new,
            extra={"round": server_round},
        )

    def _status(self, server_round: int, status: str, **fields: Any) -> RoundRecord:
        with self._store.transaction():
            record = self._store.set_round_status(server_round, status, **fields)
            self._events.emit(ev.RoundStatus(status), server_round=server_round)
        return record

    def _fail(self, server_round: int, reason: str, *, status: str = "failed") -> None:
        try:
            end_round(self._store, self._events, server_round, reason, status=status)
        except FlctlError:
            return  # already terminal
        log.info("round %d %s: %s", server_round, status, reason, extra={"round": server_round})

    async def _run_round(self, record: RoundRecord) -> None:
        server_round = record.id
        rounds = self._config.rounds
        started = time.time()
        mechanism = self._privacy.mechanism()
        if mechanism is not None and (
            refusal := await self._privacy.refusal(server_round, mechanism)
        ):
            self._fail(server_round, refusal)
            return
        self._status(server_round, "selecting", started=started)
        try:
            connected = await self._selection.wait_for_quorum(server_round)
        except RoundFailedError as exc:
            self._fail(server_round, exc.message)
            return
        if (reason := self._cancelled(server_round)) is not None:
            self._fail(server_round, reason, status="cancelled")
            return
        selected = self._selection.select(connected)
        if mechanism is not None and len(selected) < rounds.min_clients:
            self._fail(
                server_round,
                f"privacy sampling selected {len(selected)} of {len(connected)} connected "
                f"clients, fewer than min_clients ({rounds.min_clients})",
            )
            return
        # adaptive clipping's noise split, checked before any client trains for nothing
        self._privacy.adaptive(self._privacy.denominator(len(connected)))
        head = self._store.head()
        if head is None:  # pragma: no cover - the coordinator writes version 1 at start
            raise RoundFailedError("no head model")
        self._aggregation.sync_state()
        fit_config = self._aggregation.configure_fit(server_round, selected)
        deadline = time.time() + rounds.deadline_s
        tasks = {client_id: uuid.uuid4().hex for client_id in selected}
        if self._config.secagg.enabled:
            self._start_secagg(server_round, head, tasks)
        model_size = self._blobs.size(head.digest)
        self.open = _OpenRound(
            server_round,
            head.digest,
            tasks,
            deadline,
            asyncio.Event(),
            model_size,
            target=self._selection.target(len(tasks)),
            fit_config=fit_config,
        )
        # the round waits for every selected client (no over-selection, no secure
        # aggregation): its model may be computed while their updates upload
        streamed = self.secagg is None and self.open.target >= len(tasks)
        self._aggregation.start_round(
            server_round, head.digest, [], selected=selected if streamed else ()
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
                ev.RoundStarted(
                    base_version=head.version,
                    selected=selected,
                    deadline_unix=deadline,
                    min_clients=rounds.min_clients,
                ),
                server_round=server_round,
            )
        for client_id in tasks:
            self._send_task(client_id)
        if self.secagg is not None:
            self._secagg_driver = asyncio.create_task(
                self._drive_secagg(self.secagg), name=f"flctl-round-{server_round}-secagg"
            )
        await self._finish_round(server_round, head, started, mechanism, len(connected))

    # ------------------------------------------------------------------ secure aggregation

    def _start_secagg(self, server_round: int, head: ModelRecord, tasks: dict[str, str]) -> None:
        """Open the round's secure aggregation for the selected clients (before any task).

        Raises:
            SecAggThresholdError: Fewer than 2 clients were selected.
        """
        cfg = self._config.secagg
        layout = SecureLayout.of(read_spec(self._blobs.path(head.digest)))
        setup = SecAggSetup.create(
            server_round,
            list(tasks),
            threshold=cfg.threshold,
            num_shares=cfg.num_shares,
            clip_range=cfg.clip_range,
            quantization_bits=cfg.quantization_bits,
            num_elements=layout.num_elements,
        )
        central = self._config.privacy.mode == "central"
        task = SecAggTask(
            setup,
            max_weight=cfg.max_weight,
            stage_timeout_s=cfg.stage_timeout_s,
            clip_norm=self._privacy.clip_norm() if central else 0.0,
        )
        self.secagg = SecAggRound(
            task=task,
            tasks=tasks,
            layout=layout,
            events=self._events,
            is_live=lambda client_id: self._is_live(client_id, server_round),
            has_failed=lambda client_id: self._has_failed(client_id, server_round),
            rejoin_grace_s=self._config.rounds.rejoin_grace_s,
            scratch=self._blobs.tmp_dir,
        )
        self._events.emit(self.secagg.started_event(), server_round=server_round)

    def _has_failed(self, client_id: str, server_round: int) -> bool:
        """Whether ``client_id`` reported its task of the round failed (connected or not)."""
        session = self._registry.get(client_id)
        return session is not None and session.failed_round == server_round

    def _is_live(self, client_id: str, server_round: int) -> bool:
        """Whether ``client_id`` is connected and has not reported its task of the round failed."""
        session = self._registry.get(client_id)
        return session is not None and session.streaming and session.failed_round != server_round

    async def _drive_secagg(self, secagg: SecAggRound) -> None:
        """Run the key stages; then the wait for the masked inputs knows who is still in."""
        server_round = secagg.server_round
        try:
            await secagg.run_key_stages(
                lambda: self._stopping or self._cancelled(server_round) is not None
            )
        finally:
            if self.open is not None and self.open.server_round == server_round:
                self.open.changed.set()

    def _end_secagg(self, server_round: int) -> None:
        """The round ended: answer the clients still waiting, drop the masked sum."""
        if self._secagg_driver is not None:
            self._secagg_driver.cancel()
            self._secagg_driver = None
        secagg, self.secagg = self.secagg, None
        if secagg is None:
            return
        reason = "it ended"
        try:
            record = self._store.get_round(server_round)
            reason = record.status + (f" ({record.reason})" if record.reason else "")
        except FlctlError:
            pass
        secagg.end(reason)

    async def _aggregate_secure(
        self,
        server_round: int,
        head: ModelRecord,
        accepted: list[Any],
        mechanism: SampledGaussianRound | None,
        connected: int,
    ) -> tuple[str, str, list[Any], list[int]]:
        """Close the masked inputs, unmask with the survivors' shares, aggregate the mean.

        Returns as :meth:`RoundAggregation.aggregate`: the model's and state's digests, the
        updates in the sum (the survivors') and their claimed weights.

        Raises:
            SecAggError: Too few clients left to unmask (``SecAggThresholdError``), shares
                that disagree, or a sum that still holds a mask.
            RoundFailedError: Fewer than ``min_clients`` inputs are in the sum.
        """
        secagg = self.secagg
        assert secagg is not None
        await secagg.close_masked_input()
        result = await secagg.run_unmask(lambda: self._stopping)
        survivors = set(result.survivors)
        accepted = [u for u in accepted if u.client_id in survivors]
        need = self._config.rounds.min_clients
        if result.num_inputs < need:
            raise RoundFailedError(
                f"secure aggregation has {result.num_inputs} masked inputs in its sum, fewer "
                f"than min_clients ({need})"
            )
        try:
            digest, state_digest, info = await self._aggregation.aggregate_secure(
                server_round,
                head,
                secagg.sum,
                unmask=result.unmask,
                quantizer=secagg.quantizer,
                num_inputs=result.num_inputs,
                mechanism=mechanism,
                connected=connected,
            )
        except FlctlError as exc:
            secagg.fail_at(secagg.stage, exc.message)
            raise
        self._events.emit(
            secagg.unmasked_event(info.total_weight, info.error_bound, info.noise_std),
            server_round=server_round,
        )
        log.info(
            "round %d: unmasked the sum of %d masked inputs (error bound %.3g)",
            server_round,
            result.num_inputs,
            info.error_bound,
            extra={"round": server_round},
        )
        return digest, state_digest, accepted, [int(u.num_examples) for u in accepted]

    def _send_task(self, client_id: str) -> None:
        open_round = self.open
        session = self._registry.get(client_id)
        if open_round is None or session is None or not session.streaming:
            return  # its task stream sends the task when it opens
        session.queue.put_nowait(self._task(open_round, client_id))
        self._events.emit(
            ev.TaskSent(
                task_id=open_round.selected[client_id],
                kind="fit",
                model_digest=open_round.base_digest,
            ),
            server_round=open_round.server_round,
            client_id=client_id,
            durable=False,
        )

    async def _resume_round(self, record: RoundRecord) -> None:
        """Carry on with a round a stopped coordinator left open (see :meth:`resume`).

        A round stopped while selecting sent no task yet: it selects again from the clients
        that come back. One stopped later keeps its tasks, deadline and accepted updates, and
        waits for each selected client that has not reported until the deadline, not
        ``rejoin_grace_s`` from the restart: a client training when the coordinator stopped
        rejoins only once its ``fit`` returns, with the update it kept. Once seen again, a
        client that leaves gets the grace as in any round.
        """
        server_round = record.id
        if record.status == "selecting":
            self._events.emit(
                ev.RoundResumed(selected=[], accepted=0, is_reselect=True),
                server_round=server_round,
            )
            log.info(
                "round %d resumed: selecting again", server_round, extra={"round": server_round}
            )
            await self._run_round(record)
            return
        head = self._store.head()
        if head is None or record.deadline is None:  # pragma: no cover - checked by resumable
            raise RoundFailedError("coordinator restarted")
        self._aggregation.sync_state()
        self.open = _OpenRound(
            server_round,
            head.digest,
            dict(record.tasks),
            record.deadline,
            asyncio.Event(),
            self._blobs.size(head.digest),
            waited_until=dict.fromkeys(record.tasks, record.deadline),
            target=self._selection.target(len(record.tasks)),
            reported={
                u.client_id for u in self._store.updates_for_round(server_round, status="accepted")
            },
            fit_config=dict(record.fit_config),
        )
        self._aggregation.start_round(
            server_round,
            head.digest,
            self._store.updates_for_round(server_round, status="accepted"),
        )
        accepted = len(self.open.reported)
        with self._store.transaction():
            self._status(server_round, "training")
            self._events.emit(
                ev.RoundResumed(
                    selected=sorted(record.tasks),
                    accepted=accepted,
                    deadline_unix=record.deadline,
                ),
                server_round=server_round,
            )
        log.info(
            "round %d resumed with %d accepted updates",
            server_round,
            accepted,
            extra={"round": server_round},
        )
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
        if self._config.secagg.enabled or record.config.get("secagg"):
            return (
                "coordinator restarted during secure aggregation: the round's keys and shares "
                "were held in memory only, so nothing of it can be unmasked"
            )
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
                self._privacy.charge_released(server_round)
            raise
        selected = sorted(self.open.selected)
        refused = dict(self.open.refused)
        self.open = None
        if is_local and accepted:
            assert mechanism is not None
            # noised updates left their clients: the round is spent, whatever happens next
            await self._privacy.charge(
                server_round, mechanism, clip_norm=self._config.privacy.clip_norm
            )
        if (reason := self._cancelled(server_round)) is not None:
            self._fail(server_round, reason, status="cancelled")
            return
        if self.secagg is not None and self.secagg.failure is not None:
            self._fail(server_round, self.secagg.failure)
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
        if self.secagg is not None:
            digest, state_digest, accepted, weights = await self._aggregate_secure(
                server_round, head, accepted, mechanism, connected
            )
        else:
            digest, state_digest, accepted, weights = await self._aggregation.aggregate(
                server_round, head, accepted, mechanism, connected
            )
        aggregate_s = time.perf_counter() - aggregating
        gate = self._config.gate
        # the gate's first check: the aggregate of finite updates can still overflow
        non_finite = ""
        if gate.mode != "off":
            checked = self._aggregation.last_non_finite  # as the model was written
            if checked is None:
                checked = await asyncio.to_thread(non_finite_tensors, self._blobs.path(digest))
            non_finite = checked
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
                    clients = await self._evaluation.run(
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
            verdict = (
                Verdict(non_finite) if non_finite else self._heads.check_metrics(metrics, head)
            )
            if verdict.is_rejected:
                self._heads.reject(server_round, digest, metrics, len(accepted), started, verdict)
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
                ev.ModelCreated(
                    version=model.version,
                    digest=model.digest,
                    kind=model.kind,
                    parent=model.parent,
                    metrics=metrics,
                    is_head=True,
                ),
                server_round=server_round,
            )
            self._events.emit(
                ev.RoundCommitted(
                    model_version=model.version,
                    metrics=metrics,
                    num_clients=len(accepted),
                    duration_s=time.time() - started,
                    # the coordinator's phases: aggregation (reading the updates, writing,
                    # hashing and storing the new model) and server-side evaluation
                    aggregate_s=round(aggregate_s, 4),
                    # "streamed" (summed while they uploaded), "incremental" (summed as they
                    # arrived), "whole", "private" or "secure"
                    aggregation=self._aggregation.last_mode,
                    evaluate_s=None if evaluate_s is None else round(evaluate_s, 4),
                ),
                server_round=server_round,
            )
        self._aggregation.committed(state_digest)
        log.info(
            "round %d committed: model version %d %s",
            server_round,
            model.version,
            metrics,
            extra={"round": server_round},
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
            secagg = self.secagg
            if secagg is not None and secagg.failure is not None:
                return self._store.updates_for_round(server_round, status="accepted")
            for client_id in open_round.selected:
                if client_id in reported:
                    continue
                if secagg is not None and client_id in secagg.out:
                    continue  # out of the secure aggregation: no masked input will count
                session = self._registry.get(client_id)
                if session is not None and session.streaming:
                    open_round.absent_since.pop(client_id, None)
                    open_round.waited_until.pop(client_id, None)
                    if session.failed_round != server_round:
                        outstanding.append(client_id)
                    continue
                # gone: it may come back (reconnect, restart) within the grace; a resumed
                # round's client not seen since the restart, until the deadline
                back_by = open_round.waited_until.get(client_id)
                if back_by is None:
                    back_by = open_round.absent_since.setdefault(client_id, now) + grace
                if now < back_by:
                    outstanding.append(client_id)
                    wake_at = min(wake_at, back_by + 0.01)
            if open_round.target and len(reported) >= open_round.target:
                # over-selection: the first N to report make the round
                accepted = self._store.updates_for_round(server_round, status="accepted")
                if secagg is not None:
                    return accepted  # every masked input taken is in the sum
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
        payload = ev.RoundCancelled if status == "cancelled" else ev.RoundFailed
        events.emit(payload(reason=reason, duration_s=record.duration_s), server_round=server_round)
    return record
