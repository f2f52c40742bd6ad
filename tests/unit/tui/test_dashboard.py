"""The dashboard view-model, its rendering and the plain event lines."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.console import Console

import flctl.tui
from flctl.core import events as ev
from flctl.core.events import Event
from flctl.tui import DashboardState, event_line, is_notable, render_dashboard

T0 = 1_700_000_000.0  # 22:13:20 UTC
REASON = "deadline passed with 1 of 2 required updates"


class Log:
    """Builds a gap-free event log the way the coordinator appends it."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(
        self,
        type_: str,
        at: float,
        *,
        server_round: int = 0,
        client_id: str = "",
        **data: Any,
    ) -> Event:
        event = Event(len(self.events) + 1, T0 + at, type_, server_round, client_id, data)
        self.events.append(event)
        return event


def realistic_log() -> Log:
    log = Log()
    log.add(
        ev.COORDINATOR_STARTED,
        0,
        address="127.0.0.1:7070",
        pid=42,
        state_dir="/srv/proj/.flctl",
        head_version=1,
    )
    for i, client in enumerate(["c1", "c2", "c3"]):
        log.add(ev.CLIENT_JOINED, 1 + i, client_id=client, session_id=f"s{i}")
    log.add(ev.ROUND_QUEUED, 5, server_round=1)
    log.add(ev.ROUND_QUEUED, 5, server_round=2)
    log.add(
        ev.ROUND_STARTED,
        6,
        server_round=1,
        base_version=1,
        selected=["c1", "c2", "c3"],
        deadline_unix=T0 + 66,
        min_clients=2,
    )
    for i, client in enumerate(["c1", "c2", "c3"]):
        log.add(
            ev.UPDATE_ACCEPTED,
            7 + i,
            server_round=1,
            client_id=client,
            task_id=f"t{i}",
            num_examples=600,
            metrics={"loss": 0.3},
            size=1024,
            digest="ab",
        )
    log.add(
        ev.ROUND_COMMITTED,
        10,
        server_round=1,
        model_version=2,
        metrics={"accuracy": 0.9611, "loss": 0.1234, "f1": 0.5},
        num_clients=3,
        duration_s=1.8,
    )
    log.add(
        ev.ROUND_STARTED,
        11,
        server_round=2,
        base_version=2,
        selected=["c1", "c2"],
        deadline_unix=T0 + 71,
        min_clients=2,
    )
    log.add(ev.ROUND_FAILED, 71, server_round=2, reason=REASON, duration_s=60.0)
    return log


def fold(events: list[Event], **kwargs: Any) -> DashboardState:
    state = DashboardState(**kwargs)
    for event in events:
        state.apply(event)
    return state


def render(
    state: DashboardState, *, width: int = 100, height: int = 200, now: float = T0 + 80
) -> str:
    """The panel as plain text; tall by default, so only tests about height see it shrink."""
    console = Console(
        file=io.StringIO(), width=width, height=height, force_terminal=False, color_system=None
    )
    console.print(render_dashboard(state, now=now))
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output


def row(output: str, first_cells: str) -> str:
    """The line of a table whose cells start with ``first_cells`` (single spaces)."""
    pattern = re.compile(r"│\s+" + r"\s+".join(map(re.escape, first_cells.split())) + r"\s")
    matches = [line for line in output.splitlines() if pattern.search(line)]
    assert len(matches) == 1, (first_cells, output)
    return matches[0]


# The view-model.


