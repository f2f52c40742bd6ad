"""MetricsCollector: synthetic events in, the Prometheus text format out, parsed back."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flctl.core import Event
from flctl.core import events as ev
from flctl.observe import (
    CLIENT_STATES,
    REFUSAL_REASONS,
    ROUND_PHASES,
    UPDATE_REJECTION_REASONS,
    MetricsCollector,
)


class Feed:
    """Builds events as the coordinator writes them (payload.to_data()), seq and time rising."""

    def __init__(self, collector: MetricsCollector, start: float = 1000.0) -> None:
        self.collector = collector
        self.time = start
        self._seq: Iterator[int] = itertools.count(1)

    def __call__(
        self,
        payload: ev.EventPayload,
        *,
        server_round: int = 0,
        client_id: str = "",
        after: float = 0.0,
    ) -> Event:
        self.time += after
        event = Event(
            seq=next(self._seq),
            time=self.time,
            type=payload.type,
            server_round=server_round,
            client_id=client_id,
            data=payload.to_data(),
        )
        self.collector.observe(event)
        return event


def scrape(collector: MetricsCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered text: (name, sorted labels) -> value."""
    text = generate_latest(collector.registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, tuple(sorted(labels.items())))]  # type: ignore[no-any-return]


@pytest.fixture
def collector() -> MetricsCollector:
    return MetricsCollector()


@pytest.fixture
def feed(collector: MetricsCollector) -> Feed:
    return Feed(collector)


def _committed(feed: Feed, server_round: int, *, duration: float = 4.0) -> None:
    feed(ev.RoundStatus("selecting"), server_round=server_round)
    feed(
        ev.RoundStarted(base_version=1, selected=["c1", "c2"], deadline_unix=0.0, min_clients=2),
        server_round=server_round,
        after=0.5,
    )
    feed(ev.RoundStatus("aggregating"), server_round=server_round, after=2.0)
    feed(ev.RoundStatus("evaluating"), server_round=server_round, after=0.25)
    feed(
        ev.ModelCreated(version=server_round + 1, digest="d", kind="aggregate", parent=1),
        server_round=server_round,
        after=1.0,
    )
    feed(
        ev.RoundCommitted(
            model_version=server_round + 1,
            metrics={"loss": 0.5},
            num_clients=2,
            duration_s=duration,
            aggregate_s=0.02,
            aggregation="incremental",
            evaluate_s=1.0,
        ),
        server_round=server_round,
    )


def test_every_bounded_label_is_exported_at_zero_before_any_event(
    collector: MetricsCollector,
) -> None:
    samples = scrape(collector)
    for status in ("committed", "rejected", "failed", "cancelled"):
        assert value(samples, "flctl_rounds_total", status=status) == 0
    for state in CLIENT_STATES:
        assert value(samples, "flctl_clients", state=state) == 0
    for code in UPDATE_REJECTION_REASONS:
        assert value(samples, "flctl_updates_rejected_total", reason=code) == 0
    for code in REFUSAL_REASONS:
        assert value(samples, "flctl_refusals_total", reason=code) == 0
    for phase in ROUND_PHASES:
        assert value(samples, "flctl_round_phase_seconds_count", phase=phase) == 0
    assert value(samples, "flctl_leader") == 0
    # privacy gauges exist only once a privacy event told them (0 would claim a budget)
    assert not [key for key in samples if key[0].startswith("flctl_dp_")]


def test_rounds_phases_and_durations(feed: Feed, collector: MetricsCollector) -> None:
    _committed(feed, 1, duration=4.0)
    _committed(feed, 2, duration=40.0)
    feed(ev.RoundStatus("selecting"), server_round=3)
    feed(ev.RoundFailed(reason="quorum", duration_s=60.0), server_round=3, after=60.0)
    feed(ev.RoundCancelled(reason="admin", duration_s=None), server_round=4)
    feed(
        ev.RoundRejected(model_version=9, metrics={}, num_clients=2, duration_s=3.0, reason="gate"),
        server_round=5,
    )
    s = scrape(collector)
    assert value(s, "flctl_rounds_total", status="committed") == 2
    assert value(s, "flctl_rounds_total", status="failed") == 1
    assert value(s, "flctl_rounds_total", status="cancelled") == 1
    assert value(s, "flctl_rounds_total", status="rejected") == 1
    # durations: the two committed ones, in their buckets; the cancelled one never started
    assert value(s, "flctl_round_duration_seconds_count", status="committed") == 2
    assert value(s, "flctl_round_duration_seconds_sum", status="committed") == 44.0
    assert value(s, "flctl_round_duration_seconds_bucket", status="committed", le="5.0") == 1
    assert value(s, "flctl_round_duration_seconds_bucket", status="committed", le="+Inf") == 2
    assert ("flctl_round_duration_seconds_count", (("status", "cancelled"),)) not in s
    # phases from the events' times: selecting 0.5 s twice and 60 s once, training 2 s, ...
    assert value(s, "flctl_round_phase_seconds_count", phase="selecting") == 3
    assert value(s, "flctl_round_phase_seconds_sum", phase="selecting") == 61.0
    assert value(s, "flctl_round_phase_seconds_sum", phase="training") == 4.0
    assert value(s, "flctl_round_phase_seconds_sum", phase="aggregating") == 0.5
    assert value(s, "flctl_round_phase_seconds_sum", phase="evaluating") == 2.0
    assert value(s, "flctl_aggregation_seconds_count") == 2
    assert value(s, "flctl_aggregation_seconds_sum") == pytest.approx(0.04)
    assert value(s, "flctl_head_model_version") == 3
    assert value(s, "flctl_events_total", type="round.committed") == 2


