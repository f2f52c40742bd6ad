"""The handlers behind the Coordinator and Admin services: sessions, transfers, rounds, reads.

Every inbound field is checked before it touches state; a refusal raises a flctl error, which
the transport turns into a gRPC status with the message. Refused updates are recorded (status
rejected, with the reason) in ``updates`` and the event log. Every call of a revoked identity or
certificate, or with a certificate out of its validity window, is refused first
(:class:`RevocationGuard`), on both services; an open task stream, download or upload of an
identity revoked, or whose certificate expired, meanwhile ends with the same refusal. A session
token is renewed (``RenewToken``) without ending the session.

Admin changes to the coordinator's state (revoke, rollback, tag) are recorded with the calling
admin's identity; a rollback is serialised with rounds by the :class:`RoundEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from flctl.core import TransportConfig
from flctl.core import events as ev
from flctl.core.errors import (
    AuthenticationError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    ProtocolMismatchError,
    SessionConflictError,
)
from flctl.core.usercode import MAX_REASON_CHARS
from flctl.core.work import Task, check_metrics
from flctl.security import TokenSigner
from flctl.store import (
    BlobStore,
    ModelRecord,
    SqlStore,
    UpdateRecord,
    is_revoked,
    revoke,
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
    MESSAGE_OVERHEAD,
    PROTOCOL_VERSION,
    ChunkOut,
    RpcContext,
    UploadItem,
    is_loopback_peer,
    pb,
    raw_value_map,
    task_to_pb,
    to_value_map,
    upload_answer_to_pb,
    upload_header_from_pb,
)

from ._engine import PendingRollback, RoundEngine, end_round
from ._events import EventLog
from ._guard import RevocationGuard
from ._intake import UpdateIntake
from ._limits import MAX_ID, Limits, check_id
from ._registry import Registry, Session
from ._uploads import PartialUploads

__all__ = ["AdminService", "CoordinatorService", "Limits"]

log = logging.getLogger("flctl.coordinator")

_MAX_MODEL_SPEC_BYTES = 256 * 1024

#: Downloads the coordinator serves at once; more wait their turn (uploads: ``_intake.py``).
MAX_CONCURRENT_DOWNLOADS = 2
_STATES = frozenset({"idle", "downloading", "training", "uploading", "failed"})
_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")
#: Bounds of the Admin service's text fields (refs, reasons).
_MAX_REF = 256
_MAX_REASON = 1024
#: A Status reply lists the updates of at most this many rounds (the newest of those asked).
STATUS_UPDATE_ROUNDS = 16
#: The most bytes the updates take in one Status reply (about 700 updates of usual size).
STATUS_UPDATES_BYTES = 64 * 1024
#: Room a Status reply keeps below the message limit however many rounds it lists.
_STATUS_REPLY_SLACK = 4096
#: What listing one more round may add to a reply around its updates: ``updates_listed``,
#: ``updates_left_out`` and the longer length prefix of its RoundInfo.
_LISTED_ROUND_BYTES = 12


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
        task_id = _bounded("task_id", task_id, 64)
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


def model_info(record: Any) -> pb.ModelInfo:
    """A store ModelRecord as the wire's ModelInfo."""
    info = pb.ModelInfo(
        version=record.version,
        digest=record.digest,
        parent=record.parent or 0,
        server_round=record.server_round or 0,
        kind=record.kind,
        created_unix=record.created,
    )
    to_value_map(info.metrics, record.metrics)
    return info


def round_info(record: Any) -> pb.RoundInfo:
    """A store RoundRecord as the wire's RoundInfo."""
    info = pb.RoundInfo(
        server_round=record.id,
        status=record.status,
        num_clients=record.num_clients,
        duration_s=record.duration_s or 0.0,
        reason=record.reason or "",
        model_version=record.model_version or 0,
        created_unix=record.created,
    )
    to_value_map(info.metrics, record.metrics)
    return info


