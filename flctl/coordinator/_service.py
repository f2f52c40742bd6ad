"""The handlers behind the Coordinator and Admin services: sessions, transfers, rounds, reads.

Every inbound field is checked before it touches state; a refusal raises a flctl error, which
the transport turns into a gRPC status with the message. Refused updates are recorded (status
rejected, with the reason) in ``updates`` and the event log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from flctl.core import events as ev
from flctl.core.errors import (
    AuthenticationError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    ProtocolMismatchError,
)
from flctl.security import TokenSigner
from flctl.store import BlobStore, SqlStore
from flctl.tensors import StreamValidator, TensorSpec
from flctl.transport import Pipeline
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    ChunkOut,
    RpcContext,
    UploadItem,
    metrics_from_map,
    pb,
    to_value_map,
)

from ._engine import RoundEngine
from ._events import EventLog
from ._registry import Registry, Session

__all__ = ["AdminService", "CoordinatorService", "Limits"]

log = logging.getLogger("flctl.coordinator")

_MAX_MODEL_SPEC_BYTES = 256 * 1024

#: Transfers the coordinator serves at once; more wait their turn (see CoordinatorService).
MAX_CONCURRENT_UPLOADS = 2
MAX_CONCURRENT_DOWNLOADS = 2
_STATES = frozenset({"idle", "downloading", "training", "uploading", "failed"})


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


def _describe_spec_difference(ours: dict[str, TensorSpec], theirs_json: str, limit: int = 3) -> str:
    """Say how a client's model differs from ours, from the spec it sent at Join."""
    try:
        theirs = json.loads(theirs_json)
        assert isinstance(theirs, dict)
    except (ValueError, AssertionError):
        return "the client sent no readable model description"
    problems: list[str] = []
    for name in sorted(set(ours) - set(theirs)):
        problems.append(f"missing tensor {name!r}")
    for name in sorted(set(theirs) - set(ours)):
        problems.append(f"unexpected tensor {name!r}")
    for name in sorted(set(ours) & set(theirs)):
        entry = theirs[name]
        want = ours[name]
        if not isinstance(entry, list) or len(entry) != 2:
            problems.append(f"tensor {name!r}: malformed description")
        elif entry[0] != want.dtype:
            problems.append(f"tensor {name!r}: dtype {entry[0]} vs the coordinator's {want.dtype}")
        elif list(entry[1]) != list(want.shape):
            problems.append(
                f"tensor {name!r}: shape {list(entry[1])} vs the coordinator's {list(want.shape)}"
            )
    if not problems:
        return "the descriptions match but the fingerprints do not"
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


