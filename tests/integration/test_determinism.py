"""The same seed gives the same federation: identical models, bit for bit, and metrics.

Two federations of the digits template run one after the other, each with its own state, over
real gRPC and mutual TLS. The clients of the second finish in the opposite order to those of
the first (each fit waits a little, longer for some clients), so the coordinator receives the
updates in another order. With ``[strategy] incremental = false`` the models it commits and the
metrics it records must not change, bit for bit, whether the round's model was summed while
the updates uploaded (``streaming = true``, the default) or with every update read once the
round's wait ends (``streaming = false``): both sum in a fixed order. With incremental
aggregation (``incremental = true``: each update summed as it arrives) three updates summed in
another order may change the last bits of the mean: the models must agree within float32
rounding.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flctl.client import Client, ConfigValue, Metrics, Parameters, Runner
from flctl.coordinator import Coordinator
from flctl.core import Config
from flctl.store import SqlStore
from flctl.tensors import load_parameters

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "digits"
CLIENTS = ("c1", "c2", "c3")
ROUNDS = 2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as a client process has by default (client.num_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LateClient(Client):
    """A task's client whose fit returns only after ``delay_s``: it arrives when told to."""

    def __init__(self, inner: Client, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[Parameters, int, Metrics]:
        started = time.monotonic()
        result = self.inner.fit(parameters, config)
        time.sleep(max(0.0, self.delay_s - (time.monotonic() - started)))
        return result


def _project(root: Path, certs: Path, *, incremental: bool, streaming: bool = True) -> Config:
    root.mkdir()
    shutil.copytree(certs, root / "certs")
    shutil.copy(TEMPLATE / "task.py", root / "task.py")
    return Project(root).write(
        project={"task": "task.py", "seed": 7},
        rounds={"min_clients": len(CLIENTS), "deadline_s": 60.0, "quorum_timeout_s": 30.0},
        data={"num_partitions": len(CLIENTS)},
        task={"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        strategy={"name": "fedavg", "incremental": incremental, "streaming": streaming},
    )


def _runner(config: Config, address: str, client_id: str, delay_s: float) -> Runner:
    partition = CLIENTS.index(client_id)
    return make_runner(
        config,
        address,
        client_id,
        partition=partition,
        wrap=lambda client: LateClient(client, delay_s),
    )


def _federate(config: Config, delays: dict[str, float]) -> tuple[list[dict[str, float]], list[str]]:
    """Run ROUNDS rounds; return each round's metrics and every model's digest, oldest first."""

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [_runner(config, address, c, delays[c]) for c in CLIENTS]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            registry = coordinator._registry
            assert registry is not None
            await wait_until(lambda: len(registry.connected()) == len(CLIENTS), timeout=60)
            reply = await client.start_round(ROUNDS)

            async def done() -> bool:
                status = await client.status(list(reply.round_ids))
                return all(r.status in ("committed", "failed") for r in status.rounds)

            await wait_until(done, timeout=120, step=0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    store = SqlStore.open(config.state_path)
    try:
        rounds = [store.get_round(r) for r in range(1, ROUNDS + 1)]
        assert [r.status for r in rounds] == ["committed"] * ROUNDS
        metrics = [dict(r.metrics) for r in rounds]
        # each round aggregated as [strategy] incremental and streaming say
        modes = [
            e.data["aggregation"]
            for e in store.events_since(0, limit=10_000)
            if e.type == "round.committed"
        ]
        if config.strategy.incremental:
            expected = "incremental"
        else:
            expected = "streamed" if config.strategy.streaming else "whole"
        assert modes == [expected] * ROUNDS
        digests = [m.digest for m in sorted(store.list_models(), key=lambda m: m.version)]
        head = store.head()
        assert head is not None and head.digest == digests[-1]
    finally:
        store.close()
    return metrics, digests


def test_the_same_seed_gives_the_same_models_whatever_order_updates_arrive_in(
    tmp_path: Path, certs_template: Path
) -> None:
    # summed while the updates upload, then every update read once the wait ends: the same
    # bits, whatever the order they arrived in
    first = _federate(
        _project(tmp_path / "first", certs_template, incremental=False),
        {"c1": 0.0, "c2": 0.4, "c3": 0.8},
    )
    second = _federate(
        _project(tmp_path / "second", certs_template, incremental=False, streaming=False),
        {"c1": 0.8, "c2": 0.4, "c3": 0.0},
    )
    metrics, digests = first
    assert len(digests) == ROUNDS + 1  # the initial model and one per round
    assert set(metrics[0]) >= {"accuracy", "loss"}
    assert second == first


def test_incremental_aggregation_agrees_within_rounding_whatever_order_updates_arrive_in(
    tmp_path: Path, certs_template: Path
) -> None:
    configs = [_project(tmp_path / name, certs_template, incremental=True) for name in ("a", "b")]
    first = _federate(configs[0], {"c1": 0.0, "c2": 0.4, "c3": 0.8})
    second = _federate(configs[1], {"c1": 0.8, "c2": 0.4, "c3": 0.0})
    assert first[1][0] == second[1][0]  # the same initial model
    for a, b in zip(first[0], second[0], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), key
    heads = [
        load_parameters(config.state_path / "blobs" / "sha256" / d[-1][:2] / d[-1][2:])
        for config, d in zip(configs, (first[1], second[1]), strict=True)
    ]
    assert heads[0].keys() == heads[1].keys()
    for name in heads[0]:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=1e-5, atol=1e-6)
