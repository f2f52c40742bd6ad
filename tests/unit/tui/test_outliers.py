"""Byzantine detection in the live panel and the plain event lines."""

from __future__ import annotations

from flctl.core import events as ev
from flctl.core.events import Event
from flctl.tui import event_line, is_notable
from tests.unit.tui.test_dashboard import T0, Log, fold, render, row


def _round_with_outliers() -> Log:
    log = Log()
    log.add(ev.COORDINATOR_STARTED, 0, head_version=1)
    log.add(ev.ROUND_STARTED, 1, server_round=1, selected=["c1", "c2", "c3", "c4"])
    for i, client in enumerate(["c1", "c2", "c3", "c4"]):
        log.add(ev.UPDATE_ACCEPTED, 2 + i, server_round=1, client_id=client)
        log.add(
            ev.UPDATE_SCORED,
            2 + i,
            server_round=1,
            client_id=client,
            l2=1.0 + i,
            cosine=None if i == 0 else 0.9,
            median_distance=None,
        )
    excluded = {"score": "l2", "value": 41.25, "z": 12.3, "threshold": 3.5}
    log.add(ev.UPDATE_EXCLUDED, 7, server_round=1, client_id="c4", mode="drop", **excluded)
    flagged = {"score": "cosine", "value": -0.2, "z": -4.1, "threshold": 3.5}
    log.add(ev.UPDATE_EXCLUDED, 7, server_round=1, client_id="c3", mode="flag", **flagged)
    log.add(
        ev.ROUND_COMMITTED,
        8,
        server_round=1,
        model_version=2,
        metrics={"accuracy": 0.9},
        num_clients=3,
        duration_s=7.0,
    )
    return log


def test_event_lines_of_scores_and_outliers() -> None:
    events = {(e.type, e.client_id): e for e in _round_with_outliers().events}
    scored = events[(ev.UPDATE_SCORED, "c2")]
    assert event_line(scored).endswith("round 1: update from c2 scored: l2 2, cos 0.9")
    assert not is_notable(scored)  # one per update: round status lists them
    dropped = events[(ev.UPDATE_EXCLUDED, "c4")]
    assert is_notable(dropped)
    assert event_line(dropped).endswith(
        "round 1: update from c4 excluded as an outlier (l2 41.25, z 12.30)"
    )
    flagged = event_line(events[(ev.UPDATE_EXCLUDED, "c3")])
    assert flagged.endswith("round 1: update from c3 flagged as an outlier (cosine -0.2, z -4.10)")
    bare = Event(1, T0, ev.UPDATE_EXCLUDED, 2, "c9", {})
    assert event_line(bare).endswith("round 2: update from c9 excluded as an outlier")


def test_the_panel_counts_a_rounds_outliers() -> None:
    state = fold(_round_with_outliers().events)
    assert state.rounds[1].outliers == {"c4": "drop", "c3": "flag"}
    assert any("c4 excluded as an outlier" in line for line in state.last_events)
    assert not any("scored" in line for line in state.last_events)
    wide = render(state, width=120)
    assert "model v2, 1 excluded, 1 flagged" in row(wide, "1 committed 3 0.9000")
