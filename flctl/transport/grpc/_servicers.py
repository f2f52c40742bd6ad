"""Servicers' plumbing: who is calling, role checks, and error translation for every RPC.

The generated servicer classes are subclassed here and delegate to handler objects that know
nothing of grpc (the coordinator implements :class:`CoordinatorHandler` and
:class:`AdminHandler`). The caller's identity comes from its verified client certificate; with
``--insecure`` (loopback only) it comes from ``x-flctl-identity`` metadata instead. A request
that did not decode (a ``Malformed`` from the server's tolerant deserializers) is refused with
``INVALID_ARGUMENT`` after the identity and role checks and before any handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from flctl.core.errors import (
    AuthenticationError,
    FlctlError,
    PermissionDeniedError,
)
from flctl.security import Identity, Role, identity_from_pem
from flctl.transport.grpc._connections import note_authenticated
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._proto import flctl_pb2_grpc as pb_grpc
from flctl.transport.grpc._status import error_metadata, status_for
from flctl.transport.grpc._tolerant import refuse_malformed, refusing_malformed
from flctl.transport.grpc._wire import ChunkOut, UploadItem

__all__ = [
    "AdminHandler",
    "AdminServicer",
    "CoordinatorHandler",
    "CoordinatorServicer",
    "RpcContext",
]

log = logging.getLogger("flctl.transport")

T = TypeVar("T")

IDENTITY_METADATA_KEY = "x-flctl-identity"
ROLE_METADATA_KEY = "x-flctl-role"


@dataclass(frozen=True)
class RpcContext:
    """What a handler knows about the call it serves.

    Attributes:
        identity: The caller's name (the certificate's subject CN).
        role: "client" or "admin".
        fingerprint: sha256 of the caller's certificate ("" with --insecure).
        token: The session token from ``authorization: Bearer`` metadata ("" when absent).
        peer: The peer's address, for logs.
        serial: The caller's certificate serial (0 with --insecure).
        not_before: Start of the certificate's validity, seconds since the epoch (0: none, as
            with --insecure).
        not_after: End of the certificate's validity, seconds since the epoch (0: none).
    """

    identity: str
    role: str
    fingerprint: str
    token: str
    peer: str
    serial: int = 0
    not_before: float = 0.0
    not_after: float = 0.0

    def validity_problem(self, now: float) -> str | None:
        """How the caller's certificate fails at ``now`` ("expired at ..."), or None if valid.

        The handshake checks the window once, when the connection opens; a connection (and a
        session) outlives it, so the coordinator asks again on every call.
        """
        if self.not_after and now >= self.not_after:
            return f"expired at {_utc(self.not_after)}"
        if self.not_before and now < self.not_before:
            return f"is not valid until {_utc(self.not_before)}"
        return None


def _utc(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class CoordinatorHandler(Protocol):
    """What the coordinator implements for the ``Coordinator`` service."""

    async def join(self, request: pb.JoinRequest, ctx: RpcContext) -> pb.JoinReply:
        """Open a session."""

    async def heartbeat(self, request: pb.HeartbeatRequest, ctx: RpcContext) -> pb.HeartbeatReply:
        """Record liveness and progress."""

    def tasks(self, request: pb.TasksRequest, ctx: RpcContext) -> AsyncIterator[pb.Task]:
        """Push work to the client for as long as its session lives."""

    def download(self, request: pb.DownloadRequest, ctx: RpcContext) -> AsyncIterator[ChunkOut]:
        """Stream a blob from an offset."""

    async def upload(
        self, chunks: AsyncIterator[UploadItem | None], ctx: RpcContext
    ) -> pb.UploadReply:
        """Receive an update: the header, then data; None marks an unreadable message."""

    async def begin_upload(self, request: pb.UploadHeader, ctx: RpcContext) -> pb.UploadReply:
        """Open an upload or find the one begun earlier; say how many bytes are held."""

    async def renew_token(
        self, request: pb.RenewTokenRequest, ctx: RpcContext
    ) -> pb.RenewTokenReply:
        """Issue a fresh token for the caller's open session."""

    async def report_evaluation(
        self, request: pb.EvaluationReport, ctx: RpcContext
    ) -> pb.EvaluationReply:
        """Take the result of an evaluate task."""

    async def secagg(self, request: pb.SecAggMessage, ctx: RpcContext) -> pb.SecAggReply:
        """Take a client's message of a secure-aggregation stage; answer once it closed."""