def test_realistic_log_folds_into_rounds_and_clients() -> None:
    state = fold(realistic_log().events)

    assert state.address == "127.0.0.1:7070"
    assert state.state_dir == "/srv/proj/.flctl"
    assert state.head_version == 2
    assert state.last_seq == 13

    first, second = state.rounds[1], state.rounds[2]
    assert (first.status, first.model_version, first.num_clients) == ("committed", 2, 3)
    assert first.metrics == {"accuracy": 0.9611, "loss": 0.1234, "f1": 0.5}
    assert first.reported == ["c1", "c2", "c3"]
    assert first.duration_s == 1.8
    assert (first.started, first.deadline) == (T0 + 6, T0 + 66)
    assert (second.status, second.reason, second.duration_s) == ("failed", REASON, 60.0)
    assert second.selected == ["c1", "c2"]
    assert second.model_version is None

    assert sorted(state.clients) == ["c1", "c2", "c3"]
    assert [c.rounds_joined for c in state.clients.values()] == [1, 1, 1]
    assert all(c.connected and c.state == "idle" for c in state.clients.values())
    assert state.clients["c3"].last_seen == T0 + 9

    assert state.is_round_done(1) and state.is_round_done(2)
    assert not state.is_round_done(3)
    assert state.all_done([1, 2]) and not state.all_done([1, 2, 3]) and state.all_done([])
    assert list(state.last_events)[-1] == f"22:14:31 round 2 failed: {REASON}"
    assert len(state.last_events) == 8


def test_replayed_or_older_seq_is_ignored() -> None:
    events = realistic_log().events
    once = fold(events)
    twice = fold(events + events)
    assert twice.rounds == once.rounds
    assert twice.clients == once.clients
    assert list(twice.last_events) == list(once.last_events)
    assert render(twice) == render(once)

    twice.apply(Event(3, T0 + 99, ev.CLIENT_LEFT, client_id="c2"))
    assert twice.clients["c2"].connected


def test_unknown_event_types_are_ignored() -> None:
    events = realistic_log().events
    state = fold(events)
    before = render(state)
    state.apply(Event(99, T0 + 75, "gpu.temperature", 1, "c1", {"celsius": 80}))
    assert state.last_seq == 99
    assert state.clients["c1"].last_seen == T0 + 7  # not even last_seen moves
    assert render(state) == before


def test_client_lifecycle() -> None:
    log = Log()
    log.add(ev.CLIENT_JOINED, 0, client_id="c1")
    log.add(ev.CLIENT_STATE, 1, client_id="c1", state="training", progress=0.45)
    state = fold(log.events)
    client = state.clients["c1"]
    assert (client.state, client.progress, client.connected) == ("training", 0.45, True)
    assert "training 45%" in render(state)
    assert state.last_events[-1] == "22:13:20 client c1 joined"  # state updates stay quiet

    state.apply(log.add(ev.CLIENT_LEFT, 2, client_id="c1", reason="shutdown"))
    assert (client.state, client.connected, client.last_seen) == ("offline", False, T0 + 2)
    assert "0 clients connected" in render(state)

    state.apply(log.add(ev.CLIENT_JOINED, 3, client_id="c1"))
    assert (client.state, client.connected, client.progress) == ("idle", True, None)


def test_a_transfer_shows_its_bytes_and_rate() -> None:
    log = Log()
    log.add(ev.CLIENT_JOINED, 0, client_id="c1")
    moving = log.add(
        ev.CLIENT_STATE,
        1,
        client_id="c1",
        state="uploading",
        progress=0.5,
        bytes_done=256 * 2**20,
        bytes_total=512 * 2**20,
        bytes_per_s=300 * 2**20,
    )
    state = fold(log.events)
    assert state.clients["c1"].bytes_per_s == 300 * 2**20
    assert "uploading 50% 300.0 MiB/s" in render(state)
    assert event_line(moving).endswith(
        "client c1 uploading (50%, 256.0 MiB of 512.0 MiB, 300.0 MiB/s)"
    )
    # training reports no rate: none is shown
    state.apply(log.add(ev.CLIENT_STATE, 2, client_id="c1", state="training", progress=0.0))
    assert state.clients["c1"].bytes_per_s is None
    assert "MiB/s" not in render(state)


