"""Transfers against a real coordinator over mTLS: resumption, the client cache, and refusals.

The client side is flctl's own (CoordinatorClient, fetch_blob); refusals are sent by hand so
that each bad input arrives exactly as a hostile client would send it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import torch

from flctl.client import ClientCache, PendingUploads, fetch_blob
from flctl.coordinator import Coordinator
from flctl.core.errors import (
    ConflictError,
    FlctlError,
    IntegrityError,
    InvalidInputError,
    LimitExceededError,
    PermissionDeniedError,
    TransportError,
)
from flctl.security import load_credentials
from flctl.store import BlobStore
from flctl.tensors import fingerprint, read_spec, save_parameters
from flctl.transport.grpc import PROTOCOL_VERSION, CoordinatorClient, pb, secure_channel
from flctl.transport.grpc._status import GRPC_CORE_INTERNAL

from .conftest import Project, admin, wait_until

pytestmark = pytest.mark.timeout(120)


class Harness:
    """A coordinator, one hand-driven client session, and the head model's blob."""

    def __init__(
        self, coordinator: Coordinator, api: CoordinatorClient, blobs: BlobStore, digest: str
    ):
        self.coordinator, self.api, self.blobs, self.digest = coordinator, api, blobs, digest
        self.stream: AsyncIterator[pb.Task] | None = None

    def bytes_down(self) -> int:
        store = self.coordinator.store
        assert store is not None
        return sum(c.bytes_down for c in store.list_clients())


async def start(project: Project, **sections: dict) -> Harness:  # type: ignore[type-arg]
    config = project.write(rounds={"min_clients": 1}, **sections)
    coordinator = Coordinator(config)
    address = await coordinator.start()
    cert, key, ca = load_credentials(config.certs_path, "c1")
    api = CoordinatorClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))
    store, blobs = coordinator.store, BlobStore(config.state_path / "blobs")
    assert store is not None
    head = store.head()
    assert head is not None
    spec = read_spec(blobs.path(head.digest))
    await api.join(
        pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_fingerprint=fingerprint(spec))
    )
    return Harness(coordinator, api, blobs, head.digest)


async def stop(h: Harness) -> None:
    await h.api.close()
    await h.coordinator.stop()


def test_download_resumes_from_the_partial_file_and_the_cache_is_never_refetched(
    project: Project, tmp_path: Path
) -> None:
    async def main() -> None:
        h = await start(project)
        try:
            blob = h.blobs.path(h.digest).read_bytes()
            cache = ClientCache(tmp_path / "cache")
            cut = len(blob) // 3
            cache.partial(h.digest).write_bytes(blob[:cut])  # a download that broke at 1/3
            path = await fetch_blob(h.api, cache, h.digest)
            assert path.read_bytes() == blob
            assert not cache.partial(h.digest).exists()
            await wait_until(lambda: h.bytes_down() == len(blob) - cut)
            # already cached: no byte is served again
            assert await fetch_blob(h.api, cache, h.digest) == path
            await asyncio.sleep(0.2)
            assert h.bytes_down() == len(blob) - cut
        finally:
            await stop(h)

    asyncio.run(main())


def test_dropped_download_resumes(project: Project, tmp_path: Path) -> None:
    """A connection dropped mid-stream leaves a partial file the next attempt continues."""

    async def main() -> None:
        h = await start(project, transport={"max_chunk_bytes": 4096}, task={"in_features": 262144})
        try:
            blob = h.blobs.path(h.digest).read_bytes()
            cache = ClientCache(tmp_path / "cache")
            seen: list[int] = []
            task = asyncio.create_task(
                fetch_blob(
                    h.api, cache, h.digest, on_progress=lambda done, total: seen.append(done)
                )
            )
            await wait_until(lambda: len(seen) >= 3)
            task.cancel()  # the stream is cut after a few chunks
            with pytest.raises(asyncio.CancelledError):
                await task
            partial = cache.partial(h.digest)
            assert 0 < partial.stat().st_size < len(blob)
            have = partial.stat().st_size
            path = await fetch_blob(h.api, cache, h.digest)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == h.digest
            assert have > 0
        finally:
            await stop(h)

    asyncio.run(main())