class AdminHandler(Protocol):
    """What the coordinator implements for the ``Admin`` service."""

    async def start_round(
        self, request: pb.StartRoundRequest, ctx: RpcContext
    ) -> pb.StartRoundReply:
        """Queue rounds."""

    async def status(self, request: pb.StatusRequest, ctx: RpcContext) -> pb.StatusReply:
        """Describe rounds and the head model."""

    async def list_clients(
        self, request: pb.ListClientsRequest, ctx: RpcContext
    ) -> pb.ListClientsReply:
        """List known clients."""

    async def list_models(
        self, request: pb.ListModelsRequest, ctx: RpcContext
    ) -> pb.ListModelsReply:
        """List model versions."""

    async def revoke(self, request: pb.RevokeRequest, ctx: RpcContext) -> pb.RevokeReply:
        """Revoke an identity or one certificate, and end its session."""

    async def rollback(self, request: pb.RollbackRequest, ctx: RpcContext) -> pb.RollbackReply:
        """Move the head back to an earlier version's weights, serialised with rounds."""

    async def cancel_round(
        self, request: pb.CancelRoundRequest, ctx: RpcContext
    ) -> pb.CancelRoundReply:
        """Cancel the running round and/or queued rounds."""

    async def evict(self, request: pb.EvictRequest, ctx: RpcContext) -> pb.EvictReply:
        """End a client's session."""

    async def tag(self, request: pb.TagRequest, ctx: RpcContext) -> pb.TagReply:
        """Name a model version."""

    def watch(self, request: pb.WatchRequest, ctx: RpcContext) -> AsyncIterator[pb.Event]:
        """Replay the event log from a seq, then follow it."""

    async def list_events(
        self, request: pb.ListEventsRequest, ctx: RpcContext
    ) -> pb.ListEventsReply:
        """One page of the event log, newest first."""


@lru_cache(maxsize=1024)
def _identity_of(cert_pem: bytes) -> Identity:
    return identity_from_pem(cert_pem)


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


class _Base:
    """Builds the :class:`RpcContext` and maps errors for every method of a service."""

    required_role: Role
    #: Other roles this service accepts besides ``required_role``.
    also_allowed: frozenset[str] = frozenset()

    def __init__(
        self, *, insecure: bool, on_refused: Callable[[str, str, str], None] | None = None
    ) -> None:
        self._insecure = insecure
        # (identity, rpc, reason) of a caller refused here, before any handler: for the log
        self._on_refused = on_refused

    def _context(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str = "") -> RpcContext:
        metadata = _metadata(context)
        auth = metadata.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        peer = context.peer() or ""
        certs = (context.auth_context() or {}).get("x509_pem_cert") or []
        if certs:
            identity = _identity_of(bytes(certs[0]))
            name, role, fingerprint = identity.name, identity.role.value, identity.fingerprint
            serial = identity.serial
            window = (identity.not_before.timestamp(), identity.not_after.timestamp())
        elif self._insecure:
            name = metadata.get(IDENTITY_METADATA_KEY, "")
            role = metadata.get(ROLE_METADATA_KEY, self.required_role.value)
            fingerprint = ""
            serial = 0
            window = (0.0, 0.0)
            if not name:
                raise AuthenticationError(f"--insecure calls must send `{IDENTITY_METADATA_KEY}`")
        else:
            raise AuthenticationError("no client certificate was presented")
        if role != self.required_role.value and role not in self.also_allowed:
            refusal = PermissionDeniedError(
                f"{'an' if role[:1] in 'aeiou' else 'a'} {role} certificate may not call the "
                f"{'Admin' if self.required_role is Role.ADMIN else 'Coordinator'} service"
            )
            if self._on_refused is not None:
                self._on_refused(name, rpc, refusal.message)
            raise refusal
        note_authenticated(peer)  # the last of this peer's connections a bound would close
        return RpcContext(name, role, fingerprint, token, peer, serial, *window)

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, FlctlError):
            code = status_for(exc)
            log.info("refused %s: %s (%s)", context.peer(), exc.message, code.name)
            context.set_trailing_metadata(error_metadata(exc))
            await context.abort(code, exc.message)
        log.error("internal error serving %s", context.peer(), exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the coordinator's log)")

    async def _unary(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Callable[[RpcContext], Awaitable[T]],
        rpc: str = "",
        request: object = None,
    ) -> T:
        try:
            ctx = self._context(context, rpc)
            refuse_malformed(request)
            return await call(ctx)
        except Exception as exc:  # the servicer is one of the three places that catch broadly
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await self._abort(context, exc)
            raise  # pragma: no cover - abort always raises

    async def _stream(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Callable[[RpcContext], AsyncIterator[T]],
        rpc: str = "",
        request: object = None,
    ) -> AsyncIterator[T]:
        try:
            ctx = self._context(context, rpc)
            refuse_malformed(request)
            async for item in call(ctx):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await self._abort(context, exc)


class CoordinatorServicer(_Base, pb_grpc.CoordinatorServicer):
    """The ``Coordinator`` service (role: client), delegating to a :class:`CoordinatorHandler`."""

    required_role = Role.CLIENT

    def __init__(
        self,
        handler: CoordinatorHandler,
        *,
        insecure: bool = False,
        allow_admin: bool = False,
        on_refused: Callable[[str, str, str], None] | None = None,
    ) -> None:
        super().__init__(insecure=insecure, on_refused=on_refused)
        self._handler = handler
        # an operator may run a client with its admin certificate when the config allows it
        self.also_allowed = frozenset({Role.ADMIN.value}) if allow_admin else frozenset()

    async def Join(self, request: Any, context: Any) -> pb.JoinReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.join(request, ctx), "Join", request
        )

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.heartbeat(request, ctx), "Heartbeat", request
        )

    async def Tasks(self, request: Any, context: Any) -> AsyncIterator[pb.Task]:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        async for item in self._stream(
            context, lambda ctx: self._handler.tasks(request, ctx), "Tasks", request
        ):
            yield item

    async def Download(self, request: Any, context: Any) -> AsyncIterator[ChunkOut]:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        async for item in self._stream(
            context, lambda ctx: self._handler.download(request, ctx), "Download", request
        ):
            yield item

    async def Upload(self, request_iterator: Any, context: Any) -> pb.UploadReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context,
            lambda ctx: self._handler.upload(refusing_malformed(request_iterator), ctx),
            "Upload",
        )

    async def BeginUpload(self, request: Any, context: Any) -> pb.UploadReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.begin_upload(request, ctx), "BeginUpload", request
        )

    async def RenewToken(self, request: Any, context: Any) -> pb.RenewTokenReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.renew_token(request, ctx), "RenewToken", request
        )

    async def ReportEvaluation(self, request: Any, context: Any) -> pb.EvaluationReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context,
            lambda ctx: self._handler.report_evaluation(request, ctx),
            "ReportEvaluation",
            request,
        )

    async def SecAgg(self, request: Any, context: Any) -> pb.SecAggReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.secagg(request, ctx), "SecAgg", request
        )


