"""Translation between flctl errors and gRPC statuses, at each boundary, once.

Server side: a :class:`FlctlError` becomes a status code (by the table below) plus its message
and its exact ``code`` in the ``flctl-error`` trailing metadata; anything else becomes INTERNAL
with a generic message (details go to the log only). Client side: a ``grpc.RpcError`` becomes
the most specific :class:`TransportError` or domain error, rebuilt from that metadata when
present.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

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
    TransportError,
    all_error_classes,
)

__all__ = [
    "ERROR_METADATA_KEY",
    "STATUS_TO_ERROR",
    "is_tls_failure",
    "map_rpc_errors",
    "status_for",
    "translate_rpc_error",
]

ERROR_METADATA_KEY = "flctl-error"

# Most specific class first: the first isinstance match wins.
_ERROR_TO_STATUS: list[tuple[type[FlctlError], grpc.StatusCode]] = [
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (CertificateError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ABORTED),
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


def translate_rpc_error(exc: grpc.RpcError) -> FlctlError:
    """Turn a failed call into the most specific flctl error."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            cls = _BY_CODE.get(value if isinstance(value, str) else value.decode())
            if cls is not None:
                return cls(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message bound (one chunk plus 64 KiB on both channel ends)
        return LimitExceededError(
            f"a message exceeded the channel's size limit ({details})",
            hint="send data in chunks of at most max_chunk_bytes (the JoinReply's limits)",
        )
    if code == grpc.StatusCode.UNAVAILABLE and is_tls_failure(details):
        return CertificateError(
            f"the TLS handshake failed: {details}",
            hint="check that this certificate was issued by the coordinator's CA and is valid",
        )
    return STATUS_TO_ERROR.get(code, TransportError)(details)


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