def test_corrupt_partial_is_discarded_then_refetched(project: Project, tmp_path: Path) -> None:
    async def main() -> None:
        h = await start(project)
        try:
            cache = ClientCache(tmp_path / "cache")
            cache.partial(h.digest).write_bytes(b"garbage that is not the model")
            with pytest.raises(IntegrityError, match="does not match its digest"):
                await fetch_blob(h.api, cache, h.digest)
            assert not cache.partial(h.digest).exists() and not cache.has(h.digest)
            await fetch_blob(h.api, cache, h.digest)
            assert cache.has(h.digest)
        finally:
            await stop(h)

    asyncio.run(main())


def test_download_refusals(project: Project) -> None:
    async def main() -> None:
        h = await start(project)
        try:
            sink = bytearray()

            class Sink:
                def write(self, data: bytes | memoryview) -> int:
                    sink.extend(data)
                    return len(data)

            for digest, needle in [
                ("../../etc/passwd", "invalid digest"),
                ("A" * 64, "invalid digest"),
                ("0" * 64, "no blob"),
            ]:
                with pytest.raises(FlctlError, match=needle):
                    await h.api.download(digest, Sink())
            with pytest.raises(InvalidInputError, match="beyond the blob"):
                await h.api.download(h.digest, Sink(), offset=10**9)
            assert not sink
        finally:
            await stop(h)

    asyncio.run(main())


