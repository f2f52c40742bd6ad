"""Prometheus metrics computed from the coordinator's events (``flctl serve --metrics-address``).

:class:`MetricsCollector` is an event listener: ``coordinator.subscribe(collector.observe)``
feeds it the same events the live panel and ``round watch`` read, and its
:attr:`~MetricsCollector.registry` holds the metrics that ``/metrics`` renders
(docs/operations.md lists each one). Counters count from the start of this process, as
Prometheus expects (``rate()`` and ``increase()`` handle a restart); the gauges say what the
events since then said.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flctl.core import Event
from flctl.core import events as ev

from ._reasons import (
    REFUSAL_REASONS,
    UPDATE_REJECTION_REASONS,
    refusal_reason,
    update_rejection_reason,
)

__all__ = ["CLIENT_STATES", "MetricsCollector", "ROUND_PHASES"]

#: The ``state`` label values of ``flctl_clients`` (a connected client's last reported state).
CLIENT_STATES = ("idle", "downloading", "training", "uploading", "failed")
#: The ``phase`` label values of ``flctl_round_phase_seconds``: a round's non-terminal statuses.
ROUND_PHASES = ("selecting", "training", "aggregating", "evaluating")
#: Terminal round statuses, in the order ``flctl_rounds_total`` lists them.
_TERMINAL = ("committed", "rejected", "failed", "cancelled")
_TERMINAL_TYPES = {
    ev.ROUND_COMMITTED: "committed",
    ev.ROUND_REJECTED: "rejected",
    ev.ROUND_FAILED: "failed",
    ev.ROUND_CANCELLED: "cancelled",
}
#: An event type as the coordinator writes them (``round.committed``); anything else is
#: counted as ``other``, so that the ``type`` label stays bounded whatever reaches it.
_EVENT_TYPE = re.compile(r"[a-z][a-z_]{0,31}\.[a-z][a-z_]{0,31}")

_ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Reported(Collector):
    """Gauges exported only once an event has told their value (none before: 0 would lie).

    Epsilon spent and the budget exist only where differential privacy is on.
    """

    def __init__(self) -> None:
        self._help: dict[str, str] = {}
        self._values: dict[str, float] = {}

    def declare(self, name: str, documentation: str) -> None:
        self._help[name] = documentation

    def set(self, name: str, value: float) -> None:
        self._values[name] = value

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation in self._help.items():
            if name in self._values:
                yield GaugeMetricFamily(name, documentation, value=self._values[name])


@dataclass
class _Transfer:
    """One client's download as its progress reports tell it."""

    total: int = 0
    counted: int = 0


