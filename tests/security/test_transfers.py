"""Refusals of what a client sends and asks for: uploads and downloads.

Uploads are ``c1``'s, for its own task in the open round, unless the case is about the round
itself; every bad input arrives exactly as a hostile client would send it. Malformed input
changes nothing but the event log (an ``update.rejected`` event with the identity); a
well-formed update refused for the round's state (another round, another task, a duplicate) is
answered ``accepted = false`` and also recorded as a ``rejected`` row in ``updates``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from flctl.coordinator._intake import MAX_UPLOADS_PER_IDENTITY
from flctl.core.errors import (
    ConflictError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
)
from flctl.transport import compress_chunk
from flctl.transport.grpc import pb
from tests.security.arena import MAX_CHUNK, Arena, Snapshot, digest_of, pieces, update_like

pytestmark = pytest.mark.timeout(120)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

#: Digests that must never be used as a path, nor anything else but refused.
PATH_LIKE_DIGESTS = [
    "../../../../etc/passwd",
    "../" + "0" * 61,
    "/etc/passwd",
    "/" + "0" * 63,
    "0" * 32 + "/../" + "0" * 28,
    "A" * 64,
    "g" * 64,
    "0" * 63,
    "0" * 65,
    "0" * 64 + "\n",
    "",
    "\u0661" * 64,  # Arabic-Indic digit one: a digit, not hex
]


def _c1_task(arena: Arena) -> pb.Task:
    task = arena.members["c1"].task
    assert task is not None
    return task


def _assert_logged_rejection(arena: Arena, before: Snapshot, identity: str, reason: str) -> None:
    events = arena.refusal_events(before, "update.rejected")
    # One, or two when grpc.aio replaced the Upload's status and the client asked BeginUpload
    # with the same header, which the coordinator refuses (and records) again.
    assert 1 <= len(events) <= 2, events
    for event in events:
        assert event.client_id == identity
        assert reason in event.data["reason"], event.data


# ---------------------------------------------------------------------------- the round


def _round_cases(arena: Arena) -> dict[str, tuple[str, pb.UploadHeader, bytes, str]]:
    """case -> (who uploads, header, data, reason)."""
    c1, c2 = _c1_task(arena), arena.members["c2"].task
    assert c2 is not None
    data = update_like(arena.spec, value=0.41)
    later = arena.server_round + 1
    return {
        "another-round": (
            "c1",
            arena.header(c1, data, server_round=later),
            data,
            f"round {later} is not in training (open round: {arena.server_round})",
        ),
        "round-zero": (
            "c1",
            arena.header(c1, data, server_round=0),
            data,
            f"round 0 is not in training (open round: {arena.server_round})",
        ),
        "another-task": (
            "c1",
            arena.header(c2, data),  # c2's task id in the open round
            data,
            f"task {c2.task_id[:16]!r} is not this client's task for the round",
        ),
        "not-selected": (
            "c3",
            arena.header(c1, data),
            data,
            f"c3 was not selected for round {arena.server_round}",
        ),
        "duplicate": (
            "c2",
            arena.header(c2, data),
            data,
            f"duplicate: an update for round {arena.server_round} was already accepted",
        ),
    }


@pytest.mark.parametrize("rpc", ["Upload", "BeginUpload"])
@pytest.mark.parametrize(
    "case", ["another-round", "round-zero", "another-task", "not-selected", "duplicate"]
)
def test_an_update_the_round_does_not_expect_is_not_accepted(
    arena: Arena, case: str, rpc: str
) -> None:
    who, header, data, reason = _round_cases(arena)[case]
    api = arena.members[who].api
    before = arena.snapshot()
    if rpc == "Upload":
        reply = arena.run(api.upload(header, pieces(data)))
    else:
        reply = arena.run(api.begin_upload(header))
    assert (reply.accepted, reply.reason, reply.upload_id) == (False, reason, "")
    (row,) = arena.assert_unchanged(before, rejected=1)
    assert (row["client_id"], row["reason"], row["digest"]) == (who, reason, "")
    _assert_logged_rejection(arena, before, who, reason)


@pytest.mark.parametrize("rpc", ["Upload", "BeginUpload"])
def test_an_upload_id_of_another_identity_is_refused(arena: Arena, rpc: str) -> None:
    """c1 begins an upload (on purpose, before the snapshot); c2 may neither resume nor use it."""
    data = update_like(arena.spec, value=0.42)
    header = arena.header(_c1_task(arena), data)
    begun = arena.run(arena.members["c1"].api.begin_upload(header))
    assert begun.accepted and begun.upload_id
    stolen = pb.UploadHeader()
    stolen.CopyFrom(header)
    stolen.upload_id = begun.upload_id
    c2 = arena.members["c2"].api
    before = arena.snapshot()
    call = c2.upload(stolen, pieces(data)) if rpc == "Upload" else c2.begin_upload(stolen)
    arena.refused(
        call,
        PermissionDeniedError,
        grpc.StatusCode.PERMISSION_DENIED,
        f"upload {begun.upload_id} belongs to another identity",
    )
    arena.assert_unchanged(before)
    assert (arena.state_dir / "uploads" / f"{begun.upload_id}.part").stat().st_size == 0


@pytest.mark.parametrize("case", ["malformed-id", "unknown-id", "other-update", "wrong-offset"])
def test_an_upload_id_must_name_this_update_at_the_offset_held(arena: Arena, case: str) -> None:
    """c1 begins an upload (on purpose, before the snapshot), then resumes it wrongly."""
    api = arena.members["c1"].api
    data = update_like(arena.spec, value=0.55 + len(case) / 100)
    header = arena.header(_c1_task(arena), data)
    begun = arena.run(api.begin_upload(header))
    header.upload_id = begun.upload_id
    sent = data
    if case == "malformed-id":
        header.upload_id = "../../" + begun.upload_id
        expected: tuple[type[FlctlError], grpc.StatusCode, str] = (
            InvalidInputError,
            INVALID_ARGUMENT,
            "upload id '../../[0-9a-f]+' is malformed",
        )
    elif case == "unknown-id":
        header.upload_id = "0" * 32
        expected = (NotFoundError, grpc.StatusCode.NOT_FOUND, f"no upload {'0' * 32}")
    elif case == "other-update":
        sent = update_like(arena.spec, value=0.99)
        header.digest, header.size = digest_of(sent), len(sent)
        expected = (InvalidInputError, INVALID_ARGUMENT, "was begun for another update")
    else:
        header.offset = 5
        expected = (ConflictError, grpc.StatusCode.ABORTED, "resume from offset 0, not 5")
    before = arena.snapshot()
    arena.refused(api.upload(header, pieces(sent)), *expected)
    arena.assert_unchanged(before)


# ---------------------------------------------------------------------------- the header


def _header_cases(arena: Arena) -> dict[str, tuple[dict[str, Any], type[FlctlError], str]]:
    """case -> (header fields changed, error, message)."""
    assert arena.limits is not None
    limit = arena.limits.max_update_bytes
    many = {f"m{i}": pb.Value(double_value=1.0) for i in range(65)}
    return {
        "size-over-limit": (
            {"size": limit + 1},
            LimitExceededError,
            f"update of {limit + 1} bytes exceeds the limit of {limit} bytes",
        ),
        "size-huge": ({"size": 2**64 - 1}, LimitExceededError, "exceeds the limit"),
        "task-id-too-long": ({"task_id": "t" * 257}, LimitExceededError, "task_id is too long"),
        "no-examples": (
            {"num_examples": 0},
            InvalidInputError,
            r"num_examples must be between 1 and 2\^40, not 0",
        ),
        "too-many-examples": (
            {"num_examples": 2**40 + 1},
            InvalidInputError,
            rf"num_examples must be between 1 and 2\^40, not {2**40 + 1}",
        ),
        "codec-not-negotiated": ({"codec": "lz4"}, InvalidInputError, "was not negotiated"),
        "metrics-too-many": (
            {"metrics": many},
            LimitExceededError,
            "metrics map has 65 entries, more than 64",
        ),
        "metric-name-too-long": (
            {"metrics": {"m" * 129: pb.Value(double_value=1.0)}},
            LimitExceededError,
            "metric name longer than 128 bytes",
        ),
        "metric-nan": (
            {"metrics": {"loss": pb.Value(double_value=math.nan)}},
            InvalidInputError,
            "metric 'loss' is not finite",
        ),
        "metric-inf": (
            {"metrics": {"loss": pb.Value(double_value=-math.inf)}},
            InvalidInputError,
            "metric 'loss' is not finite",
        ),
        "metric-not-a-number": (
            {"metrics": {"loss": pb.Value(string_value="0.1")}},
            InvalidInputError,
            "metric 'loss' is not a number",
        ),
        "base-digest-path": (
            {"encoding": "delta", "base_digest": "../../etc/passwd"},
            InvalidInputError,
            "invalid digest",
        ),
    }


HEADER_CASES = [
    "size-over-limit",
    "size-huge",
    "task-id-too-long",
    "no-examples",
    "too-many-examples",
    "codec-not-negotiated",
    "metrics-too-many",
    "metric-name-too-long",
    "metric-nan",
    "metric-inf",
    "metric-not-a-number",
    "base-digest-path",
]


@pytest.mark.parametrize("rpc", ["Upload", "BeginUpload"])
@pytest.mark.parametrize("case", HEADER_CASES)
def test_a_malformed_header_is_refused(arena: Arena, case: str, rpc: str) -> None:
    changes, error, match = _header_cases(arena)[case]
    data = update_like(arena.spec, value=0.43)
    fields = {k: v for k, v in changes.items() if k != "metrics"}
    header = arena.header(_c1_task(arena), data, **fields)
    for name, value in changes.get("metrics", {}).items():
        header.metrics[name].CopyFrom(value)
    api = arena.members["c1"].api
    status = RESOURCE_EXHAUSTED if error is LimitExceededError else INVALID_ARGUMENT
    before = arena.snapshot()
    call = api.upload(header, pieces(data)) if rpc == "Upload" else api.begin_upload(header)
    arena.refused(call, error, status, match)
    arena.assert_unchanged(before)
    _assert_logged_rejection(arena, before, "c1", match.split(" (")[0][:20])


@pytest.mark.parametrize("rpc", ["Upload", "BeginUpload"])
@pytest.mark.parametrize("digest", PATH_LIKE_DIGESTS)
def test_a_path_like_upload_digest_is_refused(arena: Arena, digest: str, rpc: str) -> None:
    data = update_like(arena.spec, value=0.44)
    header = arena.header(_c1_task(arena), data, digest=digest)
    api = arena.members["c1"].api
    before = arena.snapshot()
    call = api.upload(header, pieces(data)) if rpc == "Upload" else api.begin_upload(header)
    arena.refused(call, InvalidInputError, INVALID_ARGUMENT, "invalid digest")
    arena.assert_unchanged(before)
    _assert_logged_rejection(arena, before, "c1", "invalid digest")


# ---------------------------------------------------------------------------- the bytes


def _data_cases(arena: Arena) -> dict[str, tuple[bytes, dict[str, Any], type[FlctlError], str]]:
    """case -> (bytes sent, header fields changed, error, message)."""
    spec = arena.spec
    weight = next(name for name, t in spec.items() if len(t.shape) == 2)
    other = next(name for name in spec if name != weight)
    shape = [spec[weight].shape[0] + 1, 4]
    good = update_like(spec, value=0.45)
    return {
        "digest-mismatch": (
            good,
            {"digest": digest_of(good + b"!")},
            IntegrityError,
            "update bytes do not match the digest in the header",
        ),
        "wrong-names": (
            update_like(spec, value=0.46, rename={weight: "weights"}),
            {},
            InvalidInputError,
            re.escape(f"missing tensors [{weight!r}]; unexpected tensors ['weights']"),
        ),
        "missing-tensor": (
            update_like({weight: spec[weight]}, value=0.46),
            {},
            InvalidInputError,
            re.escape(f"does not match the model: missing tensors [{other!r}]"),
        ),
        "extra-tensor": (
            update_like(spec, value=0.46, extra={"backdoor": ("F32", (4,))}),
            {},
            InvalidInputError,
            re.escape("does not match the model: unexpected tensors ['backdoor']"),
        ),
        "wrong-shape": (
            update_like(spec, value=0.47, shapes={weight: shape}),
            {},
            InvalidInputError,
            re.escape(f"tensor {weight!r}: shape {shape} differs from the model's"),
        ),
        "wrong-dtype-f64": (
            update_like(spec, value=0.48, dtypes={weight: "F64"}),
            {},
            InvalidInputError,
            f"tensor {weight!r}: dtype F64 differs from the model's F32",
        ),
        "wrong-dtype-i32": (
            update_like(spec, value=1, dtypes={weight: "I32"}),
            {},
            InvalidInputError,
            f"tensor {weight!r}: dtype I32 differs from the model's F32",
        ),
        "nan": (
            update_like(spec, value=0.49, poison={weight: math.nan}),
            {},
            InvalidInputError,
            f"tensor {weight!r} holds NaN or Inf values",
        ),
        "inf": (
            update_like(spec, value=0.49, poison={weight: math.inf}),
            {},
            InvalidInputError,
            f"tensor {weight!r} holds NaN or Inf values",
        ),
        "minus-inf": (
            update_like(spec, value=0.49, poison={weight: -math.inf}),
            {},
            InvalidInputError,
            f"tensor {weight!r} holds NaN or Inf values",
        ),
        "header-length-huge": (
            b"\xff" * len(good),
            {},
            LimitExceededError,
            "safetensors header length 18446744073709551615",
        ),
        "header-not-json": (
            (16).to_bytes(8, "little") + b"{not json at all" + good[24:],
            {},
            InvalidInputError,
            "not a safetensors file: header is not JSON",
        ),
        "more-than-announced": (
            good + b"\0" * 8,
            {"size": len(good), "digest": digest_of(good + b"\0" * 8)},
            LimitExceededError,
            f"upload exceeds the {len(good)} bytes its header announced",
        ),
    }


DATA_CASES = [
    "digest-mismatch",
    "wrong-names",
    "missing-tensor",
    "extra-tensor",
    "wrong-shape",
    "wrong-dtype-f64",
    "wrong-dtype-i32",
    "nan",
    "inf",
    "minus-inf",
    "header-length-huge",
    "header-not-json",
    "more-than-announced",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bytes_that_are_not_the_update_announced_are_refused(arena: Arena, case: str) -> None:
    data, fields, error, match = _data_cases(arena)[case]
    header = arena.header(_c1_task(arena), data, **fields)
    status = {
        IntegrityError: grpc.StatusCode.DATA_LOSS,
        LimitExceededError: RESOURCE_EXHAUSTED,
        InvalidInputError: INVALID_ARGUMENT,
    }[error]
    before = arena.snapshot()
    raised = arena.refused(
        arena.members["c1"].api.upload(header, pieces(data)), error, status, match
    )
    arena.assert_unchanged(before)  # the part file was removed, no blob, no row
    _assert_logged_rejection(arena, before, "c1", raised.message[:40])


def test_a_chunk_over_max_chunk_bytes_is_refused(arena: Arena) -> None:
    """One byte over ``transport.max_chunk_bytes``, within gRPC's bound: the coordinator's check."""
    data = update_like(arena.spec, value=0.51)
    assert len(data) > MAX_CHUNK + 1
    header = arena.header(_c1_task(arena), data)
    before = arena.snapshot()
    arena.refused(
        arena.members["c1"].api.upload(header, pieces(data, MAX_CHUNK + 1)),
        LimitExceededError,
        RESOURCE_EXHAUSTED,
        f"chunk of {MAX_CHUNK + 1} bytes exceeds max_chunk_bytes {MAX_CHUNK}",
    )
    arena.assert_unchanged(before)
    _assert_logged_rejection(arena, before, "c1", "exceeds max_chunk_bytes")


def test_a_message_over_grpcs_bound_is_refused(arena: Arena) -> None:
    """Over one chunk plus 64 KiB: gRPC refuses the message before the handler sees it.

    The upload is begun first (on purpose, before the snapshot), as the client does; the
    refused message must leave it as it was.
    """
    data = bytes(MAX_CHUNK + 65536 + 1)
    header = arena.header(_c1_task(arena), data)
    api = arena.members["c1"].api
    begun = arena.run(api.begin_upload(header))
    header.upload_id = begun.upload_id
    before = arena.snapshot()
    arena.refused(
        api.upload(header, pieces(data, len(data))),
        LimitExceededError,
        RESOURCE_EXHAUSTED,
        r"exceeded the channel's size limit \(SERVER: Received message larger than max",
    )
    arena.assert_unchanged(before)


def test_a_truncated_stream_is_refused_and_kept_for_resuming(arena: Arena) -> None:
    """Refused, but not a rejection: the bytes received wait in the upload's part file for the
    stream that resumes it (docs/security.md). No blob, no row."""
    data = update_like(arena.spec, value=0.52)
    header = arena.header(_c1_task(arena), data)
    api = arena.members["c1"].api
    begun = arena.run(api.begin_upload(header))
    header.upload_id = begun.upload_id
    before = arena.snapshot()
    sent = 2 * MAX_CHUNK
    arena.refused(
        api.upload(header, pieces(data[:sent])),
        InvalidInputError,
        INVALID_ARGUMENT,
        f"the stream ended at byte {sent} of {len(data)}: .* resume from offset {sent}",
    )
    part = f"uploads/{begun.upload_id}.part"
    changes = before.changes(arena.snapshot())
    # the only other change allowed: c1's oldest idle uploads beyond the per-identity cap go
    dropped = [c for c in changes if c.endswith("-> None bytes")]
    assert [c for c in changes if c not in dropped] == [f"file {part}: 0 -> {sent} bytes"]
    assert all(c.startswith("file uploads/") for c in dropped)
    records = [json.loads(p.read_text()) for p in (arena.state_dir / "uploads").glob("*.json")]
    assert sum(r["client_id"] == "c1" for r in records) <= MAX_UPLOADS_PER_IDENTITY
    assert arena.refusal_events(before, "update.rejected") == []


@pytest.mark.parametrize("where", ["first", "second"])
def test_an_upload_must_be_one_header_then_data(arena: Arena, where: str) -> None:
    data = update_like(arena.spec, value=0.53)
    header = arena.header(_c1_task(arena), data)
    if where == "first":
        items: list[Any] = [data[:MAX_CHUNK], header]
        match = "an upload must start with its header"
    else:
        items = [header, data[:MAX_CHUNK], header, data[MAX_CHUNK:]]
        match = "an upload carries one header, then data"
    before = arena.snapshot()
    arena.refused(
        arena.raw_upload(arena.members["c1"].api, items),
        InvalidInputError,
        INVALID_ARGUMENT,
        match,
    )
    arena.assert_unchanged(before)
    if where == "second":  # the header had arrived: the refusal is logged with the identity
        _assert_logged_rejection(arena, before, "c1", match)


def test_a_corrupt_compressed_frame_is_refused(arena: Arena) -> None:
    data = update_like(arena.spec, value=0.54)
    header = arena.header(_c1_task(arena), data, codec="zstd")

    async def frames() -> AsyncIterator[bytes]:
        for n, start in enumerate(range(0, len(data), MAX_CHUNK)):
            frame = bytearray(compress_chunk(data[start : start + MAX_CHUNK], 1, codec="zstd"))
            if n == 1:
                frame[len(frame) // 2] ^= 0xFF
            yield bytes(frame)

    before = arena.snapshot()
    arena.refused(
        arena.members["c1"].api.upload(header, frames()),
        IntegrityError,
        grpc.StatusCode.DATA_LOSS,
        "zstd",
    )
    arena.assert_unchanged(before)
    _assert_logged_rejection(arena, before, "c1", "zstd")


# ---------------------------------------------------------------------------- downloads


class _Sink:
    def write(self, data: bytes | memoryview) -> int:
        raise AssertionError("a refused download sent bytes")


@pytest.mark.parametrize("digest", PATH_LIKE_DIGESTS)
def test_a_path_like_download_digest_is_refused(arena: Arena, digest: str) -> None:
    before = arena.snapshot()
    arena.refused(
        arena.members["c1"].api.download(digest, _Sink()),
        InvalidInputError,
        INVALID_ARGUMENT,
        "invalid digest",
    )
    arena.assert_unchanged(before)


@pytest.mark.parametrize(
    ("digest", "offset", "error", "status", "match"),
    [
        ("0" * 64, 0, NotFoundError, grpc.StatusCode.NOT_FOUND, "no blob 000000000000"),
        (None, 10**9, InvalidInputError, INVALID_ARGUMENT, "beyond the blob's"),
        (None, 2**64 - 1, InvalidInputError, INVALID_ARGUMENT, "beyond the blob's"),
    ],
    ids=["unknown-blob", "offset-beyond", "offset-max"],
)
def test_a_download_of_what_is_not_there_is_refused(
    arena: Arena,
    digest: str | None,
    offset: int,
    error: type[FlctlError],
    status: grpc.StatusCode,
    match: str,
) -> None:
    before = arena.snapshot()
    call: Callable[[], Any] = lambda: arena.members["c1"].api.download(  # noqa: E731
        digest or arena.head_digest, _Sink(), offset=offset
    )
    arena.refused(call(), error, status, match)
    arena.assert_unchanged(before)
