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
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from flctl.core import TransportConfig
from flctl.core import events as ev
from flctl.core.errors import (
    AuthenticationError,
    ConflictError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    ProtocolMismatchError,
    SessionConflictError,
    StorageFullError,
)
from flctl.core.usercode import MAX_REASON_CHARS
from flctl.security import TokenSigner
from flctl.store import (
    BlobStore,
    ModelRecord,
    SqlStore,
    UpdateRecord,
    WriteBehind,
    is_revoked,
    revoke,
)
from flctl.tensors import (
    StreamValidator,
    TensorSpec,
    UpdateEncoding,
    describe_spec_difference,
    expected_update_spec,
)
from flctl.transport import (
    CODEC_NONE,
    CODECS,
    SAMPLE_BYTES,
    Decision,
    LinkMeter,
    Pipeline,
    choose_codec,
    compress_chunks,
    decompress_chunk,
    negotiate_codecs,
)
from flctl.transport.grpc import (
    MESSAGE_OVERHEAD,
    PROTOCOL_VERSION,
    ChunkOut,
    RpcContext,
    UploadItem,
    is_loopback_peer,
    metrics_from_map,
    pb,
    task_to_pb,
    to_value_map,
)

from ._engine import PendingRollback, RoundEngine, end_round
from ._events import EventLog
from ._guard import RevocationGuard
from ._registry import Registry, Session
from ._uploads import PartialUpload, PartialUploads

__all__ = ["AdminService", "CoordinatorService", "Limits"]

log = logging.getLogger("flctl.coordinator")

_MAX_MODEL_SPEC_BYTES = 256 * 1024

#: Transfers the coordinator serves at once; more wait their turn (see CoordinatorService).
MAX_CONCURRENT_UPLOADS = 2
MAX_CONCURRENT_DOWNLOADS = 2
_STATES = frozenset({"idle", "downloading", "training", "uploading", "failed"})
_SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")
#: The largest round id, sequence number or version the store can hold (SQLite's INTEGER).
MAX_ID = (1 << 63) - 1
#: Uploads one identity may have begun and not finished at once (a new one drops the oldest).
MAX_UPLOADS_PER_IDENTITY = 4
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


class Limits:
    """The bounds the coordinator enforces and announces at Join."""

    def __init__(self, *, max_chunk_bytes: int, max_update_bytes: int, max_tensors: int) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.max_update_bytes = max_update_bytes
        self.max_tensors = max_tensors
        self.max_metrics = 64
        self.max_string_bytes = 256

    def to_pb(self) -> pb.Limits:
        """As the JoinReply's message."""
        return pb.Limits(
            max_chunk_bytes=self.max_chunk_bytes,
            max_update_bytes=self.max_update_bytes,
            max_tensors=self.max_tensors,
            max_metrics=self.max_metrics,
            max_string_bytes=self.max_string_bytes,
        )


def _describe_spec_difference(ours: dict[str, TensorSpec], theirs_json: str) -> str:
    """Say how a client's model differs from ours, from the spec it sent at Join."""
    try:
        theirs = json.loads(theirs_json)
        assert isinstance(theirs, dict)
    except (ValueError, AssertionError):
        return "the client sent no readable model description"
    return describe_spec_difference(ours, theirs)


