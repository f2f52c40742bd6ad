"""Requests whose bytes do not decode as their message, on every shape of RPC of both services.

Each is sent raw (identity serializers) with valid credentials: ``c1``'s certificate and session
token for the Coordinator service, ``admin``'s for the Admin service. The coordinator must
answer ``INVALID_ARGUMENT`` with ``malformed <Type>: <reason>`` before any handler runs, change
nothing, log no traceback (no gRPC "Unexpected [DecodeError] raised by servicer method"), and
go on serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.message import DecodeError, Message

from flctl.store import BlobStore
from flctl.transport.grpc import decode_chunk, encode_upload, pb
from tests.security.arena import Arena, update_like

pytestmark = pytest.mark.timeout(120)

#: Field 31 with wire type 7, which does not exist: no message parses it.
CORRUPT = b"\xff\xff\xff"
#: A data message whose length claims more bytes than follow.
TRUNCATED_DATA = b"\x12\x05abc"


#: Put in a string field, then replaced by bytes that are not UTF-8 (see :func:`not_utf8`).
MARKER = "MARKER!!"


def not_utf8(message: Message) -> bytes:
    """``message`` serialized, with the :data:`MARKER` in one of its string fields (nested or
    not) replaced by as many bytes that are not UTF-8: the framing still holds."""
    raw = message.SerializeToString()
    assert raw.count(MARKER.encode()) == 1
    out = raw.replace(MARKER.encode(), b"\xc3\x28" * (len(MARKER) // 2))
    with pytest.raises(DecodeError, match="UTF-8"):
        type(message).FromString(out)
    return out


def _same(raw: bytes) -> bytes:
    return raw


@dataclass(frozen=True)
class Case:
    """One call: where it goes, its shape, the messages sent, and the type named in the refusal."""

    service: str  # "Coordinator" or "Admin"
    method: str
    shape: str  # "unary", "server-stream" or "client-stream"
    messages: tuple[bytes, ...]
    message_type: str

    @property
    def path(self) -> str:
        """The RPC's path on the wire."""
        return f"/flctl.v1.{self.service}/{self.method}"


def _cases(arena: Arena) -> dict[str, Case]:
    task = arena.members["c1"].task
    assert task is not None
    data = update_like(arena.spec, value=0.37)
    header = arena.header(task, data)  # c1's own task: a header the coordinator would take

    def case(method: str, shape: str, message_type: str, *messages: bytes) -> Case:
        return Case("Coordinator", method, shape, messages, message_type)

    def admin(method: str, shape: str, message_type: str, *messages: bytes) -> Case:
        return Case("Admin", method, shape, messages, message_type)

    return {
        "join-corrupt": case("Join", "unary", "JoinRequest", CORRUPT),
        "join-not-utf8": case(
            "Join", "unary", "JoinRequest", not_utf8(arena.join_request(client_version=MARKER))
        ),
        "heartbeat-corrupt": case("Heartbeat", "unary", "HeartbeatRequest", CORRUPT),
        "heartbeat-not-utf8": case(
            "Heartbeat",
            "unary",
            "HeartbeatRequest",
            not_utf8(pb.HeartbeatRequest(state=MARKER, server_round=task.server_round)),
        ),
        "begin-upload-corrupt": case("BeginUpload", "unary", "UploadHeader", CORRUPT),
        "begin-upload-not-utf8": case(
            "BeginUpload", "unary", "UploadHeader", not_utf8(arena.header(task, data, codec=MARKER))
        ),
        "download-corrupt": case("Download", "server-stream", "DownloadRequest", CORRUPT),
        "download-not-utf8": case(
            "Download",
            "server-stream",
            "DownloadRequest",
            not_utf8(pb.DownloadRequest(digest=MARKER)),
        ),
        "upload-corrupt-first": case("Upload", "client-stream", "UploadChunk", CORRUPT),
        "upload-header-not-utf8": case(
            "Upload",
            "client-stream",
            "UploadChunk",
            not_utf8(pb.UploadChunk(header=arena.header(task, data, task_id=MARKER))),
        ),
        # the header is taken (an upload begins), then the stream breaks: the upload goes
        "upload-corrupt-after-header": case(
            "Upload",
            "client-stream",
            "UploadChunk",
            encode_upload(header),
            encode_upload(data[:4096]),
            CORRUPT,
        ),
        "upload-truncated-after-header": case(
            "Upload", "client-stream", "UploadChunk", encode_upload(header), TRUNCATED_DATA
        ),
        "status-corrupt": admin("Status", "unary", "StatusRequest", CORRUPT),
        # a valid ref: read, it would roll the head back
        "rollback-not-utf8": admin(
            "Rollback",
            "unary",
            "RollbackRequest",
            not_utf8(pb.RollbackRequest(ref="1", reason=MARKER)),
        ),
        "tag-corrupt": admin("Tag", "unary", "TagRequest", CORRUPT),
        "watch-corrupt": admin("Watch", "server-stream", "WatchRequest", CORRUPT),
    }


CASES = [
    "join-corrupt",
    "join-not-utf8",
    "heartbeat-corrupt",
    "heartbeat-not-utf8",
    "begin-upload-corrupt",
    "begin-upload-not-utf8",
    "download-corrupt",
    "download-not-utf8",
    "upload-corrupt-first",
    "upload-header-not-utf8",
    "upload-corrupt-after-header",
    "upload-truncated-after-header",
    "status-corrupt",
    "rollback-not-utf8",
    "tag-corrupt",
    "watch-corrupt",
]


