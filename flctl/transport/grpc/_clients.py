"""Typed client wrappers: every call maps gRPC failures to flctl errors and sends credentials."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any, Literal, Protocol

import grpc
import grpc.aio

from flctl.core.errors import (
    CertificateError,
    ConnectError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    TransportError,
)
from flctl.core.work import Task
from flctl.transport._compression import (
    CODEC_NONE,
    COMPRESSING_CODECS,
    LinkMeter,
    decompress_chunk,
)
from flctl.transport._pipeline import Pipeline
from flctl.transport.grpc._channel import closed_during_handshake, explain_closed_handshake
from flctl.transport.grpc._proto import flctl_pb2 as pb
from flctl.transport.grpc._proto import flctl_pb2_grpc as pb_grpc
from flctl.transport.grpc._servicers import IDENTITY_METADATA_KEY, ROLE_METADATA_KEY
from flctl.transport.grpc._status import GRPC_CORE_INTERNAL, map_rpc_errors
from flctl.transport.grpc._wire import UploadItem, decode_chunk, encode_upload
from flctl.transport.grpc._work import task_from_pb

log = logging.getLogger("flctl.transport")

__all__ = ["AdminClient", "CoordinatorClient", "Sink"]


class Sink(Protocol):
    """Where downloaded bytes go (a file, or a file that also hashes)."""

    def write(self, data: bytes | memoryview, /) -> int:
        """Take the next piece."""


class _Caller:
    def __init__(self, channel: grpc.aio.Channel, *, identity: str, role: str) -> None:
        self.channel = channel
        self.token = ""
        self._plain_identity = [(IDENTITY_METADATA_KEY, identity), (ROLE_METADATA_KEY, role)]

    def metadata(self) -> list[tuple[str, str]]:
        md = list(self._plain_identity)
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md

    async def close(self) -> None:
        await self.channel.close()


class CoordinatorClient(_Caller):
    """A client's calls to the ``Coordinator`` service.

    Args:
        channel: From :func:`secure_channel` (or :func:`insecure_channel`).
        identity: Sent as metadata for ``--insecure`` sessions only; with TLS the coordinator
            reads the identity from the certificate and ignores it.
    """

    def __init__(self, channel: grpc.aio.Channel, *, identity: str = "") -> None:
        super().__init__(channel, identity=identity, role="client")
        self._stub = pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        #: The link rate measured on this session's downloads (for choosing upload codecs).
        self.link = LinkMeter()
        # The data path uses the hand-framed codecs (same wire bytes, fewer copies).
        self._download = channel.unary_stream(
            "/flctl.v1.Coordinator/Download",
            request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=decode_chunk,
        )
        self._upload = channel.stream_unary(
            "/flctl.v1.Coordinator/Upload",
            request_serializer=encode_upload,
            response_deserializer=pb.UploadReply.FromString,
        )

    async def join(self, request: pb.JoinRequest, *, timeout: float = 30.0) -> pb.JoinReply:
        """Open a session; keeps the returned token for later calls."""
        with map_rpc_errors():
            reply: pb.JoinReply = await self._stub.Join(
                request, metadata=self.metadata(), timeout=timeout
            )
        self.token = reply.session_token
        return reply

    async def renew_token(self, *, timeout: float = 10.0) -> pb.RenewTokenReply:
        """Exchange the session's token for a fresh one; later calls send the new one.

        Calls in flight keep the token they started with, which stays valid until it expires.
        """
        with map_rpc_errors():
            reply: pb.RenewTokenReply = await self._stub.RenewToken(
                pb.RenewTokenRequest(), metadata=self.metadata(), timeout=timeout
            )
        self.token = reply.session_token
        return reply

    async def heartbeat(
        self, request: pb.HeartbeatRequest, *, timeout: float = 10.0
    ) -> pb.HeartbeatReply:
        """Report liveness and progress."""
        with map_rpc_errors():
            reply: pb.HeartbeatReply = await self._stub.Heartbeat(
                request, metadata=self.metadata(), timeout=timeout
            )
        return reply

    async def report_evaluation(
        self, request: pb.EvaluationReport, *, timeout: float = 30.0
    ) -> pb.EvaluationReply:
        """Send the result of an evaluate task."""
        with map_rpc_errors():
            reply: pb.EvaluationReply = await self._stub.ReportEvaluation(
                request, metadata=self.metadata(), timeout=timeout
            )
        return reply

    async def secagg(self, request: pb.SecAggMessage, *, timeout: float) -> pb.SecAggReply:
        """Send a secure-aggregation stage's message; the reply comes once the stage closed.

        ``timeout`` must cover the stage's wait on the coordinator (up to the round's deadline
        for the masked input stage).
        """
        with map_rpc_errors():
            reply: pb.SecAggReply = await self._stub.SecAgg(
                request, metadata=self.metadata(), timeout=timeout
            )
        return reply

    async def tasks(self) -> AsyncIterator[Task]:
        """Follow the task stream until the coordinator ends it, as plain tasks.

        A task of a kind this flctl does not know (a newer coordinator's) is skipped, with a
        warning in the log.
        """
        call = self._stub.Tasks(pb.TasksRequest(), metadata=self.metadata())
        try:
            with map_rpc_errors():
                async for message in call:
                    try:
                        yield task_from_pb(message)
                    except InvalidInputError as exc:
                        log.warning("task %s skipped: %s", message.task_id, exc.message)
        finally:
            call.cancel()

    async def download(
        self,
        digest: str,
        sink: Sink,
        *,
        offset: int = 0,
        on_chunk: Callable[[int, int], None] | None = None,
        timeout: float | None = None,
        codecs: Sequence[str] = COMPRESSING_CODECS,
        max_chunk_bytes: int = 4 << 20,
    ) -> int:
        """Write blob ``digest`` from ``offset`` into ``sink``; return the blob's total size.

        ``on_chunk(bytes_so_far, total)`` is called after each chunk (uncompressed bytes). The
        caller verifies the digest. ``codecs`` are the compressed codecs this download accepts;
        a compressed chunk is decompressed in the sink's worker thread and may hold at most
        ``max_chunk_bytes`` (default: the largest chunk a coordinator may announce). The rate
        the bytes arrived at (first chunk to last) updates :attr:`link`.

        Raises:
            IntegrityError: A chunk is out of place or a frame is corrupt.
            LimitExceededError: A frame holds more than ``max_chunk_bytes``.
            InvalidInputError: A chunk has a codec this download did not accept.
        """
        total = 0
        accepted = set(codecs) & set(COMPRESSING_CODECS)
        call = self._download(
            pb.DownloadRequest(digest=digest, offset=offset, codecs=sorted(accepted)),
            metadata=self.metadata(),
            timeout=timeout,
        )

        def write(item: tuple[bytes | memoryview, str, int, int]) -> None:
            data, codec, raw_size, at = item
            if codec:
                try:
                    data = decompress_chunk(data, max_size=raw_size, codec=codec)
                except FlctlError as exc:
                    where = f"download of {digest[:12]}, chunk at byte {at}"
                    raise type(exc)(f"{where}: {exc.message}") from None
                if len(data) != raw_size:
                    raise IntegrityError(
                        f"download of {digest[:12]}: a {codec} frame holds {len(data)} bytes, "
                        f"not the {raw_size} its chunk announced"
                    )
            sink.write(data)

        position = offset
        first = last = 0.0
        on_wire = 0  # bytes after the first chunk: the first one's time is the call's latency
        pipeline: Pipeline[tuple[bytes | memoryview, str, int, int]] = Pipeline(write)
        try:
            with map_rpc_errors():
                async for chunk in call:
                    if chunk.offset != position:
                        raise IntegrityError(
                            f"download of {digest[:12]} jumped from byte {position} "
                            f"to {chunk.offset}"
                        )
                    codec = "" if chunk.codec == CODEC_NONE else chunk.codec
                    size = len(chunk.data)
                    if codec:
                        if codec not in accepted:
                            raise InvalidInputError(
                                f"download of {digest[:12]} came with codec {codec!r}, which "
                                "this client did not accept"
                            )
                        if chunk.raw_size > max_chunk_bytes:
                            raise LimitExceededError(
                                f"download of {digest[:12]}: a chunk announces "
                                f"{chunk.raw_size} bytes, more than the {max_chunk_bytes} allowed"
                            )
                        size = chunk.raw_size
                    await pipeline.put((chunk.data, codec, size, position))
                    last = time.perf_counter()
                    if first:
                        on_wire += len(chunk.data)
                    else:
                        first = last
                    position += size
                    total = chunk.total_size
                    if on_chunk is not None:
                        on_chunk(position, total)
            await pipeline.close()
        finally:
            call.cancel()
            # the sink (the caller's file) must not be written once this returns
            await pipeline.cancel_and_wait()
        self.link.observe(on_wire, last - first)
        return total

    async def begin_upload(
        self, header: pb.UploadHeader, *, timeout: float = 30.0
    ) -> pb.UploadReply:
        """Open an upload (or find the one begun earlier): its id and the bytes already held."""
        with map_rpc_errors():
            reply: pb.UploadReply = await self._stub.BeginUpload(
                header, metadata=self.metadata(), timeout=timeout
            )
        return reply

    async def upload(
        self, header: pb.UploadHeader, data: AsyncIterable[bytes], *, timeout: float | None = None
    ) -> pb.UploadReply:
        """Send an update: the header, then ``data`` chunk by chunk."""

        async def messages() -> AsyncIterator[UploadItem]:
            yield header
            async for piece in data:
                yield piece

        try:
            with map_rpc_errors():
                reply: pb.UploadReply = await self._upload(
                    messages(), metadata=self.metadata(), timeout=timeout
                )
        except TransportError as exc:
            if GRPC_CORE_INTERNAL not in exc.message:
                raise
            # grpc.aio can replace the status of a stream the coordinator ended early (a
            # refusal) with this one, when a write still in flight fails after the status came
            # (grpc issue 36066). BeginUpload checks the same header: a refusal it raises is
            # the coordinator's own answer; if it has none, the transport error stands.
            again = pb.UploadHeader()
            again.CopyFrom(header)
            again.upload_id, again.offset = "", 0
            try:
                await self.begin_upload(again)
            except TransportError:
                pass
            except FlctlError as refusal:
                # BeginUpload's own status stays its cause: callers see the refusal's real code
                raise refusal  # noqa: B904
            raise
        return reply


class AdminClient(_Caller):
    """An operator's calls to the ``Admin`` service.

    Args:
        channel: The channel to the coordinator.
        identity: Sent as metadata on a plaintext (``--insecure``) channel only.
        target: The coordinator's ``HOST:PORT``, for messages.
        probe: Tells a refused certificate from an overloaded coordinator when a handshake is
            closed (:func:`probe_certificate` bound to our certificate).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        identity: str = "admin",
        target: str = "",
        probe: Callable[[], Literal["accepted", "refused", "unknown"]] | None = None,
    ) -> None:
        super().__init__(channel, identity=identity, role="admin")
        self._stub = pb_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        self._target = target
        self._probe = probe

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            with map_rpc_errors():
                return await method(request, metadata=self.metadata(), timeout=timeout)
        except (CertificateError, ConnectError) as exc:
            if self._probe is None or not closed_during_handshake(exc.message):
                raise
            verdict = await asyncio.to_thread(self._probe)
            raise explain_closed_handshake(self._target, verdict, exc) from None

    async def start_round(self, rounds: int, *, timeout: float = 30.0) -> pb.StartRoundReply:
        """Queue ``rounds`` rounds; return their ids."""
        reply: pb.StartRoundReply = await self._call(
            self._stub.StartRound, pb.StartRoundRequest(rounds=rounds), timeout
        )
        return reply

    async def status(
        self,
        round_ids: list[int] | None = None,
        *,
        limit: int = 0,
        before_round: int = 0,
        phases: bool = True,
        timeout: float = 30.0,
    ) -> pb.StatusReply:
        """Describe rounds (all, or ``round_ids``) and the head model.

        Each listed round (``RoundInfo.updates_listed``: those asked for, the newest 16, or
        without ``round_ids`` the latest that left the queue) carries its updates with their
        anomaly scores and outlier verdicts (``RoundInfo.updates``, ``UpdateInfo``), and
        ``updates_left_out`` counts those past the reply's size budget. Without ``round_ids``,
        ``limit`` pages: the newest ``limit`` rounds below ``before_round`` (0: the newest);
        ``rounds_total`` counts them all; ``phases=False`` leaves out each round's phase
        durations.
        """
        request = pb.StatusRequest(
            round_ids=round_ids or [],
            limit=limit,
            before_round=before_round,
            without_phases=not phases,
        )
        reply: pb.StatusReply = await self._call(self._stub.Status, request, timeout)
        return reply

    async def list_events(
        self,
        *,
        before_seq: int = 0,
        limit: int = 50,
        type_filter: str = "",
        server_round: int = 0,
        timeout: float = 30.0,
    ) -> pb.ListEventsReply:
        """One page of the event log, newest first (``type_filter``: a type, a prefix, admin)."""
        request = pb.ListEventsRequest(
            before_seq=before_seq, limit=limit, type=type_filter, server_round=server_round
        )
        reply: pb.ListEventsReply = await self._call(self._stub.ListEvents, request, timeout)
        return reply

    async def list_clients(self, *, timeout: float = 30.0) -> pb.ListClientsReply:
        """List the clients the coordinator knows."""
        reply: pb.ListClientsReply = await self._call(
            self._stub.ListClients, pb.ListClientsRequest(), timeout
        )
        return reply

    async def list_models(
        self, limit: int = 0, *, versions: list[int] | None = None, timeout: float = 30.0
    ) -> pb.ListModelsReply:
        """List model versions, newest first (``versions``: only those, at most 16)."""
        reply: pb.ListModelsReply = await self._call(
            self._stub.ListModels, pb.ListModelsRequest(limit=limit, versions=versions), timeout
        )
        return reply

    async def revoke(
        self, identity: str, *, serial: int | None = None, reason: str = "", timeout: float = 30.0
    ) -> pb.RevokeReply:
        """Revoke ``identity`` (every certificate of it, or only ``serial``)."""
        request = pb.RevokeRequest(
            identity=identity, serial="" if serial is None else format(serial, "x"), reason=reason
        )
        reply: pb.RevokeReply = await self._call(self._stub.Revoke, request, timeout)
        return reply

    async def rollback(
        self, ref: str, *, reason: str = "", timeout: float = 30.0
    ) -> pb.RollbackReply:
        """Roll the head back to ``ref``'s weights (deferred while a round is open)."""
        reply: pb.RollbackReply = await self._call(
            self._stub.Rollback, pb.RollbackRequest(ref=ref, reason=reason), timeout
        )
        return reply

    async def tag(
        self, ref: str, name: str, *, force: bool = False, timeout: float = 30.0
    ) -> pb.TagReply:
        """Name version ``ref`` as ``name`` (``force`` moves an existing tag)."""
        reply: pb.TagReply = await self._call(
            self._stub.Tag, pb.TagRequest(ref=ref, name=name, force=force), timeout
        )
        return reply

    async def evict(
        self, client_id: str, *, reason: str = "", timeout: float = 30.0
    ) -> pb.EvictReply:
        """End ``client_id``'s session (it may join again; revoke it to keep it out)."""
        request = pb.EvictRequest(client_id=client_id, reason=reason)
        reply: pb.EvictReply = await self._call(self._stub.Evict, request, timeout)
        return reply

    async def cancel_round(
        self,
        round_ids: list[int] | None = None,
        *,
        queued: bool = False,
        reason: str = "",
        timeout: float = 30.0,
    ) -> pb.CancelRoundReply:
        """Cancel rounds (none given: the running one; ``queued``: every queued one too)."""
        request = pb.CancelRoundRequest(round_ids=round_ids or [], queued=queued, reason=reason)
        reply: pb.CancelRoundReply = await self._call(self._stub.CancelRound, request, timeout)
        return reply

    async def watch(self, since_seq: int = 0, *, follow: bool = True) -> AsyncIterator[pb.Event]:
        """Replay the event log after ``since_seq``, then (with ``follow``) live events."""
        call = self._stub.Watch(
            pb.WatchRequest(since_seq=since_seq, no_follow=not follow), metadata=self.metadata()
        )
        try:
            with map_rpc_errors():
                async for event in call:
                    yield event
        finally:
            call.cancel()