class _UpdateSink:
    """Hashes, validates and writes an update's bytes as they arrive (one pass)."""

    def __init__(
        self,
        spec: dict[str, TensorSpec],
        size: int,
        metadata: dict[str, str],
        *,
        codec: str = "none",
        max_chunk: int = 1 << 20,
    ) -> None:
        self.handle: BinaryIO | None = None
        self.writeback: WriteBehind | None = None
        self._size = size
        self._codec = codec or "none"
        self._max_chunk = max_chunk
        self._hash = hashlib.sha256()
        self._validator = StreamValidator(spec, size, metadata=metadata)
        self.received = 0

    def replay(self, path: Path, length: int, block: int = 1 << 20) -> None:
        """Hash and check the first ``length`` bytes already in ``path`` (no write)."""
        with open(path, "rb") as handle:
            done = 0
            while done < length:
                data = handle.read(min(block, length - done))
                if not data:
                    raise IntegrityError("the upload's part file is shorter than recorded")
                self._validator.feed(data)
                self._hash.update(data)
                done += len(data)
        self.received = length

    def feed(self, data: bytes | memoryview) -> None:
        """Take the next data message (one compressed frame, with a codec): in a worker."""
        if self._codec != "none":
            data = decompress_chunk(data, max_size=self._max_chunk, codec=self._codec)
        if self.received + len(data) > self._size:
            raise LimitExceededError(f"upload exceeds the {self._size} bytes its header announced")
        self._validator.feed(data)
        self._hash.update(data)
        assert self.handle is not None and self.writeback is not None
        self.handle.write(data)
        self.writeback.wrote(len(data))
        self.received += len(data)

    def finish(self, digest: str) -> None:
        self._validator.finish()
        if self._hash.hexdigest() != digest:
            raise IntegrityError("update bytes do not match the digest in the header")