def test_a_resumed_round_times_its_phase_from_the_resume(
    feed: Feed, collector: MetricsCollector
) -> None:
    feed(ev.RoundResumed(selected=["c1"], accepted=1, deadline_unix=0.0), server_round=7)
    feed(ev.RoundStatus("aggregating"), server_round=7, after=3.0)
    feed(ev.RoundFailed(reason="x", duration_s=99.0), server_round=7, after=1.0)
    s = scrape(collector)
    assert value(s, "flctl_round_phase_seconds_sum", phase="training") == 3.0
    assert value(s, "flctl_round_phase_seconds_sum", phase="aggregating") == 1.0


def test_updates_bytes_and_rejections_by_reason_code(
    feed: Feed, collector: MetricsCollector
) -> None:
    for client, wire in (("c1", 1000), ("c2", 2500)):
        feed(
            ev.UpdateAccepted(
                task_id="t",
                num_examples=10,
                metrics={},
                size=4000,
                digest="d",
                upload_id="u",
                resumed_from=0,
                codec="zstd",
                wire_bytes=wire,
                receive_s=0.1,
                commit_s=0.1,
            ),
            server_round=1,
            client_id=client,
        )
    reasons = [
        ("late: round 1's deadline has passed", False, "late"),
        ("duplicate: an update for round 1 was already accepted", False, "duplicate"),
        ("c9 was not selected for round 1", False, "not_selected"),
        ("round 1 is not in training (open round: none)", False, "round_closed"),
        ("digest mismatch", True, "malformed"),
        ("something new the coordinator says one day", False, "other"),
    ]
    for reason, malformed, _ in reasons:
        feed(ev.UpdateRejected(task_id="t", reason=reason, is_malformed=malformed))
    s = scrape(collector)
    assert value(s, "flctl_updates_accepted_total") == 2
    assert value(s, "flctl_received_bytes_total") == 3500
    for _, _, code in reasons:
        assert value(s, "flctl_updates_rejected_total", reason=code) == 1
    # one series per code, never per reason text
    rejected = [key for key in s if key[0] == "flctl_updates_rejected_total"]
    assert len(rejected) == len(UPDATE_REJECTION_REASONS)


def test_refusals_by_reason_code(feed: Feed, collector: MetricsCollector) -> None:
    feed(ev.SecurityRefused(identity="c1", reason="identity revoked", rpc="Join"))
    feed(ev.SecurityRefused(identity="c1", reason="rate limit: more than 20 calls/s", rpc="X"))
    feed(ev.SecurityRefused(identity="c1", reason="session token expired", rpc="Tasks"))
    feed(ev.SecurityRefused(identity="c1", reason="certificate expired at 2020-01-01", rpc="Join"))
    feed(ev.SecurityRefused(identity=None, peer="1.2.3.4", reason="300 connections", rpc="connect"))
    feed(ev.PrivacyRefused(reason="budget", epsilon=9.0, budget=8.0, accountant="rdp", delta=1e-5))
    s = scrape(collector)
    for code in (
        "revoked",
        "rate_limit",
        "session_token",
        "certificate_validity",
        "connection_limit",
        "privacy_budget",
    ):
        assert value(s, "flctl_refusals_total", reason=code) == 1, code
    assert value(s, "flctl_refusals_total", reason="other") == 0
    assert value(s, "flctl_dp_epsilon_budget") == 8.0


def test_epsilon_leader_and_head(feed: Feed, collector: MetricsCollector) -> None:
    feed(
        ev.CoordinatorStarted(
            address="127.0.0.1:1", pid=1, state_dir="/s", head_version=4, is_insecure=False
        )
    )
    s = scrape(collector)
    assert value(s, "flctl_leader") == 1 and value(s, "flctl_head_model_version") == 4
    feed(
        ev.PrivacyCharged(
            epsilon=1.5,
            accountant="rdp",
            epsilon_rdp=1.5,
            epsilon_pld=None,
            budget=8.0,
            delta=1e-5,
            noise_multiplier=1.0,
            mechanism="central",
            clip_norm=1.0,
        )
    )
    feed(
        ev.ModelRollback(
            version=5, digest="d", source=2, previous_head=4, author="admin", reason="bad"
        )
    )
    feed(ev.ModelCreated(version=6, digest="d", kind="aggregate", parent=5, is_head=False))
    s = scrape(collector)
    assert value(s, "flctl_dp_epsilon_spent") == 1.5
    assert value(s, "flctl_dp_epsilon_budget") == 8.0
    assert value(s, "flctl_head_model_version") == 5  # a version that did not become head
    feed(ev.CoordinatorStopped(reason="signal"))
    assert value(scrape(collector), "flctl_leader") == 0


