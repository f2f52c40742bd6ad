"""The handlers behind the Coordinator service: sessions, tasks, transfers, reports.

Every inbound field is checked before it touches state; a refusal raises a flctl error, which
the transport turns into a gRPC status with the message. Updates go through the upload path
(:class:`UpdateIntake`, ``_intake.py``), which records refused ones (status rejected, with the
reason) in ``updates`` and the event log. Every call of a revoked identity or certificate, or
with a certificate out of its validity window, is refused first (:class:`RevocationGuard`); an
open task stream, download or upload of an identity revoked, or whose certificate expired,
meanwhile ends with the same refusal. A session token is renewed (``RenewToken``) without
ending the session. In-process clients (``flctl simulate``) open their sessions and report
through :meth:`CoordinatorService.open_local` and its neighbours (``_local.py``). A round with
secure aggregation takes each client's stage messages through :meth:`CoordinatorService.secagg`
(the round's :class:`~flctl.coordinator._secagg_round.SecAggRound` answers them). The Admin
service's handlers are in ``_admin.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping

from flctl.core import TransportConfig
from flctl.core import events as ev
from flctl.core.errors import (
    AuthenticationError,
    FlctlError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    ProtocolMismatchError,
    SessionConflictError,
)
from flctl.core.usercode import MAX_REASON_CHARS
from flctl.core.work import SecAggAnswer, Task, check_metrics
from flctl.security import TokenSigner
from flctl.store import (
    BlobStore,
    SqlStore,
)
from flctl.tensors import (
    TensorSpec,
    describe_spec_difference,
)
from flctl.transport import (
    CODEC_NONE,
    SAMPLE_BYTES,
    Decision,
    LinkMeter,
    choose_codec,
    compress_chunks,
    negotiate_codecs,
)
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    ChunkOut,
    RpcContext,
    UploadItem,
    is_loopback_peer,
    pb,
    raw_value_map,
    task_to_pb,
    upload_answer_to_pb,
    upload_header_from_pb,
)

from ._engine import RoundEngine
from ._events import EventLog
from ._guard import RevocationGuard
from ._intake import UpdateIntake
from ._limits import Limits, bounded, check_id
from ._registry import Registry, Session
from ._uploads import PartialUploads

__all__ = ["CoordinatorService", "Limits"]

log = logging.getLogger("flctl.coordinator")

_MAX_MODEL_SPEC_BYTES = 256 * 1024

#: Downloads the coordinator serves at once; more wait their turn (uploads: ``_intake.py``).
MAX_CONCURRENT_DOWNLOADS = 2
_STATES = frozenset({"idle", "downloading", "training", "uploading", "failed"})
#: The largest secure-aggregation stage message taken (its shares: about 200 bytes a neighbour).
MAX_SECAGG_PAYLOAD = 16 << 20


def _limits_pb(limits: Limits) -> pb.Limits:
    """The limits as the JoinReply's message."""
    return pb.Limits(
        max_chunk_bytes=limits.max_chunk_bytes,
        max_update_bytes=limits.max_update_bytes,
        max_tensors=limits.max_tensors,
        max_metrics=limits.max_metrics,
        max_string_bytes=limits.max_string_bytes,
    )


def _describe_spec_difference(ours: dict[str, TensorSpec], theirs_json: str) -> str:
    """Say how a client's model differs from ours, from the spec it sent at Join."""
    try:
        theirs = json.loads(theirs_json)
        assert isinstance(theirs, dict)
    except (ValueError, AssertionError):
        return "the client sent no readable model description"
    return describe_spec_difference(ours, theirs)


