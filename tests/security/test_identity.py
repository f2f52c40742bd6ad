"""Refusals of who is calling: certificates, roles, revocations, rate limits, the bind address.

Each test makes one refusal against the live coordinator and asserts the flctl error class, the
gRPC status and message, that the state is unchanged (tests/security/arena.py), and the
refusal's event with the caller's identity where the coordinator records one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest

from flctl.client import JoinOptions, Runner
from flctl.coordinator import Coordinator
from flctl.core import TaskContext, load_task
from flctl.core.errors import (
    CertificateError,
    ConfigError,
    ConnectError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from flctl.security import KeyPair, Role, generate_ca, issue_certificate, load_ca
from flctl.transport.grpc import AdminClient, CoordinatorClient, pb
from tests.security.arena import Arena, Snapshot, not_before, odd_role_certificate, pieces

pytestmark = pytest.mark.timeout(120)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------------------- the handshake


def _bad_certificate(arena: Arena, case: str) -> KeyPair | None:
    """The certificate (and key) each handshake case presents; None: none at all."""
    ca = load_ca(arena.certs)
    if case == "other-ca":
        return issue_certificate(generate_ca(), "c1", Role.CLIENT)
    if case == "expired":
        return issue_certificate(ca, "c1", Role.CLIENT, days=1, not_before=not_before(-10))
    if case == "not-yet-valid":
        return issue_certificate(ca, "c1", Role.CLIENT, days=30, not_before=not_before(1))
    return None


@pytest.mark.parametrize("case", ["no-certificate", "other-ca", "expired", "not-yet-valid"])
def test_the_handshake_refuses_a_certificate_the_ca_did_not_vouch_for(
    arena: Arena, case: str
) -> None:
    """Refused by TLS before any handler runs: the coordinator cannot log these (no identity)."""
    pair = _bad_certificate(arena, case)
    if pair is None:
        ca = (arena.certs / "ca.crt").read_bytes()
        channel = grpc.aio.secure_channel(
            arena.address, grpc.ssl_channel_credentials(root_certificates=ca)
        )
        api = CoordinatorClient(channel)
    else:
        api = arena.client(pair=pair)
    before = arena.snapshot()
    try:
        # TLS 1.3: the server checks the client's certificate after the client has finished its
        # side of the handshake, so the refusal reaches the client as a closed socket
        arena.refused(api.join(arena.join_request()), ConnectError, UNAVAILABLE, "Socket closed")
    finally:
        if pair is None:
            arena.run(api.close())
    arena.assert_unchanged(before)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("other-ca", "refused the TLS handshake"),
        # the client reads its own certificate's window: it says why, not just "refused"
        ("expired", r"the certificate of c1 \(serial [0-9a-f]+\) expired on .* UTC"),
        ("not-yet-valid", r"the certificate of c1 \(serial [0-9a-f]+\) is not valid until"),
    ],
)
def test_flctl_join_reports_a_refused_handshake_as_a_certificate_error(
    arena: Arena, case: str, match: str, tmp_path: Any
) -> None:
    """What ``flctl join`` raises (exit code 21), and it gives up instead of retrying."""
    pair = _bad_certificate(arena, case)
    assert pair is not None
    config = arena.config
    task = load_task(config.task_path)
    context = TaskContext(
        role="client",
        seed=1,
        client_id="c1",
        partition_id=0,
        num_partitions=3,
        config=dict(config.task),
    )
    options = JoinOptions(
        server=arena.address,
        client_id="c1",
        cert_pem=pair.cert_pem,
        key_pem=pair.key_pem,
        ca_pem=(arena.certs / "ca.crt").read_bytes(),
        cache_dir=tmp_path / "cache",
        max_tls_failures=1,
    )
    before = arena.snapshot()
    with pytest.raises(CertificateError, match=match) as info:
        arena.run(Runner(task.client_fn(context), options).run(asyncio.Event()))
    assert info.value.exit_code == 21
    arena.assert_unchanged(before)


@pytest.mark.parametrize(
    ("unit", "extension", "match"),
    [
        (None, None, "role"),
        ("admin", "client", "role"),
        ("client", "admin", "role"),
    ],
    ids=["no-role", "ou-admin-extension-client", "ou-client-extension-admin"],
)
def test_a_certificate_without_one_clear_role_is_unauthenticated(
    arena: Arena, unit: str | None, extension: str | None, match: str
) -> None:
    pair = odd_role_certificate(load_ca(arena.certs), "c1", unit=unit, extension=extension)
    api = arena.client(pair=pair)
    before = arena.snapshot()
    arena.refused(
        api.join(arena.join_request()),
        CertificateError,
        grpc.StatusCode.UNAUTHENTICATED,
        match,
    )
    arena.assert_unchanged(before)


# ---------------------------------------------------------------------------- roles


def _admin_calls(admin: AdminClient) -> dict[str, Any]:
    return {
        "StartRound": lambda: admin.start_round(1),
        "Revoke": lambda: admin.revoke("c2", reason="a client trying its luck"),
        "Rollback": lambda: admin.rollback("1"),
        "Tag": lambda: admin.tag("1", "stolen"),
        "CancelRound": lambda: admin.cancel_round(),
        "Status": lambda: admin.status(),
    }


@pytest.mark.parametrize(
    "rpc", ["StartRound", "Revoke", "Rollback", "Tag", "CancelRound", "Status"]
)
def test_a_client_certificate_may_not_call_the_admin_service(arena: Arena, rpc: str) -> None:
    cert, key = arena.credentials("c1")
    admin = AdminClient(arena.channel(cert, key))
    before = arena.snapshot()
    arena.refused(
        _admin_calls(admin)[rpc](),
        PermissionDeniedError,
        PERMISSION_DENIED,
        "a client certificate may not call the Admin service",
    )
    arena.assert_unchanged(before)
    _assert_refused_event(arena, before, "c1", rpc)


@pytest.mark.parametrize("rpc", ["Join", "BeginUpload", "Upload", "Download"])
def test_an_admin_certificate_may_not_call_the_coordinator_service(arena: Arena, rpc: str) -> None:
    api = arena.client("admin")
    task = arena.members["c1"].task
    assert task is not None
    data = b"\0" * 64
    header = arena.header(task, data)
    calls = {
        "Join": lambda: api.join(arena.join_request()),
        "BeginUpload": lambda: api.begin_upload(header),
        "Upload": lambda: api.upload(header, pieces(data)),
        "Download": lambda: api.download(arena.head_digest, _Discard()),
    }
    before = arena.snapshot()
    arena.refused(
        calls[rpc](),
        PermissionDeniedError,
        PERMISSION_DENIED,
        "admin certificate may not call the Coordinator service",
    )
    arena.assert_unchanged(before)
    _assert_refused_event(arena, before, "admin", rpc)


class _Discard:
    def write(self, data: bytes | memoryview) -> int:
        return len(data)


# ---------------------------------------------------------------------------- revocations


def _assert_refused_event(arena: Arena, before: Snapshot, identity: str, rpc: str) -> None:
    (event,) = arena.refusal_events(before, "security.refused")
    assert event.client_id == identity == event.data["identity"]
    assert event.data["rpc"] == rpc


@pytest.mark.parametrize("rpc", ["Join", "Heartbeat", "Tasks", "Download", "BeginUpload", "Upload"])
def test_a_revoked_identity_is_refused_on_every_coordinator_rpc(arena: Arena, rpc: str) -> None:
    """``gone`` was revoked in the store before the coordinator started."""
    api = arena.client("gone")
    task = arena.members["c1"].task
    assert task is not None
    data = b"\0" * 64
    header = arena.header(task, data)

    async def first_task() -> pb.Task:
        return await anext(api.tasks())

    calls = {
        "Join": lambda: api.join(arena.join_request()),
        "Heartbeat": lambda: api.heartbeat(pb.HeartbeatRequest(state="training")),
        "Tasks": first_task,
        "Download": lambda: api.download(arena.head_digest, _Discard()),
        "BeginUpload": lambda: api.begin_upload(header),
        "Upload": lambda: api.upload(header, pieces(data)),
    }
    before = arena.snapshot()
    arena.refused(
        calls[rpc](), PermissionDeniedError, PERMISSION_DENIED, "certificate of gone is revoked"
    )
    arena.assert_unchanged(before)
    _assert_refused_event(arena, before, "gone", rpc)
    (event,) = arena.refusal_events(before, "security.refused")
    assert event.data["reason"] == "identity revoked"


def test_a_revoked_certificate_serial_is_refused(arena: Arena) -> None:
    """``c4``'s first certificate is revoked by serial; the test does not use its second."""
    assert arena.c4_old is not None
    api = arena.client(pair=arena.c4_old)
    before = arena.snapshot()
    arena.refused(
        api.join(arena.join_request()),
        PermissionDeniedError,
        PERMISSION_DENIED,
        "certificate of c4 is revoked",
    )
    arena.assert_unchanged(before)
    _assert_refused_event(arena, before, "c4", "Join")
    (event,) = arena.refusal_events(before, "security.refused")
    assert event.data["reason"].startswith("certificate serial ")


