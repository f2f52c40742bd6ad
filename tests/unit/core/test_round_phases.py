"""A round's phase durations from its events."""

from __future__ import annotations

from flctl.core.events import (
    PHASE_EVENT_TYPES,
    ROUND_COMMITTED,
    ROUND_RESUMED,
    ROUND_STARTED,
    ROUND_STATUS,
    UPDATE_ACCEPTED,
    Event,
    round_phases,
)


def _event(seq: int, time: float, kind: str, **data: object) -> Event:
    return Event(seq=seq, time=time, type=kind, server_round=1, client_id="", data=dict(data))


def test_each_phase_lasts_until_the_next_mark_and_a_resumed_phase_adds_up() -> None:
    events = [
        _event(1, 10.0, ROUND_STATUS, status="selecting"),
        _event(2, 12.0, ROUND_STARTED),
        _event(3, 13.0, UPDATE_ACCEPTED),  # not a mark
        _event(4, 15.0, ROUND_RESUMED),  # a restart: still training
        _event(5, 17.5, ROUND_STATUS, status="aggregating"),
        _event(6, 18.0, ROUND_STATUS, status="evaluating"),
        _event(7, 18.25, ROUND_COMMITTED),
    ]
    assert round_phases(events) == [
        ("selecting", 2.0),
        ("training", 5.5),
        ("aggregating", 0.5),
        ("evaluating", 0.25),
    ]
    assert round_phases(events[:1]) == []  # one mark: no span yet
    assert round_phases([]) == []
    assert UPDATE_ACCEPTED not in PHASE_EVENT_TYPES


def test_a_clock_step_backwards_never_gives_a_negative_phase() -> None:
    events = [_event(1, 10.0, ROUND_STARTED), _event(2, 9.0, ROUND_COMMITTED)]
    assert round_phases(events) == [("training", 0.0)]