def test_a_training_client_shows_how_long_it_has_trained_and_its_progress_once_reported() -> None:
    log = Log()
    log.add(ev.CLIENT_JOINED, 0, client_id="c1")
    log.add(ev.CLIENT_STATE, 10, client_id="c1", state="downloading", progress=0.0)
    log.add(ev.CLIENT_STATE, 11, client_id="c1", state="training", progress=0.0)
    state = fold(log.events)
    assert state.clients["c1"].state_since == T0 + 11
    output = render(state, now=T0 + 53)
    assert re.search(r"│ c1\s+training 42 s\s", output)
    assert "0%" not in output
    # progress the task reports arrives as another event of the same state: the clock goes on
    state.apply(log.add(ev.CLIENT_STATE, 50, client_id="c1", state="training", progress=0.4))
    assert state.clients["c1"].state_since == T0 + 11
    assert re.search(r"│ c1\s+training 40% 42 s\s", render(state, now=T0 + 53))
    state.apply(log.add(ev.CLIENT_STATE, 54, client_id="c1", state="uploading", progress=0.0))
    assert re.search(r"│ c1\s+uploading 0% 1.0 s\s", render(state, now=T0 + 55))
    state.apply(log.add(ev.CLIENT_STATE, 56, client_id="c1", state="idle", progress=0.0))
    assert re.search(r"│ c1\s+idle\s+0\s", render(state, now=T0 + 99))


def test_clients_that_are_starting_show_until_they_join() -> None:
    state = DashboardState(title="flctl demo")
    state.expect_client("c1", T0)
    state.expect_client("c2", T0 + 1)
    output = render(state, now=T0 + 4)
    assert "0 clients connected" in output
    assert re.search(r"│ c1\s+starting 4.0 s\s+0\s+4s ago\s", output)
    assert re.search(r"│ c2\s+starting 3.0 s\s", output)
    state.apply(Event(1, T0 + 5, ev.CLIENT_JOINED, client_id="c2"))
    output = render(state, now=T0 + 6)
    assert "1 client connected" in output
    assert re.search(r"│ c2\s+idle\s+0\s+1s ago\s", output)
    assert re.search(r"│ c1\s+starting 6.0 s\s", output)
    assert output.index("c2") < output.index("c1")  # joined clients first
    state.expect_client("c2", T0 + 7)  # too late: it joined already
    assert state.clients["c2"].state == "idle" and state.clients["c2"].connected


def test_events_from_a_client_not_seen_joining_create_it() -> None:
    state = DashboardState()
    state.apply(Event(7, T0, ev.UPDATE_ACCEPTED, 4, "late", {}))
    assert state.clients["late"].rounds_joined == 1
    assert state.rounds[4].reported == ["late"]


@pytest.mark.parametrize(
    ("data", "head"),
    [
        ({"version": 5, "kind": "aggregate", "head": True}, 5),
        ({"version": 1, "kind": "initial"}, 1),
        ({"version": 6, "kind": "aggregate"}, 3),
        ({"version": 7, "kind": "rollback", "head": True}, 7),
        ({"kind": "initial"}, 3),
    ],
)
def test_model_created_moves_head_only_when_head(data: dict[str, Any], head: int) -> None:
    state = DashboardState()
    state.apply(Event(1, T0, ev.COORDINATOR_STARTED, data={"head_version": 3}))
    state.apply(Event(2, T0, ev.MODEL_CREATED, data=data))
    assert state.head_version == head


def test_cancelled_round_and_status_changes() -> None:
    log = Log()
    log.add(ev.ROUND_STARTED, 0, server_round=1, selected=["a"])
    log.add(ev.ROUND_STATUS, 1, server_round=1, status="aggregating")
    state = fold(log.events)
    assert state.rounds[1].status == "aggregating" and not state.is_round_done(1)
    state.apply(log.add(ev.ROUND_CANCELLED, 2, server_round=1, reason="by operator"))
    assert (state.rounds[1].status, state.rounds[1].reason) == ("cancelled", "by operator")
    assert state.is_round_done(1)


GATE_REASON = "accuracy 0.4000 is 0.5000 worse than 0.9000 of version 2 (the best version)"


