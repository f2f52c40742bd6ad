"""Compressed downloads against a real coordinator over mTLS: negotiation, bytes, bad frames."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

import flctl.transport._compression as compression
from flctl.client import ClientCache, fetch_blob
from flctl.coordinator import Coordinator
from flctl.core.errors import IntegrityError
from flctl.security import load_credentials
from flctl.store import BlobStore
from flctl.tensors import fingerprint, read_spec
from flctl.transport import CODECS
from flctl.transport.grpc import PROTOCOL_VERSION, CoordinatorClient, pb, secure_channel

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)

KiB = 1024
rng = np.random.default_rng(0)
#: Compressible: bfloat16-like 16-bit values (sign and exponent repeat) and runs of zeros.
COMPRESSIBLE = (
    (rng.standard_normal(256 * KiB) * 0.02).astype(np.float32).view(np.uint32) >> 16
).astype(np.uint16).tobytes() + bytes(512 * KiB)
#: float32 weights: random mantissas, about 8 % compressible.
FLOAT32 = (rng.standard_normal(512 * KiB) * 0.02).astype(np.float32).tobytes()


class Harness:
    def __init__(self, coordinator: Coordinator, api: CoordinatorClient, reply: pb.JoinReply):
        self.coordinator, self.api, self.reply = coordinator, api, reply
        self.blobs = BlobStore(coordinator.config.state_path / "blobs")

    def bytes_down(self) -> int:
        store = self.coordinator.store
        assert store is not None
        return sum(c.bytes_down for c in store.list_clients())


async def start(project: Project, **transport: object) -> Harness:
    config = project.write(rounds={"min_clients": 1}, transport=transport)
    coordinator = Coordinator(config)
    address = await coordinator.start()
    cert, key, ca = load_credentials(config.certs_path, "c1")
    api = CoordinatorClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))
    head = coordinator.store.head()  # type: ignore[union-attr]
    assert head is not None
    spec = read_spec(BlobStore(config.state_path / "blobs").path(head.digest))
    reply = await api.join(
        pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            task_fingerprint=fingerprint(spec),
            codecs=list(CODECS),
        )
    )
    return Harness(coordinator, api, reply)


async def stop(h: Harness) -> None:
    await h.api.close()
    await h.coordinator.stop()


def test_join_announces_the_policy_and_the_codecs_both_speak(project: Project) -> None:
    async def main() -> None:
        h = await start(project, compression="zstd", compression_level=3)
        try:
            assert list(h.reply.codecs) == ["none", "zstd"]
            assert (h.reply.compression, h.reply.compression_level) == ("zstd", 3)
        finally:
            await stop(h)
        h = await start(project, compression="none")
        try:
            assert list(h.reply.codecs) == ["none"] and h.reply.compression == "none"
        finally:
            await stop(h)

    asyncio.run(main())


def test_a_runner_joins_with_its_codecs_and_keeps_the_reply(project: Project) -> None:
    async def main() -> None:
        config = project.write(rounds={"min_clients": 1})  # compression: "auto" by default
        coordinator = Coordinator(config)
        address = await coordinator.start()
        runner = make_runner(config, address, "c1")
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        try:
            await wait_until(lambda: runner.join_reply is not None)
            reply = runner.join_reply
            assert reply is not None
            assert list(reply.codecs) == list(CODECS)
            assert (reply.compression, reply.compression_level) == ("auto", 1)
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
            await coordinator.stop()

    asyncio.run(main())


def test_zstd_download_arrives_whole_in_fewer_bytes(project: Project, tmp_path: Path) -> None:
    async def main() -> None:
        h = await start(project, compression="zstd", max_chunk_bytes=64 * KiB)
        try:
            digest = h.blobs.put_bytes(COMPRESSIBLE)
            path = await fetch_blob(h.api, ClientCache(tmp_path / "a"), digest)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
            await wait_until(lambda: h.bytes_down() > 0)
            on_wire = h.bytes_down()
            assert on_wire < len(COMPRESSIBLE) // 2  # what the coordinator sent, compressed
            # a client that accepts no codec gets the raw bytes
            sink = bytearray()

            class Sink:
                def write(self, data: bytes | memoryview) -> int:
                    sink.extend(data)
                    return len(data)

            await h.api.download(digest, Sink(), codecs=[])
            assert bytes(sink) == COMPRESSIBLE
            await wait_until(lambda: h.bytes_down() == on_wire + len(COMPRESSIBLE))
        finally:
            await stop(h)

    asyncio.run(main())


def test_auto_sends_float32_raw_on_loopback(project: Project, tmp_path: Path) -> None:
    async def main() -> None:
        h = await start(project)  # compression = "auto", no link measured: loopback assumed
        try:
            assert h.reply.compression == "auto"
            digest = h.blobs.put_bytes(FLOAT32)
            path = await fetch_blob(h.api, ClientCache(tmp_path / "a"), digest)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
            await wait_until(lambda: h.bytes_down() == len(FLOAT32))
        finally:
            await stop(h)

    asyncio.run(main())


def test_a_corrupt_frame_is_refused_and_nothing_corrupt_is_kept(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = compression.compress_chunk
    frames = 0

    def corrupting(data: bytes | memoryview, level: int = 1, *, codec: str = "zstd") -> bytes:
        nonlocal frames
        frames += 1
        frame = bytearray(real(data, level, codec=codec))
        if frames == 2:  # the second chunk arrives damaged
            frame[len(frame) // 2] ^= 0xFF
        return bytes(frame)

    async def main() -> None:
        chunk = 64 * KiB
        h = await start(project, compression="zstd", max_chunk_bytes=chunk)
        try:
            digest = h.blobs.put_bytes(COMPRESSIBLE)
            cache = ClientCache(tmp_path / "cache")
            monkeypatch.setattr(compression, "compress_chunk", corrupting)
            with pytest.raises(IntegrityError, match=r"chunk at byte 65536: .*not a valid zstd"):
                await fetch_blob(h.api, cache, digest)
            assert not cache.has(digest)
            # only the intact first chunk was written: a later attempt resumes after it
            assert cache.partial(digest).read_bytes() == COMPRESSIBLE[:chunk]
            monkeypatch.setattr(compression, "compress_chunk", real)
            path = await fetch_blob(h.api, cache, digest)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        finally:
            await stop(h)

    asyncio.run(main())


def test_a_runner_compresses_its_upload_when_told_to(project: Project) -> None:
    """compression = "zstd": the runner sends zstd frames, the coordinator stores the raw file."""
    config = project.write(rounds={"min_clients": 1}, transport={"compression": "zstd"})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        runner = make_runner(config, address, "c1", once=True)
        seen: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        runner._on_event = lambda kind, details: seen.append((kind, details))
        try:
            run = asyncio.create_task(runner.run(asyncio.Event()))
            await wait_until(lambda: len(coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
            client = admin(config, address)
            try:
                await client.start_round(1)
            finally:
                await client.close()
            assert await asyncio.wait_for(run, 60) == 1
            store = coordinator.store
            assert store is not None
            codecs = [d["codec"] for k, d in seen if k == "compressing"]
            assert codecs == ["zstd"]
            accepted = store.updates_for_round(1, status="accepted")
            assert len(accepted) == 1
            blob = BlobStore(config.state_path / "blobs").path(accepted[0].digest)
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == accepted[0].digest
        finally:
            await coordinator.stop()

    asyncio.run(main())