def _is_full(exc: OSError) -> bool:
    """Whether ``exc`` says the file system is out of space (or of the user's quota)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


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
        self._upload_slots = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)
        self._download_slots = asyncio.Semaphore(MAX_CONCURRENT_DOWNLOADS)
        # transport.compression and the link rate measured per client, for "auto".
        self._transport = transport or TransportConfig()
        self._links: dict[str, LinkMeter] = {}
        self._codec_cache: dict[tuple[str, tuple[str, ...], int, bool], Decision] = {}

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
            limits=self._limits.to_pb(),
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
        _check_id("server_round", request.server_round)
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
            session.failed_round = int(request.server_round)
            session.failure = failure or "the task failed (no reason given)"
            self._engine.update_arrived()
        return pb.HeartbeatReply(command="", server_time_unix=time.time())

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
        server_round = _check_id("server_round", request.server_round)
        task_id = _bounded("task_id", request.task_id, 64)
        failure = _one_line(request.failure)
        metrics: dict[str, float] = {}
        if not failure:
            try:
                metrics = metrics_from_map(request.metrics, max_items=self._limits.max_metrics)
                if not math.isfinite(request.loss):
                    raise InvalidInputError(f"the loss is not finite ({request.loss})")
                if request.num_examples < 1:
                    raise InvalidInputError("num_examples must be positive")
            except FlctlError as exc:
                self._engine.evaluation_arrived(
                    session.client_id,
                    server_round,
                    task_id,
                    failure=f"evaluation refused: {exc.message}",
                )
                raise
        refusal = self._engine.evaluation_arrived(
            session.client_id,
            server_round,
            task_id,
            loss=request.loss,
            num_examples=int(request.num_examples),
            metrics=metrics,
            failure=failure,
        )
        if refusal is not None:
            return pb.EvaluationReply(accepted=False, reason=refusal)
        return pb.EvaluationReply(accepted=True)

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

    def _reject(
        self, header: pb.UploadHeader, client_id: str, reason: str, *, malformed: bool = False
    ) -> None:
        """Record a refused update: every refusal in the event log, with the identity.

        A well-formed update refused for the round's state (late, duplicate, wrong round) is
        also kept in ``updates`` with its reason; malformed input (bad digest, size, tensors,
        values) changes no table but the event log.
        """
        if header.server_round > MAX_ID:  # refused as malformed; the log cannot hold it
            malformed = True
            header = pb.UploadHeader(task_id=header.task_id)
        if malformed:
            self._events.emit(
                ev.UpdateRejected(task_id=header.task_id[:64], reason=reason, is_malformed=True),
                server_round=int(header.server_round),
                client_id=client_id,
            )
            return
        with self._store.transaction():
            self._store.add_update(
                server_round=int(header.server_round),
                client_id=client_id,
                task_id=header.task_id[: self._limits.max_string_bytes],
                status="rejected",
                reason=reason,
            )
            self._events.emit(
                ev.UpdateRejected(task_id=header.task_id[:64], reason=reason),
                server_round=int(header.server_round),
                client_id=client_id,
            )

    def _refuse_task(self, header: pb.UploadHeader, client_id: str, exc: FlctlError) -> None:
        """Make a refusal of the update itself final for its task (see RoundEngine.refuse).

        Only :class:`InvalidInputError` judges the update (its header, size, digest, tensors,
        values, metrics): sending it again would be refused again. Other errors (a busy or
        full coordinator) leave the task open.
        """
        if isinstance(exc, InvalidInputError):
            self._engine.refuse(int(header.server_round), client_id, header.task_id, exc.message)

    def _check_header(self, header: pb.UploadHeader, client_id: str) -> str | None:
        """Validate the header's fields; return a round-state refusal reason, or None."""
        _check_id("server_round", header.server_round)
        if len(header.task_id) > self._limits.max_string_bytes:
            raise LimitExceededError("task_id is too long")
        self._blobs.check_digest(header.digest)
        if header.codec not in ("", *negotiate_codecs(self._transport.compression, CODECS)):
            raise InvalidInputError(f"codec {header.codec!r} was not negotiated")
        if header.size > self._limits.max_update_bytes:
            raise LimitExceededError(
                f"update of {header.size} bytes exceeds the limit of "
                f"{self._limits.max_update_bytes} bytes"
            )
        if header.num_examples <= 0 or header.num_examples > 1 << 40:
            raise InvalidInputError(
                f"num_examples must be between 1 and 2^40, not {header.num_examples}"
            )
        encoding = UpdateEncoding.from_header(header.encoding, header.dtype, header.base_digest)
        if encoding.base_digest:
            self._blobs.check_digest(encoding.base_digest)
        open_round = self._engine.open
        if open_round is None or open_round.server_round != header.server_round:
            current = open_round.server_round if open_round else "none"
            return f"round {header.server_round} is not in training (open round: {current})"
        expected_task = open_round.selected.get(client_id)
        if expected_task is None:
            return f"{client_id} was not selected for round {header.server_round}"
        if expected_task != header.task_id:
            return f"task {header.task_id[:16]!r} is not this client's task for the round"
        if (refused := self._engine.refusal(client_id)) is not None:
            return f"refused: this task's update was refused, which is final ({refused})"
        if encoding.base_digest and encoding.base_digest != open_round.base_digest:
            return (
                f"the delta is relative to model {encoding.base_digest[:12]}, not to round "
                f"{header.server_round}'s model {open_round.base_digest[:12]}"
            )
        if time.time() > open_round.deadline:
            return f"late: round {header.server_round}'s deadline has passed"
        if self._engine.has_reported(client_id):
            return f"duplicate: an update for round {header.server_round} was already accepted"
        return None

    def _record_of(self, header: pb.UploadHeader, client_id: str) -> PartialUpload:
        """The header as an upload record (not yet stored), for matching earlier uploads."""
        return PartialUpload(
            upload_id="",
            client_id=client_id,
            server_round=int(header.server_round),
            task_id=header.task_id,
            digest=header.digest,
            size=int(header.size),
            num_examples=int(header.num_examples),
            codec=header.codec or "none",
            encoding=header.encoding or "full",
            dtype=header.dtype,
            base_digest=header.base_digest,
            created=0.0,
        )

    def _checked_header(
        self, header: pb.UploadHeader, client_id: str
    ) -> tuple[dict[str, float], str | None]:
        """Metrics and round-state refusal of a header; malformed ones are refused (raised)."""
        try:
            metrics = metrics_from_map(header.metrics, max_items=self._limits.max_metrics)
            refusal = self._check_header(header, client_id)
        except FlctlError as exc:
            self._reject(header, client_id, exc.message, malformed=True)
            self._refuse_task(header, client_id, exc)
            raise
        if refusal is not None:
            self._reject(header, client_id, refusal)
        return metrics, refusal

    def _check_room(self, size: int) -> None:
        """Refuse an upload that would leave less than ``server.min_free_mb`` free.

        Raises:
            StorageFullError: Not enough room (an event says where and how much is free).
        """
        free = shutil.disk_usage(self._uploads.root).free
        if free - max(0, size) < self._min_free_bytes:
            raise self._storage_full("upload", size, None, free=free)

    @contextlib.contextmanager
    def _storage(self, what: str, size: int) -> Iterator[None]:
        """Turn a full disk met inside the block into :class:`StorageFullError`."""
        try:
            yield
        except OSError as exc:
            if not _is_full(exc):
                raise
            raise self._storage_full(what, size, exc) from None

    def _storage_full(
        self, what: str, size: int, exc: OSError | None, *, free: int | None = None
    ) -> StorageFullError:
        """The error for a write that does not fit; recorded (at most every 10 s) and shown."""
        path = self._uploads.root
        if free is None:
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(path).free
        free_text = f"{free / (1 << 20):.1f} MiB free" if free is not None else "no room"
        message = (
            f"storage full: {path} has {free_text}; an {what} of {size / (1 << 20):.1f} MiB "
            f"needs it plus server.min_free_mb ({self._min_free_bytes / (1 << 20):g} MiB)"
        )
        if exc is not None:
            message = f"storage full: writing under {path} failed ({exc.strerror}); {free_text}"
        self._engine.storage_warning = (time.time(), message)
        now = time.monotonic()
        if now - self._storage_reported >= 10.0:
            self._storage_reported = now
            log.warning("%s", message)
            with contextlib.suppress(FlctlError):  # the event log may be out of room too
                self._events.emit(
                    ev.StorageFull(
                        path=str(path),
                        free_bytes=free,
                        needed_bytes=size + self._min_free_bytes,
                        what=what,
                    )
                )
        return StorageFullError(
            message, hint="free space on the coordinator's disk; clients retry their uploads"
        )

    async def begin_upload(self, header: pb.UploadHeader, ctx: RpcContext) -> pb.UploadReply:
        """Open an upload, or find the one this identity began for the same update."""
        self._guard.admit(ctx, "BeginUpload")
        session = self._session(ctx, "BeginUpload")
        # another identity's upload id is refused before anything else is read
        named = self._uploads.get(header.upload_id, session.client_id) if header.upload_id else None
        _, refusal = self._checked_header(header, session.client_id)
        if refusal is not None:
            return pb.UploadReply(accepted=False, reason=refusal)
        with self._storage("upload", int(header.size)):
            self._check_room(
                int(header.size) - (self._uploads.held(named.upload_id) if named else 0)
            )
            record = self._open_upload(header, session.client_id, named)
        held = self._uploads.held(record.upload_id)
        if held:
            self._events.emit(
                ev.UploadResumed(upload_id=record.upload_id, offset=held, size=record.size),
                server_round=record.server_round,
                client_id=session.client_id,
            )
        return pb.UploadReply(accepted=True, upload_id=record.upload_id, committed_offset=held)

    def _open_upload(
        self, header: pb.UploadHeader, client_id: str, named: PartialUpload | None
    ) -> PartialUpload:
        """The upload for this update: ``named`` (checked), one begun earlier, or a new one."""
        wanted = self._record_of(header, client_id)
        if named is not None:
            if not named.matches(wanted):
                raise InvalidInputError(
                    f"upload {named.upload_id} was begun for another update "
                    "(round, task, digest or size differ)"
                )
            return named
        return self._uploads.find(wanted) or self._uploads.begin(
            **{k: v for k, v in vars(wanted).items() if k not in ("upload_id", "created")}
        )

    async def upload(
        self, chunks: AsyncIterator[UploadItem | None], ctx: RpcContext
    ) -> pb.UploadReply:
        """Stream an update's bytes to its part file; when whole, verify and accept it.

        The header names the upload (from :meth:`begin_upload`; none: one is begun here) and
        the offset the data starts at, which must be the bytes the coordinator holds.
        """
        self._guard.admit(ctx, "Upload")
        session = self._session(ctx, "Upload")
        header = await anext(aiter(chunks), None)
        if not isinstance(header, pb.UploadHeader):
            raise InvalidInputError("an upload must start with its header")
        # another identity's upload id is refused before anything else is read
        named = self._uploads.get(header.upload_id, session.client_id) if header.upload_id else None
        metrics, refusal = self._checked_header(header, session.client_id)
        if refusal is not None:
            return pb.UploadReply(accepted=False, reason=refusal)
        try:
            with self._storage("upload", int(header.size)):
                self._check_room(int(header.size) - int(header.offset))
                record = self._open_upload(header, session.client_id, named)
        except StorageFullError:
            if named is not None:  # no room to finish it: what it holds goes, to make room
                self._uploads.discard(named.upload_id)
            raise
        upload_id = record.upload_id
        if not self._uploads.acquire(upload_id):
            raise ConflictError(f"upload {upload_id} is already being received on another stream")
        try:
            held = self._uploads.held(upload_id)
            if header.offset != held:
                raise ConflictError(
                    f"upload {upload_id} holds {held} bytes: resume from offset {held}, "
                    f"not {header.offset}"
                )
            async with self._upload_slots:
                return await self._receive(record, header, chunks, session, metrics, ctx)
        finally:
            self._uploads.release(upload_id)
            # the round may have ended while the bytes were in flight
            open_round = self._engine.open
            if open_round is None or open_round.server_round != record.server_round:
                self._uploads.discard(upload_id)
            elif self._uploads.holds(upload_id):
                # kept for resuming: an identity's unfinished uploads holding bytes are bounded
                # (disk), the oldest idle ones go
                self._uploads.trim(session.client_id, MAX_UPLOADS_PER_IDENTITY, spare=upload_id)

    def _update_format(self, record: PartialUpload) -> tuple[dict[str, TensorSpec], dict[str, str]]:
        """The tensors an update must hold in its encoding, and the metadata it must carry."""
        encoding = UpdateEncoding.from_header(record.encoding, record.dtype, record.base_digest)
        spec = expected_update_spec(self._model_spec, encoding.encoding, encoding.dtype)
        return spec, encoding.to_metadata()

    async def _receive(
        self,
        record: PartialUpload,
        header: pb.UploadHeader,
        chunks: AsyncIterator[UploadItem | None],
        session: Session,
        metrics: dict[str, float],
        ctx: RpcContext,
    ) -> pb.UploadReply:
        upload_id = record.upload_id
        part = self._uploads.part_path(upload_id)
        started = time.perf_counter()
        wire = 0  # bytes of this stream on the wire (compressed, when a codec is on)
        try:
            spec, metadata = self._update_format(record)
            sink = _UpdateSink(
                spec,
                record.size,
                metadata,
                codec=header.codec,
                max_chunk=self._limits.max_chunk_bytes,
            )
            held = int(header.offset)
            if held:
                # bytes from earlier streams: hashed and checked again, never trusted
                await asyncio.to_thread(sink.replay, part, held)
            pipeline: Pipeline[bytes | memoryview] = Pipeline(sink.feed)
            try:
                with open(part, "ab") as handle:
                    # the update is read again only when the round aggregates: its pages
                    # leave the page cache as they reach the disk
                    sink.handle, sink.writeback = handle, WriteBehind(handle, drop=True)
                    try:
                        async for data in chunks:
                            if data is None or isinstance(data, pb.UploadHeader):
                                raise InvalidInputError("an upload carries one header, then data")
                            if len(data) > self._limits.max_chunk_bytes:
                                raise LimitExceededError(
                                    f"chunk of {len(data)} bytes exceeds max_chunk_bytes "
                                    f"{self._limits.max_chunk_bytes}"
                                )
                            # decompressing, hashing, checking and writing release the GIL: a
                            # worker thread does them while the loop receives the next piece
                            wire += len(data)
                            await pipeline.put(data)
                    finally:
                        # what arrived is on disk before the stream's end is answered, however
                        # it ends: the next stream resumes from the part file's length
                        await pipeline.close()
                if sink.received < record.size:
                    raise _Incomplete(
                        f"the stream ended at byte {sink.received} of {record.size}: "
                        f"upload {upload_id} is kept, resume from offset {sink.received}"
                    )
                sink.finish(record.digest)
            finally:
                pipeline.cancel()
        except _Incomplete as exc:
            raise InvalidInputError(str(exc)) from None
        except OSError as exc:
            if not _is_full(exc):
                raise
            self._uploads.discard(upload_id)  # nothing half-written stays behind
            raise self._storage_full("upload", record.size, exc) from None
        except FlctlError as exc:
            self._uploads.discard(upload_id)
            self._reject(header, session.client_id, exc.message, malformed=True)
            self._refuse_task(header, session.client_id, exc)
            raise
        receive_s = time.perf_counter() - started
        # The identity may have been revoked while the bytes were in flight.
        self._guard.check(ctx, "Upload")
        # The round may have ended while the bytes were in flight.
        refusal = self._check_header(header, session.client_id)
        if refusal is not None:
            self._uploads.discard(upload_id)
            self._reject(header, session.client_id, refusal)
            return pb.UploadReply(accepted=False, reason=refusal)
        committing = time.perf_counter()
        try:
            stored = await asyncio.to_thread(self._commit_part, upload_id, record.digest)
        except OSError as exc:
            if not _is_full(exc):
                raise
            self._uploads.discard(upload_id)
            raise self._storage_full("upload", record.size, exc) from None
        commit_s = time.perf_counter() - committing
        received = record.size
        # The update, the client's counters and the update.accepted event land together: an
        # acknowledged update always has its event, even when the coordinator dies next.
        with self._store.transaction():
            update = self._store.add_update(
                server_round=record.server_round,
                client_id=session.client_id,
                task_id=record.task_id,
                status="accepted",
                digest=stored,
                size=received,
                num_examples=record.num_examples,
                metrics=metrics,
            )
            # bytes on the wire: this stream's, plus the part an earlier stream brought
            # (counted as held: a refused or cut stream changes no table)
            moved = wire + int(header.offset)
            self._store.bump_client(session.client_id, add_rounds=1, add_bytes_up=moved)
            self._events.emit(
                ev.UpdateAccepted(
                    task_id=record.task_id,
                    num_examples=update.num_examples,
                    metrics=metrics,
                    size=received,
                    digest=stored,
                    upload_id=upload_id,
                    resumed_from=int(header.offset),
                    codec=header.codec or "none",
                    wire_bytes=moved,
                    receive_s=round(receive_s, 4),
                    commit_s=round(commit_s, 4),
                ),
                server_round=update.server_round,
                client_id=session.client_id,
            )
        self._uploads.forget(upload_id)
        self._engine.storage_warning = None  # an update fitted: the disk has room again
        self._engine.update_arrived(session.client_id)
        return pb.UploadReply(accepted=True, upload_id=upload_id, committed_offset=received)

    def _commit_part(self, upload_id: str, digest: str) -> str:
        """Move a verified part file into the blob store (same file system: a rename)."""
        temp, handle = self._blobs.temp_file()
        handle.close()
        # rename onto a free name: replacing an existing file makes ext4 start writing the data
        # back at once (0.1-0.3 s per 500 MB measured), before commit_temp's own fsync
        temp.unlink()
        try:
            os.replace(self._uploads.part_path(upload_id), temp)
            return self._blobs.commit_temp(temp, digest)
        finally:
            temp.unlink(missing_ok=True)


class _Incomplete(Exception):
    """A stream ended before the bytes its header announced: the part file is kept."""


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


def _check_id(label: str, value: int) -> int:
    """A round id, sequence number or version from the wire, within what the store holds."""
    if value > MAX_ID:
        raise InvalidInputError(f"{label} {value} is out of range (at most {MAX_ID})")
    return int(value)


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
        ids = [_check_id("round id", i) for i in request.round_ids] or None
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
        seq = _check_id("since_seq", request.since_seq)
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
        wanted = [_check_id("round id", i) for i in request.round_ids]
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