@pytest.mark.parametrize("rpc", ["StartRound", "Revoke", "Status"])
def test_a_revoked_admin_is_refused(arena: Arena, rpc: str) -> None:
    assert arena.ops_gone is not None
    admin = arena.admin(pair=arena.ops_gone)
    before = arena.snapshot()
    arena.refused(
        _admin_calls(admin)[rpc](),
        PermissionDeniedError,
        PERMISSION_DENIED,
        "certificate of ops-gone is revoked",
    )
    arena.assert_unchanged(before)
    _assert_refused_event(arena, before, "ops-gone", rpc)


def test_revoking_ends_the_open_stream_and_refuses_the_next_call(arena: Arena) -> None:
    """The one test that changes state on purpose: it revokes ``revokee``, used nowhere else."""
    member = arena.run(arena.join("revokee"))
    arena._follow(member)
    registry = arena.coordinator._registry
    assert registry is not None

    def streaming() -> bool:
        session = registry.get("revokee")
        return session is not None and session.streaming

    arena.run(arena.until(streaming))
    before = arena.snapshot()
    reply = arena.run(arena.admin().revoke("revokee", reason="compromised"))
    assert reply.author == "admin"
    assert member.stream is not None
    arena.run(asyncio.wait_for(asyncio.shield(member.stream), 15))
    (error,) = member.stream_error
    assert type(error) is PermissionDeniedError
    assert error.message == "certificate of revokee is revoked"
    # the revocation itself is the only change: its row, and the client now offline
    changes = before.changes(arena.snapshot())
    assert [c.split(":")[0] for c in changes] == ["clients", "clients", "revocations"], changes
    assert "'state': 'offline'" in changes[1] and "'identity': 'revokee'" in changes[2]
    refused = arena.refusal_events(before, "security.refused")
    assert [(e.client_id, e.data["rpc"]) for e in refused] == [("revokee", "Tasks")]

    before = arena.snapshot()
    arena.refused(
        member.api.heartbeat(pb.HeartbeatRequest(state="idle")),
        PermissionDeniedError,
        PERMISSION_DENIED,
        "certificate of revokee is revoked",
    )
    arena.refused(
        arena.client("revokee").join(arena.join_request()),
        PermissionDeniedError,
        PERMISSION_DENIED,
        "certificate of revokee is revoked",
    )
    arena.assert_unchanged(before)
    refused = arena.refusal_events(before, "security.refused")
    assert [(e.client_id, e.data["rpc"]) for e in refused] == [
        ("revokee", "Heartbeat"),
        ("revokee", "Join"),
    ]