def test_rejected_round_is_done_keeps_its_reason_and_the_head_stays() -> None:
    log = Log()
    log.add(ev.COORDINATOR_STARTED, 0, head_version=2)
    log.add(ev.ROUND_STARTED, 1, server_round=3, selected=["c1", "c2"])
    log.add(ev.UPDATE_ACCEPTED, 2, server_round=3, client_id="c1")
    log.add(ev.UPDATE_ACCEPTED, 2, server_round=3, client_id="c2")
    log.add(ev.MODEL_REJECTED, 3, server_round=3, version=3, parent=2, reason=GATE_REASON)
    log.add(
        ev.ROUND_REJECTED,
        3,
        server_round=3,
        model_version=3,
        metrics={"accuracy": 0.4, "loss": 1.5},
        num_clients=2,
        duration_s=2.0,
        reason=GATE_REASON,
    )
    state = fold(log.events)
    view = state.rounds[3]
    assert (view.status, view.reason, view.model_version) == ("rejected", GATE_REASON, 3)
    assert state.is_round_done(3) and state.head_version == 2
    output = render(state, width=140)
    assert "head model v2" in output
    assert GATE_REASON[:40] in row(output, "3 rejected 2 0.4000 1.5000 2.0 s")
    assert f"model v3 rejected by the validation gate: {GATE_REASON}" in "".join(state.last_events)


def test_malformed_data_is_tolerated() -> None:
    log = Log()
    log.add(ev.COORDINATOR_STARTED, 0, address=None, head_version="x")
    log.add(ev.ROUND_STARTED, 1, server_round=1, selected="c1", deadline_unix="soon")
    log.add(ev.ROUND_COMMITTED, 2, server_round=1, metrics={"accuracy": "high", "loss": 1})
    log.add(ev.CLIENT_STATE, 3, state="training")  # no client id
    log.add(ev.ROUND_QUEUED, 4)  # no round id
    state = fold(log.events, address="default:1")
    assert state.address == "default:1"
    assert state.head_version is None
    assert state.rounds[1].selected == [] and state.rounds[1].deadline is None
    assert state.rounds[1].metrics == {"loss": 1.0}
    assert list(state.rounds) == [1] and state.clients == {}
    assert "1.0000" in render(state)


# Rendering.


def test_render_realistic_log() -> None:
    output = render(fold(realistic_log().events, total_rounds=5), width=100)

    assert "╭─ flctl · 127.0.0.1:7070 ─" in output
    assert "head model v2  ·  3 clients connected  ·  state /srv/proj/.flctl" in output
    assert "rounds 2/5 ━" in output
    assert re.search(r"│ Round\s+Status\s+Clients\s+Accuracy\s+Loss\s+Time\s+Note\s", output)
    assert row(output, "1 committed 3 0.9611 0.1234 1.8 s model v2")
    assert "f1" not in row(output, "1 committed")
    assert "deadline passed with" in row(output, "2 failed 0/2 - - 1m 00s")
    assert "Client  State  Rounds  Last seen" in re.sub(" {3,}", "  ", output)
    for client, ago in [("c1", "1m ago"), ("c2", "1m ago"), ("c3", "1m ago")]:
        assert re.search(rf"│ {client}\s+idle\s+1\s+{ago}\s", output)
    assert f"22:14:31 round 2 failed: {REASON}" in output
    assert "22:13:30 round 1 committed: 3 clients, accuracy 0.9611, loss 0.1234" in output


def test_failure_reason_in_note_column_when_wide_and_under_table_when_narrow() -> None:
    state = fold(realistic_log().events[:-1])
    state.apply(Event(99, T0 + 71, ev.ROUND_FAILED, 2, data={"reason": REASON}))
    state.last_events.clear()  # only the table may show it

    wide = render(state, width=120)
    assert REASON in row(wide, "2 failed")
    narrow = render(state, width=80)
    assert "Note" not in narrow
    assert f"│ round 2: {REASON}" in narrow


def test_open_round_shows_progress_elapsed_and_deadline() -> None:
    state = fold(realistic_log().events[:9])  # round 1 started, two updates in
    output = render(state, now=T0 + 20.0)
    line = row(output, "1 ⠋ training 2/3 - - 14 s, deadline in 46 s")
    assert "│" in line
    assert row(render(state, now=T0 + 20.1), "1 ⠙ training")  # the marker turns with time
    queued = row(output, "2 queued - - - -")
    assert queued
    late = render(state, now=T0 + 70)
    assert "deadline passed" in row(late, "1")


def test_more_than_twelve_rounds_collapse() -> None:
    log = Log()
    for server_round in range(1, 16):
        log.add(ev.ROUND_QUEUED, server_round, server_round=server_round)
    output = render(fold(log.events))
    assert "│ Rounds" in output
    assert "… 3 earlier rounds" in output
    assert re.search(r"│\s+4\s+queued", output) and re.search(r"│\s+15\s+queued", output)
    assert not re.search(r"│\s+3\s+queued", output)
    assert output.index("earlier rounds") < output.index("Status")


