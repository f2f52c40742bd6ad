"""One client cannot own a round's aggregate by what it claims, nor loop on a refused update.

Real rounds over gRPC and mutual TLS, with honest clients of the tiny task beside a hostile one:

- a client claiming 2^40 examples for a model far from the others' weighs at most
  ``rounds.max_weight_share`` of the round, the aggregate stays near the honest average, and
  the clamp is in the event log;
- a client whose update the coordinator refuses (it claims 2^40 + 1 examples) does not send it
  again: the refusal is final for its task, the round ends without waiting for its deadline,
  and a new upload for the task is answered at once;
- a task whose fit returns more metrics than the coordinator accepts is reported failed, with
  the reason, and never uploaded.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from flctl.aggregation import cap_weights
from flctl.client import Client, ConfigValue, Metrics, Parameters, Runner
from flctl.coordinator import Coordinator
from flctl.coordinator import _coordinator as coordinator_module
from flctl.coordinator._service import CoordinatorService
from flctl.core import Config
from flctl.core import events as ev
from flctl.core.work import UploadHeader
from flctl.security import generate_project_certs
from flctl.store import BlobStore, SqlStore
from flctl.tensors import load_parameters
from flctl.transport.grpc import AdminClient, pb
from tests.integration.conftest import HERE, Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)

CLIENTS = ("c1", "c2", "c3")
#: What the hostile client claims: the upload header's old upper bound.
HOSTILE_CLAIM = 1 << 40
#: Examples each honest client of the tiny task trains on.
HONEST_EXAMPLES = 64


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Hostile(Client):
    """Trains honestly, then moves every weight by ``shift`` and claims ``claim`` examples."""

    def __init__(self, inner: Client, claim: int, shift: float) -> None:
        self.inner = inner
        self.claim = claim
        self.shift = shift

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[Parameters, int, Metrics]:
        state, _, metrics = self.inner.fit(parameters, config)
        return {k: v + self.shift for k, v in state.items()}, self.claim, metrics


class _Overclaiming(Client):
    """Claims more examples than any upload may (the coordinator refuses it), counts its fits."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner
        self.fits = 0

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[Parameters, int, Metrics]:
        self.fits += 1
        state, _, metrics = self.inner.fit(parameters, config)
        return state, (1 << 40) + 1, metrics


class _Held(Client):
    """Fits only once ``release`` is set (at most a minute)."""

    def __init__(self, inner: Client, release: threading.Event) -> None:
        self.inner = inner
        self.release = release

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[Parameters, int, Metrics]:
        self.release.wait(60)
        return self.inner.fit(parameters, config)


class _Talkative(Client):
    """Returns ``count`` metrics, one more than the coordinator accepts by default."""

    def __init__(self, inner: Client, count: int) -> None:
        self.inner = inner
        self.count = count
        self.fits = 0

    def get_parameters(self) -> Parameters:
        return self.inner.get_parameters()

    def fit(
        self, parameters: Parameters, config: dict[str, ConfigValue]
    ) -> tuple[Parameters, int, Metrics]:
        self.fits += 1
        state, count, _ = self.inner.fit(parameters, config)
        return state, count, {f"m{i}": float(i) for i in range(self.count)}


def _project(root: Path, **sections: dict[str, Any]) -> Config:
    generate_project_certs(root / "certs", list(CLIENTS))
    shutil.copy(HERE / "tiny_task.py", root / "tiny_task.py")
    rounds = {"min_clients": 2, "deadline_s": 60.0, "quorum_timeout_s": 60.0}
    return Project(root).write(
        rounds={**rounds, **sections.pop("rounds", {})}, data={"num_partitions": 3}, **sections
    )


Body = Callable[[Coordinator, AdminClient], Awaitable[None]]