# ---------------------------------------------------------------------------- the bind address


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.7:7070"])
def test_insecure_refuses_a_non_loopback_address(arena: Arena, address: str) -> None:
    """Refused before the state folder is touched: the running coordinator's state is as it was."""
    before = arena.snapshot()
    lock = (arena.state_dir / "coordinator.lock").stat()
    with pytest.raises(ConfigError, match="plaintext is for loopback only") as info:
        arena.run(Coordinator(arena.config, address=address, insecure=True).start())
    assert info.value.exit_code == 10
    arena.assert_unchanged(before)
    assert (arena.state_dir / "coordinator.lock").stat().st_mtime_ns == lock.st_mtime_ns


def test_insecure_on_a_non_loopback_address_creates_no_state(
    loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    from tests.security.arena import write_project

    config = write_project(tmp_path, server={"address": "0.0.0.0:7070", "insecure": True})
    with pytest.raises(ConfigError, match="plaintext is for loopback only"):
        loop.run_until_complete(Coordinator(config).start())
    assert not config.state_path.exists()


# ---------------------------------------------------------------------------- rate limits


def test_calls_beyond_the_rate_limit_are_refused(
    loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    """A coordinator of its own, with a small bucket: 3 calls at once, then 1 per second."""
    arena = Arena.start(
        tmp_path / "project",
        loop,
        open_round=False,
        server={"rate_limit_per_s": 1.0, "rate_limit_burst": 3},
    )
    try:
        admin = arena.admin()
        for _ in range(3):
            arena.run(admin.status())
        before = arena.snapshot()
        for call in (lambda: admin.start_round(1), lambda: admin.revoke("c2")):
            arena.refused(
                call(), ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit"
            )
        arena.assert_unchanged(before)
        (event,) = arena.refusal_events(before, "security.refused")
        assert event.client_id == "admin" == event.data["identity"]
        assert "rate limit" in event.data["reason"]
        # each identity has its own bucket: c1 is not held back by the admin's calls
        c1 = arena.members["c1"]
        reply = arena.run(c1.api.heartbeat(pb.HeartbeatRequest(state="idle")))
        assert reply.command == ""
    finally:
        arena.close()
