"""The event log's typed payloads: one per type, JSON-safe, and the data readers always had."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from flctl.core import events as ev

PAYLOADS = sorted(
    (
        obj
        for name in ev.__all__
        if isinstance(obj := getattr(ev, name), type)
        and issubclass(obj, ev.EventPayload)
        and obj is not ev.EventPayload
    ),
    key=lambda cls: cls.__name__,
)

#: The event type constants: every upper-case name whose value is a dotted type string.
TYPES = {
    name: value
    for name in ev.__all__
    if name.isupper() and isinstance(value := getattr(ev, name), str) and "." in value
}

#: One instance of each payload class, every optional key filled in.
SAMPLES: list[ev.EventPayload] = [
    ev.SecAggStarted(
        participants=["c1", "c2", "c3"],
        threshold=2,
        num_neighbours=2,
        quantization_bits=24,
        modulus_bits=32,
        num_elements=11,
    ),
    ev.SecAggStageClosed(stage="share_keys", live=["c1", "c2"], dropped={"c3": "no answer"}),
    ev.SecAggUnmasked(
        survivors=["c1", "c2"],
        dropouts={"c3": "share_keys"},
        refusals={},
        total_weight=1.5,
        error_bound=1e-7,
        noise_std=0.01,
    ),
    ev.SecAggFailed(stage="unmask", reason="too few", dropouts={"c3": "unmask"}),
    ev.ClientEvicted(admin="admin", reason="misbehaving"),
    ev.ClientJoined(session_id="s1", is_replaced=True),
    ev.ClientLeft(reason="gone", admin="admin", is_expired=True),
    ev.ClientState(
        state="uploading",
        progress=0.5,
        reason="oops",
        bytes_done=10,
        bytes_total=20,
        bytes_per_s=1.5,
    ),
    ev.CoordinatorDraining(timeout_s=30.0, server_round=None),
    ev.CoordinatorStarted(
        address="127.0.0.1:7070", pid=42, state_dir="/s", head_version=1, is_insecure=False
    ),
    ev.CoordinatorStopped(reason="signal"),
    ev.CoordinatorWarning(
        message="m", hint="h", certificate="c", not_after="2030-01-01", days_left=3.5, author="a"
    ),
    ev.EvaluationFailed(task_id="t", reason="boom"),
    ev.EvaluationReported(task_id="t", loss=0.5, num_examples=10, metrics={"acc": 0.9}),
    ev.IdentityRevoked(serial="ab", reason="lost", author="admin"),
    ev.ModelCorrupt(
        version=3, digest="d", path="/p", problem="missing", rollback_to=None, reason="r"
    ),
    ev.ModelCreated(version=2, digest="d", kind="aggregate", parent=1, metrics={"loss": 0.1}),
    ev.ModelImported(version=4, digest="d", parent=None, is_head=False, file="m.st", author="a"),
    ev.ModelRejected(
        version=5,
        digest="d",
        parent=4,
        metrics={"acc": 0.1},
        reason="worse",
        check="metric",
        metric="acc",
        value=0.1,
        reference=0.9,
        reference_version=4,
        against="best",
        max_regression=0.0,
    ),
    ev.ModelRollback(version=6, digest="d", source=2, previous_head=5, author="a", reason="r"),
    ev.ModelRollbackDeferred(source=2, digest="d", server_round=7, author="a", reason="r"),
    ev.ModelRollbackFailed(source=2, server_round=7, author="a", reason="r", error="e"),
    ev.ModelTagged(tag="prod", version=2, previous=None, author="a"),
    ev.PrivacyCharged(
        epsilon=1.0,
        accountant="rdp",
        epsilon_rdp=1.0,
        epsilon_pld=None,
        budget=8.0,
        delta=1e-5,
        noise_multiplier=1.1,
        mechanism="central",
        clip_norm=1.0,
        next_clip_norm=0.9,
    ),
    ev.PrivacyRefused(reason="r", epsilon=9.0, budget=8.0, accountant="pld", delta=1e-5),
    ev.RoundCancelled(reason="by admin", duration_s=None),
    ev.RoundCommitted(
        model_version=2,
        metrics={"loss": 0.1},
        num_clients=3,
        duration_s=1.5,
        aggregate_s=0.25,
        aggregation="incremental",
        evaluate_s=None,
    ),
    ev.RoundFailed(reason="quorum", duration_s=2.0),
    ev.RoundQueued(admin="admin", retry_of=1, attempt=1, reason="r"),
    ev.RoundRejected(model_version=5, metrics={}, num_clients=2, duration_s=1.0, reason="r"),
    ev.RoundResumed(selected=("c1", "c2"), accepted=1, deadline_unix=1e9),
    ev.RoundStarted(base_version=1, selected=["c1"], deadline_unix=1e9, min_clients=1),
    ev.RoundStatus(status="training"),
    ev.SecurityRefused(identity=None, reason="r", rpc="connect", serial=None, peer="ipv4:1:2"),
    ev.StorageFull(path="/s", free_bytes=None, needed_bytes=10, what="upload"),
    ev.TaskSent(task_id="t", kind="fit", model_digest="d"),
    ev.UpdateAccepted(
        task_id="t",
        num_examples=10,
        metrics={"loss": 0.2},
        size=100,
        digest="d",
        upload_id="u",
        resumed_from=0,
        codec="none",
        wire_bytes=90,
        receive_s=0.01,
        commit_s=0.02,
    ),
    ev.UpdateClamped(
        claimed=100,
        used=10,
        bound="max_examples_per_update",
        share=0.5,
        max_examples_per_update=10,
        max_weight_share=1.0,
    ),
    ev.UpdateExcluded(score="l2", value=12.5, z=8.1, threshold=3.5, mode="flag"),
    ev.UpdateRejected(task_id="t", reason="late", is_malformed=True),
    ev.UpdateScored(l2=1.0, cosine=None, median_distance=None),
    ev.UploadResumed(upload_id="u", offset=10, size=100),
]


def test_every_payload_class_has_a_sample() -> None:
    assert sorted(type(s).__name__ for s in SAMPLES) == [cls.__name__ for cls in PAYLOADS]


def test_every_event_type_has_exactly_one_payload_class() -> None:
    # The client emits no events of its own; ``model.imported`` (and ``model.rollback``,
    # ``model.tagged`` offline) are also written by ``flctl models`` through the store.
    by_type = {cls.type: cls for cls in PAYLOADS}
    assert len(by_type) == len(PAYLOADS), "two payload classes share a type"
    assert set(by_type) == set(TYPES.values())
    for name, value in TYPES.items():  # ROUND_COMMITTED = RoundCommitted.type
        assert name == re.sub(r"(?<!^)(?=[A-Z])", "_", by_type[value].__name__).upper()


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).type)
def test_to_data_round_trips_through_json(payload: ev.EventPayload) -> None:
    data = payload.to_data()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert all(isinstance(key, str) for key in data)


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).type)
def test_payloads_are_frozen_and_document_every_field(payload: ev.EventPayload) -> None:
    field = dataclasses.fields(payload)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(payload, field.name, None)
    doc = type(payload).__doc__ or ""
    for spec in dataclasses.fields(payload):
        assert f"\n        {spec.name}: " in doc, f"{type(payload).__name__}.{spec.name}"


# -- the data each call site wrote before payloads: the wire and JSON contract -------------------

CASES: list[tuple[ev.EventPayload, dict[str, Any]]] = [
    # _coordinator.py: a connection refused before any identity
    (
        ev.SecurityRefused(identity=None, peer=None, reason="too many", rpc="connect"),
        {"identity": None, "peer": None, "reason": "too many", "rpc": "connect", "serial": None},
    ),
    # _guard.py: a revoked certificate
    (
        ev.SecurityRefused(identity="c1", reason="revoked", rpc="Join", serial="1f"),
        {"identity": "c1", "reason": "revoked", "rpc": "Join", "serial": "1f"},
    ),
    # _service.py heartbeat: a transfer, then a failure
    (
        ev.ClientState(
            state="downloading", progress=0.3, bytes_done=3, bytes_total=10, bytes_per_s=0.0
        ),
        {
            "state": "downloading",
            "progress": 0.3,
            "bytes_done": 3,
            "bytes_total": 10,
            "bytes_per_s": 0.0,
        },
    ),
    (
        ev.ClientState(state="failed", progress=0.0, reason="CUDA out of memory"),
        {"state": "failed", "progress": 0.0, "reason": "CUDA out of memory"},
    ),
    (ev.ClientState(state="idle", progress=0.0), {"state": "idle", "progress": 0.0}),
    # client.left: a stream's end, an eviction, an expired certificate
    (ev.ClientLeft(reason="revoked"), {"reason": "revoked"}),
    (
        ev.ClientLeft(reason="evicted by admin", admin="admin"),
        {"reason": "evicted by admin", "admin": "admin"},
    ),
    (
        ev.ClientLeft(reason="certificate expired", is_expired=True),
        {"reason": "certificate expired", "expired": True},
    ),
    (
        ev.ClientJoined(session_id="s", is_replaced=False),
        {"session_id": "s", "replaced": False},
    ),
    # update.rejected: malformed (no table but the log), or for the round's state
    (
        ev.UpdateRejected(task_id="t", reason="bad digest", is_malformed=True),
        {"task_id": "t", "reason": "bad digest", "malformed": True},
    ),
    (ev.UpdateRejected(task_id="t", reason="late"), {"task_id": "t", "reason": "late"}),
    # round.queued: by an admin (StartRound), or a retry (_engine.py)
    (ev.RoundQueued(admin="admin"), {"admin": "admin"}),
    (
        ev.RoundQueued(retry_of=3, attempt=1, reason=""),
        {"retry_of": 3, "attempt": 1, "reason": ""},
    ),
    # round.resumed (_engine.py): stopped while selecting, or later
    (
        ev.RoundResumed(selected=[], accepted=0, is_reselect=True),
        {"selected": [], "accepted": 0, "reselect": True},
    ),
    (
        ev.RoundResumed(selected=["a", "b"], accepted=1, deadline_unix=None),
        {"selected": ["a", "b"], "accepted": 1, "deadline_unix": None},
    ),
    # model.created: the initial model (_coordinator.py), a round's (_engine.py)
    (
        ev.ModelCreated(version=1, digest="d", kind="initial", parent=None),
        {"version": 1, "digest": "d", "kind": "initial", "parent": None, "head": True},
    ),
    (
        ev.ModelCreated(version=2, digest="e", kind="aggregate", parent=1, metrics={"a": 1.0}),
        {
            "version": 2,
            "digest": "e",
            "kind": "aggregate",
            "parent": 1,
            "metrics": {"a": 1.0},
            "head": True,
        },
    ),
    # round.committed (_engine.py): evaluate_s is null without server-side evaluation
    (
        ev.RoundCommitted(
            model_version=2,
            metrics={"loss": 0.5},
            num_clients=2,
            duration_s=3.0,
            aggregate_s=0.1234,
            aggregation="whole",
            evaluate_s=None,
        ),
        {
            "model_version": 2,
            "metrics": {"loss": 0.5},
            "num_clients": 2,
            "duration_s": 3.0,
            "aggregate_s": 0.1234,
            "aggregation": "whole",
            "evaluate_s": None,
        },
    ),
    # round.failed / round.cancelled (_engine.end_round)
    (ev.RoundFailed(reason="r", duration_s=None), {"reason": "r", "duration_s": None}),
    (ev.RoundCancelled(reason="r", duration_s=1.0), {"reason": "r", "duration_s": 1.0}),
    # privacy.charged: next_clip_norm only with adaptive clipping
    (
        ev.PrivacyCharged(
            epsilon=0.5,
            accountant="rdp",
            epsilon_rdp=0.5,
            epsilon_pld=0.4,
            budget=8.0,
            delta=1e-5,
            noise_multiplier=1.0,
            mechanism="central",
            clip_norm=1.0,
        ),
        {
            "epsilon": 0.5,
            "accountant": "rdp",
            "epsilon_rdp": 0.5,
            "epsilon_pld": 0.4,
            "budget": 8.0,
            "delta": 1e-5,
            "noise_multiplier": 1.0,
            "mechanism": "central",
            "clip_norm": 1.0,
        },
    ),
    # coordinator.warning: the rollback policy's (_heads.py)
    (
        ev.CoordinatorWarning(message="m", author="policy"),
        {"message": "m", "author": "policy"},
    ),
    (
        ev.CoordinatorDraining(timeout_s=5.0, server_round=3),
        {"timeout_s": 5.0, "server_round": 3},
    ),
    (
        ev.CoordinatorStarted(
            address="a:1", pid=1, state_dir="/s", head_version=1, is_insecure=True
        ),
        {"address": "a:1", "pid": 1, "state_dir": "/s", "head_version": 1, "insecure": True},
    ),
    # the ones _aggregation.py emits
    (
        ev.UpdateScored(l2=2.0, cosine=0.5, median_distance=None),
        {"l2": 2.0, "cosine": 0.5, "median_distance": None},
    ),
    (
        ev.UpdateExcluded(score="cosine", value=-0.9, z=-5.0, threshold=3.5, mode="drop"),
        {"score": "cosine", "value": -0.9, "z": -5.0, "threshold": 3.5, "mode": "drop"},
    ),
]


@pytest.mark.parametrize(("payload", "data"), CASES, ids=lambda c: getattr(c, "type", ""))
def test_to_data_is_what_the_call_site_wrote(
    payload: ev.EventPayload, data: dict[str, Any]
) -> None:
    assert payload.to_data() == data
    assert list(payload.to_data()) == list(data)  # in the same order, for in-process readers


def test_to_data_gives_plain_lists_and_dicts_of_its_own() -> None:
    selected = ("c1", "c2")
    metrics = {"loss": 1.0}
    started = ev.RoundStarted(base_version=1, selected=selected, deadline_unix=0.0, min_clients=1)
    data = ev.ModelCreated(version=1, digest="d", kind="aggregate", parent=None, metrics=metrics)
    assert started.to_data()["selected"] == ["c1", "c2"]
    assert data.to_data()["metrics"] == metrics and data.to_data()["metrics"] is not metrics
