"""The dashboard's view-model, folded from events."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from flctl.core.events import (
    CLIENT_JOINED,
    CLIENT_LEFT,
    CLIENT_STATE,
    COORDINATOR_STARTED,
    COORDINATOR_STOPPED,
    MODEL_CREATED,
    MODEL_REJECTED,
    PRIVACY_CHARGED,
    ROUND_CANCELLED,
    ROUND_COMMITTED,
    ROUND_FAILED,
    ROUND_QUEUED,
    ROUND_REJECTED,
    ROUND_STARTED,
    ROUND_STATUS,
    TASK_SENT,
    TERMINAL_ROUND_STATUSES,
    UPDATE_ACCEPTED,
    UPDATE_EXCLUDED,
    UPDATE_REJECTED,
    UPDATE_SCORED,
    Event,
)
from flctl.tui._data import get_float, get_int, get_metrics, get_str, get_str_list
from flctl.tui._line import event_line, is_notable

__all__ = ["ClientView", "DashboardState", "RoundView"]

#: How many event lines :attr:`DashboardState.last_events` keeps.
LAST_EVENTS = 8

#: Event types that mean nothing without a client id, or without a round id.
_CLIENT_TYPES = frozenset({CLIENT_JOINED, CLIENT_LEFT, CLIENT_STATE, UPDATE_ACCEPTED})
_ROUND_TYPES = frozenset(
    {
        ROUND_QUEUED,
        ROUND_STARTED,
        ROUND_STATUS,
        UPDATE_ACCEPTED,
        UPDATE_EXCLUDED,
        ROUND_COMMITTED,
        ROUND_REJECTED,
        ROUND_FAILED,
        ROUND_CANCELLED,
    }
)


@dataclass
class RoundView:
    """What the dashboard knows about one round.

    Attributes:
        server_round: The round's id, from 1.
        status: ``queued``, ``selecting``, ``training``, ``aggregating``, ``evaluating``,
            ``committed``, ``rejected``, ``failed`` or ``cancelled``.
        num_clients: How many updates the round's model aggregates (0 until it has one).
        selected: Client ids selected for the round.
        reported: Client ids whose update was accepted, in arrival order.
        metrics: The metrics of the round's model (committed or rejected).
        duration_s: How long the round ran, once it ended.
        reason: Why the round failed, was cancelled, or its model was rejected by the gate.
        model_version: The version the round committed (or stored as rejected).
        started: Unix time the round started.
        deadline: Unix time updates are due.
        outliers: Client id -> ``flag`` or ``drop``, for the updates the outlier rule marked
            (``update.excluded``): flagged, or left out of the aggregate.
    """

    server_round: int
    status: str = "queued"
    num_clients: int = 0
    selected: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    reason: str = ""
    model_version: int | None = None
    started: float | None = None
    deadline: float | None = None
    outliers: dict[str, str] = field(default_factory=dict)

    @property
    def is_done(self) -> bool:
        """Whether the round reached a terminal status (committed, rejected, failed, cancelled)."""
        return self.status in TERMINAL_ROUND_STATUSES


@dataclass
class ClientView:
    """What the dashboard knows about one client.

    Attributes:
        client_id: The client's id.
        state: ``idle``, ``downloading``, ``training``, ``uploading``, ``failed``, ``offline``,
            or ``starting`` (see :meth:`DashboardState.expect_client`).
        last_seen: Unix time of the latest event about the client.
        rounds_joined: How many of its updates were accepted.
        connected: Whether it is joined now.
        progress: Progress of its current task (0..1), when it reported one.
        bytes_per_s: Its transfer rate while downloading or uploading, when reported.
        state_since: Unix time it entered ``state``, None when no event said so (a watch
            that resumed mid-log).
    """

    client_id: str
    state: str = "idle"
    last_seen: float = 0.0
    rounds_joined: int = 0
    connected: bool = True
    progress: float | None = None
    bytes_per_s: float | None = None
    state_since: float | None = None

    def enter(self, state: str, at: float) -> None:
        """Move to ``state`` at Unix time ``at``; staying in the same state keeps its start."""
        if state != self.state or self.state_since is None:
            self.state_since = at
        self.state = state


class DashboardState:
    """View-model folded from events (:class:`flctl.core.events.Event`).

    Feed it every event in log order with :meth:`apply`; hand it to ``render_dashboard``
    to draw it. It holds no business logic: it only remembers what the events said.

    Attributes:
        title: Shown in the panel's title.
        address: The coordinator's address, shown after the title.
        state_dir: The coordinator's state directory, shown in the header.
        total_rounds: How many rounds the run expects, for the progress line; None hides it.
        rounds: One :class:`RoundView` per round id seen.
        clients: One :class:`ClientView` per client id seen.
        head_version: The head model's version, None before the first model.
        last_events: The latest event lines (see ``event_line``), oldest first.

    Example:
        ```python
        state = DashboardState(total_rounds=3)
        for event in events:
            state.apply(event)
        if state.all_done([1, 2, 3]):
            ...
        ```
    """

    def __init__(
        self,
        *,
        title: str = "flctl",
        address: str = "",
        state_dir: str = "",
        total_rounds: int | None = None,
    ) -> None:
        self.title = title
        self.address = address
        self.state_dir = state_dir
        self.total_rounds = total_rounds
        self.rounds: dict[int, RoundView] = {}
        self.clients: dict[str, ClientView] = {}
        self.head_version: int | None = None
        #: epsilon spent, budget and accountant, from the latest privacy.charged event
        self.privacy: tuple[float, float, str] | None = None
        self.last_events: deque[str] = deque(maxlen=LAST_EVENTS)
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the latest event applied (0 before any); resume the log after it."""
        return self._last_seq

    @property
    def connected_clients(self) -> int:
        """How many clients are joined now."""
        return sum(client.connected for client in self.clients.values())

    @property
    def rounds_done(self) -> int:
        """How many rounds reached a terminal status."""
        return sum(view.is_done for view in self.rounds.values())

    def apply(self, event: Event) -> None:
        """Fold one event into the view.

        Events with a ``seq`` at or below the last one applied are ignored, so replaying an
        overlapping stretch of the log is harmless. Unknown event types are ignored.

        Args:
            event: The next event of the log.
        """
        if event.seq <= self._last_seq:
            return
        self._last_seq = event.seq
        handler = _HANDLERS.get(event.type)
        if handler is None:
            return
        if (event.type in _CLIENT_TYPES and not event.client_id) or (
            event.type in _ROUND_TYPES and event.server_round < 1
        ):
            return  # malformed: nothing to attach it to
        if event.client_id:
            self._client(event.client_id, event.time).last_seen = event.time
        handler(self, event)
        if is_notable(event):  # heartbeats would flush the footer many times a second
            self.last_events.append(event_line(event))

    def expect_client(self, client_id: str, at: float) -> None:
        """Show a client that is starting and has not joined yet (``flctl demo``'s processes).

        It is listed as ``starting``, not connected, until its ``client.joined`` event.

        Args:
            client_id: The id it will join as.
            at: Unix time it started.
        """
        client = self.clients.get(client_id)
        if client is not None and client.connected:
            return  # it joined already
        client = self._client(client_id, at)
        client.connected, client.progress, client.last_seen = False, None, at
        client.enter("starting", at)

    def is_round_done(self, server_round: int) -> bool:
        """Return whether the round is committed, rejected, failed or cancelled.

        Args:
            server_round: The round's id.

        Returns:
            False too for a round no event mentioned yet.
        """
        view = self.rounds.get(server_round)
        return view is not None and view.is_done

    def all_done(self, round_ids: Iterable[int]) -> bool:
        """Return whether every given round is done (True for none).

        Args:
            round_ids: The rounds to check, e.g. those ``round start`` queued.
        """
        return all(self.is_round_done(server_round) for server_round in round_ids)

    # Folding, one method per event type.

    def _client(self, client_id: str, now: float) -> ClientView:
        client = self.clients.get(client_id)
        if client is None:
            # A watch may resume mid-log, after the client's join.
            client = self.clients[client_id] = ClientView(client_id, last_seen=now)
        return client

    def _round(self, server_round: int) -> RoundView:
        view = self.rounds.get(server_round)
        if view is None:
            view = self.rounds[server_round] = RoundView(server_round)
        return view

    def _coordinator_started(self, event: Event) -> None:
        self.address = get_str(event.data, "address", self.address)
        self.state_dir = get_str(event.data, "state_dir", self.state_dir)
        head = get_int(event.data, "head_version")
        if head is not None:
            self.head_version = head

    def _client_joined(self, event: Event) -> None:
        client = self.clients[event.client_id]
        client.connected, client.progress = True, None
        client.enter("idle", event.time)

    def _client_left(self, event: Event) -> None:
        client = self.clients[event.client_id]
        client.connected, client.progress = False, None
        client.enter("offline", event.time)

    def _client_state(self, event: Event) -> None:
        client = self.clients[event.client_id]
        client.enter(get_str(event.data, "state", client.state), event.time)
        client.connected = client.state != "offline"
        client.progress = get_float(event.data, "progress")
        client.bytes_per_s = get_float(event.data, "bytes_per_s")

    def _round_queued(self, event: Event) -> None:
        self._round(event.server_round)

    def _round_started(self, event: Event) -> None:
        view = self._round(event.server_round)
        view.status = "training"
        view.selected = get_str_list(event.data, "selected")
        view.started = event.time
        view.deadline = get_float(event.data, "deadline_unix")

    def _round_status(self, event: Event) -> None:
        view = self._round(event.server_round)
        view.status = get_str(event.data, "status", view.status)

    def _update_accepted(self, event: Event) -> None:
        view = self._round(event.server_round)
        if event.client_id not in view.reported:
            view.reported.append(event.client_id)
            self.clients[event.client_id].rounds_joined += 1

    def _update_excluded(self, event: Event) -> None:
        view = self._round(event.server_round)
        view.outliers[event.client_id or "?"] = get_str(event.data, "mode", "drop")

    def _round_committed(self, event: Event) -> None:
        view = self._round(event.server_round)
        view.status = "committed"
        view.model_version = get_int(event.data, "model_version")
        view.metrics = get_metrics(event.data)
        view.num_clients = get_int(event.data, "num_clients") or len(view.reported)
        view.duration_s = get_float(event.data, "duration_s")
        if view.model_version is not None:
            self.head_version = view.model_version

    def _round_rejected(self, event: Event) -> None:
        view = self._round(event.server_round)
        view.status = "rejected"  # its model is stored, but the head did not move
        view.model_version = get_int(event.data, "model_version")
        view.metrics = get_metrics(event.data)
        view.num_clients = get_int(event.data, "num_clients") or len(view.reported)
        view.duration_s = get_float(event.data, "duration_s")
        view.reason = get_str(event.data, "reason")

    def _round_ended(self, event: Event, status: str) -> None:
        view = self._round(event.server_round)
        view.status = status
        view.reason = get_str(event.data, "reason")
        view.duration_s = get_float(event.data, "duration_s")

    def _round_failed(self, event: Event) -> None:
        self._round_ended(event, "failed")

    def _round_cancelled(self, event: Event) -> None:
        self._round_ended(event, "cancelled")

    def _model_created(self, event: Event) -> None:
        version = get_int(event.data, "version")
        is_head = event.data.get("head") is True or get_str(event.data, "kind") == "initial"
        if version is not None and is_head:
            self.head_version = version

    def _privacy_charged(self, event: Event) -> None:
        epsilon = get_float(event.data, "epsilon")
        budget = get_float(event.data, "budget")
        if epsilon is not None and budget is not None:
            self.privacy = (epsilon, budget, get_str(event.data, "accountant") or "rdp")

    def _noop(self, event: Event) -> None:
        """Known types with nothing to fold beyond ``last_seen`` and the footer line."""


_HANDLERS = {
    COORDINATOR_STARTED: DashboardState._coordinator_started,
    CLIENT_JOINED: DashboardState._client_joined,
    CLIENT_LEFT: DashboardState._client_left,
    CLIENT_STATE: DashboardState._client_state,
    ROUND_QUEUED: DashboardState._round_queued,
    ROUND_STARTED: DashboardState._round_started,
    ROUND_STATUS: DashboardState._round_status,
    UPDATE_ACCEPTED: DashboardState._update_accepted,
    ROUND_COMMITTED: DashboardState._round_committed,
    ROUND_REJECTED: DashboardState._round_rejected,
    ROUND_FAILED: DashboardState._round_failed,
    ROUND_CANCELLED: DashboardState._round_cancelled,
    MODEL_CREATED: DashboardState._model_created,
    MODEL_REJECTED: DashboardState._noop,
    PRIVACY_CHARGED: DashboardState._privacy_charged,
    TASK_SENT: DashboardState._noop,
    UPDATE_REJECTED: DashboardState._noop,
    UPDATE_EXCLUDED: DashboardState._update_excluded,
    UPDATE_SCORED: DashboardState._noop,
    COORDINATOR_STOPPED: DashboardState._noop,
}