class _UpdateSink:
    """Hashes, validates and writes an update's bytes as they arrive (one pass)."""

    def __init__(self, handle: BinaryIO, model_spec: dict[str, TensorSpec], size: int) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self._validator = StreamValidator(model_spec, size)
        self.received = 0

    def feed(self, data: bytes | memoryview) -> None:
        self._validator.feed(data)
        self._hash.update(data)
        self._handle.write(data)

    def finish(self, digest: str) -> int:
        self._validator.finish()
        if self._hash.hexdigest() != digest:
            raise IntegrityError("update bytes do not match the digest in the header")
        return self.received


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
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._registry = registry
        self._engine = engine
        self._signer = signer
        self._limits = limits
        self._model_spec = model_spec
        self._fingerprint = task_fingerprint
        self._heartbeat_interval_s = heartbeat_interval_s
        self._token_ttl_s = token_ttl_s
        # Each transfer in flight holds its own buffers (gRPC's and ours); bounding how many run
        # at once keeps the coordinator's memory flat in the number of clients. A stream that
        # waits for a slot is held back by HTTP/2 flow control, not buffered.
        self._upload_slots = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)
        self._download_slots = asyncio.Semaphore(MAX_CONCURRENT_DOWNLOADS)

    # ------------------------------------------------------------------ sessions

    def _session(self, ctx: RpcContext) -> Session:
        if not ctx.token:
            raise AuthenticationError("this call needs a session token: call Join first")
        claims = self._signer.verify(ctx.token, fingerprint=ctx.fingerprint)
        if claims.subject != ctx.identity:
            raise AuthenticationError("session token was issued to another identity")
        session = self._registry.get(ctx.identity)
        if session is None or session.session_id != claims.session_id:
            raise AuthenticationError("session is no longer open: join again")
        session.last_seen = time.time()
        return session

    async def join(self, request: pb.JoinRequest, ctx: RpcContext) -> pb.JoinReply:
        """Check protocol and model, open a session, hand out a token."""
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
        session = Session(ctx.identity, uuid.uuid4().hex, ctx.fingerprint)
        old = self._registry.add(session)
        token = self._signer.issue(
            ctx.identity, ctx.fingerprint, session.session_id, self._token_ttl_s
        )
        now = time.time()
        self._store.upsert_client(ctx.identity, fingerprint=ctx.fingerprint, state="idle", seen=now)
        self._events.emit(
            ev.CLIENT_JOINED,
            client_id=ctx.identity,
            data={"session_id": session.session_id, "replaced": old is not None},
        )
        return pb.JoinReply(
            client_id=ctx.identity,
            session_id=session.session_id,
            session_token=token,
            heartbeat_interval_s=self._heartbeat_interval_s,
            limits=self._limits.to_pb(),
            codecs=["none"],
            token_expires_unix=now + self._token_ttl_s,
        )

    async def heartbeat(self, request: pb.HeartbeatRequest, ctx: RpcContext) -> pb.HeartbeatReply:
        """Record liveness; a state change is persisted as an event."""
        try:
            session = self._session(ctx)
        except AuthenticationError:
            return pb.HeartbeatReply(command="rejoin", server_time_unix=time.time())
        state = request.state if request.state in _STATES else "idle"
        if state != session.state:
            session.state = state
            self._store.upsert_client(session.client_id, state=state, seen=session.last_seen)
            self._events.emit(
                ev.CLIENT_STATE,
                server_round=request.server_round,
                client_id=session.client_id,
                data={"state": state, "progress": request.progress},
            )
        session.progress = request.progress
        if state == "failed" and request.server_round:
            session.failed_round = int(request.server_round)
            self._engine.update_arrived()
        return pb.HeartbeatReply(command="", server_time_unix=time.time())

    async def tasks(self, request: pb.TasksRequest, ctx: RpcContext) -> AsyncIterator[pb.Task]:
        """Stream tasks to the client until it leaves, joins again, or we stop."""
        session = self._session(ctx)
        session.streaming = True
        self._registry.notify()
        reason = "disconnected"
        try:
            while True:
                task = await session.queue.get()
                if task is None:
                    reason = "session replaced or coordinator stopping"
                    return
                yield task
        finally:
            session.streaming = False
            if self._registry.remove(session):
                self._store.upsert_client(session.client_id, state="offline", seen=time.time())
                self._events.emit(
                    ev.CLIENT_LEFT, client_id=session.client_id, data={"reason": reason}
                )
            self._engine.update_arrived()

    # ------------------------------------------------------------------ transfers

    async def download(
        self, request: pb.DownloadRequest, ctx: RpcContext
    ) -> AsyncIterator[ChunkOut]:
        """Stream a blob from ``offset``, one chunk at a time, straight from its file."""
        session = self._session(ctx)
        digest = self._blobs.check_digest(request.digest)
        if not self._blobs.has(digest):
            raise NotFoundError(f"no blob {digest[:12]}")
        total = self._blobs.size(digest)
        if request.offset > total:
            raise InvalidInputError(f"offset {request.offset} is beyond the blob's {total} bytes")
        position = request.offset
        sent = 0
        try:
            async with self._download_slots:
                for data in self._blobs.iter_chunks(
                    digest, request.offset, self._limits.max_chunk_bytes
                ):
                    yield ChunkOut(data, position, total)
                    position += len(data)
                    sent += len(data)
        finally:
            self._store.upsert_client(session.client_id, add_bytes_down=sent)

    def _reject(self, header: pb.UploadHeader, client_id: str, reason: str) -> None:
        self._store.add_update(
            server_round=int(header.server_round),
            client_id=client_id,
            task_id=header.task_id[: self._limits.max_string_bytes],
            status="rejected",
            reason=reason,
        )
        self._events.emit(
            ev.UPDATE_REJECTED,
            server_round=int(header.server_round),
            client_id=client_id,
            data={"task_id": header.task_id[:64], "reason": reason},
        )

    def _check_header(self, header: pb.UploadHeader, client_id: str) -> str | None:
        """Validate the header's fields; return a round-state refusal reason, or None."""
        if len(header.task_id) > self._limits.max_string_bytes:
            raise LimitExceededError("task_id is too long")
        self._blobs.check_digest(header.digest)
        if header.codec not in ("", "none"):
            raise InvalidInputError(f"codec {header.codec!r} was not negotiated")
        if header.size > self._limits.max_update_bytes:
            raise LimitExceededError(
                f"update of {header.size} bytes exceeds the limit of "
                f"{self._limits.max_update_bytes} bytes"
            )
        if header.num_examples <= 0 or header.num_examples > 1 << 40:
            raise InvalidInputError(f"num_examples must be positive, not {header.num_examples}")
        open_round = self._engine.open
        if open_round is None or open_round.server_round != header.server_round:
            current = open_round.server_round if open_round else "none"
            return f"round {header.server_round} is not in training (open round: {current})"
        expected_task = open_round.selected.get(client_id)
        if expected_task is None:
            return f"{client_id} was not selected for round {header.server_round}"
        if expected_task != header.task_id:
            return f"task {header.task_id[:16]!r} is not this client's task for the round"
        if time.time() > open_round.deadline:
            return f"late: round {header.server_round}'s deadline has passed"
        if self._store.has_accepted_update(int(header.server_round), client_id):
            return f"duplicate: an update for round {header.server_round} was already accepted"
        return None

    async def upload(
        self, chunks: AsyncIterator[UploadItem | None], ctx: RpcContext
    ) -> pb.UploadReply:
        """Stream an update to a temp file, verify it, then accept it (durably) or refuse it."""
        session = self._session(ctx)
        header = await anext(aiter(chunks), None)
        if not isinstance(header, pb.UploadHeader):
            raise InvalidInputError("an upload must start with its header")
        try:
            metrics = metrics_from_map(header.metrics, max_items=self._limits.max_metrics)
            refusal = self._check_header(header, session.client_id)
        except FlctlError as exc:
            self._reject(header, session.client_id, exc.message)
            raise
        if refusal is not None:
            self._reject(header, session.client_id, refusal)
            return pb.UploadReply(accepted=False, reason=refusal)

        async with self._upload_slots:
            return await self._receive(header, chunks, session, metrics)

    async def _receive(
        self,
        header: pb.UploadHeader,
        chunks: AsyncIterator[UploadItem | None],
        session: Session,
        metrics: dict[str, float],
    ) -> pb.UploadReply:
        temp, handle = self._blobs.temp_file()
        sink = _UpdateSink(handle, self._model_spec, int(header.size))
        started = time.perf_counter()
        pipeline: Pipeline[bytes | memoryview] = Pipeline(sink.feed)
        try:
            try:
                with handle:
                    async for data in chunks:
                        if data is None or isinstance(data, pb.UploadHeader):
                            raise InvalidInputError("an upload carries one header, then data")
                        if len(data) > self._limits.max_chunk_bytes:
                            raise LimitExceededError(
                                f"chunk of {len(data)} bytes exceeds max_chunk_bytes "
                                f"{self._limits.max_chunk_bytes}"
                            )
                        if sink.received + len(data) > header.size:
                            raise LimitExceededError(
                                f"upload exceeds the {header.size} bytes its header announced"
                            )
                        sink.received += len(data)
                        # hashing, checking and writing release the GIL: a worker thread does
                        # them while the loop receives the next piece
                        await pipeline.put(data)
                    await pipeline.close()
                received = sink.finish(header.digest)
            except FlctlError as exc:
                self._reject(header, session.client_id, exc.message)
                raise
            receive_s = time.perf_counter() - started
            # The round may have ended while the bytes were in flight.
            refusal = self._check_header(header, session.client_id)
            if refusal is not None:
                self._reject(header, session.client_id, refusal)
                return pb.UploadReply(accepted=False, reason=refusal)
            committing = time.perf_counter()
            stored = await asyncio.to_thread(self._blobs.commit_temp, temp, header.digest)
            commit_s = time.perf_counter() - committing
        finally:
            pipeline.cancel()
            temp.unlink(missing_ok=True)
        record = self._store.add_update(
            server_round=int(header.server_round),
            client_id=session.client_id,
            task_id=header.task_id,
            status="accepted",
            digest=stored,
            size=received,
            num_examples=int(header.num_examples),
            metrics=metrics,
        )
        self._store.upsert_client(session.client_id, add_rounds=1, add_bytes_up=received)
        self._events.emit(
            ev.UPDATE_ACCEPTED,
            server_round=record.server_round,
            client_id=session.client_id,
            data={
                "task_id": header.task_id,
                "num_examples": record.num_examples,
                "metrics": metrics,
                "size": received,
                "digest": stored,
                "receive_s": round(receive_s, 4),
                "commit_s": round(commit_s, 4),
            },
        )
        self._engine.update_arrived()
        return pb.UploadReply(accepted=True, upload_id="", committed_offset=received)


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