async def _call(
    channel: grpc.aio.Channel,
    case: Case,
    metadata: Sequence[tuple[str, str]],
) -> grpc.aio.AioRpcError:
    """Send ``case``'s messages exactly as they are; the error it ends with."""
    try:
        if case.shape == "unary":
            unary = channel.unary_unary(
                case.path, request_serializer=_same, response_deserializer=_same
            )
            await unary(case.messages[0], metadata=metadata, timeout=30)
        elif case.shape == "server-stream":
            stream = channel.unary_stream(
                case.path, request_serializer=_same, response_deserializer=_same
            )
            async for _ in stream(case.messages[0], metadata=metadata, timeout=30):
                pass
        else:
            upload = channel.stream_unary(
                case.path, request_serializer=_same, response_deserializer=_same
            )

            async def messages() -> AsyncIterator[bytes]:
                for message in case.messages:
                    yield message

            await upload(messages(), metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"{case.path} answered OK")


def _caller(arena: Arena, service: str) -> tuple[grpc.aio.Channel, list[tuple[str, str]]]:
    """c1's channel and session token (Coordinator), or a channel of ``admin`` (Admin)."""
    if service == "Coordinator":
        api = arena.members["c1"].api
        return api.channel, api.metadata()
    return arena.admin().channel, []


def _still_serving(arena: Arena, service: str, channel: grpc.aio.Channel, md: list[Any]) -> None:
    """A valid call of the same service, on the same channel, is answered."""
    if service == "Admin":
        status = channel.unary_unary(
            "/flctl.v1.Admin/Status",
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusReply.FromString,
        )
        reply = arena.run(status(pb.StatusRequest(), metadata=md, timeout=30))
        assert reply.head_version >= 1
        return
    size = BlobStore(arena.state_dir / "blobs").size(arena.head_digest)
    download = channel.unary_stream(
        "/flctl.v1.Coordinator/Download",
        request_serializer=pb.DownloadRequest.SerializeToString,
        response_deserializer=decode_chunk,
    )

    async def tail() -> bytes:
        request = pb.DownloadRequest(digest=arena.head_digest, offset=size - 7)
        return b"".join([bytes(c.data) async for c in download(request, metadata=md, timeout=30)])

    assert len(arena.run(tail())) == 7


def _assert_no_traceback(caplog: pytest.LogCaptureFixture, message_type: str) -> None:
    records = caplog.records
    unexpected = [
        r.getMessage()
        for r in records
        if "Unexpected [" in r.getMessage()
        or (r.exc_info is not None and r.exc_info[0] is not None)
    ]
    assert unexpected == [], unexpected
    refusals = [
        r
        for r in records
        if r.name == "flctl.transport" and f"malformed {message_type}" in r.getMessage()
    ]
    assert refusals, [r.getMessage() for r in records]


@pytest.mark.parametrize("name", CASES)
def test_a_request_that_does_not_decode_is_refused_as_invalid(
    arena: Arena, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    case = _cases(arena)[name]
    channel, metadata = _caller(arena, case.service)
    before = arena.snapshot()
    with caplog.at_level(logging.INFO):
        error = arena.run(_call(channel, case, metadata))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error.details() or ""
    assert details.startswith(f"malformed {case.message_type}: "), details
    arena.assert_unchanged(before)
    # the upload whose header was taken is refused like any malformed update: an event only
    refusals = arena.refusal_events(before, "update.rejected")
    if name.endswith("-after-header"):
        (event,) = refusals
        assert event.client_id == "c1" and event.data["malformed"] is True
        assert event.data["reason"].startswith("malformed UploadChunk: "), event.data
    else:
        assert refusals == []
    _assert_no_traceback(caplog, case.message_type)
    _still_serving(arena, case.service, channel, metadata)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Wire format was corrupt", CORRUPT),
        ("String field had bad UTF-8", not_utf8(pb.JoinRequest(client_version=MARKER))),
    ],
    ids=["corrupt", "not-utf8"],
)
def test_the_refusal_says_what_the_parser_found(arena: Arena, reason: str, expected: bytes) -> None:
    channel, metadata = _caller(arena, "Coordinator")
    case = Case("Coordinator", "Join", "unary", (expected,), "JoinRequest")
    error = arena.run(_call(channel, case, metadata))
    assert error.details() == f"malformed JoinRequest: {reason}"


@pytest.mark.parametrize(
    ("who", "path"),
    [("c1", "/flctl.v1.Admin/Status"), ("admin", "/flctl.v1.Coordinator/Join")],
)
def test_the_role_is_checked_before_the_request_is(arena: Arena, who: str, path: str) -> None:
    """A certificate on the other service is refused for its role, whatever it sends."""
    channel = arena.channel(*arena.credentials(who))
    service, method = path.split("/")[1:]
    case = Case(service.removeprefix("flctl.v1."), method, "unary", (CORRUPT,), "-")
    before = arena.snapshot()
    error = arena.run(_call(channel, case, []))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED, (error.code(), error.details())
    arena.assert_unchanged(before)
    (event,) = arena.refusal_events(before, "security.refused")
    assert (event.client_id, event.data["rpc"]) == (who, method)
