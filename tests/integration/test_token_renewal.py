"""Session tokens are renewed before they expire: no false refusals, no rejoin, rounds commit."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from flctl.coordinator import Coordinator
from flctl.store import SqlStore

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)

#: Shorter than flctl.toml allows (10 s), so that the test spans several lifetimes quickly.
TOKEN_TTL_S = 2.0


def test_clients_renew_their_token_across_several_lifetimes(project: Project) -> None:
    # rounds of a fraction of a second: a few heartbeats each, far from the rate limit
    config = project.write(server={"heartbeat_interval_s": 0.5}, task={"fit_sleep_s": 0.3})
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, token_ttl_s=TOKEN_TTL_S)
    )
    runners = [make_runner(config, "", f"c{i}", partition=i - 1) for i in (1, 2)]

    async def main() -> list[str]:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        for runner in runners:
            runner._options = dataclasses.replace(runner._options, server=address)
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        statuses: list[str] = []
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            started = time.monotonic()
            # one round after another until four token lifetimes have passed: each round
            # downloads the new model and uploads an update with the session's current token
            while time.monotonic() - started < 4 * TOKEN_TTL_S or len(statuses) < 3:
                (server_round,) = (await client.start_round(1)).round_ids

                async def ended(server_round: int = server_round) -> bool:
                    (record,) = (await client.status([server_round])).rounds
                    return record.status in ("committed", "failed", "cancelled")

                await wait_until(ended, timeout=60.0, step=0.1)
                (record,) = (await client.status([server_round])).rounds
                statuses.append(record.status)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()
        return statuses

    statuses = asyncio.run(main())
    assert statuses == ["committed"] * len(statuses)
    assert all(r.tokens_renewed >= 3 for r in runners), [r.tokens_renewed for r in runners]
    store = SqlStore.open(config.state_path)
    try:
        events = store.events_since(0, limit=100_000)
    finally:
        store.close()
    refused = [e.data for e in events if e.type == "security.refused"]
    assert refused == []
    # one session per client for the whole run: renewing kept it (no rejoin, no drop)
    joined = sorted(e.client_id for e in events if e.type == "client.joined")
    assert joined == ["c1", "c2"]
    last_commit = max(e.seq for e in events if e.type == "round.committed")
    left = [e.data for e in events if e.type == "client.left" and e.seq < last_commit]
    assert left == []