class AdminService:
    """Implements the Admin service: rounds, status, listings and the event stream."""

    MAX_ROUNDS_PER_START = 10_000

    def __init__(
        self,
        *,
        store: SqlStore,
        events: EventLog,
        registry: Registry,
        engine: RoundEngine,
        state_dir: str,
        config_snapshot: dict[str, Any],
    ) -> None:
        self._store = store
        self._events = events
        self._registry = registry
        self._engine = engine
        self._state_dir = state_dir
        self._config_snapshot = config_snapshot

    async def start_round(
        self, request: pb.StartRoundRequest, ctx: RpcContext
    ) -> pb.StartRoundReply:
        """Queue rounds; they run after any already queued or open."""
        if not 1 <= request.rounds <= self.MAX_ROUNDS_PER_START:
            raise InvalidInputError(
                f"rounds must be between 1 and {self.MAX_ROUNDS_PER_START}, not {request.rounds}"
            )
        ids = self._store.create_rounds(request.rounds, self._config_snapshot)
        for server_round in ids:
            self._events.emit(
                ev.ROUND_QUEUED, server_round=server_round, data={"admin": ctx.identity}
            )
        self._engine.notify()
        return pb.StartRoundReply(round_ids=ids)

    async def status(self, request: pb.StatusRequest, ctx: RpcContext) -> pb.StatusReply:
        """Rounds (all, or those asked for), head version, connected clients."""
        ids = [int(i) for i in request.round_ids] or None
        rounds = self._store.list_rounds(ids)
        head = self._store.head()
        return pb.StatusReply(
            rounds=[round_info(r) for r in rounds],
            head_version=head.version if head else 0,
            connected_clients=len(self._registry.connected()),
            state_dir=self._state_dir,
        )

    async def list_clients(
        self, request: pb.ListClientsRequest, ctx: RpcContext
    ) -> pb.ListClientsReply:
        """Known clients, with live state for connected ones."""
        out = []
        for client in self._store.list_clients():
            session = self._registry.get(client.client_id)
            state = session.state if session is not None and session.streaming else "offline"
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
        models = self._store.list_models(limit=request.limit or None)
        head = self._store.head()
        return pb.ListModelsReply(
            models=[model_info(m) for m in models], head=head.version if head else 0
        )

    async def watch(self, request: pb.WatchRequest, ctx: RpcContext) -> AsyncIterator[pb.Event]:
        """Replay events after ``since_seq``; then follow until the coordinator stops."""
        seq = int(request.since_seq)
        while True:
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
