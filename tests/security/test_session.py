"""Refusals of the session: protocol and model at Join, and every kind of bad session token.

Each token case is presented by ``c1``'s own certificate on a channel of its own, on calls that
would change state if the token were not checked (BeginUpload would begin an upload for c1's
task). The coordinator logs none of these refusals in the event log today (docs/security.md,
"Planned"); the tests assert the status, the message and the unchanged state.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from flctl.core.errors import AuthenticationError, ProtocolMismatchError
from flctl.security import MAX_TOKEN_LENGTH, TokenSigner, identity_from_pem
from flctl.transport.grpc import CoordinatorClient, pb
from tests.security.arena import Arena, digest_of, pieces, update_like

pytestmark = pytest.mark.timeout(120)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(arena: Arena, case: str) -> tuple[str, str]:
    """The token each case presents as c1, and the message its refusal carries."""
    assert arena.signer is not None
    c1 = arena.members["c1"]
    fp = identity_from_pem(arena.credentials("c1")[0]).fingerprint
    sid = c1.joined.session_id
    if case == "missing":
        return "", "needs a session token: call Join first"
    if case == "malformed":
        return "not-a-token", "malformed session token"
    if case == "too-long":
        return "a" * (MAX_TOKEN_LENGTH + 1), "malformed session token"
    if case == "alg-none":
        header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        claims = _b64(json.dumps({"sub": "c1", "sid": sid, "exp": time.time() + 600}).encode())
        return f"{header}.{claims}.", "malformed session token"
    if case == "forged":  # the right claims, signed with a key that is not the coordinator's
        return TokenSigner.generate().issue("c1", fp, sid, 600), "signature is invalid"
    if case == "expired":
        token = arena.signer.issue("c1", fp, sid, 60, now=time.time() - 3600)
        return token, "session token expired"
    if case == "other-certificate":  # c2's real token, presented with c1's certificate
        return arena.members["c2"].joined.session_token, "issued to another certificate"
    if case == "other-identity":  # signed by the coordinator for c2, bound to c1's certificate
        token = arena.signer.issue("c2", fp, sid, 600)
        return token, "issued to another identity"
    if case == "stale-session":  # a real token of c1 for a session that does not exist
        return arena.signer.issue("c1", fp, "0" * 32, 600), "session is no longer open"
    raise AssertionError(case)


TOKEN_CASES = [
    "missing",
    "malformed",
    "too-long",
    "alg-none",
    "forged",
    "expired",
    "other-certificate",
    "other-identity",
    "stale-session",
]


def _calls(arena: Arena, api: CoordinatorClient) -> dict[str, Callable[[], Any]]:
    task = arena.members["c1"].task
    assert task is not None
    data = update_like(arena.spec, value=0.31)
    header = arena.header(task, data)

    async def first_task() -> pb.Task:
        return await anext(api.tasks())

    class Discard:
        def write(self, piece: bytes | memoryview) -> int:
            return len(piece)

    return {
        "BeginUpload": lambda: api.begin_upload(header),
        "Upload": lambda: api.upload(header, pieces(data)),
        "Download": lambda: api.download(arena.head_digest, Discard()),
        "Tasks": first_task,
    }


@pytest.mark.parametrize("rpc", ["BeginUpload", "Upload", "Download", "Tasks"])
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_a_bad_session_token_is_unauthenticated(arena: Arena, case: str, rpc: str) -> None:
    api = arena.client("c1")
    api.token, message = _token(arena, case)
    before = arena.snapshot()
    arena.refused(_calls(arena, api)[rpc](), AuthenticationError, UNAUTHENTICATED, message)
    arena.assert_unchanged(before)


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_a_heartbeat_with_a_bad_token_is_told_to_join_again(arena: Arena, case: str) -> None:
    api = arena.client("c1")
    api.token, _ = _token(arena, case)
    before = arena.snapshot()
    request = pb.HeartbeatRequest(state="failed", server_round=arena.server_round)
    reply = arena.run(api.heartbeat(request))
    assert reply.command == "rejoin"
    arena.assert_unchanged(before)
    # c1's session did not take the "failed" state from the bad call
    session = arena.coordinator._registry.get("c1")  # type: ignore[union-attr]
    assert session is not None
    assert (session.state, session.failed_round) == ("idle", 0)


def test_a_token_of_a_replaced_session_is_unauthenticated(arena: Arena) -> None:
    """``c4`` joins twice; its first token dies with the session the second Join replaced."""
    first = arena.client("c4")
    arena.run(first.join(arena.join_request()))
    arena.run(arena.client("c4").join(arena.join_request()))
    before = arena.snapshot()
    arena.refused(
        first.download(arena.head_digest, _Sink()),
        AuthenticationError,
        UNAUTHENTICATED,
        "session is no longer open",
    )
    arena.assert_unchanged(before)


class _Sink:
    def write(self, data: bytes | memoryview) -> int:
        raise AssertionError("a refused download sent bytes")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"protocol_version": 2}, "protocol version 2 is not supported"),
        ({"protocol_version": 0}, "protocol version 0 is not supported"),
        ({"task_fingerprint": "0" * 64}, "does not match the coordinator's task"),
        ({"task_fingerprint": ""}, "does not match the coordinator's task"),
    ],
    ids=["protocol-2", "protocol-0", "other-fingerprint", "no-fingerprint"],
)
def test_join_refuses_another_protocol_or_model(
    arena: Arena, fields: dict[str, Any], match: str
) -> None:
    api = arena.client("c3")
    before = arena.snapshot()
    arena.refused(
        api.join(arena.join_request(**fields)),
        ProtocolMismatchError,
        grpc.StatusCode.FAILED_PRECONDITION,
        match,
    )
    arena.assert_unchanged(before)


def test_join_names_the_tensors_that_differ(arena: Arena) -> None:
    api = arena.client("c3")
    request = arena.join_request(task_fingerprint=digest_of(b"another model"))
    spec = {"weight": ["F32", [2, 3]], "bias": ["F16", [2]], "extra": ["F32", [1]]}
    request.properties["model_spec"].string_value = json.dumps(spec)
    before = arena.snapshot()
    error = arena.refused(
        api.join(request),
        ProtocolMismatchError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "unexpected tensor 'extra'",
    )
    assert "tensor 'bias': dtype F16 vs the coordinator's F32" in error.message
    assert "tensor 'weight': shape [2, 3]" in error.message
    arena.assert_unchanged(before)
