"""JsonFormatter and log_event: every line one JSON object, context fields where given."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from flctl.core import Event
from flctl.core import events as ev
from flctl.observe import JsonFormatter, event_level, log_event


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing JSON lines into a buffer (not propagating to the root)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("flctl.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_line_with_the_base_fields(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.info("round %d committed: %s", 3, {"loss": 0.5}, extra={"round": 3, "client": ""})
    logger.warning('two\nlines and "quotes" and ünïcode', extra={"client": "c1"})
    logger.debug("plain", extra={"request_id": "ab12", "round": None})
    first, second, third = lines(stream)
    assert first == {
        "time": first["time"],
        "level": "INFO",
        "logger": "flctl.test.json",
        "message": "round 3 committed: {'loss': 0.5}",
        "round": 3,
    }
    stamp = str(first["time"])
    assert stamp.endswith("Z") and datetime.fromisoformat(stamp).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert len(stamp) == len("2025-01-02T03:04:05.678Z")
    assert second["message"] == 'two\nlines and "quotes" and ünïcode'
    assert second["client"] == "c1" and second["level"] == "WARNING"
    assert third["request_id"] == "ab12" and "round" not in third
    assert len(stream.getvalue().splitlines()) == 3


def test_a_traceback_is_one_field_of_one_line(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("round %d crashed", 2, extra={"round": 2})
    [line] = lines(stream)
    assert line["level"] == "ERROR" and line["round"] == 2
    assert "Traceback" in str(line["exception"]) and "ValueError: bad value" in str(
        line["exception"]
    )


def test_an_event_line_carries_the_event_its_time_round_and_client(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    committed = Event(
        seq=42,
        time=1_700_000_000.25,
        type=ev.ROUND_COMMITTED,
        server_round=5,
        data={"model_version": 6},
    )
    rejected = Event(
        seq=43,
        time=1_700_000_001.0,
        type=ev.UPDATE_REJECTED,
        server_round=5,
        client_id="c2",
        data={"reason": "late"},
    )
    log_event(logger, committed, "round 5 committed")
    log_event(logger, rejected, "c2's update refused: late")
    first, second = lines(stream)
    assert first["time"] == "2023-11-14T22:13:20.250Z"
    assert first["event"] == "round.committed" and first["seq"] == 42
    assert first["round"] == 5 and "client" not in first
    assert first["data"] == {"model_version": 6} and first["level"] == "INFO"
    assert second["client"] == "c2" and second["level"] == "WARNING"
    assert second["message"] == "c2's update refused: late"


def test_event_levels() -> None:
    def event(kind: str, **data: object) -> Event:
        return Event(seq=1, time=0.0, type=kind, data=dict(data))

    assert event_level(event(ev.ROUND_FAILED)) == logging.WARNING
    assert event_level(event(ev.CLIENT_STATE, state="failed")) == logging.WARNING
    assert event_level(event(ev.CLIENT_STATE, state="training")) == logging.INFO
    assert event_level(event("future.thing")) == logging.INFO
