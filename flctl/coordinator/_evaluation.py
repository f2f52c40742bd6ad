"""Federated evaluation: the clients evaluate a round's new model before it commits.

With ``rounds.evaluate = "clients"`` or ``"both"``, once a round aggregated, the clients whose
update was accepted and that are still connected are sent an ``evaluate`` task for the new
model (:meth:`Strategy.configure_evaluate` may add config). The engine waits up to
``rounds.evaluate_timeout_s`` for their reports (``ReportEvaluation``), then the strategy's
:meth:`~flctl.aggregation.Strategy.aggregate_evaluate` combines those that arrived. A client
whose evaluate raised, or that did not answer, fails only its own evaluation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flctl.aggregation import EvaluateResult, Strategy, cap_weights
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.work import Task
from flctl.store import BlobStore, RoundRecord

from ._events import EventLog
from ._registry import Registry
from ._tasks import build_task

__all__ = ["ClientEvaluation", "Evaluation"]


@dataclass
class Evaluation:
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

    def task(self, client_id: str, task_config: Mapping[str, Any]) -> Task:
        """The evaluate task of ``client_id``: ``[task]``'s config, the strategy's, the round."""
        return build_task(
            "evaluate",
            self.server_round,
            self.tasks[client_id],
            self.digest,
            self.model_size,
            self.deadline,
            {**task_config, **self.config.get(client_id, {})},
        )


class ClientEvaluation:
    """Runs the clients' evaluation of a round's model and takes their reports."""

    def __init__(
        self,
        *,
        config: Config,
        blobs: BlobStore,
        events: EventLog,
        registry: Registry,
        strategy: Callable[[], Strategy],
        status: Callable[..., RoundRecord],
        stopping: Callable[[], bool],
        cancelled: Callable[[int], str | None],
    ) -> None:
        self._config = config
        self._blobs = blobs
        self._events = events
        self._registry = registry
        #: the engine's strategy now (the engine may build it anew between rounds)
        self._strategy = strategy
        self._status = status
        self._stopping = stopping
        self._cancelled = cancelled
        #: the evaluation the engine waits for, if any
        self.current: Evaluation | None = None

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
        evaluation = self.current
        if evaluation is None or evaluation.server_round != server_round:
            return f"round {server_round} is not evaluating"
        if evaluation.tasks.get(client_id) != task_id:
            return f"no evaluate task {task_id!r} was sent to this client in round {server_round}"
        if evaluation.answered(client_id):
            return "this evaluation was already reported"
        if failure:
            evaluation.failed[client_id] = failure
            self._events.emit(
                ev.EvaluationFailed(task_id=task_id, reason=failure),
                server_round=server_round,
                client_id=client_id,
            )
        else:
            result = EvaluateResult(client_id, float(loss), int(num_examples), dict(metrics or {}))
            evaluation.results[client_id] = result
            self._events.emit(
                ev.EvaluationReported(
                    task_id=task_id,
                    loss=result.loss,
                    num_examples=result.num_examples,
                    metrics=result.metrics,
                ),
                server_round=server_round,
                client_id=client_id,
                durable=False,
            )
        evaluation.changed.set()
        return None

    async def run(self, server_round: int, digest: str, clients: list[str]) -> dict[str, float]:
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
            self._note(server_round, {}, 0, "no client left to evaluate")
            return {}
        asked = self._strategy().configure_evaluate(server_round, connected)
        config = {c: dict(asked[c]) for c in connected if c in asked}
        evaluation = Evaluation(
            server_round,
            digest,
            self._blobs.size(digest),
            {client_id: uuid.uuid4().hex for client_id in connected},
            time.time() + rounds.evaluate_timeout_s,
            config,
            asyncio.Event(),
        )
        self.current = evaluation
        try:
            for client_id, task_id in evaluation.tasks.items():
                session = self._registry.get(client_id)
                if session is None or not session.streaming:
                    continue
                session.queue.put_nowait(evaluation.task(client_id, self._config.task))
                self._events.emit(
                    ev.TaskSent(task_id=task_id, kind="evaluate", model_digest=digest),
                    server_round=server_round,
                    client_id=client_id,
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
                    or self._stopping()
                    or self._cancelled(server_round) is not None
                ):
                    break
                try:
                    await asyncio.wait_for(evaluation.changed.wait(), evaluation.deadline - now)
                except TimeoutError:
                    pass
        finally:
            self.current = None
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
                ev.EvaluationFailed(task_id=task_id, reason=reason),
                server_round=server_round,
                client_id=client_id,
            )
        results = list(evaluation.results.values())
        self._note(server_round, evaluation.failed, len(evaluation.tasks))
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
        loss, metrics = self._strategy().aggregate_evaluate(results)
        return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

    def _note(
        self, server_round: int, failed: Mapping[str, str], asked: int, note: str = ""
    ) -> None:
        """Record in the round's reason which clients' evaluations failed, and why."""
        if failed:
            said = "; ".join(f"{c}: {why}" for c, why in sorted(failed.items()))
            note = f"evaluation failed on {len(failed)} of {asked} clients ({said})"
        if note:
            self._status(server_round, "evaluating", reason=note)