def test_clients_by_state_rates_and_bytes_sent(feed: Feed, collector: MetricsCollector) -> None:
    for client in ("c1", "c2", "c3"):
        feed(ev.ClientJoined(session_id="s", is_replaced=False), client_id=client)
    s = scrape(collector)
    assert value(s, "flctl_clients", state="idle") == 3

    def state(client: str, name: str, **fields: Any) -> None:
        feed(ev.ClientState(state=name, progress=0.0, **fields), client_id=client)

    state("c1", "downloading", bytes_done=300, bytes_total=1000, bytes_per_s=100.0)
    state("c2", "downloading", bytes_done=500, bytes_total=1000, bytes_per_s=50.0)
    state("c3", "uploading", bytes_done=10, bytes_total=100, bytes_per_s=7.0)
    s = scrape(collector)
    assert value(s, "flctl_clients", state="downloading") == 2
    assert value(s, "flctl_clients", state="uploading") == 1
    assert value(s, "flctl_clients", state="idle") == 0
    assert value(s, "flctl_transfer_bytes_per_second", direction="download") == 150.0
    assert value(s, "flctl_transfer_bytes_per_second", direction="upload") == 7.0
    assert value(s, "flctl_sent_bytes_total") == 800

    state("c1", "downloading", bytes_done=700, bytes_total=1000, bytes_per_s=100.0)
    state("c1", "training")  # the download ended: its last 300 bytes count
    state("c2", "failed", reason="boom")  # a failed download counts what it moved
    feed(ev.ClientLeft(reason="gone"), client_id="c3")
    s = scrape(collector)
    assert value(s, "flctl_sent_bytes_total") == 1500
    assert value(s, "flctl_clients", state="training") == 1
    assert value(s, "flctl_clients", state="failed") == 1
    assert value(s, "flctl_clients", state="uploading") == 0
    assert value(s, "flctl_transfer_bytes_per_second", direction="download") == 0
    assert value(s, "flctl_transfer_bytes_per_second", direction="upload") == 0

    # a second download of another model starts from 0 again
    state("c1", "downloading", bytes_done=100, bytes_total=2000, bytes_per_s=1.0)
    assert value(scrape(collector), "flctl_sent_bytes_total") == 1600


def test_counters_never_decrease_over_a_long_run(feed: Feed, collector: MetricsCollector) -> None:
    previous: dict = {}  # type: ignore[type-arg]
    for server_round in range(1, 30):
        _committed(feed, server_round)
        feed(ev.ClientJoined(session_id="s", is_replaced=True), client_id="c1")
        feed(ev.ClientLeft(reason="x"), client_id="c1")
        feed(ev.CoordinatorStopped(reason="x"))
        current = {
            key: v
            for key, v in scrape(collector).items()
            if key[0].endswith(("_total", "_count", "_sum", "_bucket"))
        }
        for key, before in previous.items():
            assert current[key] >= before, key
        previous = current
    assert value(previous, "flctl_rounds_total", status="committed") == 29


def test_unknown_event_types_and_odd_data_are_counted_not_fatal(
    collector: MetricsCollector,
) -> None:
    odd = [
        Event(seq=1, time=1.0, type="future.thing", data={"x": 1}),
        Event(seq=2, time=1.0, type="NOT A TYPE" * 20),
        Event(seq=3, time=1.0, type=ev.ROUND_COMMITTED, server_round=1, data={}),
        Event(seq=4, time=1.0, type=ev.CLIENT_STATE, client_id="c1", data={"state": "dreaming"}),
        Event(seq=5, time=1.0, type=ev.UPDATE_ACCEPTED, data={"wire_bytes": "lots"}),
    ]
    for event in odd:
        collector.observe(event)
    s = scrape(collector)
    assert value(s, "flctl_events_total", type="future.thing") == 1
    assert value(s, "flctl_events_total", type="other") == 1
    assert value(s, "flctl_rounds_total", status="committed") == 1
    assert value(s, "flctl_clients", state="other") == 1
    assert value(s, "flctl_received_bytes_total") == 0


def test_collectors_do_not_share_metrics() -> None:
    first, second = MetricsCollector(), MetricsCollector()
    Feed(first)(ev.RoundFailed(reason="x", duration_s=1.0), server_round=1)
    assert value(scrape(first), "flctl_rounds_total", status="failed") == 1
    assert value(scrape(second), "flctl_rounds_total", status="failed") == 0
