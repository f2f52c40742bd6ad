"""Every built-in strategy runs real rounds through the round engine.

For each name in BUILTIN_STRATEGIES: a real coordinator on 127.0.0.1 (mutual TLS) and three
real clients of the tiny task run two rounds with ``[strategy] name = ...`` (its defaults):
both commit, and a strategy that keeps state has it stored with each committed version.
"""

from __future__ import annotations

import asyncio

import pytest

from flctl.aggregation import BUILTIN_STRATEGIES
from flctl.coordinator import Coordinator
from flctl.store import SqlStore

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)

CLIENTS = ["c1", "c2", "c3"]
#: the server optimizers: their moments (or momentum) and step count go with each model
STATEFUL = {"fedadam", "fedyogi", "fedadagrad", "fedavgm"}


@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_a_built_in_strategy_commits_real_rounds(project: Project, name: str) -> None:
    config = project.write(
        rounds={"min_clients": 3, "deadline_s": 60.0, "quorum_timeout_s": 60.0},
        strategy={"name": name},
    )

    async def main() -> list[str]:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, c, partition=i) for i, c in enumerate(CLIENTS)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            registry = coordinator._registry
            assert registry is not None
            await wait_until(lambda: len(registry.connected()) == 3, timeout=60)
            reply = await client.start_round(2)

            async def ended() -> bool:
                status = await client.status(list(reply.round_ids))
                return all(r.status in ("committed", "failed") for r in status.rounds)

            await wait_until(ended, timeout=120, step=0.1)
            status = await client.status(list(reply.round_ids))
            return [f"{r.status}: {r.reason}" for r in status.rounds]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    assert asyncio.run(main()) == ["committed: ", "committed: "]
    store = SqlStore.open(config.state_path, read_only=True)
    try:
        versions = sorted(store.list_models(), key=lambda m: m.version)
    finally:
        store.close()
    assert [m.kind for m in versions] == ["initial", "aggregate", "aggregate"]
    states = [m.state_digest for m in versions[1:]]
    if name in STATEFUL:
        assert all(states), f"{name} keeps state, but a committed version has none"
        assert states[0] != states[1]  # the state moved on with the second round
    else:
        assert states == ["", ""]