class MetricsCollector:
    """Turns events into Prometheus metrics, in a registry of its own.

    The registry is not prometheus-client's global one, so that several collectors (several
    coordinators in one test process) never share a metric. Events may arrive from any
    thread (each store commit announces its events): one lock guards the collector's state.

    Args:
        registry: Where to register the metrics (default: a new :class:`CollectorRegistry`).

    Example:
        ::

            collector = MetricsCollector()
            coordinator.subscribe(collector.observe)
            text = prometheus_client.generate_latest(collector.registry)
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        #: The registry ``/metrics`` renders.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rounds = Counter(
            "flctl_rounds",
            "Rounds that ended, by terminal status.",
            ["status"],
            registry=r,
        )
        self.round_duration = Histogram(
            "flctl_round_duration_seconds",
            "Duration of each round that started, by terminal status.",
            ["status"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.phase_duration = Histogram(
            "flctl_round_phase_seconds",
            "Time rounds spent in each phase (selecting, training, aggregating, evaluating).",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.aggregation = Histogram(
            "flctl_aggregation_seconds",
            "The coordinator's aggregation phase of each committed round.",
            buckets=_AGGREGATION_BUCKETS,
            registry=r,
        )
        self.clients = Gauge(
            "flctl_clients",
            "Connected clients, by the state they last reported.",
            ["state"],
            registry=r,
        )
        self.received = Counter(
            "flctl_received_bytes",
            "Bytes of accepted updates received on the wire (every stream of each upload).",
            registry=r,
        )
        self.sent = Counter(
            "flctl_sent_bytes",
            "Bytes of models the clients reported downloading (in their progress reports).",
            registry=r,
        )
        self.rate = Gauge(
            "flctl_transfer_bytes_per_second",
            "The summed rate of the transfers in progress, as the clients last reported it.",
            ["direction"],
            registry=r,
        )
        self.accepted = Counter(
            "flctl_updates_accepted",
            "Updates accepted (on disk, counted for their round).",
            registry=r,
        )
        self.rejected = Counter(
            "flctl_updates_rejected",
            "Updates refused, by reason code.",
            ["reason"],
            registry=r,
        )
        self.refusals = Counter(
            "flctl_refusals",
            "Calls, connections and rounds refused, by reason code.",
            ["reason"],
            registry=r,
        )
        self.privacy = _Reported()
        self.privacy.declare(
            "flctl_dp_epsilon_spent",
            "Differential privacy: epsilon spent after the last charged round.",
        )
        self.privacy.declare(
            "flctl_dp_epsilon_budget", "Differential privacy: the configured epsilon budget."
        )
        r.register(self.privacy)
        self.leader = Gauge(
            "flctl_leader",
            "1 while this process leads and serves rounds, 0 while it stands by or has stopped.",
            registry=r,
        )
        self.head_version = Gauge(
            "flctl_head_model_version",
            "The head model's version.",
            registry=r,
        )
        self.events = Counter(
            "flctl_events",
            "Events written to the event log, by type.",
            ["type"],
            registry=r,
        )
        # every bounded label value is there from the start, at 0: a rate over a series that
        # appears late misses its first increase
        for status in _TERMINAL:
            self.rounds.labels(status)
        for phase in ROUND_PHASES:
            self.phase_duration.labels(phase)
        for state in CLIENT_STATES:
            self.clients.labels(state)
        for direction in ("download", "upload"):
            self.rate.labels(direction)
        for code in UPDATE_REJECTION_REASONS:
            self.rejected.labels(code)
        for code in REFUSAL_REASONS:
            self.refusals.labels(code)
        self._lock = threading.Lock()
        self._client_states: dict[str, str] = {}
        self._rates: dict[str, tuple[str, float]] = {}  # client -> (direction, bytes/s)
        self._downloads: dict[str, _Transfer] = {}
        self._phases: dict[int, tuple[str, float]] = {}  # round -> (phase, since)

    def observe(self, event: Event) -> None:
        """Account for one event; events of types it does not know are only counted.

        Args:
            event: An event, as the coordinator's listeners receive it.
        """
        with self._lock:
            kind = event.type if _EVENT_TYPE.fullmatch(event.type) else "other"
            self.events.labels(kind).inc()
            handler = _HANDLERS.get(event.type)
            if handler is not None:
                handler(self, event, event.data)

    # ------------------------------------------------------------------ the coordinator

    def _started(self, event: Event, data: Mapping[str, Any]) -> None:
        self.leader.set(1)
        if (version := _number(data.get("head_version"))) is not None:
            self.head_version.set(version)

    def _stopped(self, event: Event, data: Mapping[str, Any]) -> None:
        self.leader.set(0)
        self._client_states.clear()
        self._rates.clear()
        self._downloads.clear()
        self._phases.clear()
        self._publish_clients()

    def _head(self, event: Event, data: Mapping[str, Any]) -> None:
        """``model.created`` (when it became the head) and ``model.rollback``."""
        if data.get("head", True) and (version := _number(data.get("version"))) is not None:
            self.head_version.set(version)

    # ------------------------------------------------------------------ rounds

    def _phase(self, event: Event, data: Mapping[str, Any]) -> None:
        status = str(data.get("status", ""))
        if status in ROUND_PHASES:
            self._enter(event, status)

    def _round_started(self, event: Event, data: Mapping[str, Any]) -> None:
        self._enter(event, "training")

    def _round_resumed(self, event: Event, data: Mapping[str, Any]) -> None:
        # the time before the restart is unknown: the phase is timed from here
        self._phases.pop(event.server_round, None)
        self._enter(event, "selecting" if data.get("reselect") else "training")

    def _enter(self, event: Event, phase: str) -> None:
        self._leave(event)
        self._phases[event.server_round] = (phase, event.time)

    def _leave(self, event: Event) -> None:
        current = self._phases.pop(event.server_round, None)
        if current is not None:
            phase, since = current
            self.phase_duration.labels(phase).observe(max(0.0, event.time - since))

    def _round_ended(self, event: Event, data: Mapping[str, Any]) -> None:
        status = _TERMINAL_TYPES[event.type]
        self._leave(event)
        self.rounds.labels(status).inc()
        if (duration := _number(data.get("duration_s"))) is not None:
            self.round_duration.labels(status).observe(max(0.0, duration))
        if status == "committed" and (seconds := _number(data.get("aggregate_s"))) is not None:
            self.aggregation.observe(max(0.0, seconds))

    # ------------------------------------------------------------------ updates

    def _update_accepted(self, event: Event, data: Mapping[str, Any]) -> None:
        self.accepted.inc()
        wire = _number(data.get("wire_bytes"))
        if wire is None:
            wire = _number(data.get("size"))
        if wire is not None and wire > 0:
            self.received.inc(wire)

    def _update_rejected(self, event: Event, data: Mapping[str, Any]) -> None:
        code = update_rejection_reason(
            str(data.get("reason", "")), is_malformed=bool(data.get("malformed"))
        )
        self.rejected.labels(code).inc()

    def _security_refused(self, event: Event, data: Mapping[str, Any]) -> None:
        code = refusal_reason(str(data.get("reason", "")), str(data.get("rpc", "")))
        self.refusals.labels(code).inc()

    # ------------------------------------------------------------------ privacy

    def _privacy_charged(self, event: Event, data: Mapping[str, Any]) -> None:
        if (epsilon := _number(data.get("epsilon"))) is not None:
            self.privacy.set("flctl_dp_epsilon_spent", epsilon)
        if (budget := _number(data.get("budget"))) is not None:
            self.privacy.set("flctl_dp_epsilon_budget", budget)

    def _privacy_refused(self, event: Event, data: Mapping[str, Any]) -> None:
        self.refusals.labels("privacy_budget").inc()
        if (budget := _number(data.get("budget"))) is not None:
            self.privacy.set("flctl_dp_epsilon_budget", budget)

    # ------------------------------------------------------------------ clients

    def _joined(self, event: Event, data: Mapping[str, Any]) -> None:
        self._forget(event.client_id)
        self._client_states[event.client_id] = "idle"
        self._publish_clients()

    def _left(self, event: Event, data: Mapping[str, Any]) -> None:
        self._forget(event.client_id)
        self._publish_clients()

    def _forget(self, client_id: str) -> None:
        self._client_states.pop(client_id, None)
        self._rates.pop(client_id, None)
        self._downloads.pop(client_id, None)

    def _client_state(self, event: Event, data: Mapping[str, Any]) -> None:
        client, state = event.client_id, str(data.get("state", ""))
        if not client:
            return
        if state == "offline":
            self._forget(client)
            self._publish_clients()
            return
        self._count_download(client, state, data)
        self._client_states[client] = state if state in CLIENT_STATES else "other"
        rate = _number(data.get("bytes_per_s"))
        if state in ("downloading", "uploading") and rate is not None:
            direction = "download" if state == "downloading" else "upload"
            self._rates[client] = (direction, max(0.0, rate))
        else:
            self._rates.pop(client, None)
        self._publish_clients()

    def _count_download(self, client: str, state: str, data: Mapping[str, Any]) -> None:
        """Add what a client's download moved on since its last report to the sent bytes.

        A download that ends (the client moves on to training) counts whole: progress is
        reported by tenths, so the last tenth has no report of its own.
        """
        transfer = self._downloads.get(client)
        if state == "downloading":
            total, done = _number(data.get("bytes_total")), _number(data.get("bytes_done"))
            if total is None or done is None:
                return
            if transfer is None or transfer.total != int(total) or done < transfer.counted:
                transfer = self._downloads[client] = _Transfer(total=int(total))
            if done > transfer.counted:
                self.sent.inc(done - transfer.counted)
                transfer.counted = int(done)
            return
        if transfer is None:
            return
        del self._downloads[client]
        if state == "training" and transfer.total > transfer.counted:
            self.sent.inc(transfer.total - transfer.counted)

    def _publish_clients(self) -> None:
        counts = dict.fromkeys(CLIENT_STATES, 0)
        for state in self._client_states.values():
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            self.clients.labels(state).set(count)
        rates = {"download": 0.0, "upload": 0.0}
        for direction, rate in self._rates.values():
            rates[direction] += rate
        for direction, rate in rates.items():
            self.rate.labels(direction).set(rate)


def _number(value: Any) -> float | None:
    """A numeric event field, or None (absent, null, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


_HANDLERS = {
    ev.COORDINATOR_STARTED: MetricsCollector._started,
    ev.COORDINATOR_STOPPED: MetricsCollector._stopped,
    ev.MODEL_CREATED: MetricsCollector._head,
    ev.MODEL_ROLLBACK: MetricsCollector._head,
    ev.ROUND_STATUS: MetricsCollector._phase,
    ev.ROUND_STARTED: MetricsCollector._round_started,
    ev.ROUND_RESUMED: MetricsCollector._round_resumed,
    ev.ROUND_COMMITTED: MetricsCollector._round_ended,
    ev.ROUND_REJECTED: MetricsCollector._round_ended,
    ev.ROUND_FAILED: MetricsCollector._round_ended,
    ev.ROUND_CANCELLED: MetricsCollector._round_ended,
    ev.UPDATE_ACCEPTED: MetricsCollector._update_accepted,
    ev.UPDATE_REJECTED: MetricsCollector._update_rejected,
    ev.SECURITY_REFUSED: MetricsCollector._security_refused,
    ev.PRIVACY_CHARGED: MetricsCollector._privacy_charged,
    ev.PRIVACY_REFUSED: MetricsCollector._privacy_refused,
    ev.CLIENT_JOINED: MetricsCollector._joined,
    ev.CLIENT_LEFT: MetricsCollector._left,
    ev.CLIENT_STATE: MetricsCollector._client_state,
}
