"""A client certificate's validity is checked on every call, not only at the handshake.

A TLS connection, and the session opened on it, outlive the handshake that checked the
certificate's window. The coordinator checks it again on every call and ends the session when
the certificate expires; ``flctl join`` says "expired" of its own expired certificate.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from flctl.cli import app
from flctl.core.errors import CertificateError
from flctl.security import KeyPair, Role, issue_certificate, load_ca
from flctl.transport.grpc import pb
from tests.security.arena import Arena, Member, not_before

pytestmark = pytest.mark.timeout(120)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
#: How long the short-lived certificate is valid after it is issued: enough to join.
LIFETIME_S = 4.0


def _short_lived(arena: Arena, name: str) -> KeyPair:
    """A client certificate of ``name`` from the project's CA, valid for ``LIFETIME_S`` more."""
    start = datetime.now(UTC) - timedelta(days=1) + timedelta(seconds=LIFETIME_S)
    return issue_certificate(load_ca(arena.certs), name, Role.CLIENT, days=1, not_before=start)


class _Discard:
    def write(self, piece: bytes | memoryview) -> int:
        return len(piece)


def test_a_certificate_that_expires_on_an_open_session_is_refused(arena: Arena) -> None:
    """Uses ``brief``, an identity no other test knows; its session ends when it expires."""
    pair = _short_lived(arena, "brief")
    api = arena.client(pair=pair)
    joined = arena.run(api.join(arena.join_request()))
    member = Member("brief", api, joined)
    arena._follow(member)
    registry = arena.coordinator._registry
    assert registry is not None
    # valid: the calls work on the connection the handshake opened
    assert arena.run(api.heartbeat(pb.HeartbeatRequest(state="idle"))).command == ""
    before = arena.snapshot()

    # the connection stays open; the coordinator ends the session once the certificate expires
    arena.run(arena.until(lambda: registry.get("brief") is None, timeout=30), timeout=40)
    assert member.stream is not None
    arena.run(asyncio.wait_for(asyncio.shield(member.stream), 15))
    (error,) = member.stream_error
    assert type(error) is CertificateError
    assert error.message.startswith("certificate of brief expired at "), error.message
    assert error.exit_code == 21

    # every later call on the same connection is refused, saying why
    expired = r"^certificate of brief expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"
    arena.refused(
        api.heartbeat(pb.HeartbeatRequest(state="idle")), CertificateError, UNAUTHENTICATED, expired
    )
    arena.refused(
        api.download(arena.head_digest, _Discard()), CertificateError, UNAUTHENTICATED, expired
    )
    arena.refused(api.join(arena.join_request()), CertificateError, UNAUTHENTICATED, expired)

    (left,) = [e for e in arena.events_after(before) if e.type == "client.left"]
    assert left.client_id == "brief"
    assert left.data["expired"] is True
    assert left.data["reason"].startswith("certificate expired at "), left.data
    refused = arena.refusal_events(before, "security.refused")
    assert [(e.client_id, e.data["rpc"]) for e in refused] == [
        ("brief", "Tasks"),
        ("brief", "Heartbeat"),
        ("brief", "Download"),
        ("brief", "Join"),
    ]
    assert all(e.data["reason"].startswith("certificate expired at ") for e in refused)


def test_flctl_join_with_an_expired_certificate_exits_21_saying_expired(
    arena: Arena, tmp_path: Path
) -> None:
    """The client reads its own certificate: no handshake the coordinator would refuse."""
    pair = issue_certificate(
        load_ca(arena.certs), "c1", Role.CLIENT, days=1, not_before=not_before(-3)
    )
    (tmp_path / "c1.crt").write_bytes(pair.cert_pem)
    (tmp_path / "c1.key").write_bytes(pair.key_pem)
    before = arena.snapshot()
    args = [
        "join",
        "--config",
        str(arena.root / "flctl.toml"),
        "--server",
        arena.address,
        "--client-id",
        "c1",
        "--cert",
        str(tmp_path / "c1.crt"),
        "--key",
        str(tmp_path / "c1.key"),
        "--ca",
        str(arena.certs / "ca.crt"),
    ]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        asyncio.set_event_loop(arena.loop)  # asyncio.run (in join) cleared the thread's loop
    assert result.exit_code == 21, result.output
    text = " ".join(result.output.split())
    assert "the certificate of c1" in text and "expired on" in text, result.output
    arena.assert_unchanged(before)
