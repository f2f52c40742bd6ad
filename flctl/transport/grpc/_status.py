"""Translation between flctl errors and gRPC statuses, at each boundary, once.

Server side: a :class:`FlctlError` becomes a status code (by the table below) plus its message
and its exact ``code`` in the ``flctl-error`` trailing metadata (its hint and details, when
it has them, in ``flctl-error-hint`` and ``flctl-error-details``); anything else becomes INTERNAL
with a generic message (details go to the log only). Client side: a ``grpc.RpcError`` becomes
the most specific :class:`TransportError` or domain error, rebuilt from that metadata when
present.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote

import grpc

from flctl.core.errors import (
    AuthenticationError,
    CertificateError,
    ConflictError,
    ConnectError,
    DeadlineExceededError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PeerRejectedError,
    PermissionDeniedError,
    ProtocolMismatchError,
    ResourceExhaustedError,
    SessionConflictError,
    StorageFullError,
    TransportError,
    all_error_classes,
)

__all__ = [
    "ERROR_METADATA_KEY",
    "STATUS_TO_ERROR",
    "UNREACHABLE_HINT",
    "describe_unreachable",
    "error_metadata",
    "is_tls_failure",
    "map_rpc_errors",
    "status_for",
    "translate_rpc_error",
]

ERROR_METADATA_KEY = "flctl-error"
_HINT_KEY = "flctl-error-hint"
_DETAILS_KEY = "flctl-error-details"
#: Hints and details longer than this stay on the server (metadata is small by design).
_MAX_EXTRA = 2048


def error_metadata(error: FlctlError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a servicer sends with ``error``: its code, hint and details."""
    out = [(ERROR_METADATA_KEY, error.code)]
    if error.hint and len(error.hint) <= _MAX_EXTRA:
        out.append((_HINT_KEY, error.hint.encode("unicode_escape").decode("ascii")))
    if error.details:
        encoded = json.dumps(error.details, default=str, ensure_ascii=True)
        if len(encoded) <= _MAX_EXTRA:
            out.append((_DETAILS_KEY, encoded))
    return tuple(out)


# Most specific class first: the first isinstance match wins.
_ERROR_TO_STATUS: list[tuple[type[FlctlError], grpc.StatusCode]] = [
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (CertificateError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StorageFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ABORTED),
    (SessionConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConnectError, grpc.StatusCode.UNAVAILABLE),
    (FlctlError, grpc.StatusCode.FAILED_PRECONDITION),
]

#: What a client raises for each status when the server sent no ``flctl-error`` code.
STATUS_TO_ERROR: dict[grpc.StatusCode, type[FlctlError]] = {
    grpc.StatusCode.OK: TransportError,
    grpc.StatusCode.CANCELLED: ConnectError,
    grpc.StatusCode.UNKNOWN: TransportError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: PeerRejectedError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolMismatchError,
    grpc.StatusCode.INTERNAL: TransportError,
    grpc.StatusCode.UNAVAILABLE: ConnectError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}

_BY_CODE: dict[str, type[FlctlError]] = {cls.code: cls for cls in all_error_classes()}

#: The details grpc.aio gives a call whose status it replaced after a failed write (an
#: INTERNAL status that no flctl servicer sends).
GRPC_CORE_INTERNAL = "Internal error from Core"

# Substrings of grpc's own messages that mean the TLS handshake, not the network, failed.
_TLS_MARKERS = ("handshake", "ssl", "certificate", "tls", "alert")


def status_for(error: FlctlError) -> grpc.StatusCode:
    """Return the status code a servicer answers ``error`` with."""
    for cls, code in _ERROR_TO_STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL  # pragma: no cover - FlctlError is the last row


def is_tls_failure(details: str) -> bool:
    """Say whether an UNAVAILABLE message describes a refused TLS handshake."""
    lowered = details.lower()
    return any(marker in lowered for marker in _TLS_MARKERS)


# gRPC's words for a peer that is not there: "failed to connect to all addresses; last error:
# UNKNOWN: ipv4:127.0.0.1:7070: Connection refused", "DNS resolution failed for h:1: ...".
_PEER_ADDRESS = re.compile(r"(?:ipv4|ipv6|unix|dns):(\S+?):\s")
_DNS_FAILED = re.compile(r"DNS resolution failed for (\S+?):?\s")
_UNREACHABLE = (
    ("connection refused", "connection refused"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("timed out", "connection timed out"),
    ("timeout occurred", "connection timed out"),
)
UNREACHABLE_HINT = "is `flctl serve` running there? check the address and port"


def describe_unreachable(details: str) -> ConnectError | None:
    """A plain :class:`ConnectError` for gRPC's "cannot connect" texts, or None for others.

    The coordinator's address comes from gRPC's text; gRPC's own words stay in the details.
    """
    dns = _DNS_FAILED.search(details)
    if dns:
        return ConnectError(
            f"cannot resolve the coordinator's host name ({dns.group(1)})",
            hint="check the host name in --server or server.address",
            details={"grpc": details},
        )
    lowered = details.lower()
    for marker, words in _UNREACHABLE:
        if marker in lowered:
            found = _PEER_ADDRESS.search(details)
            where = f" at {unquote(found.group(1))}" if found else ""
            return ConnectError(
                f"no coordinator{where} yet ({words})",
                hint=UNREACHABLE_HINT,
                details={"grpc": details},
            )
    return None


def translate_rpc_error(exc: grpc.RpcError) -> FlctlError:
    """Turn a failed call into the most specific flctl error."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    meta = {
        key: value if isinstance(value, str) else value.decode(errors="replace")
        for key, value in trailing or ()
    }
    cls = _BY_CODE.get(meta.get(ERROR_METADATA_KEY, ""))
    if cls is not None:
        hint = meta.get(_HINT_KEY)
        return cls(
            details,
            hint=hint.encode("ascii", "replace").decode("unicode_escape") if hint else None,
            details=_details(meta.get(_DETAILS_KEY)),
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message bound (one chunk plus 64 KiB on both channel ends)
        return LimitExceededError(
            f"a message exceeded the channel's size limit ({details})",
            hint="send data in chunks of at most max_chunk_bytes (the JoinReply's limits)",
        )
    if code == grpc.StatusCode.UNAVAILABLE and not is_tls_failure(details):
        unreachable = describe_unreachable(details)
        if unreachable is not None:
            return unreachable
    if code == grpc.StatusCode.UNAVAILABLE and is_tls_failure(details):
        return CertificateError(
            f"the TLS handshake failed: {details}",
            hint="check that this certificate was issued by the coordinator's CA and is valid",
        )
    return STATUS_TO_ERROR.get(code, TransportError)(details)


def _details(encoded: str | None) -> dict[str, object] | None:
    if not encoded:
        return None
    try:
        value = json.loads(encoded)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@contextmanager
def map_rpc_errors() -> Iterator[None]:
    """Re-raise any ``grpc.RpcError`` inside the block as a flctl error."""
    try:
        yield
    except grpc.RpcError as exc:
        # A call cut short because our own task is being cancelled is a cancellation, not a
        # transport error: turning it into one would let a retry loop swallow the cancel.
        task = _current_task()
        if exc.code() == grpc.StatusCode.CANCELLED and task is not None and task.cancelling():
            raise asyncio.CancelledError from exc
        raise translate_rpc_error(exc) from exc


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop (a synchronous caller)
        return None