def update_info(record: UpdateRecord) -> pb.UpdateInfo:
    """A store UpdateRecord as the wire's UpdateInfo: who, its status, scores and verdict."""
    info = pb.UpdateInfo(
        client_id=record.client_id,
        status=record.status,
        reason=record.reason,
        num_examples=record.num_examples,
        outlier=record.outlier,
        excluded=record.is_excluded,
    )
    if record.scores is not None:
        info.scores.SetInParent()  # scored, even where no score was computed
        for name in ("l2", "cosine", "median_distance"):
            value = record.scores.get(name)
            if value is not None:
                setattr(info.scores, name, value)
    return info


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _parse_serial(text: str) -> int | None:
    """A RevokeRequest's serial: "" for every certificate, else lower-case hex."""
    if not text:
        return None
    if _SERIAL_RE.fullmatch(text) is None or int(text, 16) == 0:
        raise InvalidInputError(
            f"serial must be a certificate serial in lower-case hex, not {text[:48]!r}"
        )
    return int(text, 16)


def _ref(text: str) -> str:
    """A model ref from the wire: bounded, and a version number within range."""
    ref = _bounded("ref", text, _MAX_REF)
    if ref.isascii() and ref.isdigit() and int(ref) > MAX_ID:
        raise NotFoundError(f"no model version {ref[:24]}")
    return ref


