"""Fuzzing every RPC of a live coordinator with random and mutated protobuf messages.

A coordinator of its own (a small model, 4 KiB chunks, no rate limit) with ``c1`` and ``c2``
selected in an open round; the generator and the invariants are in tests/security/fuzzing.py.
Hypothesis draws the calls (seeded: ``derandomize``), a few hundred in all;
``bench/fuzz.py --count 10000`` runs the same generator at scale.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flctl.transport.grpc import pb
from tests.security.arena import Snapshot, pieces, update_like
from tests.security.fuzzing import (
    ADMIN_TARGETS,
    COORDINATOR_TARGETS,
    Fuzzer,
    Target,
    generate,
    start_fuzz_arena,
)

pytestmark = pytest.mark.timeout(300)

#: Calls per service in CI (bench/fuzz.py runs thousands).
COORDINATOR_EXAMPLES = 240
ADMIN_EXAMPLES = 160
BIG = 2**63


@pytest.fixture(scope="module")
def fuzzer(
    loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzer]:
    arena = start_fuzz_arena(tmp_path_factory.mktemp("fuzz") / "project", loop)
    fuzzer = Fuzzer(arena)
    yield fuzzer
    fuzzer.close()
    arena.close()


def _fuzz(fuzzer: Fuzzer, targets: list[Target], examples: int) -> None:
    before = fuzzer.view()
    sent_before = fuzzer.tally.sent + fuzzer.tally.skipped

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    # each call from a seeded random.Random, as bench/fuzz.py makes them: the generator's shares
    # (a fifth random bytes, a quarter of the uploads too long, ...) hold. Hypothesis's own
    # randoms lean to the first choice of every draw, so most calls would take the same branch
    @given(target=st.sampled_from(targets), seed=st.integers(0, 2**64 - 1))
    def one(target: Target, seed: int) -> None:
        outcome = fuzzer.send(generate(random.Random(seed), target, fuzzer.seeds))
        if outcome is None:
            return  # an Admin change that would be accepted: not sent
        assert outcome.problem is None, outcome.problem
        changes = before.changes(fuzzer.view())
        assert changes == [], f"{target.method} changed the state: {changes[:5]}"

    one()
    assert fuzzer.tally.sent + fuzzer.tally.skipped - sent_before >= examples
    assert fuzzer.healthy() == []


def test_fuzzed_coordinator_calls_end_with_a_status_and_change_nothing(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, COORDINATOR_TARGETS, COORDINATOR_EXAMPLES)
    statuses = {
        m: s for m, s in fuzzer.tally.by_rpc().items() if m in _methods(COORDINATOR_TARGETS)
    }
    # the generator reaches the handlers, not only gRPC's parser: every RPC saw flctl answers
    assert set(statuses) == _methods(COORDINATOR_TARGETS), statuses
    for method, counts in statuses.items():
        handled = sum(n for status, n in counts.items() if status != "UNKNOWN")
        assert handled > 0, (method, counts)
    upload = statuses["Upload"]
    assert upload.get("INVALID_ARGUMENT", 0) and upload.get("RESOURCE_EXHAUSTED", 0), upload


def test_fuzzed_admin_calls_end_with_a_status_and_change_nothing(fuzzer: Fuzzer) -> None:
    _fuzz(fuzzer, ADMIN_TARGETS, ADMIN_EXAMPLES)
    statuses = {m: s for m, s in fuzzer.tally.by_rpc().items() if m in _methods(ADMIN_TARGETS)}
    assert set(statuses) == _methods(ADMIN_TARGETS), statuses
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "OK"} <= {s for c in statuses.values() for s in c}


def _methods(targets: list[Target]) -> set[str]:
    return {t.method for t in targets}


_KINDS = {(False, False): "unary", (False, True): "server-stream", (True, False): "client-stream"}


@pytest.mark.parametrize(
    ("service", "targets"), [("Coordinator", COORDINATOR_TARGETS), ("Admin", ADMIN_TARGETS)]
)
def test_the_fuzzer_targets_every_rpc_as_the_proto_declares_it(
    service: str, targets: list[Target]
) -> None:
    """A new RPC fails this until the fuzzer has a target for it (and seeds: the test below)."""
    declared = {
        m.name: (_KINDS[m.client_streaming, m.server_streaming], m.input_type.full_name)
        for m in pb.DESCRIPTOR.services_by_name[service].methods
    }
    fuzzed = {t.method: (t.kind, t.request.DESCRIPTOR.full_name) for t in targets}
    assert {t.service for t in targets} == {service}
    assert fuzzed == declared


def test_every_target_has_valid_seed_messages(fuzzer: Fuzzer) -> None:
    for target in COORDINATOR_TARGETS + ADMIN_TARGETS:
        if target.kind == "client-stream":
            assert fuzzer.seeds.uploads, target.method
            continue
        seeds = fuzzer.seeds.messages[target.method]
        assert seeds, target.method
        for seed in seeds:  # each is a message of the RPC's request type: no unknown field
            assert not UnknownFieldSet(target.request.FromString(seed)), target.method


# ---------------------------------------------------------------------------- what it found


def _assert_not_internal(fuzzer: Fuzzer, call: Any) -> None:
    arena = fuzzer.arena
    before: Snapshot = fuzzer.view()
    try:
        arena.run(call)
    except Exception as exc:  # any flctl error: its status is what matters
        cause = exc.__cause__
        assert isinstance(cause, grpc.RpcError), exc
        assert cause.code() is not grpc.StatusCode.INTERNAL, cause.details()
    assert before.changes(fuzzer.view()) == []


def _huge_ids(fuzzer: Fuzzer) -> dict[str, Any]:
    arena = fuzzer.arena
    admin = arena.admin()
    task = arena.members["c1"].task
    assert task is not None
    api = arena.client("c1")  # a session of its own: the fuzzer's calls may have ended c1's
    arena.run(api.join(arena.join_request()))
    data = update_like(arena.spec, value=0.75)
    header = arena.header(task, data, server_round=BIG)

    async def watch() -> None:
        async for _ in admin.watch(BIG, follow=False):
            pass

    return {
        "status-round-id": lambda: admin.status([BIG]),
        "cancel-round-id": lambda: admin.cancel_round([2**64 - 1]),
        "watch-since-seq": watch,
        "rollback-version": lambda: admin.rollback(str(BIG)),
        "tag-version": lambda: admin.tag(str(BIG), "big"),
        "heartbeat-round": lambda: api.heartbeat(
            pb.HeartbeatRequest(state="downloading", server_round=BIG)
        ),
        "begin-upload-round": lambda: api.begin_upload(header),
        "upload-round": lambda: api.upload(header, pieces(data, 4096)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "status-round-id",
        "cancel-round-id",
        "watch-since-seq",
        "rollback-version",
        "tag-version",
        "heartbeat-round",
        "begin-upload-round",
        "upload-round",
    ],
)
def test_ids_beyond_sqlite_integers_are_refused_not_internal(fuzzer: Fuzzer, case: str) -> None:
    _assert_not_internal(fuzzer, _huge_ids(fuzzer)[case]())


def test_begun_uploads_are_discarded_when_their_round_ends(fuzzer: Fuzzer) -> None:
    """What the fuzzed uploads left under ``uploads/`` (begun, never finished) goes with the
    round; the blob store's temporary folder is empty."""
    fuzzer.end_round()
    assert fuzzer.staging() == {}