def test_twelve_rounds_do_not_collapse() -> None:
    log = Log()
    for server_round in range(1, 13):
        log.add(ev.ROUND_QUEUED, server_round, server_round=server_round)
    output = render(fold(log.events))
    assert "earlier round" not in output
    assert re.search(r"│\s+1\s+queued", output)


def test_empty_state_renders() -> None:
    output = render(DashboardState(title="watch"), width=80)
    assert "╭─ watch ─" in output
    assert "head model -  ·  0 clients connected" in output
    assert "no rounds yet" in output and "no clients yet" in output
    assert "rounds 0/" not in output


def test_user_text_is_not_read_as_markup() -> None:
    state = DashboardState(address="[::]:7070")
    state.apply(Event(1, T0, ev.CLIENT_JOINED, client_id="[bold]eve[/bold]"))
    output = render(state)
    assert "flctl · [::]:7070" in output
    assert "[bold]eve[/bold]" in output


def test_statuses_are_coloured() -> None:
    state = fold(realistic_log().events)
    state.apply(Event(20, T0 + 72, ev.ROUND_CANCELLED, 3, data={"reason": "stop"}))
    state.apply(Event(21, T0 + 72, ev.ROUND_STARTED, 4, data={"selected": ["c1"]}))
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")
    console.print(render_dashboard(state, now=T0 + 80))
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[32mcommitted" in output
    assert "\x1b[31mfailed" in output
    assert "\x1b[33mcancelled" in output
    assert "\x1b[36m⠋ training" in output


@pytest.mark.parametrize("width", [80, 120])
def test_busy_dashboard_fits_the_width(width: int) -> None:
    log = Log()
    clients = [f"client-{i:03d}-with-a-rather-long-identifier-{i * 7919}" for i in range(20)]
    for client in clients:
        log.add(ev.CLIENT_JOINED, 0, client_id=client)
    for server_round in range(1, 15):
        log.add(ev.ROUND_STARTED, 1, server_round=server_round, selected=clients)
        log.add(
            ev.ROUND_COMMITTED,
            2,
            server_round=server_round,
            model_version=1000 + server_round,
            metrics={"accuracy": 0.5, "loss": 12.3456},
            num_clients=20,
            duration_s=725.0,
        )
    log.add(ev.ROUND_STARTED, 3, server_round=15, selected=clients, deadline_unix=T0 + 4000)
    log.add(ev.ROUND_STATUS, 4, server_round=15, status="aggregating")
    log.add(ev.ROUND_FAILED, 5, server_round=16, reason="x" * 200)
    state = fold(log.events, address="coordinator.example.org:7070", total_rounds=20)
    state.state_dir = "/very/long/path/" * 8

    output = render(state, width=width, now=T0 + 3000)
    lines = output.splitlines()
    assert all(len(line) == width for line in lines)
    assert "rounds 15/20" in output
    assert "… 4 earlier rounds" in output
    assert "… 4 more clients" in output
    assert row(output, "14 committed 20 0.5000 12.3456 12m 05s")
    assert "aggregating" in row(output, "15")
    assert "deadline in 16m" in output
    assert ("round 16: xxx" in output) is (width == 80)
    assert "x" * 200 not in output


def demo_log(num_clients: int, num_rounds: int) -> Log:
    """A run like ``flctl demo``'s: clients join, rounds commit, the last one is training."""
    log = Log()
    log.add(ev.COORDINATOR_STARTED, 0, address="127.0.0.1:40123", head_version=1)
    clients = [f"c{i}" for i in range(1, num_clients + 1)]
    for client in clients:
        log.add(ev.CLIENT_JOINED, 1, client_id=client)
    for server_round in range(1, num_rounds):
        at = 10.0 * server_round
        log.add(ev.ROUND_STARTED, at, server_round=server_round, selected=clients)
        for client in clients:
            log.add(ev.UPDATE_ACCEPTED, at + 1, server_round=server_round, client_id=client)
        log.add(
            ev.ROUND_COMMITTED,
            at + 2,
            server_round=server_round,
            model_version=server_round + 1,
            metrics={"accuracy": 0.9, "loss": 0.3},
            num_clients=num_clients,
            duration_s=2.0,
        )
    at = 10.0 * num_rounds
    log.add(ev.ROUND_STARTED, at, server_round=num_rounds, selected=clients)
    for client in clients:
        log.add(ev.CLIENT_STATE, at + 1, client_id=client, state="training", progress=0.0)
    return log


def test_demo_panel_fits_80x24_with_every_client_and_the_newest_events() -> None:
    state = fold(demo_log(6, 10).events, total_rounds=10, title="flctl demo (digits)")
    output = render(state, width=80, height=24, now=T0 + 105)
    lines = output.splitlines()
    assert len(lines) <= 24 and all(len(line) == 80 for line in lines), output
    assert lines[0].startswith("╭─ flctl demo (digits)") and lines[-1].startswith("╰")
    for i in range(1, 7):
        assert re.search(rf"│ c{i}\s+training 4.0 s\s+9\s+4s ago\s", output), output
    assert "more client" not in output
    newest = list(state.last_events)[-2:]
    assert all(line in output for line in newest), output
    assert row(output, "10 ⠋ training 0/6")
    assert row(output, "9 committed 6 0.9000 0.3000 2.0 s")
    assert "earlier rounds" in output  # rounds 1.. gave way to the clients


def test_many_clients_are_summarised_in_80x24() -> None:
    state = fold(demo_log(30, 3).events, total_rounds=3)
    state.apply(Event(state.last_seq + 1, T0 + 31, ev.CLIENT_LEFT, client_id="c7"))
    output = render(state, width=80, height=24, now=T0 + 35)
    lines = output.splitlines()
    assert len(lines) <= 24 and all(len(line) == 80 for line in lines), output
    shown = re.findall(r"│ (c\d+)\s+(?:training|offline)", output)
    hidden = 30 - len(shown)
    assert len(shown) >= 3 and hidden > 0
    assert f"… {hidden} more clients (1 not connected)" in output
    assert not re.search(r"│ c7\s", output)  # the one that left is among those summarised
    assert row(output, "3 ⠋ training 0/30")
    assert list(state.last_events)[-1] in output


@pytest.mark.parametrize("height", [12, 14, 15, 16, 24, 40])
def test_panel_never_overflows_the_console_height(height: int) -> None:
    state = fold(demo_log(8, 12).events, total_rounds=12)
    output = render(state, width=80, height=height, now=T0 + 125)
    # 13 lines: border, header, progress, one round, one client and "… more", no events
    assert len(output.splitlines()) <= max(height, 13)
    assert (list(state.last_events)[-1] in output) is (height >= 15)


# Plain lines.


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            Event(
                1, T0, ev.COORDINATOR_STARTED, data={"address": "0.0.0.0:7070", "head_version": 4}
            ),
            "22:13:20 coordinator started on 0.0.0.0:7070, head model v4",
        ),
        (
            Event(1, T0, ev.COORDINATOR_STARTED, data={"address": "h:1", "head_version": None}),
            "22:13:20 coordinator started on h:1, no model yet",
        ),
        (
            Event(1, T0, ev.COORDINATOR_STOPPED, data={"reason": "SIGTERM"}),
            "22:13:20 coordinator stopped: SIGTERM",
        ),
        (Event(1, T0, ev.CLIENT_JOINED, client_id="c1"), "22:13:20 client c1 joined"),
        (
            Event(1, T0, ev.CLIENT_LEFT, client_id="c1", data={"reason": "timeout"}),
            "22:13:20 client c1 left: timeout",
        ),
        (Event(1, T0, ev.CLIENT_LEFT, client_id="c1"), "22:13:20 client c1 left"),
        (
            Event(
                1, T0, ev.CLIENT_STATE, client_id="c1", data={"state": "uploading", "progress": 0.5}
            ),
            "22:13:20 client c1 uploading (50%)",
        ),
        (Event(1, T0, ev.ROUND_QUEUED, 3), "22:13:20 round 3 queued"),
        (
            Event(
                1,
                T0,
                ev.ROUND_STARTED,
                3,
                data={"selected": ["a", "b"], "deadline_unix": T0 + 30, "min_clients": 2},
            ),
            "22:13:20 round 3 started: 2 clients selected (min 2), deadline in 30 s",
        ),
        (
            Event(1, T0, ev.ROUND_STATUS, 3, data={"status": "evaluating"}),
            "22:13:20 round 3 evaluating",
        ),
        (
            Event(1, T0, ev.TASK_SENT, 3, "c1", {"task_id": "t", "kind": "train"}),
            "22:13:20 round 3: train task sent to c1",
        ),
        (
            Event(1, T0, ev.UPDATE_ACCEPTED, 3, "c1", {"num_examples": 1, "metrics": {}}),
            "22:13:20 round 3: update from c1 accepted (1 example)",
        ),
        (
            Event(1, T0, ev.UPDATE_REJECTED, 3, "c1", {"reason": "digest mismatch"}),
            "22:13:20 round 3: update from c1 rejected: digest mismatch",
        ),
        (
            Event(
                1,
                T0 + 3603,
                ev.ROUND_COMMITTED,
                3,
                data={
                    "model_version": 4,
                    "metrics": {"loss": 0.1234, "accuracy": 0.9611},
                    "num_clients": 3,
                    "duration_s": 1.8,
                },
            ),
            "23:13:23 round 3 committed: 3 clients, accuracy 0.9611, loss 0.1234 (1.8 s)",
        ),
        (
            Event(1, T0, ev.ROUND_FAILED, 4, data={"reason": REASON, "duration_s": 60}),
            f"22:13:20 round 4 failed: {REASON}",
        ),
        (
            Event(1, T0, ev.ROUND_CANCELLED, 4, data={"reason": "by operator"}),
            "22:13:20 round 4 cancelled: by operator",
        ),
        (
            Event(
                1,
                T0,
                ev.ROUND_REJECTED,
                4,
                data={
                    "model_version": 5,
                    "metrics": {"accuracy": 0.4},
                    "num_clients": 2,
                    "duration_s": 2.0,
                    "reason": GATE_REASON,
                },
            ),
            "22:13:20 round 4 rejected: 2 clients, accuracy 0.4000 (2.0 s); model v5 kept, "
            "head stays",
        ),
        (
            Event(1, T0, ev.MODEL_REJECTED, 4, data={"version": 5, "reason": GATE_REASON}),
            f"22:13:20 model v5 rejected by the validation gate: {GATE_REASON}",
        ),
        (
            Event(1, T0, ev.MODEL_CREATED, data={"version": 4, "kind": "aggregate", "parent": 3}),
            "22:13:20 model v4 created (aggregate, parent v3)",
        ),
        (
            Event(1, T0, ev.COORDINATOR_WARNING, data={"message": "server.crt expires in 3 days"}),
            "22:13:20 warning: server.crt expires in 3 days",
        ),
        (
            Event(1, T0, ev.IDENTITY_REVOKED, 0, "c2", {"serial": None, "author": "admin"}),
            "22:13:20 c2 revoked by admin",
        ),
        (
            Event(1, T0, ev.IDENTITY_REVOKED, 0, "c2", {"serial": "5f", "reason": "lost laptop"}),
            "22:13:20 certificate 5f of c2 revoked by unknown: lost laptop",
        ),
        (
            Event(
                1, T0, ev.SECURITY_REFUSED, 0, "c2", {"rpc": "Join", "reason": "identity revoked"}
            ),
            "22:13:20 refused c2 on Join: identity revoked",
        ),
        (
            Event(1, T0, ev.MODEL_ROLLBACK, data={"source": 2, "version": 5, "author": "admin"}),
            "22:13:20 rolled back to v2: head is v5 (by admin)",
        ),
        (
            Event(1, T0, ev.MODEL_ROLLBACK_DEFERRED, 7, data={"source": 2, "server_round": 7}),
            "22:13:20 rollback to v2 deferred until round 7 ends (by unknown)",
        ),
        (
            Event(1, T0, ev.MODEL_ROLLBACK_FAILED, 7, data={"source": 2, "error": "same weights"}),
            "22:13:20 deferred rollback to v2 failed: same weights",
        ),
        (
            Event(1, T0, ev.MODEL_TAGGED, data={"tag": "best", "version": 3}),
            "22:13:20 tagged v3 as 'best'",
        ),
        (
            Event(1, T0, "gpu.temperature", 2, "c1", {"celsius": 80}),
            "22:13:20 gpu.temperature round 2 client c1",
        ),
    ],
    ids=lambda value: value.type if isinstance(value, Event) else "",
)
def test_event_line(event: Event, line: str) -> None:
    assert event_line(event) == line