def _bounded(label: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise LimitExceededError(f"{label} is longer than {limit} characters")
    return value


class AdminService:
    """Implements the Admin service: reads, rounds, and changes made while the coordinator runs.

    Reads: status, clients, models, the event stream. Changes (start rounds, revoke, rollback,
    tag) are recorded with the calling admin's identity.

    Args:
        max_chunk_bytes: The coordinator's ``[transport] max_chunk_bytes``: with
            ``MESSAGE_OVERHEAD`` it bounds every message, and a Status reply stays under it.
    """

    MAX_ROUNDS_PER_START = 10_000

    def __init__(
        self,
        *,
        store: SqlStore,
        blobs: BlobStore,
        events: EventLog,
        registry: Registry,
        engine: RoundEngine,
        guard: RevocationGuard,
        state_dir: str,
        config_snapshot: dict[str, Any],
        max_chunk_bytes: int = 1 << 20,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._registry = registry
        self._engine = engine
        self._guard = guard
        self._state_dir = state_dir
        self._config_snapshot = config_snapshot
        self._max_message_bytes = max_chunk_bytes + MESSAGE_OVERHEAD

    async def start_round(
        self, request: pb.StartRoundRequest, ctx: RpcContext
    ) -> pb.StartRoundReply:
        """Queue rounds; they run after any already queued or open."""
        self._guard.admit(ctx, "StartRound")
        if not 1 <= request.rounds <= self.MAX_ROUNDS_PER_START:
            raise InvalidInputError(
                f"rounds must be between 1 and {self.MAX_ROUNDS_PER_START}, not {request.rounds}"
            )
        ids = self._store.create_rounds(request.rounds, self._config_snapshot)
        for server_round in ids:
            self._events.emit(ev.RoundQueued(admin=ctx.identity), server_round=server_round)
        self._engine.notify()
        return pb.StartRoundReply(round_ids=ids)

    async def status(self, request: pb.StatusRequest, ctx: RpcContext) -> pb.StatusReply:
        """Rounds (all, or those asked for), head version, connected clients, updates.

        The updates (with their anomaly scores) are listed for the rounds asked for, the newest
        :data:`STATUS_UPDATE_ROUNDS` of them, or without ``round_ids`` for the newest round
        that left the queue (:meth:`_list_updates` keeps the reply bounded).
        """
        self._guard.admit(ctx, "Status")
        ids = [check_id("round id", i) for i in request.round_ids] or None
        rounds = self._store.list_rounds(ids)
        head = self._store.head()
        reply = pb.StatusReply(
            rounds=[round_info(r) for r in rounds],
            head_version=head.version if head else 0,
            connected_clients=len(self._registry.connected()),
            state_dir=self._state_dir,
            open_round=self._open_round(),
            warnings=[self._engine.storage_warning[1]] if self._engine.storage_warning else [],
        )
        if ids is not None:
            listed = list(reply.rounds)[-STATUS_UPDATE_ROUNDS:]
        else:
            listed = [r for r in reply.rounds if r.status != "queued"][-1:]
        self._list_updates(reply, listed[::-1])
        return reply

    def _list_updates(self, reply: pb.StatusReply, rounds: list[pb.RoundInfo]) -> None:
        """Fill ``rounds``' updates (each in arrival order, newest round first) within a budget.

        The updates take at most :data:`STATUS_UPDATES_BYTES` and never bring the reply past
        the message limit (less :data:`_STATUS_REPLY_SLACK`); those that do not fit are counted in
        ``updates_left_out``. A round has one accepted update per selected client, but its
        rejected ones (late, duplicate, wrong round) have no such bound, hence bytes, not counts.
        """
        limit = self._max_message_bytes - _STATUS_REPLY_SLACK
        room = min(STATUS_UPDATES_BYTES, limit - reply.ByteSize())
        for info in rounds:
            room -= _LISTED_ROUND_BYTES
            info.updates_listed = True
            records = self._store.updates_for_round(int(info.server_round))
            for position, record in enumerate(records):
                update = update_info(record)
                size = update.ByteSize()
                size += 1 + _varint_size(size)
                if size > room:
                    info.updates_left_out = len(records) - position
                    room = 0  # the older rounds' updates are left out too, not cherry-picked
                    break
                info.updates.append(update)
                room -= size

    def _open_round(self) -> pb.OpenRound | None:
        """Where each selected client of the round in training stands, and what comes next."""
        open_round = self._engine.open
        if open_round is None:
            return None
        server_round = open_round.server_round
        reported = {
            u.client_id for u in self._store.updates_for_round(server_round, status="accepted")
        }
        participants = []
        for client_id in sorted(open_round.selected):
            session = self._registry.get(client_id)
            if client_id in reported:
                state, progress, rate = "reported", 1.0, 0.0
            elif session is None or not session.streaming:
                state, progress, rate = "offline", 0.0, 0.0
            elif session.failed_round == server_round:
                state, progress, rate = "failed", 0.0, 0.0
            else:
                state, progress, rate = session.state, session.progress, session.bytes_per_s
            participants.append(
                pb.Participant(
                    client_id=client_id, state=state, progress=progress, bytes_per_s=rate
                )
            )
        need = self._engine.min_clients
        have = len(reported)
        at_deadline = (
            f"commit with the {have} updates received"
            if have >= need
            else f"fail: {have} of the {need} required updates so far"
        )
        return pb.OpenRound(
            server_round=server_round,
            deadline_unix=open_round.deadline,
            min_clients=need,
            participants=participants,
            at_deadline=at_deadline,
        )

    async def list_clients(
        self, request: pb.ListClientsRequest, ctx: RpcContext
    ) -> pb.ListClientsReply:
        """Known clients, with live state for connected ones."""
        self._guard.admit(ctx, "ListClients")
        out = []
        for client in self._store.list_clients():
            session = self._registry.get(client.client_id)
            state = session.state if session is not None and session.streaming else "offline"
            if self._guard.reason(client.client_id) is not None:
                state = "revoked"
            out.append(
                pb.ClientInfo(
                    client_id=client.client_id,
                    state=state,
                    last_seen_unix=session.last_seen if session else client.last_seen,
                    rounds_joined=client.rounds_joined,
                    bytes_up=client.bytes_up,
                    bytes_down=client.bytes_down,
                )
            )
        return pb.ListClientsReply(clients=out)

    async def list_models(
        self, request: pb.ListModelsRequest, ctx: RpcContext
    ) -> pb.ListModelsReply:
        """Model versions, newest first."""
        self._guard.admit(ctx, "ListModels")
        models = self._store.list_models(limit=request.limit or None)
        head = self._store.head()
        return pb.ListModelsReply(
            models=[model_info(m) for m in models], head=head.version if head else 0
        )

    async def watch(self, request: pb.WatchRequest, ctx: RpcContext) -> AsyncIterator[pb.Event]:
        """Replay events after ``since_seq``; then follow until the coordinator stops."""
        seq = check_id("since_seq", request.since_seq)
        self._guard.admit(ctx, "Watch")
        while True:
            self._guard.check(ctx, "Watch")
            batch = self._store.events_since(seq, limit=500)
            for event in batch:
                seq = event.seq
                yield pb.Event(
                    seq=event.seq,
                    time_unix=event.time,
                    type=event.type,
                    server_round=event.server_round,
                    client_id=event.client_id,
                    data_json=json.dumps(event.data),
                )
            if batch:
                continue
            if request.no_follow or self._events.closed:
                return
            await self._events.wait_beyond(seq, timeout=15.0)

    # ------------------------------------------------------------------ changes

    async def revoke(self, request: pb.RevokeRequest, ctx: RpcContext) -> pb.RevokeReply:
        """Record a revocation with the admin's identity, enforce it, end the open session."""
        self._guard.admit(ctx, "Revoke")
        identity = request.identity
        serial = _parse_serial(request.serial)
        already = is_revoked(self._store, identity, serial)
        with self._store.transaction():
            record = revoke(
                self._store,
                identity,
                serial=serial,
                reason=request.reason,
                author=ctx.identity,
                record_event=False,  # emitted through the event log, which wakes followers
            )
            event = self._events.emit(
                ev.IdentityRevoked(
                    serial=None if serial is None else format(serial, "x"),
                    reason=record.reason,
                    author=record.author,
                ),
                client_id=identity,
            )
        self._guard.add(identity, serial)
        log.info("%s revoked %s (%s)", ctx.identity, identity, request.serial or "all")
        session = self._registry.get(identity)
        if session is not None and (serial is None or session.serial == serial):
            self._registry.end(session, revoked=True)
            self._store.bump_client(identity, state="offline", seen=time.time())
            self._events.emit(ev.ClientLeft(reason="revoked"), client_id=identity, durable=False)
            self._engine.update_arrived()
        return pb.RevokeReply(
            identity=record.identity,
            serial="" if serial is None else format(serial, "x"),
            revoked_at_unix=record.revoked_at,
            already_revoked=already,
            event_seq=event.seq,
            author=record.author,
            reason=record.reason,
        )

    async def rollback(self, request: pb.RollbackRequest, ctx: RpcContext) -> pb.RollbackReply:
        """Roll the head back now, or (a round is running) as soon as that round ends."""
        self._guard.admit(ctx, "Rollback")
        ref = _ref(request.ref)
        reason = _bounded("reason", request.reason, _MAX_REASON)
        target = self._store.resolve_model(ref)
        if not self._blobs.has(target.digest):
            raise NotFoundError(
                f"the weights of version {target.version} (blob {target.digest[:12]}) are missing",
                hint="run `flctl models verify` to check every version",
            )
        if not await asyncio.to_thread(self._blobs.verify, target.digest):
            raise IntegrityError(
                f"the weights of version {target.version} are corrupt (blob {target.digest[:12]})",
                hint="run `flctl models verify`; roll back to an intact version",
            )
        # No await from here on: the engine cannot start or end a round in between.
        result = self._engine.rollback(target.version, author=ctx.identity, reason=reason)
        if isinstance(result, PendingRollback):
            message = (
                f"round {result.server_round} is running: the rollback to version "
                f"{target.version} takes effect when it ends, before the next round starts"
            )
            return pb.RollbackReply(
                digest=target.digest,
                source_version=target.version,
                deferred=True,
                message=message,
                server_round=result.server_round,
            )
        new: ModelRecord = result
        return pb.RollbackReply(
            version=new.version,
            digest=new.digest,
            source_version=target.version,
            deferred=False,
            message=f"head is now version {new.version}; the next round starts from it",
            previous_head=new.parent or 0,
        )

    async def evict(self, request: pb.EvictRequest, ctx: RpcContext) -> pb.EvictReply:
        """End a client's session with the admin's identity; it may join again."""
        self._guard.admit(ctx, "Evict")
        client_id = _bounded("client_id", request.client_id, 255)
        given = _bounded("reason", request.reason, _MAX_REASON)
        session = self._registry.get(client_id)
        if session is None:
            return pb.EvictReply(evicted=False, message=f"{client_id} has no open session")
        self._registry.end(session)
        self._store.bump_client(client_id, state="offline", seen=time.time())
        reason = f"evicted by {ctx.identity}" + (f": {given}" if given else "")
        self._events.emit(ev.ClientEvicted(admin=ctx.identity, reason=given), client_id=client_id)
        self._events.emit(
            ev.ClientLeft(reason=reason, admin=ctx.identity), client_id=client_id, durable=False
        )
        self._engine.update_arrived()
        log.info("%s evicted %s", ctx.identity, client_id)
        return pb.EvictReply(
            evicted=True,
            message=f"{client_id}'s session ended; its token no longer works (it may join again)",
        )

    async def cancel_round(
        self, request: pb.CancelRoundRequest, ctx: RpcContext
    ) -> pb.CancelRoundReply:
        """Cancel the running round and/or queued rounds, with the admin's identity."""
        self._guard.admit(ctx, "CancelRound")
        given = _bounded("reason", request.reason, _MAX_REASON)
        reason = f"cancelled by {ctx.identity}" + (f": {given}" if given else "")
        wanted = [check_id("round id", i) for i in request.round_ids]
        running = self._engine.busy_round()
        if not wanted:
            if running is None and not request.queued:
                raise NotFoundError("no round is running", hint="name queued rounds, or --queued")
            wanted = [running] if running is not None else []
        if request.queued:
            wanted += [r.id for r in self._store.list_rounds() if r.status == "queued"]
        cancelled: list[int] = []
        notes: list[str] = []
        for server_round in dict.fromkeys(wanted):
            record = self._store.get_round(server_round)  # NotFoundError for an unknown id
            if server_round == running:
                why_not = self._engine.cancel(server_round, reason)
                if why_not is None:
                    cancelled.append(server_round)
                else:
                    notes.append(why_not)
            elif record.status == "queued":
                end_round(self._store, self._events, server_round, reason, status="cancelled")
                cancelled.append(server_round)
            else:
                notes.append(f"round {server_round} is already {record.status}")
        done = ", ".join(str(r) for r in cancelled) or "none"
        message = f"cancelled: {done}" + ("; " + "; ".join(notes) if notes else "")
        log.info("%s: %s", ctx.identity, message)
        return pb.CancelRoundReply(cancelled=cancelled, message=message)

    async def tag(self, request: pb.TagRequest, ctx: RpcContext) -> pb.TagReply:
        """Name a version, with the admin's identity as the tag's author."""
        self._guard.admit(ctx, "Tag")
        model = self._store.resolve_model(_ref(request.ref))
        before = {t.name: t.version for t in self._store.list_tags()}.get(request.name)
        with self._store.transaction():
            tag = self._store.add_tag(
                model.version, request.name, author=ctx.identity, force=request.force
            )
            if before != model.version:
                self._events.emit(
                    ev.ModelTagged(
                        tag=tag.name, version=tag.version, previous=before, author=ctx.identity
                    )
                )
        return pb.TagReply(version=tag.version, name=tag.name, previous=before or 0)
