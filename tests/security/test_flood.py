"""Connections that never prove who they are cannot exhaust the coordinator.

A real coordinator with a short handshake timeout and a per-peer bound meets a few hundred TCP
connections that send nothing and some that send half a TLS ClientHello, all from 127.0.0.1,
while two real clients (also from 127.0.0.1) run a round: every flood connection is closed by
the coordinator, the round commits, and the bound it applied is in the event log.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

import pytest

from flctl.coordinator import Coordinator
from flctl.security import generate_project_certs
from flctl.store import SqlStore
from flctl.transport.grpc import count_connections, split_address
from tests.integration.conftest import HERE, Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)

IDLE = 200
HALF_HELLO = 60
PER_PEER = 64
# A TLS record header and the start of a ClientHello that never ends.
CLIENT_HELLO_START = bytes.fromhex("160301020001") + bytes.fromhex("0001fc0303") + os.urandom(32)


def _open(port: int, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if first_bytes:
        sock.sendall(first_bytes)
    sock.setblocking(False)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_unauthenticated_connections_are_closed_and_a_round_still_commits(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    generate_project_certs(tmp_path / "certs", ["c1", "c2"])
    shutil.copy(HERE / "tiny_task.py", tmp_path / "tiny_task.py")
    config = Project(tmp_path).write(
        server={
            "address": "127.0.0.1:0",
            "heartbeat_interval_s": 0.5,
            "handshake_timeout_s": 1.0,
            "max_connections_per_peer": PER_PEER,
        },
        rounds={"min_clients": 2, "deadline_s": 60.0, "quorum_timeout_s": 60.0},
    )
    flood: list[socket.socket] = []

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        _, port = split_address(address)
        stop = asyncio.Event()
        runners = [make_runner(config, address, c, partition=i) for i, c in enumerate(["c1", "c2"])]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            registry = coordinator._registry
            assert registry is not None
            await wait_until(lambda: len(registry.connected()) == 2, timeout=60)
            # the flood: idle connections, and ones stuck half-way through a ClientHello
            for _ in range(IDLE):
                flood.append(await asyncio.to_thread(_open, port))
            for _ in range(HALF_HELLO):
                flood.append(await asyncio.to_thread(_open, port, CLIENT_HELLO_START))
            assert count_connections(port).get("127.0.0.1", 0) > PER_PEER  # the flood is real
            reply = await client.start_round(1)

            async def committed() -> bool:
                status = await client.status(list(reply.round_ids))
                return all(r.status in ("committed", "failed") for r in status.rounds)

            await wait_until(committed, timeout=90, step=0.1)
            status = await client.status(list(reply.round_ids))
            assert [r.status for r in status.rounds] == ["committed"]
            # every flood connection was closed by the coordinator (the handshake timeout, or the
            # per-peer bound), not left open as before (gRPC's default is two minutes)
            await wait_until(lambda: all(_closed_by_peer(s) for s in flood), timeout=30)
            assert count_connections(port).get("127.0.0.1", 0) <= PER_PEER
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()
            for sock in flood:
                sock.close()

    # the suite's loop, not asyncio.run: that would clear the thread's loop, which the
    # shared coordinator of the other security tests needs
    loop.run_until_complete(main())
    store = SqlStore.open(config.state_path)
    try:
        refused = [
            e
            for e in store.events_since(0, limit=100_000)
            if e.type == "security.refused" and e.data.get("rpc") == "connect"
        ]
    finally:
        store.close()
    assert refused, "the per-peer bound left no event"
    assert refused[0].data["peer"] == "127.0.0.1"
    assert f"over the bound of {PER_PEER} per peer" in refused[0].data["reason"]


def test_an_admin_at_a_full_coordinator_hears_overloaded_not_a_certificate_error(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    from flctl.cli._common import admin_client
    from flctl.core.errors import CertificateError, ConnectError

    generate_project_certs(tmp_path / "certs", ["c1"])
    shutil.copy(HERE / "tiny_task.py", tmp_path / "tiny_task.py")
    config = Project(tmp_path).write(
        server={"address": "127.0.0.1:0", "handshake_timeout_s": 60.0, "max_connections": 16}
    )
    held: list[socket.socket] = []

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        _, port = split_address(address)
        try:
            for _ in range(20):
                held.append(await asyncio.to_thread(_open, port))
            client = admin_client(config, address)
            try:
                with pytest.raises(ConnectError, match="overloaded") as caught:
                    await client.status([])
                assert not isinstance(caught.value, CertificateError)
                assert caught.value.exit_code == 31
            finally:
                await client.close()
            for sock in held:  # room again: the same admin certificate works
                sock.close()
            held.clear()
            client = admin_client(config, address)
            try:
                await wait_until(lambda: count_connections(port).get("127.0.0.1", 0) < 4)
                assert (await client.status([])).head_version == 1
            finally:
                await client.close()
        finally:
            await coordinator.stop()
            for sock in held:
                sock.close()

    # the suite's loop, not asyncio.run: that would clear the thread's loop, which the
    # shared coordinator of the other security tests needs
    loop.run_until_complete(main())