@pytest.mark.parametrize(
    ("event", "notable"),
    [
        (Event(1, T0, ev.CLIENT_STATE, 1, "c1", {"state": "idle", "progress": 0.0}), False),
        (Event(1, T0, ev.CLIENT_STATE, 1, "c1", {"state": "training", "progress": 0.4}), False),
        (Event(1, T0, ev.CLIENT_STATE, 1, "c1", {"state": "uploading", "progress": 0.5}), False),
        (Event(1, T0, ev.TASK_SENT, 1, "c1", {"kind": "train"}), False),
        (Event(1, T0, ev.CLIENT_STATE, 1, "c1", {"state": "failed"}), True),
        (Event(1, T0, ev.CLIENT_JOINED, client_id="c1"), True),
        (Event(1, T0, ev.CLIENT_LEFT, client_id="c1"), True),
        (Event(1, T0, ev.ROUND_QUEUED, 1), True),
        (Event(1, T0, ev.ROUND_STARTED, 1), True),
        (Event(1, T0, ev.ROUND_STATUS, 1, data={"status": "aggregating"}), True),
        (Event(1, T0, ev.UPDATE_ACCEPTED, 1, "c1"), True),
        (Event(1, T0, ev.UPDATE_REJECTED, 1, "c1"), True),
        (Event(1, T0, ev.MODEL_CREATED, data={"version": 2}), True),
        (Event(1, T0, ev.ROUND_COMMITTED, 1), True),
        (Event(1, T0, ev.ROUND_FAILED, 1), True),
        (Event(1, T0, "gpu.temperature"), True),
    ],
    ids=lambda value: value.type if isinstance(value, Event) else str(value),
)
def test_only_what_a_heartbeat_repeats_is_not_notable(event: Event, notable: bool) -> None:
    assert is_notable(event) is notable


