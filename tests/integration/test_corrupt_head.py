"""A head model whose blob changed on disk is never served, and clients back off on one.

A real coordinator on 127.0.0.1:0 with mutual TLS, real clients with the tiny task, real
SQLite and blobs; the corruption is one flipped byte in the blob's file.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from flctl.coordinator import Coordinator
from flctl.store import SqlStore

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)


def _flip_a_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _events(coordinator: Coordinator, type_: str) -> list[Any]:
    assert coordinator.store is not None
    return [e for e in coordinator.store.events_since(0, limit=10_000) if e.type == type_]


def _store(coordinator: Coordinator) -> SqlStore:
    assert coordinator.store is not None
    return coordinator.store


async def _wait_rounds(client: Any, ids: list[int], timeout: float = 40.0) -> Any:
    async def done() -> bool:
        reply = await client.status(ids)
        return all(r.status in ("committed", "failed", "cancelled") for r in reply.rounds)

    await wait_until(done, timeout=timeout, step=0.1)
    return await client.status(ids)


def test_a_corrupt_head_is_refused_at_start_and_a_rollback_restores_service(
    project: Project,
) -> None:
    config = project.write()

    async def run_one_round() -> str:
        """Version 2 from one committed round; its digest."""
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            ids = list((await client.start_round(1)).round_ids)
            assert [r.status for r in (await _wait_rounds(client, ids)).rounds] == ["committed"]
            head = _store(coordinator).head()
            assert head is not None and head.version == 2
            return head.digest
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    async def main() -> None:
        digest = await run_one_round()
        _flip_a_byte(config.state_path / "blobs" / "sha256" / digest[:2] / digest[2:])

        coordinator = Coordinator(config)
        address = await coordinator.start()  # it serves, so that an admin can roll back
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        store = _store(coordinator)
        try:
            (corrupt,) = _events(coordinator, "model.corrupt")
            assert (corrupt.data["version"], corrupt.data["digest"]) == (2, digest)
            assert corrupt.data["rollback_to"] == 1
            reason = corrupt.data["reason"]
            assert digest in reason and "`flctl models rollback 1`" in reason

            # rounds are refused with that reason: none selects, none sends a task, none retries
            ids = list((await client.start_round(2)).round_ids)
            status = await _wait_rounds(client, ids)
            assert [(r.status, r.reason) for r in status.rounds] == [("failed", reason)] * 2
            assert [r.id for r in store.list_rounds()] == [1, *ids]
            assert not [e for e in _events(coordinator, "round.started") if e.server_round > 1]
            assert not [e for e in _events(coordinator, "task.sent") if e.server_round > 1]
            assert len(_events(coordinator, "model.corrupt")) == 1  # recorded once

            # rolling back to the intact version restores service (the round's aggregate
            # may be v2's weights again, bit for bit: its damaged blob is replaced, not reused)
            reply = await client.rollback("1", reason="v2's blob is corrupt")
            assert (reply.version, reply.source_version) == (3, 1)
            ids = list((await client.start_round(1)).round_ids)
            (info,) = (await _wait_rounds(client, ids)).rounds
            assert info.status == "committed", info.reason
            assert store.get_round(ids[0]).base_version == 3
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_a_client_backs_off_on_a_download_that_fails_its_digest_check(
    project: Project,
) -> None:
    # one client, a round that waits 6 s for it: the window in which its attempts are counted
    config = project.write(rounds={"min_clients": 1, "deadline_s": 6.0, "retries": 0})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        head = _store(coordinator).head()
        assert head is not None
        # corrupted on disk after the coordinator checked it: served, refused by the client
        _flip_a_byte(config.state_path / "blobs" / "sha256" / head.digest[:2] / head.digest[2:])
        seen: list[tuple[str, dict[str, Any]]] = []
        stop = asyncio.Event()
        runner = make_runner(config, address, "c1")
        runner._on_event = lambda kind, details: seen.append((kind, details))
        task = asyncio.create_task(runner.run(stop))
        client = admin(config, address)
        try:
            await wait_until(lambda: any(kind == "joined" for kind, _ in seen))
            ids = list((await client.start_round(1)).round_ids)
            (info,) = (await _wait_rounds(client, ids)).rounds
            assert info.status == "failed"
            mismatches = [
                d
                for kind, d in seen
                if kind == "reconnecting" and "does not match its digest" in d["reason"]
            ]
            joins = [kind for kind, _ in seen if kind == "joined"]
            # a few attempts, each after a longer wait; not one every few tenths of a second
            assert 1 <= len(mismatches) <= 5, mismatches
            assert len(joins) <= len(mismatches) + 1
            delays = [d["delay_s"] for d in mismatches]
            assert delays == sorted(delays) or len(delays) < 3
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