def _federate(
    loop: asyncio.AbstractEventLoop,
    config: Config,
    wraps: dict[str, Callable[[Client], Client]],
    body: Body,
) -> list[Runner]:
    """Run ``body`` with c1, c2 and c3 connected (``wraps`` decorates some); return them."""
    runners: list[Runner] = []

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners.extend(
            make_runner(config, address, c, partition=i, wrap=wraps.get(c))
            for i, c in enumerate(CLIENTS)
        )
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            registry = coordinator._registry
            assert registry is not None
            await wait_until(lambda: len(registry.connected()) == len(CLIENTS), timeout=60)
            await body(coordinator, client)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    loop.run_until_complete(main())
    return runners


async def _one_round(client: AdminClient) -> pb.RoundInfo:
    return await _one_round_done(client, list((await client.start_round(1)).round_ids))


async def _one_round_done(client: AdminClient, ids: list[int]) -> pb.RoundInfo:
    async def done() -> bool:
        reply = await client.status(ids)
        return all(r.status in ev.TERMINAL_ROUND_STATUSES for r in reply.rounds)

    await wait_until(done, timeout=60, step=0.1)
    [info] = (await client.status(ids)).rounds
    return info


def _events(store: SqlStore, type_: str) -> list[ev.Event]:
    return [e for e in store.events_since(0, limit=100_000) if e.type == type_]


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def test_a_client_claiming_2_40_examples_holds_at_most_its_share(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    share = 0.4
    config = _project(tmp_path, rounds={"min_clients": 3, "max_weight_share": share})
    hostile = {"c3": lambda inner: _Hostile(inner, HOSTILE_CLAIM, shift=5.0)}

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        info = await _one_round(client)
        assert info.status == "committed", info.reason
        store = coordinator.store
        assert store is not None
        blobs = BlobStore(config.state_path / "blobs")
        updates = {u.client_id: u for u in store.updates_for_round(1, status="accepted")}
        assert updates["c3"].num_examples == HOSTILE_CLAIM  # kept as claimed, weighed less
        weights = cap_weights(
            [HONEST_EXAMPLES, HONEST_EXAMPLES, HOSTILE_CLAIM],
            max_examples=config.rounds.max_examples_per_update,
            max_share=share,
        )
        used = weights[2]

        [clamped] = _events(store, ev.UPDATE_CLAMPED)
        assert (clamped.server_round, clamped.client_id) == (1, "c3")
        assert clamped.data["claimed"] == HOSTILE_CLAIM and clamped.data["used"] == used
        assert clamped.data["bound"] == "max_weight_share"
        assert clamped.data["share"] <= share

        model = {c: _flat(load_parameters(blobs.path(u.digest))) for c, u in updates.items()}
        honest = (model["c1"] + model["c2"]) / 2  # the honest clients claim as many examples
        head = store.head()
        assert head is not None and head.server_round == 1
        aggregate = _flat(load_parameters(blobs.path(head.digest)))
        # the hostile update moved the aggregate by at most its capped share of its distance
        # (uncapped, by 2^40 / (2^40 + 128) of it: the aggregate was the hostile model)
        pulled = float((aggregate - honest).norm() / (model["c3"] - honest).norm())
        assert pulled == pytest.approx(used / sum(weights), abs=1e-4)
        assert pulled <= share

    _federate(loop, config, hostile, body)


def test_the_finite_gate_is_on_by_default(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """Finite updates whose average overflows: the aggregate is refused, the head stays."""
    config = _project(
        tmp_path, rounds={"min_clients": 3}, task={"sabotage_from_round": 1, "sabotage": "overflow"}
    )

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        info = await _one_round(client)
        assert info.status == "rejected"
        assert "non-finite" in info.reason
        store = coordinator.store
        assert store is not None
        head = store.head()
        assert head is not None and head.version == 1 and head.kind == "initial"
        [rejected] = _events(store, ev.MODEL_REJECTED)
        assert rejected.data["check"] == "finite"

    _federate(loop, config, {}, body)


def test_a_refused_update_is_final_for_its_task(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    """c3's update is refused once: not sent again, and the round stops waiting for it.

    c2 is held in its fit until the checks are done, so the round is still open for them.
    """
    config = _project(tmp_path, rounds={"min_clients": 2, "deadline_s": 3600.0})
    poisoned: list[_Overclaiming] = []
    held = threading.Event()

    def poison(inner: Client) -> Client:
        poisoned.append(_Overclaiming(inner))
        return poisoned[0]

    services: list[CoordinatorService] = []

    def capture(*args: Any, **kwargs: Any) -> CoordinatorService:
        services.append(CoordinatorService(*args, **kwargs))
        return services[-1]

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        store, engine = coordinator.store, coordinator._engine
        assert store is not None and engine is not None
        ids = list((await client.start_round(1)).round_ids)

        def refused() -> bool:
            return any(e.client_id == "c3" for e in _events(store, ev.UPDATE_REJECTED))

        await wait_until(refused, timeout=60)
        open_round = engine.open
        assert open_round is not None and open_round.server_round == ids[0]
        await wait_until(lambda: "c3" in open_round.refused)
        assert (
            open_round.refused["c3"]
            == f"num_examples must be between 1 and 2^40, not {(1 << 40) + 1}"
        )
        assert engine.task_for("c3") is None  # no task is sent again to a refused client
        # an upload for the refused task is answered at once, before any byte is read
        header = UploadHeader(
            server_round=ids[0],
            task_id=open_round.selected["c3"],
            digest="0" * 64,
            size=1,
            num_examples=1,
        )
        answer = services[0].intake._check_header(header, "c3")
        assert answer is not None and answer.startswith("refused: this task's update was refused")

        held.set()  # c2 reports; the round ends without waiting for c3 (an hour)
        info = await _one_round_done(client, ids)
        assert info.status == "committed", info.reason
        assert info.num_clients == 2
        # sent once, refused once, trained once: no loop of uploads, no rejoin
        assert len([e for e in _events(store, ev.UPDATE_REJECTED) if e.client_id == "c3"]) == 1
        assert len([e for e in _events(store, ev.CLIENT_JOINED) if e.client_id == "c3"]) == 1
        assert poisoned[0].fits == 1
        failed = [
            e
            for e in _events(store, ev.CLIENT_STATE)
            if e.client_id == "c3" and e.data["state"] == "failed"
        ]
        assert [e.data["reason"] for e in failed] == [
            f"the coordinator refused the update: {open_round.refused['c3']}"
        ]

    wraps = {"c2": lambda inner: _Held(inner, held), "c3": poison}
    try:
        with mock.patch.object(coordinator_module, "CoordinatorService", capture):
            runners = _federate(loop, config, wraps, body)
    finally:
        held.set()
    assert runners[2].rounds_done == 0


def test_too_many_metrics_fail_the_task_without_an_upload(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    config = _project(tmp_path, rounds={"min_clients": 2, "deadline_s": 3600.0})
    talkative: list[_Talkative] = []

    def wrap(inner: Client) -> Client:
        talkative.append(_Talkative(inner, 65))
        return talkative[0]

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        info = await _one_round(client)
        assert info.status == "committed", info.reason
        assert info.num_clients == 2
        store = coordinator.store
        assert store is not None
        # never uploaded: the coordinator refused nothing of c3's
        assert not [e for e in _events(store, ev.UPDATE_REJECTED) if e.client_id == "c3"]
        failed = [
            e
            for e in _events(store, ev.CLIENT_STATE)
            if e.client_id == "c3" and e.data["state"] == "failed"
        ]
        assert len(failed) == 1
        assert (
            failed[0]
            .data["reason"]
            .startswith("fit returned 65 metrics, more than the coordinator accepts (64)")
        )
        assert talkative[0].fits == 1

    _federate(loop, config, {"c3": wrap}, body)