def test_a_failed_client_reaches_the_footer() -> None:
    state = DashboardState()
    state.apply(Event(1, T0, ev.CLIENT_STATE, 2, "c1", {"state": "training"}))
    state.apply(Event(2, T0, ev.CLIENT_STATE, 2, "c1", {"state": "failed"}))
    assert list(state.last_events) == ["22:13:20 client c1 failed"]


def test_event_line_survives_an_impossible_time() -> None:
    assert event_line(Event(1, 1e20, ev.ROUND_QUEUED, 1)) == "--:--:-- round 1 queued"


def test_all_is_sorted_and_complete() -> None:
    assert flctl.tui.__all__ == sorted(flctl.tui.__all__)
    public = {name for name in vars(flctl.tui) if not name.startswith("_")}
    assert set(flctl.tui.__all__) == public


def test_privacy_spent_against_budget_in_header_and_lines() -> None:
    import io

    from rich.console import Console

    from flctl.core import Event
    from flctl.tui import DashboardState, event_line, render_dashboard

    state = DashboardState(title="t")
    charged = Event(
        seq=1,
        time=0.0,
        type="privacy.charged",
        server_round=3,
        data={"epsilon": 1.2345, "budget": 3.0, "accountant": "rdp"},
    )
    state.apply(charged)
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(render_dashboard(state, now=0.0))
    assert "ε 1.234 of 3 (rdp)" in console.file.getvalue()  # type: ignore[attr-defined]
    assert "round 3 charged: epsilon 1.2345 of 3 (rdp)" in event_line(charged)
    refused = Event(
        seq=2,
        time=0.0,
        type="privacy.refused",
        server_round=4,
        data={"reason": "privacy budget exhausted"},
    )
    assert "round 4 refused: privacy budget exhausted" in event_line(refused)