async def _open_round(h: Harness, project: Project) -> pb.Task:
    """Open a round with this client selected and return its task."""
    config = h.coordinator.config
    # keep the stream referenced: the session lives as long as its task stream is open
    stream = h.stream = h.api.tasks()
    first = asyncio.ensure_future(anext(stream))
    await wait_until(lambda: len(h.coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
    client = admin(config, h.coordinator.bound_address)
    try:
        await client.start_round(1)
    finally:
        await client.close()
    return await asyncio.wait_for(first, 20)


def _state_files(h: Harness) -> tuple[list[Path], list[Path]]:
    root = h.blobs.root
    return sorted((root / "tmp").iterdir()), sorted(
        p for p in (root / "sha256").rglob("*") if p.is_file()
    )


def test_upload_refusals_leave_no_file_behind(project: Project, tmp_path: Path) -> None:
    async def main() -> None:
        h = await start(project, transport={"max_chunk_bytes": 65536})
        try:
            task = await _open_round(h, project)
            blob = h.blobs.path(h.digest).read_bytes()
            good = hashlib.sha256(blob).hexdigest()
            before = _state_files(h)

            def header(**fields: object) -> pb.UploadHeader:
                values: dict[str, object] = {
                    "server_round": task.server_round,
                    "task_id": task.task_id,
                    "num_examples": 10,
                    "digest": good,
                    "size": len(blob),
                }
                values.update(fields)
                return pb.UploadHeader(**values)  # type: ignore[arg-type]

            async def pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
                for i in range(0, len(data), size):
                    yield data[i : i + size]

            cases: list[tuple[pb.UploadHeader, bytes, int, type[FlctlError], str]] = [
                (header(digest="0" * 64), blob, 65536, IntegrityError, "do not match the digest"),
                (header(size=10**12), blob, 65536, LimitExceededError, "exceeds the limit"),
                (header(digest="../" + "a" * 61), blob, 65536, InvalidInputError, "invalid digest"),
            ]
            for name, params, needle in [
                (
                    "nan",
                    {n: t * float("nan") for n, t in _nudged(h.blobs.path(h.digest)).items()},
                    "NaN or Inf",
                ),
                ("shape", {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, "shape"),
            ]:
                bad = tmp_path / name
                save_parameters(params, bad)
                data = bad.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                cases.append(
                    (header(digest=digest, size=len(data)), data, 65536, InvalidInputError, needle)
                )
            engine = h.coordinator._engine
            assert engine is not None and engine.open is not None

            def reopen() -> None:
                """Each refusal closes c1's task for good: reopen it for the next case."""
                assert engine.open is not None
                engine.open.refused.clear()

            for head, data, size, error, needle in cases:
                with pytest.raises(error, match=needle):
                    await h.api.upload(head, pieces(data, size))
                reopen()
            # a stream that ends short of its announced size is refused, and its bytes kept in
            # the upload's part file for a later stream to resume (no blob, no row, no refusal)
            with pytest.raises(InvalidInputError, match="resume from offset"):
                await h.api.upload(header(size=len(blob) + 10), pieces(blob))
            parts = list((h.coordinator.state_dir / "uploads").glob("*.part"))
            assert [p.stat().st_size for p in parts] == [len(blob)]
            # a chunk larger than max_chunk_bytes is refused by the channel's message bound
            with pytest.raises(LimitExceededError, match="channel.s size limit"):
                big = bytes(200_000)
                await h.api.upload(
                    header(digest=hashlib.sha256(big).hexdigest(), size=len(big)),
                    pieces(big, len(big)),
                )
            assert _state_files(h) == before
            store = h.coordinator.store
            assert store is not None
            assert store.updates_for_round(task.server_round) == []  # malformed: no row at all
            refused = [e for e in store.events_since(0) if e.type == "update.rejected"]
            # the oversize chunk never reaches the handler: gRPC's message bound refuses it
            assert len(refused) == len(cases) and all(e.client_id == "c1" for e in refused)
            # a refusal is final for the task: even a well-formed update is then answered at
            # once; with the task reopened it is accepted (the refusals kept no state behind)
            update = tmp_path / "update"
            save_parameters(_nudged(h.blobs.path(h.digest)), update)
            data = update.read_bytes()
            good_header = header(digest=hashlib.sha256(data).hexdigest(), size=len(data))
            with pytest.raises(InvalidInputError, match="invalid digest"):
                await h.api.upload(header(digest="../" + "b" * 61), pieces(blob))
            reply = await h.api.upload(good_header, pieces(data))
            assert not reply.accepted
            assert reply.reason.startswith("refused: this task's update was refused, which is")
            reopen()
            reply = await h.api.upload(good_header, pieces(data))
            assert reply.accepted, reply.reason
        finally:
            await stop(h)

    asyncio.run(main())


def _nudged(path: Path) -> dict:  # type: ignore[type-arg]
    from flctl.tensors import load_parameters

    return {n: t + 0.01 if t.is_floating_point() else t for n, t in load_parameters(path).items()}


async def _update_bytes(h: Harness, tmp_path: Path) -> tuple[bytes, str]:
    update = tmp_path / "update"
    save_parameters(_nudged(h.blobs.path(h.digest)), update)
    data = update.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def test_dropped_upload_resumes_from_the_offset_the_coordinator_confirms(
    project: Project, tmp_path: Path
) -> None:
    async def main() -> None:
        h = await start(project, transport={"max_chunk_bytes": 4096}, task={"in_features": 20000})
        try:
            task = await _open_round(h, project)
            data, digest = await _update_bytes(h, tmp_path)
            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=10,
                digest=digest,
                size=len(data),
            )
            begun = await h.api.begin_upload(header)
            assert begun.accepted and begun.committed_offset == 0 and len(begun.upload_id) == 32
            uploads = h.coordinator.state_dir / "uploads"
            part = uploads / f"{begun.upload_id}.part"
            half = len(data) // 2
            cut = asyncio.Event()

            async def first_half() -> AsyncIterator[bytes]:
                for i in range(0, half, 4096):
                    yield data[i : min(i + 4096, half)]
                await cut.wait()  # the connection "drops" here: the call is cancelled

            first = header.__deepcopy__()
            first.upload_id, first.offset = begun.upload_id, 0
            call = asyncio.create_task(h.api.upload(first, first_half()))
            # what arrived reaches the file (a write buffer may hold the last few KiB until the
            # stream ends, when it is flushed)
            await wait_until(lambda: part.exists() and part.stat().st_size >= half - 16384)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # the part file survives; BeginUpload without the id finds it by its header
            again = await h.api.begin_upload(header)
            assert again.upload_id == begun.upload_id
            assert again.committed_offset == half

            # resuming from any other offset is refused and changes nothing
            wrong = header.__deepcopy__()
            wrong.upload_id, wrong.offset = begun.upload_id, 0
            with pytest.raises(ConflictError, match=f"resume from offset {half}"):
                await h.api.upload(wrong, _pieces(data))
            assert part.stat().st_size == half

            rest = header.__deepcopy__()
            rest.upload_id, rest.offset = begun.upload_id, half
            reply = await h.api.upload(rest, _pieces(data[half:]))
            assert reply.accepted, reply.reason
            store = h.coordinator.store
            assert store is not None
            accepted = store.updates_for_round(task.server_round, status="accepted")
            assert [u.digest for u in accepted] == [digest]
            assert hashlib.sha256(h.blobs.path(digest).read_bytes()).hexdigest() == digest
            events = {e.type: e.data for e in store.events_since(0)}
            assert events["upload.resumed"]["offset"] == half
            assert events["update.accepted"]["resumed_from"] == half
            assert list(uploads.iterdir()) == []  # the part file became the blob
        finally:
            await stop(h)

    asyncio.run(main())


def test_an_upload_id_is_bound_to_the_identity_that_began_it(
    project: Project, tmp_path: Path
) -> None:
    async def main() -> None:
        h = await start(project)
        try:
            task = await _open_round(h, project)
            data, digest = await _update_bytes(h, tmp_path)
            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=10,
                digest=digest,
                size=len(data),
            )
            begun = await h.api.begin_upload(header)
            config = h.coordinator.config
            cert, key, ca = load_credentials(config.certs_path, "c2")
            other = CoordinatorClient(
                secure_channel(h.coordinator.bound_address, cert_pem=cert, key_pem=key, ca_pem=ca)
            )
            try:
                spec = read_spec(h.blobs.path(h.digest))
                await other.join(
                    pb.JoinRequest(
                        protocol_version=PROTOCOL_VERSION, task_fingerprint=fingerprint(spec)
                    )
                )
                stolen = header.__deepcopy__()
                stolen.upload_id = begun.upload_id
                with pytest.raises(PermissionDeniedError, match="another identity"):
                    await other.begin_upload(stolen)
                with pytest.raises(PermissionDeniedError, match="another identity"):
                    await other.upload(stolen, _pieces(data))
            finally:
                await other.close()
            assert (
                h.coordinator.state_dir.joinpath("uploads", f"{begun.upload_id}.part")
                .stat()
                .st_size
                == 0
            )
        finally:
            await stop(h)

    asyncio.run(main())


async def _pieces(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_restarted_client_resumes_its_pending_upload_without_training_again(
    project: Project, tmp_path: Path
) -> None:
    """What a client killed mid-upload left on disk is picked up by the next ``join``."""
    from .conftest import make_runner

    async def main() -> None:
        h = await start(project, transport={"max_chunk_bytes": 4096}, task={"in_features": 20000})
        try:
            # first life, played by hand: the task, the update, half of it sent, then death
            task = await _open_round(h, project)
            data, digest = await _update_bytes(h, tmp_path)
            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=10,
                digest=digest,
                size=len(data),
            )
            begun = await h.api.begin_upload(header)
            half = len(data) // 2
            part = h.coordinator.state_dir / "uploads" / f"{begun.upload_id}.part"
            first = header.__deepcopy__()
            first.upload_id = begun.upload_id
            cut = asyncio.Event()

            async def first_half() -> AsyncIterator[bytes]:
                async for piece in _pieces(data[:half]):
                    yield piece
                await cut.wait()

            call = asyncio.create_task(h.api.upload(first, first_half()))
            await wait_until(lambda: part.exists() and part.stat().st_size >= half - 16384)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await h.api.close()  # the session ends with the process
            config = h.coordinator.config
            cache_dir = config.root / ".cache" / "c1"
            update = tmp_path / "pending"
            update.write_bytes(data)
            PendingUploads(cache_dir / "uploads").save(task.task_id, header, update)

            # second life: a real runner with the same cache folder
            runner = make_runner(config, h.coordinator.bound_address, "c1", once=True)
            seen: list[tuple[str, dict]] = []  # type: ignore[type-arg]
            runner._on_event = lambda kind, details: seen.append((kind, details))
            stop_event = asyncio.Event()
            run = asyncio.create_task(runner.run(stop_event))
            await asyncio.sleep(8)
            print("SEEN", seen, h.coordinator.store.events_since(0)[-8:])
            assert await asyncio.wait_for(run, 60) == 1
            kinds = [k for k, _ in seen]
            assert "pending" in kinds and "uploaded" in kinds
            resumed = [d for k, d in seen if k == "resumed"]
            assert resumed and resumed[0]["offset"] == part_size_at_cut(h, digest, half)
            assert runner._client.received == []  # type: ignore[attr-defined]  # no training
            store = h.coordinator.store
            assert store is not None
            accepted = store.updates_for_round(task.server_round, status="accepted")
            assert [u.digest for u in accepted] == [digest]
            assert list((cache_dir / "uploads").iterdir()) == []
        finally:
            await h.coordinator.stop()

    asyncio.run(main())


def part_size_at_cut(h: Harness, digest: str, half: int) -> int:
    """The offset the coordinator confirmed: the resumed event says how much it held."""
    store = h.coordinator.store
    assert store is not None
    held = [e.data["offset"] for e in store.events_since(0) if e.type == "upload.resumed"]
    assert held and 0 < held[0] <= half
    return int(held[0])


def test_compressed_upload_is_accepted_and_a_bad_frame_leaves_nothing(
    project: Project, tmp_path: Path
) -> None:
    from flctl.transport import compress_chunk

    async def main() -> None:
        h = await start(
            project,
            transport={"max_chunk_bytes": 4096, "compression": "zstd"},
            task={"in_features": 4000},
        )
        try:
            task = await _open_round(h, project)
            data, digest = await _update_bytes(h, tmp_path)
            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=10,
                digest=digest,
                size=len(data),
                codec="zstd",
            )
            before = _state_files(h)

            async def frames(corrupt_at: int = -1) -> AsyncIterator[bytes]:
                for n, i in enumerate(range(0, len(data), 4096)):
                    frame = bytearray(compress_chunk(data[i : i + 4096], 1, codec="zstd"))
                    if n == corrupt_at:
                        frame[len(frame) // 2] ^= 0xFF
                    yield bytes(frame)

            with pytest.raises(IntegrityError, match="zstd"):
                await h.api.upload(header, frames(corrupt_at=3))
            # the round's model, summed while this upload streamed in, goes with the refusal
            await wait_until(lambda: _state_files(h) == before, timeout=10)
            assert list((h.coordinator.state_dir / "uploads").iterdir()) == []
            store = h.coordinator.store
            assert store is not None
            assert store.updates_for_round(task.server_round) == []
            # a codec the coordinator does not speak is refused with the header
            odd = header.__deepcopy__()
            odd.codec = "lz4"
            with pytest.raises(InvalidInputError, match="not negotiated"):
                await h.api.begin_upload(odd)
            # each refusal closed the task for good (a refused update is final): reopen it
            engine = h.coordinator._engine
            assert engine is not None and engine.open is not None
            assert "not negotiated" not in engine.open.refused["c1"]  # the first refusal stays
            engine.open.refused.clear()
            reply = await h.api.upload(header, frames())
            assert reply.accepted, reply.reason
            assert hashlib.sha256(h.blobs.path(digest).read_bytes()).hexdigest() == digest
        finally:
            await stop(h)

    asyncio.run(main())


def test_a_status_replaced_by_grpc_core_is_recovered_from_begin_upload(project: Project) -> None:
    """grpc.aio can replace a refusal's status with INTERNAL "Internal error from Core" when a
    write in flight fails after it (a race, grpc issue 36066). The real coordinator is asked
    again with BeginUpload; only the stream's outcome is forced here."""

    async def main() -> None:
        h = await start(project)
        try:
            task = await _open_round(h, project)

            def replaced(*args: object, **kwargs: object) -> object:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.INTERNAL,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=GRPC_CORE_INTERNAL,
                )

            h.api._upload = replaced  # type: ignore[method-assign]

            async def nothing() -> AsyncIterator[bytes]:
                return
                yield b""

            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=10,
                digest="A" * 64,  # refused by BeginUpload as by Upload
                size=100,
            )
            with pytest.raises(InvalidInputError, match="invalid digest"):
                await h.api.upload(header, nothing())
            # a header the coordinator accepts: the transport error stands (the caller resumes)
            header.digest = hashlib.sha256(b"x" * 100).hexdigest()
            with pytest.raises(TransportError, match=GRPC_CORE_INTERNAL):
                await h.api.upload(header, nothing())
        finally:
            await stop(h)

    asyncio.run(main())