class AdminServicer(_Base, pb_grpc.AdminServicer):
    """The ``Admin`` service (role: admin), delegating to an :class:`AdminHandler`."""

    required_role = Role.ADMIN

    def __init__(
        self,
        handler: AdminHandler,
        *,
        insecure: bool = False,
        on_refused: Callable[[str, str, str], None] | None = None,
    ) -> None:
        super().__init__(insecure=insecure, on_refused=on_refused)
        self._handler = handler

    async def StartRound(self, request: Any, context: Any) -> pb.StartRoundReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.start_round(request, ctx), "StartRound", request
        )

    async def Status(self, request: Any, context: Any) -> pb.StatusReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.status(request, ctx), "Status", request
        )

    async def ListClients(self, request: Any, context: Any) -> pb.ListClientsReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.list_clients(request, ctx), "ListClients", request
        )

    async def ListModels(self, request: Any, context: Any) -> pb.ListModelsReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.list_models(request, ctx), "ListModels", request
        )

    async def Revoke(self, request: Any, context: Any) -> pb.RevokeReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.revoke(request, ctx), "Revoke", request
        )

    async def Rollback(self, request: Any, context: Any) -> pb.RollbackReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.rollback(request, ctx), "Rollback", request
        )

    async def Tag(self, request: Any, context: Any) -> pb.TagReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.tag(request, ctx), "Tag", request
        )

    async def Evict(self, request: Any, context: Any) -> pb.EvictReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.evict(request, ctx), "Evict", request
        )

    async def CancelRound(self, request: Any, context: Any) -> pb.CancelRoundReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.cancel_round(request, ctx), "CancelRound", request
        )

    async def ListEvents(self, request: Any, context: Any) -> pb.ListEventsReply:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        return await self._unary(
            context, lambda ctx: self._handler.list_events(request, ctx), "ListEvents", request
        )

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[pb.Event]:  # noqa: N802
        """See proto/flctl/v1/flctl.proto."""
        async for item in self._stream(
            context, lambda ctx: self._handler.watch(request, ctx), "Watch", request
        ):
            yield item
