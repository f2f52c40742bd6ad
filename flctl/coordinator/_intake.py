"""The upload path: an update's header checked, its bytes received, verified and accepted.

Whatever carried it (gRPC for a deployed client, the in-process transport of ``flctl
simulate``), an update meets the same checks here, in this order: the header's fields (ids,
digest, codec, size, ``num_examples``, metrics), the round's state (open round, selection,
task, finality of an earlier refusal, deadline, duplicates), room on the disk, then the bytes
themselves as they stream in (tensor names, shapes, dtypes and finite values, against the
model's; the announced size and digest). In a round with secure aggregation an update is a
masked input (``encoding`` "secagg", docs/secagg.md): a plain update is refused before any of
its bytes is read, and a masked input is checked for the round's length and width only (its
values are uniformly random by design). Refused updates are recorded (status rejected, with
the reason) in ``updates`` and the event log; an accepted one lands in the blob store, the
``updates`` table and an ``update.accepted`` event in one transaction, and the round engine
hears of it. An upload a stream left unfinished is kept (``PartialUploads``) for the client to
resume from the bytes held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from flctl.core import TransportConfig
from flctl.core import events as ev
from flctl.core.errors import (
    ConflictError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    StorageFullError,
)
from flctl.core.work import UploadAnswer, UploadHeader, check_metrics
from flctl.store import BlobStore, SqlStore, WriteBehind
from flctl.tensors import (
    MASKED_ENCODING,
    StreamValidator,
    TensorSpec,
    UpdateEncoding,
    expected_update_spec,
    masked_metadata,
    masked_spec,
)
from flctl.transport import CODECS, Pipeline, decompress_chunk, negotiate_codecs
from flctl.transport.grpc import RpcContext

from ._engine import RoundEngine
from ._events import EventLog
from ._guard import RevocationGuard
from ._limits import MAX_ID, Limits, check_id
from ._registry import Session
from ._uploads import PartialUpload, PartialUploads

__all__ = ["MAX_CONCURRENT_UPLOADS", "MAX_UPLOADS_PER_IDENTITY", "UpdateIntake"]

log = logging.getLogger("flctl.coordinator")

#: Uploads received at once; more wait their turn (memory stays flat in the number of clients).
MAX_CONCURRENT_UPLOADS = 2
#: Uploads one identity may have begun and not finished at once (a new one drops the oldest).
MAX_UPLOADS_PER_IDENTITY = 4


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


class UpdateIntake:
    """Checks, receives and accepts updates for the round engine (see the module docstring)."""

    def __init__(
        self,
        *,
        store: SqlStore,
        blobs: BlobStore,
        events: EventLog,
        engine: RoundEngine,
        guard: RevocationGuard,
        uploads: PartialUploads,
        limits: Limits,
        model_spec: dict[str, TensorSpec],
        transport: TransportConfig,
        min_free_bytes: int,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._events = events
        self._engine = engine
        self._guard = guard
        self._uploads = uploads
        self._limits = limits
        self._model_spec = model_spec
        self._transport = transport
        self._min_free_bytes = min_free_bytes
        self._storage_reported = 0.0
        # Each upload in flight holds its own buffers; bounding how many run at once keeps
        # the coordinator's memory flat in the number of clients. A gRPC stream that waits
        # for a slot is held back by HTTP/2 flow control, not buffered.
        self._upload_slots = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)

    def _reject(
        self, header: UploadHeader, client_id: str, reason: str, *, malformed: bool = False
    ) -> None:
        """Record a refused update: every refusal in the event log, with the identity.

        A well-formed update refused for the round's state (late, duplicate, wrong round) is
        also kept in ``updates`` with its reason; malformed input (bad digest, size, tensors,
        values) changes no table but the event log.
        """
        if header.server_round > MAX_ID:  # refused as malformed; the log cannot hold it
            malformed = True
            header = UploadHeader(
                server_round=0, task_id=header.task_id, digest="", size=0, num_examples=0
            )
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

    def _refuse_task(self, header: UploadHeader, client_id: str, exc: FlctlError) -> None:
        """Make a refusal of the update itself final for its task (see RoundEngine.refuse).

        Only :class:`InvalidInputError` judges the update (its header, size, digest, tensors,
        values, metrics): sending it again would be refused again. Other errors (a busy or
        full coordinator) leave the task open.
        """
        if isinstance(exc, InvalidInputError):
            self._engine.refuse(int(header.server_round), client_id, header.task_id, exc.message)

    def _check_header(self, header: UploadHeader, client_id: str) -> str | None:
        """Validate the header's fields; return a round-state refusal reason, or None."""
        check_id("server_round", header.server_round)
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
        masked = header.encoding == MASKED_ENCODING
        if masked:
            if header.dtype or header.base_digest:
                raise InvalidInputError("a masked input (encoding secagg) has no dtype or base")
            encoding = None
        else:
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
        secure = self._engine.secagg_upload(int(header.server_round)) is not None
        if secure and not masked:
            return (
                f"round {header.server_round} uses secure aggregation: upload a masked input "
                f"(encoding {MASKED_ENCODING!r}), never a plain update"
            )
        if masked and not secure:
            raise InvalidInputError(
                f"round {header.server_round} has no secure aggregation: a masked input is not "
                "an update"
            )
        if (
            encoding is not None
            and encoding.base_digest
            and encoding.base_digest != open_round.base_digest
        ):
            return (
                f"the delta is relative to model {encoding.base_digest[:12]}, not to round "
                f"{header.server_round}'s model {open_round.base_digest[:12]}"
            )
        if time.time() > open_round.deadline:
            return f"late: round {header.server_round}'s deadline has passed"
        if self._engine.has_reported(client_id):
            return f"duplicate: an update for round {header.server_round} was already accepted"
        if masked:
            return self._engine.secagg_refusal(int(header.server_round), client_id)
        return None

    def _record_of(self, header: UploadHeader, client_id: str) -> PartialUpload:
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
        self, header: UploadHeader, client_id: str
    ) -> tuple[dict[str, float], str | None]:
        """Metrics and round-state refusal of a header; malformed ones are refused (raised)."""
        try:
            metrics = check_metrics(header.metrics, max_items=self._limits.max_metrics)
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

    async def begin(self, header: UploadHeader, session: Session) -> UploadAnswer:
        """Open an upload, or find the one this identity began for the same update."""
        # another identity's upload id is refused before anything else is read
        named = self._uploads.get(header.upload_id, session.client_id) if header.upload_id else None
        _, refusal = self._checked_header(header, session.client_id)
        if refusal is not None:
            return UploadAnswer(accepted=False, reason=refusal)
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
        return UploadAnswer(accepted=True, upload_id=record.upload_id, committed_offset=held)

    def _open_upload(
        self, header: UploadHeader, client_id: str, named: PartialUpload | None
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

    async def receive(
        self,
        header: UploadHeader,
        chunks: AsyncIterator[object],
        session: Session,
        ctx: RpcContext,
    ) -> UploadAnswer:
        """Stream an update's bytes to its part file; when whole, verify and accept it.

        The header names the upload (from :meth:`begin`; none: one is begun here) and the
        offset the data starts at, which must be the bytes the coordinator holds. ``chunks``
        yields the data pieces (bytes); anything else (a second header) is refused.
        """
        # another identity's upload id is refused before anything else is read
        named = self._uploads.get(header.upload_id, session.client_id) if header.upload_id else None
        metrics, refusal = self._checked_header(header, session.client_id)
        if refusal is not None:
            return UploadAnswer(accepted=False, reason=refusal)
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
        return self._format_of(
            record.server_round, record.encoding, record.dtype, record.base_digest
        )

    def _format_of(
        self, server_round: int, encoding_name: str, dtype: str, base_digest: str
    ) -> tuple[dict[str, TensorSpec], dict[str, str]]:
        """The tensors and metadata of an update in this encoding (a masked input: its round's).

        Raises:
            InvalidInputError: A masked input for a round without secure aggregation running.
        """
        if encoding_name == MASKED_ENCODING:
            secure = self._engine.secagg_upload(server_round)
            if secure is None:
                raise InvalidInputError(
                    f"round {server_round} has no secure aggregation running: a masked input "
                    "is not an update"
                )
            num_elements, modulus_bits = secure
            return masked_spec(num_elements, modulus_bits), masked_metadata()
        encoding = UpdateEncoding.from_header(encoding_name, dtype, base_digest)
        spec = expected_update_spec(self._model_spec, encoding.encoding, encoding.dtype)
        return spec, encoding.to_metadata()

    async def _receive(
        self,
        record: PartialUpload,
        header: UploadHeader,
        chunks: AsyncIterator[object],
        session: Session,
        metrics: dict[str, float],
        ctx: RpcContext,
    ) -> UploadAnswer:
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
                    # the round may sum these bytes as they land (RoundStream)
                    self._engine.upload_begun(record, part)
                    try:
                        async for data in chunks:
                            if not isinstance(data, bytes | memoryview):
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
            return UploadAnswer(accepted=False, reason=refusal)
        committing = time.perf_counter()
        try:
            stored = await asyncio.to_thread(self._commit_part, upload_id, record.digest)
        except OSError as exc:
            if not _is_full(exc):
                raise
            self._uploads.discard(upload_id)
            raise self._storage_full("upload", record.size, exc) from None
        commit_s = time.perf_counter() - committing
        # bytes on the wire: this stream's, plus the part an earlier stream brought (counted as
        # held: a refused or cut stream changes no table)
        accepted = ev.UpdateAccepted(
            task_id=record.task_id,
            num_examples=record.num_examples,
            metrics=metrics,
            size=record.size,
            digest=stored,
            upload_id=upload_id,
            resumed_from=int(header.offset),
            codec=header.codec or "none",
            wire_bytes=wire + int(header.offset),
            receive_s=round(receive_s, 4),
            commit_s=round(commit_s, 4),
        )
        self._accepted(session.client_id, record.server_round, accepted)
        self._uploads.forget(upload_id)
        return UploadAnswer(accepted=True, upload_id=upload_id, committed_offset=record.size)

    def _accepted(self, client_id: str, server_round: int, accepted: ev.UpdateAccepted) -> None:
        """Record an update in the blob store as accepted, and tell the round engine.

        The update, the client's counters and the ``update.accepted`` event land together: an
        acknowledged update always has its event, even when the coordinator dies next.
        """
        with self._store.transaction():
            update = self._store.add_update(
                server_round=server_round,
                client_id=client_id,
                task_id=accepted.task_id,
                status="accepted",
                digest=accepted.digest,
                size=accepted.size,
                num_examples=accepted.num_examples,
                metrics=accepted.metrics,
            )
            self._store.bump_client(client_id, add_rounds=1, add_bytes_up=accepted.wire_bytes)
            self._events.emit(accepted, server_round=server_round, client_id=client_id)
        self._engine.storage_warning = None  # an update fitted: the disk has room again
        self._engine.update_arrived(client_id, update)

    async def accept_file(
        self, header: UploadHeader, path: Path, session: Session, ctx: RpcContext
    ) -> UploadAnswer:
        """Take an update handed over as a file (the in-process transport).

        The same checks as a streamed upload (the header, the round's state, then every byte:
        tensors, values, size and digest), in the same order, with the same refusals; then the
        file itself moves into the blob store (a rename: ``path`` must be on the state
        folder's file system), where a streamed update's part file would. On a refusal the
        file stays where it is, for the caller to remove.
        """
        client_id = session.client_id
        metrics, refusal = self._checked_header(header, client_id)
        if refusal is not None:
            return UploadAnswer(accepted=False, reason=refusal)
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._verify_file, header, path)
        except FlctlError as exc:
            self._reject(header, client_id, exc.message, malformed=True)
            self._refuse_task(header, client_id, exc)
            raise
        receive_s = time.perf_counter() - started
        self._guard.check(ctx, "Upload")  # revoked meanwhile
        refusal = self._check_header(header, client_id)  # the round may have ended meanwhile
        if refusal is not None:
            self._reject(header, client_id, refusal)
            return UploadAnswer(accepted=False, reason=refusal)
        committing = time.perf_counter()
        with self._storage("upload", header.size):
            stored = await asyncio.to_thread(self._commit_file, path, header.digest)
        accepted = ev.UpdateAccepted(
            task_id=header.task_id,
            num_examples=header.num_examples,
            metrics=metrics,
            size=header.size,
            digest=stored,
            upload_id="",
            resumed_from=0,
            codec="none",
            wire_bytes=header.size,
            receive_s=round(receive_s, 4),
            commit_s=round(time.perf_counter() - committing, 4),
        )
        self._accepted(client_id, header.server_round, accepted)
        return UploadAnswer(accepted=True, committed_offset=header.size)

    def _verify_file(self, header: UploadHeader, path: Path) -> None:
        """Check an update file's bytes as a stream's are checked (no copy is written)."""
        if header.codec not in ("", "none"):
            raise InvalidInputError("an update handed over as a file is not compressed")
        size = path.stat().st_size
        if size > header.size:
            raise LimitExceededError(f"upload exceeds the {header.size} bytes its header announced")
        if size < header.size:
            raise InvalidInputError(f"the update holds {size} bytes of the {header.size} announced")
        spec, metadata = self._format_of(
            int(header.server_round), header.encoding, header.dtype, header.base_digest
        )
        sink = _UpdateSink(spec, header.size, metadata)
        sink.replay(path, size)
        sink.finish(header.digest)

    def _commit_part(self, upload_id: str, digest: str) -> str:
        """Move a verified part file into the blob store (same file system: a rename)."""
        return self._commit_file(self._uploads.part_path(upload_id), digest)

    def _commit_file(self, source: Path, digest: str) -> str:
        """Move a verified file into the blob store (same file system: a rename)."""
        temp, handle = self._blobs.temp_file()
        handle.close()
        # rename onto a free name: replacing an existing file makes ext4 start writing the data
        # back at once (0.1-0.3 s per 500 MB measured), before commit_temp's own fsync
        temp.unlink()
        try:
            os.replace(source, temp)
            return self._blobs.commit_temp(temp, digest)
        finally:
            temp.unlink(missing_ok=True)


class _Incomplete(Exception):
    """A stream ended before the bytes its header announced: the part file is kept."""
