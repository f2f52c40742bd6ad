"""The validation gate and its rollback policy, with a real coordinator and real clients.

The tiny task's ``sabotage_from_round`` knob makes every client return finite but bad weights
from that round on (they pass the upload checks), so the aggregate is finite and the gate is
what keeps it from the head.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from flctl.cli._common import round_dict
from flctl.cli._rounds import rounds_exit_code
from flctl.coordinator import Coordinator
from flctl.core import Config
from flctl.core import events as ev
from flctl.store import SqlStore, ledger
from flctl.transport.grpc import AdminClient, pb
from flctl.tui import event_line

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)

Body = Callable[[Coordinator, AdminClient], Awaitable[None]]


def _federate(config: Config, body: Body) -> None:
    """Run ``body`` against a coordinator with clients c1 and c2 connected."""

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [
            asyncio.create_task(make_runner(config, address, c, partition=i).run(stop))
            for i, c in enumerate(["c1", "c2"])
        ]
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            await body(coordinator, client)
        finally:
            stop.set()
            await asyncio.gather(*runners, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


async def _run_rounds(client: AdminClient, count: int) -> list[pb.RoundInfo]:
    ids = list((await client.start_round(count)).round_ids)

    async def done() -> bool:
        reply = await client.status(ids)
        return all(r.status in ev.TERMINAL_ROUND_STATUSES for r in reply.rounds)

    await wait_until(done, timeout=60, step=0.1)
    return list((await client.status(ids)).rounds)


def _store(coordinator: Coordinator) -> SqlStore:
    store = coordinator.store
    assert store is not None
    return store


def _events(store: SqlStore, type_: str) -> list[Any]:
    return [e for e in store.events_since(0, limit=10_000) if e.type == type_]


def test_a_regressed_aggregate_is_stored_rejected_and_the_head_stays(project: Project) -> None:
    config = project.write(
        gate={"mode": "metric", "metric": "loss", "better": "lower", "max_regression": 1.0},
        task={"sabotage_from_round": 2, "sabotage": "invert"},
    )

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        rounds = await _run_rounds(client, 2)
        assert [r.status for r in rounds] == ["committed", "rejected"]
        assert rounds_exit_code([round_dict(r) for r in rounds]) == 83
        store = _store(coordinator)
        head = store.head()
        assert head is not None and head.version == 2  # round 1's model; round 2 did not move it
        rejected = store.get_model(3)
        assert (rejected.kind, rejected.status, rejected.server_round) == (
            "aggregate",
            "rejected",
            2,
        )
        assert (rejected.parent, rejected.author) == (2, "round")
        good, bad = store.get_model(2).metrics["loss"], rejected.metrics["loss"]
        assert bad > good + 1.0
        expected = (
            f"loss {bad:.4f} is {bad - good:.4f} worse than {good:.4f} of version 2 "
            "(the best version); max_regression is 1"
        )
        assert rejected.reason == expected
        assert rounds[1].reason == expected and rounds[1].model_version == 3
        assert [m.version for m in store.list_models(include_rejected=False)] == [2, 1]

        [event] = _events(store, ev.MODEL_REJECTED)
        assert event.server_round == 2
        assert {k: event.data[k] for k in ("version", "parent", "check", "metric")} == {
            "version": 3,
            "parent": 2,
            "check": "metric",
            "metric": "loss",
        }
        assert (event.data["value"], event.data["reference"]) == (bad, good)
        assert (event.data["reference_version"], event.data["against"]) == (2, "best")
        assert f"model v3 rejected by the validation gate: {expected}" in event_line(event)
        [ended] = _events(store, ev.ROUND_REJECTED)
        assert ended.data["model_version"] == 3 and ended.data["reason"] == expected
        assert "round 2 rejected: 2 clients" in event_line(ended)
        assert _events(store, ev.ROUND_COMMITTED)[-1].server_round == 1
        assert not _events(store, ev.MODEL_ROLLBACK)  # no policy configured

    _federate(config, body)


def test_non_finite_metrics_reject_the_round_instead_of_failing_it(project: Project) -> None:
    config = project.write(
        gate={"mode": "finite"},
        task={"sabotage_from_round": 2, "sabotage": "overflow"},
    )

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        rounds = await _run_rounds(client, 2)
        assert [r.status for r in rounds] == ["committed", "rejected"]
        assert rounds[1].reason == "evaluation returned non-finite metrics: loss"
        store = _store(coordinator)
        head = store.head()
        assert head is not None and head.version == 2
        rejected = store.get_model(3)
        assert rejected.is_rejected and rejected.reason == rounds[1].reason
        assert "loss" not in rejected.metrics  # NaN is not kept (JSON has none)
        [event] = _events(store, ev.MODEL_REJECTED)
        assert (event.data["check"], event.data["metric"], event.data["against"]) == (
            "finite",
            None,
            None,
        )

    _federate(config, body)


def test_the_policy_rolls_back_to_the_best_version_after_n_rejections(project: Project) -> None:
    """An operator rolls back to the untrained model; the rounds from it keep being rejected."""
    config = project.write(
        gate={
            "mode": "metric",
            "metric": "loss",
            "better": "lower",
            "max_regression": 1.0,
            "rollback_after": 2,
        },
        task={"sabotage_from_round": 2},
    )

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        assert [r.status for r in await _run_rounds(client, 1)] == ["committed"]
        await client.rollback("1", reason="start over")  # version 3, the initial weights
        store = _store(coordinator)

        rounds = await _run_rounds(client, 1)
        assert [r.status for r in rounds] == ["rejected"]  # version 4
        head = store.head()
        assert head is not None and head.version == 3  # one rejection: the policy waits

        rounds = await _run_rounds(client, 1)
        assert [r.status for r in rounds] == ["rejected"]  # version 5, then the policy acts
        head = store.head()
        assert head is not None and head.version == 6
        assert (head.kind, head.source, head.author) == ("rollback", 2, "policy")
        assert head.digest == store.get_model(2).digest
        assert head.reason.startswith(
            "rollback_after: 2 rounds in a row rejected by the validation gate (rounds 2, 3); "
            "version 2 has the best loss"
        )
        policy = [e for e in _events(store, ev.MODEL_ROLLBACK) if e.data["author"] == "policy"]
        assert [(e.data["source"], e.data["version"], e.data["previous_head"]) for e in policy] == [
            (2, 6, 3)
        ]
        assert "rolled back to v2: head is v6 (by policy)" in event_line(policy[0])

        # the next rejection starts a new streak: no second rollback after one more
        assert [r.status for r in await _run_rounds(client, 1)] == ["rejected"]
        head = store.head()
        assert head is not None and head.version == 6

    _federate(config, body)


def test_with_the_gate_off_a_regressed_aggregate_becomes_head(project: Project) -> None:
    """With the gate off (it checks finiteness by default), the same sabotaged round commits."""
    config = project.write(gate={"mode": "off"}, task={"sabotage_from_round": 2})

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        rounds = await _run_rounds(client, 2)
        assert [r.status for r in rounds] == ["committed", "committed"]
        head = _store(coordinator).head()
        assert head is not None and head.version == 3 and head.status == "ok"
        assert not _events(_store(coordinator), ev.MODEL_REJECTED)

    _federate(config, body)


def test_a_rejected_round_is_still_charged_to_the_privacy_ledger(project: Project) -> None:
    """Central DP: the noisy aggregate exists before the gate looks at it, so it is spent."""
    config = project.write(
        privacy={
            "mode": "central",
            "clip_norm": 1.0,
            "noise_multiplier": 1.5,
            "epsilon_budget": 100.0,
            "sampling": "fixed",
            "population": 2,
            "sample_size": 2,
        },
        # no evaluation produces "f1": every round is rejected, deterministically despite noise
        gate={"mode": "metric", "metric": "f1"},
    )

    async def body(coordinator: Coordinator, client: AdminClient) -> None:
        rounds = await _run_rounds(client, 1)
        assert [r.status for r in rounds] == ["rejected"]
        assert rounds[0].reason == (
            "the round's metrics have no 'f1' to check (it has: accuracy, loss)"
        )
        store = _store(coordinator)
        assert [r.round_id for r in ledger(store)] == [rounds[0].server_round]
        head = store.head()
        assert head is not None and head.version == 1
        types = [e.type for e in store.events_since(0, limit=10_000)]
        assert types.index(ev.PRIVACY_CHARGED) < types.index(ev.MODEL_REJECTED)

    _federate(config, body)