def _one_line(text: str) -> str:
    """A client's free text made safe to log and show: one line, printable, bounded."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    line = " ".join(printable.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


class CoordinatorService:
    """Implements the Coordinator service for connected clients."""

    def __init__(
        self,
        *,
        store: SqlStore,
        blobs: BlobStore,
        events: EventLog,
        registry: Registry,
        engine: RoundEngine,
        signer: TokenSigner,
        limits: Limits,
        model_spec: dict[str, TensorSpec],
        task_fingerprint: str,
        heartbeat_interval_s: float,
        token_ttl_s: float,
        guard: RevocationGuard,
        uploads: PartialUploads,
        transport: TransportConfig | None = None,
        heartbeat_timeout_s: float = 30.0,
        min_free_bytes: int = 64 << 20,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._registry = registry
        self._engine = engine
        self._uploads = uploads
        self._signer = signer
        self._limits = limits
        self._model_spec = model_spec
        self._fingerprint = task_fingerprint
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._min_free_bytes = min_free_bytes
        self._storage_reported = 0.0
        self._token_ttl_s = token_ttl_s
        self._guard = guard
        # Each transfer in flight holds its own buffers (gRPC's and ours); bounding how many run
        # at once keeps the coordinator's memory flat in the number of clients. A stream that
        # waits for a slot is held back by HTTP/2 flow control, not buffered.
        self._download_slots = asyncio.Semaphore(MAX_CONCURRENT_DOWNLOADS)
        # transport.compression and the link rate measured per client, for "auto".
        self._transport = transport or TransportConfig()
        self._links: dict[str, LinkMeter] = {}
        self._codec_cache: dict[tuple[str, tuple[str, ...], int, bool], Decision] = {}
        #: the upload path: every update's checks, whatever transport carried it
        self._intake = UpdateIntake(
            store=store,
            blobs=blobs,
            events=events,
            engine=engine,
            guard=guard,
            uploads=uploads,
            limits=limits,
            model_spec=model_spec,
            transport=self._transport,
            min_free_bytes=min_free_bytes,
        )

    @property
    def intake(self) -> UpdateIntake:
        """The upload path (the in-process transport hands updates to it too)."""
        return self._intake

    # ------------------------------------------------------------------ sessions

    def _session(self, ctx: RpcContext, rpc: str = "", *, record: bool = True) -> Session:
        """The caller's open session, from its token; a refusal is recorded (``record``)."""
        try:
            if not ctx.token:
                raise AuthenticationError("this call needs a session token: call Join first")
            claims = self._signer.verify(ctx.token, fingerprint=ctx.fingerprint)
            if claims.subject != ctx.identity:
                raise AuthenticationError("session token was issued to another identity")
        except AuthenticationError as exc:
            if record:
                self._refused(ctx, rpc, exc.message)
            raise
        session = self._registry.get(ctx.identity)
        if session is None or session.session_id != claims.session_id:
            # A genuine token of a session that ended meanwhile (replaced, dropped, a renewal
            # racing the session's end): the client joins again. Not a security event.
            raise AuthenticationError("session is no longer open: join again")
        session.last_seen = time.time()
        return session

    def _refused(self, ctx: RpcContext, rpc: str, reason: str) -> None:
        """Record a refusal that no other table shows, with the caller's identity."""
        self._events.emit(
            ev.SecurityRefused(identity=ctx.identity, reason=reason, rpc=rpc),
            client_id=ctx.identity,
        )

    def _check_join(self, request: pb.JoinRequest) -> None:
        if request.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"protocol version {request.protocol_version} is not supported; "
                f"this coordinator speaks version {PROTOCOL_VERSION}"
            )
        if request.task_fingerprint != self._fingerprint:
            spec_value = request.properties.get("model_spec")
            spec_json = spec_value.string_value if spec_value is not None else ""
            difference = (
                _describe_spec_difference(self._model_spec, spec_json)
                if len(spec_json) <= _MAX_MODEL_SPEC_BYTES
                else "model description too large to compare"
            )
            raise ProtocolMismatchError(
                f"the client's model does not match the coordinator's task: {difference}"
            )

    async def join(self, request: pb.JoinRequest, ctx: RpcContext) -> pb.JoinReply:
        """Check protocol and model, open a session, hand out a token."""
        self._guard.admit(ctx, "Join")
        try:
            self._check_join(request)
        except ProtocolMismatchError as exc:
            self._refused(ctx, "Join", exc.message)
            raise
        self._check_live_session(ctx.identity, request)
        codecs = negotiate_codecs(self._transport.compression, list(request.codecs))
        session = Session(ctx.identity, uuid.uuid4().hex, ctx.fingerprint, ctx.serial)
        session.instance_id = request.instance_id
        session.not_after = ctx.not_after
        old = self._registry.add(session)
        token = self._signer.issue(
            ctx.identity, ctx.fingerprint, session.session_id, self._token_ttl_s
        )
        now = time.time()
        self._store.upsert_client(ctx.identity, fingerprint=ctx.fingerprint, state="idle", seen=now)
        self._events.emit(
            ev.ClientJoined(session_id=session.session_id, is_replaced=old is not None),
            client_id=ctx.identity,
            durable=False,
        )
        return pb.JoinReply(
            client_id=ctx.identity,
            session_id=session.session_id,
            session_token=token,
            heartbeat_interval_s=self._heartbeat_interval_s,
            limits=_limits_pb(self._limits),
            codecs=codecs,
            token_expires_unix=now + self._token_ttl_s,
            # "none" when the client speaks no compressing codec we would use
            compression=self._transport.compression if len(codecs) > 1 else "none",
            compression_level=self._transport.compression_level,
            token_ttl_s=self._token_ttl_s,
        )

    async def renew_token(
        self, request: pb.RenewTokenRequest, ctx: RpcContext
    ) -> pb.RenewTokenReply:
        """A fresh token for the caller's open session, which carries on unchanged.

        The caller proves the session with its current token, which must not have expired: an
        expired token is refused as on any call, and the client joins again. Calls already
        running with the old token are not touched (their token was checked when they began).
        """
        self._guard.admit(ctx, "RenewToken")
        session = self._session(ctx, "RenewToken")
        token = self._signer.issue(
            ctx.identity, ctx.fingerprint, session.session_id, self._token_ttl_s
        )
        return pb.RenewTokenReply(
            session_token=token,
            token_expires_unix=time.time() + self._token_ttl_s,
            token_ttl_s=self._token_ttl_s,
        )

    def _check_live_session(self, identity: str, request: pb.JoinRequest) -> None:
        """Refuse a second process joining as an identity whose session is live.

        The same process (same ``instance_id``) joining again resumes, a client that names no
        instance takes over as before, ``replace`` takes over on purpose, and a session silent
        for ``heartbeat_timeout_s`` is over (its process is gone) and is taken over too.

        Raises:
            SessionConflictError: Another process holds a live session for ``identity``.
        """
        old = self._registry.get(identity)
        if (
            old is None
            or request.replace
            or not request.instance_id
            or not old.instance_id
            or old.instance_id == request.instance_id
        ):
            return
        silent = max(0.0, time.time() - old.last_seen)
        if silent > self._heartbeat_timeout_s:
            return
        left = self._heartbeat_timeout_s - silent
        raise SessionConflictError(
            f"client {identity!r} is already joined from another `flctl join` process "
            f"(last heard {silent:.1f} s ago); that session stays",
            hint=f"stop the other process, or pass --replace to take over; if it is gone, its "
            f"session ends after {self._heartbeat_timeout_s:g} s of silence "
            f"(server.heartbeat_timeout_s), in {left:.1f} s",
            details={"retry_after_s": round(left, 2)},
        )

    async def heartbeat(self, request: pb.HeartbeatRequest, ctx: RpcContext) -> pb.HeartbeatReply:
        """Record liveness; a state change is persisted as an event."""
        self._guard.admit(ctx, "Heartbeat")
        try:
            session = self._session(ctx, "Heartbeat", record=False)
        except AuthenticationError:
            return pb.HeartbeatReply(command="rejoin", server_time_unix=time.time())
        check_id("server_round", request.server_round)
        state = request.state if request.state in _STATES else "idle"
        progress = min(1.0, max(0.0, request.progress)) if math.isfinite(request.progress) else 0.0
        # A transfer's progress is logged in steps of 10 %: enough for the panels, few events.
        step_changed = int(progress * 10) != int(session.progress * 10)
        failure = _one_line(request.failure) if state == "failed" else ""
        stepping = state in ("downloading", "training", "uploading") and step_changed
        if state != session.state or stepping:
            session.state = state
            change = ev.ClientState(
                state=state, progress=round(progress, 3), reason=failure or None
            )
            if state in ("downloading", "uploading") and request.bytes_total:
                rate = request.bytes_per_s
                change = dataclasses.replace(
                    change,
                    bytes_done=min(int(request.bytes_done), int(request.bytes_total)),
                    bytes_total=int(request.bytes_total),
                    bytes_per_s=round(rate, 1) if math.isfinite(rate) and rate >= 0 else 0.0,
                )
            self._events.emit(
                change,
                server_round=request.server_round,
                client_id=session.client_id,
                durable=state == "failed",  # why a round lost a client is worth an fsync
            )
        session.progress = progress
        session.bytes_per_s = (
            request.bytes_per_s
            if math.isfinite(request.bytes_per_s) and request.bytes_per_s > 0
            else 0.0
        )
        if state == "failed" and request.server_round:
            self._task_failed(session, int(request.server_round), failure)
        return pb.HeartbeatReply(command="", server_time_unix=time.time())

    def _task_failed(self, session: Session, server_round: int, failure: str) -> None:
        """The client's task of ``server_round`` failed: the round stops waiting for it."""
        session.failed_round = server_round
        session.failure = failure or "the task failed (no reason given)"
        self._engine.update_arrived()

    async def report_evaluation(
        self, request: pb.EvaluationReport, ctx: RpcContext
    ) -> pb.EvaluationReply:
        """Take a client's evaluation of a round's new model (an "evaluate" task's result).

        The numbers are checked as an upload's are (a finite loss, a positive number of
        examples, at most ``max_metrics`` finite metrics); a report that fails the check fails
        that client's evaluation, with why, and is refused.
        """
        self._guard.admit(ctx, "ReportEvaluation")
        session = self._session(ctx, "ReportEvaluation")
        refusal = self.evaluation(
            session,
            request.server_round,
            request.task_id,
            loss=request.loss,
            num_examples=int(request.num_examples),
            metrics=raw_value_map(request.metrics),
            failure=request.failure,
        )
        if refusal is not None:
            return pb.EvaluationReply(accepted=False, reason=refusal)
        return pb.EvaluationReply(accepted=True)

    def evaluation(
        self,
        session: Session,
        server_round: int,
        task_id: str,
        *,
        loss: float,
        num_examples: int,
        metrics: Mapping[str, object],
        failure: str,
    ) -> str | None:
        """Check and take a client's evaluation report: None, or why it is not taken.

        Raises:
            FlctlError: The numbers fail the checks (that client's evaluation fails, with why).
        """
        server_round = check_id("server_round", server_round)
        task_id = bounded("task_id", task_id, 64)
        failure = _one_line(failure)
        checked: dict[str, float] = {}
        if not failure:
            try:
                checked = check_metrics(metrics, max_items=self._limits.max_metrics)
                if not math.isfinite(loss):
                    raise InvalidInputError(f"the loss is not finite ({loss})")
                if num_examples < 1:
                    raise InvalidInputError("num_examples must be positive")
            except FlctlError as exc:
                self._engine.evaluation_arrived(
                    session.client_id,
                    server_round,
                    task_id,
                    failure=f"evaluation refused: {exc.message}",
                )
                raise
        return self._engine.evaluation_arrived(
            session.client_id,
            server_round,
            task_id,
            loss=loss,
            num_examples=num_examples,
            metrics=checked,
            failure=failure,
        )

    async def secagg(self, request: pb.SecAggMessage, ctx: RpcContext) -> pb.SecAggReply:
        """Take a client's message of a secure-aggregation stage; answer once it closed."""
        self._guard.admit(ctx, "SecAgg")
        session = self._session(ctx, "SecAgg")
        answer = await self.secagg_step(
            session, int(request.server_round), request.task_id, request.stage, request.payload
        )
        return pb.SecAggReply(
            accepted=answer.accepted,
            reason=answer.reason,
            stage=answer.stage,
            payload=answer.payload,
        )

    async def secagg_step(
        self, session: Session, server_round: int, task_id: str, stage: str, payload: bytes
    ) -> SecAggAnswer:
        """Check a secure-aggregation stage message's fields, then hand it to the round.

        Raises:
            InvalidInputError: A field is malformed or too large.
        """
        server_round = check_id("server_round", server_round)
        task_id = bounded("task_id", task_id, 64)
        stage = bounded("stage", stage, 32)
        if len(payload) > MAX_SECAGG_PAYLOAD:
            raise LimitExceededError(
                f"a secure aggregation message of {len(payload)} bytes is over the "
                f"{MAX_SECAGG_PAYLOAD} allowed"
            )
        session.last_seen = time.time()
        return await self._engine.secagg_message(
            session.client_id, server_round, task_id, stage, bytes(payload)
        )

    def open_local(
        self, client_id: str, queue: asyncio.Queue[Task | None] | None = None
    ) -> Session:
        """A session for an in-process client (``flctl simulate``): joined, its stream open.

        As :meth:`join` followed by :meth:`tasks`, without a token or a certificate: the
        client runs inside this process. A task it was sent before (a resumed round) is queued
        again.
        """
        session = Session(client_id, uuid.uuid4().hex, "")
        if queue is not None:  # the in-process transport hears of each task as it is queued
            session.queue = queue
        old = self._registry.add(session)
        self._store.upsert_client(client_id, fingerprint="", state="idle", seen=time.time())
        self._events.emit(
            ev.ClientJoined(session_id=session.session_id, is_replaced=old is not None),
            client_id=client_id,
            durable=False,
        )
        session.streaming = True
        self._registry.notify()
        pending = self._engine.task_for(client_id)
        if pending is not None:
            session.queue.put_nowait(pending)
        return session

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group the in-process sessions' store writes into one transaction (many at once)."""
        return self._store.transaction()

    def close_local(self, session: Session, reason: str = "disconnected") -> None:
        """End an in-process client's session (as its task stream ending would)."""
        session.streaming = False
        session.queue.put_nowait(None)
        if self._registry.remove(session):
            self._store.bump_client(session.client_id, state="offline", seen=time.time())
            self._events.emit(
                ev.ClientLeft(reason=reason), client_id=session.client_id, durable=False
            )
        self._engine.update_arrived()

    def task_failed(self, session: Session, server_round: int, failure: str) -> None:
        """An in-process client's task failed, and why (a deployed client says so by heartbeat).

        Recorded as a ``client.state`` event "failed" with the reason; the round stops waiting.
        """
        failure = _one_line(failure)
        session.state = "failed"
        self._events.emit(
            ev.ClientState(state="failed", progress=0.0, reason=failure or None),
            server_round=server_round,
            client_id=session.client_id,
        )
        self._task_failed(session, check_id("server_round", server_round), failure)

    async def tasks(self, request: pb.TasksRequest, ctx: RpcContext) -> AsyncIterator[pb.Task]:
        """Stream tasks to the client until it leaves, joins again, is revoked, or we stop."""
        self._guard.admit(ctx, "Tasks")
        session = self._session(ctx, "Tasks")
        session.streaming = True
        self._registry.notify()
        # selected for the open round and not reported (reconnected, or we restarted): again
        pending = self._engine.task_for(session.client_id)
        if pending is not None:
            session.queue.put_nowait(pending)
        reason = "disconnected"
        try:
            while True:
                task = await session.queue.get()
                if task is None:
                    if session.revoked or session.expired:
                        reason = "revoked" if session.revoked else "certificate expired"
                        self._guard.check(ctx, "Tasks")  # raises: the stream ends refused
                    reason = "session replaced or coordinator stopping"
                    return
                yield task_to_pb(task)
        finally:
            session.streaming = False
            if self._registry.remove(session):
                self._store.bump_client(session.client_id, state="offline", seen=time.time())
                self._events.emit(
                    ev.ClientLeft(reason=reason), client_id=session.client_id, durable=False
                )
            self._engine.update_arrived()

    # ------------------------------------------------------------------ transfers

    async def download(
        self, request: pb.DownloadRequest, ctx: RpcContext
    ) -> AsyncIterator[ChunkOut]:
        """Stream a blob from ``offset``, one chunk at a time, straight from its file.

        Chunks are compressed when the client accepts a codec and ``transport.compression``
        says so ("auto": when a sample of the blob shows it pays for the link rate measured
        on this client's earlier downloads); reading and compressing then run in a worker
        thread, one chunk ahead. ``bytes_down`` counts the bytes sent on the wire.
        """
        self._guard.admit(ctx, "Download")
        session = self._session(ctx, "Download")
        digest = self._blobs.check_digest(request.digest)
        if not self._blobs.has(digest):
            raise NotFoundError(f"no blob {digest[:12]}")
        total = self._blobs.size(digest)
        if request.offset > total:
            raise InvalidInputError(f"offset {request.offset} is beyond the blob's {total} bytes")
        position = request.offset
        sent = 0
        held = 0.0  # seconds the link held us back (flow control): the link-rate measure
        link = self._links.setdefault(session.client_id, LinkMeter())
        mode, level = self._transport.compression, self._transport.compression_level
        codecs = negotiate_codecs(mode, list(request.codecs))[1:]  # compressing, both speak
        loopback = is_loopback_peer(ctx.peer)
        try:
            async with self._download_slots:
                codec = CODEC_NONE
                if codecs and position < total:

                    def decide() -> Decision:  # reads and compresses a sample: off the loop
                        sample = b""
                        if mode == "auto" and not loopback:  # a loopback peer needs none
                            sample = next(self._blobs.iter_chunks(digest, position, SAMPLE_BYTES))
                        return choose_codec(
                            mode,
                            sample,
                            link_bytes_per_s=link.rate,
                            level=level,
                            codecs=codecs,
                            loopback=loopback,
                        )

                    # one sample per blob and link-rate class: a round sends the same model to
                    # every client, and measuring it for each would cost more than it tells
                    rate_class = round(math.log2(max(link.rate, 1.0)) * 2)
                    key = (digest, tuple(codecs), rate_class, loopback)
                    cached = self._codec_cache.get(key)
                    if cached is None:
                        cached = await asyncio.to_thread(decide)
                        if len(self._codec_cache) > 256:
                            self._codec_cache.clear()
                        self._codec_cache[key] = cached
                    decision = cached
                    codec = decision.codec
                    log.debug("download of %s: %s", digest[:12], decision.reason)
                chunks = self._blobs.iter_chunks(digest, position, self._limits.max_chunk_bytes)
                stream = compress_chunks(chunks, codec, level, keep_smaller=True)
                async with contextlib.aclosing(stream):  # a client gone: stop the worker too
                    async for data, used, raw_size in stream:
                        if session.revoked or session.expired:
                            self._guard.check(ctx, "Download")
                        started = time.perf_counter()
                        if used == CODEC_NONE:
                            yield ChunkOut(data, position, total)
                        else:
                            yield ChunkOut(data, position, total, used, raw_size)
                        held += time.perf_counter() - started  # resumed once gRPC sent it
                        position += raw_size
                        sent += len(data)
        finally:
            link.observe(sent, held)
            self._store.bump_client(session.client_id, add_bytes_down=sent)

    async def begin_upload(self, header: pb.UploadHeader, ctx: RpcContext) -> pb.UploadReply:
        """Open an upload, or find the one this identity began for the same update."""
        self._guard.admit(ctx, "BeginUpload")
        session = self._session(ctx, "BeginUpload")
        answer = await self._intake.begin(upload_header_from_pb(header), session)
        return upload_answer_to_pb(answer)

    async def upload(
        self, chunks: AsyncIterator[UploadItem | None], ctx: RpcContext
    ) -> pb.UploadReply:
        """Stream an update's bytes to the upload path (:meth:`UpdateIntake.receive`).

        The stream's first message is the header; the data pieces follow.
        """
        self._guard.admit(ctx, "Upload")
        session = self._session(ctx, "Upload")
        first = await anext(aiter(chunks), None)
        if not isinstance(first, pb.UploadHeader):
            raise InvalidInputError("an upload must start with its header")
        answer = await self._intake.receive(upload_header_from_pb(first), chunks, session, ctx)
        return upload_answer_to_pb(answer)
