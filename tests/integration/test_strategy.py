"""The strategy seam in a real round: configure_fit reaches the clients, state goes with models.

A test-only stateful strategy is registered as a built-in for the test: it counts the rounds
it aggregated, sends the count (and its parameter) to every client, and keeps the count in its
state. A real coordinator on 127.0.0.1 with mutual TLS and real clients run it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from flctl.aggregation import BUILTIN_STRATEGIES, FedAvg, Param, Strategy, WeightedUpdate
from flctl.cli._models import show_model
from flctl.client import Client
from flctl.coordinator import Coordinator
from flctl.store import BlobStore, SqlStore
from flctl.tensors import load_parameters

from .conftest import Config, Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)


class Counting(Strategy):
    """FedAvg that counts the rounds it aggregated, tells the clients, and keeps the count."""

    name = "test-counting"
    params = (Param("mu", 0.0, "sent to every client as proximal_mu", low=0.0),)

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.rounds = 0

    def configure_fit(
        self, server_round: int, clients: Sequence[str]
    ) -> dict[str, dict[str, bool | int | float | str]]:
        # lr also comes from [task]: the strategy's value wins
        return {c: {"proximal_mu": self.mu, "lr": 0.05, "seen": self.rounds} for c in clients}

    def aggregate(self, base: Path, updates: Sequence[WeightedUpdate], out: Path) -> None:
        FedAvg().aggregate(base, updates, out)
        self.rounds += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds": torch.tensor([self.rounds]), "momentum": torch.zeros(3, 2)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.rounds = int(state["rounds"].item())


@pytest.fixture(autouse=True)
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(BUILTIN_STRATEGIES, Counting.name, Counting)
    yield


def _recording(seen: list[tuple[str, dict[str, Any]]]) -> Any:
    def wrap(client: Client) -> Client:
        fit = client.fit

        def recorded(parameters: Any, config: dict[str, Any]) -> Any:
            seen.append((str(client.context.client_id), dict(config)))  # type: ignore[attr-defined]
            return fit(parameters, config)

        client.fit = recorded  # type: ignore[method-assign]
        return client

    return wrap


async def _rounds(config: Config, count: int, seen: list[tuple[str, dict[str, Any]]]) -> Any:
    """Start a coordinator and two clients, run ``count`` rounds (and rollbacks), stop."""
    coordinator = Coordinator(config)
    address = await coordinator.start()
    stop = asyncio.Event()
    runners = [
        make_runner(config, address, f"c{i}", partition=i - 1, wrap=_recording(seen))
        for i in (1, 2)
    ]
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    client = admin(config, address)
    try:
        await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
        yield coordinator, client
        ids = list((await client.start_round(count)).round_ids)

        async def done() -> bool:
            reply = await client.status(ids)
            return all(r.status in ("committed", "failed", "cancelled") for r in reply.rounds)

        await wait_until(done, timeout=60.0, step=0.1)
        status = await client.status(ids)
        assert [r.status for r in status.rounds] == ["committed"] * count, status
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await coordinator.stop()


def _state(config: Config, version: int) -> int | None:
    with SqlStore.open(config.state_path, read_only=True) as store:
        digest = store.get_model(version).state_digest
    if not digest:
        return None
    state = load_parameters(BlobStore(config.state_path / "blobs").path(digest))
    assert sorted(state) == ["momentum", "rounds"]
    return int(state["rounds"].item())


def test_fit_config_and_state_through_restart_and_rollback(project: Project) -> None:
    config = project.write(strategy={"name": "test-counting", "mu": 0.5})
    seen: list[tuple[str, dict[str, Any]]] = []

    async def session(count: int, rollback_to: str = "") -> int:
        loaded = -1
        async for coordinator, client in _rounds(config, count, seen):
            loaded = coordinator._engine.strategy.rounds  # type: ignore[union-attr]
            if rollback_to:
                await client.rollback(rollback_to, reason="test")
        return loaded

    # two rounds: the strategy's config reaches each client, its count moves on
    assert asyncio.run(session(2)) == 0
    by_round = sorted((c["server_round"], who, c["seen"]) for who, c in seen)
    assert by_round == [(1, "c1", 0), (1, "c2", 0), (2, "c1", 1), (2, "c2", 1)]
    assert all(c["proximal_mu"] == 0.5 and c["lr"] == 0.05 for _, c in seen)
    with SqlStore.open(config.state_path, read_only=True) as store:
        fit = store.get_round(2).fit_config
        assert fit == {c: {"proximal_mu": 0.5, "lr": 0.05, "seen": 1} for c in ("c1", "c2")}
        assert store.get_model(1).state_digest == ""
        assert store.get_model(3).config["strategy"] == {"name": "test-counting", "mu": 0.5}
    assert [_state(config, v) for v in (1, 2, 3)] == [None, 1, 2]

    # a restarted coordinator carries on from the head's state
    seen.clear()
    assert asyncio.run(session(1)) == 2
    assert sorted(c["seen"] for _, c in seen) == [2, 2]
    assert _state(config, 4) == 3

    # a rollback takes the state back with the weights
    seen.clear()
    asyncio.run(session(1, rollback_to="2"))
    with SqlStore.open(config.state_path, read_only=True) as store:
        back = store.get_model(5)
        assert (back.kind, back.source) == ("rollback", 2)
        assert back.state_digest == store.get_model(2).state_digest
    assert sorted(c["seen"] for _, c in seen) == [1, 1]
    assert _state(config, 6) == 2

    # models show lists the state's tensors
    doc = show_model(config, "6")
    assert doc["strategy"] == "test-counting"
    state = doc["strategy_state"]
    assert state["blob"] == "present"
    assert [(t["name"], t["shape"], t["dtype"]) for t in state["tensors"]] == [
        ("momentum", [3, 2], "F32"),
        ("rounds", [1], "I64"),
    ]
    assert show_model(config, "1")["strategy_state"] is None
