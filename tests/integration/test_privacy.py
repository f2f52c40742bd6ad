"""Central DP-FedAvg end to end: the budget refuses the round that would exceed it."""

from __future__ import annotations

import asyncio
import math

import dp_accounting
import pytest

from flctl.cli._common import round_dict
from flctl.cli._rounds import rounds_exit_code
from flctl.coordinator import Coordinator
from flctl.privacy import epsilon
from flctl.store import SqlStore, ledger

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)

Z, DELTA, N, M = 1.5, 1e-5, 2, 2


def _epsilon(rounds: int) -> float:
    return epsilon(Z, rounds, DELTA, sampling="fixed", population=N, sample_size=M)


def test_budget_for_three_rounds_refuses_the_fourth(project: Project) -> None:
    three, four = _epsilon(3), _epsilon(4)
    assert three < four
    budget = (three + four) / 2
    config = project.write(
        privacy={
            "mode": "central",
            "clip_norm": 1.0,
            "noise_multiplier": Z,
            "target_delta": DELTA,
            "epsilon_budget": budget,
            "accountant": "rdp",
            "sampling": "fixed",
            "population": N,
            "sample_size": M,
        }
    )

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            reply = await client.start_round(4)
            ids = list(reply.round_ids)
            assert ids == [1, 2, 3, 4]

            async def done() -> bool:
                status = await client.status(ids)
                return all(r.status in ("committed", "failed", "cancelled") for r in status.rounds)

            await wait_until(done, timeout=90, step=0.1)
            status = await client.status(ids)
            assert [r.status for r in status.rounds] == ["committed"] * 3 + ["failed"]
            assert all(r.num_clients == 2 for r in status.rounds[:3])
            assert status.head_version == 4
            # `round start --wait` exits with BudgetExhaustedError's code (61)
            assert rounds_exit_code([round_dict(r) for r in status.rounds]) == 61
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    store = SqlStore.open(config.state_path)
    try:
        refused = store.get_round(4)
        assert refused.status == "failed"
        assert refused.reason.startswith(
            f"privacy budget exhausted: epsilon would reach {four:.6g} > budget {budget:g}"
        )
        head = store.head()
        assert head is not None and head.version == 4
        assert store.get_round(3).model_version == head.version
        rows = ledger(store)
        assert [r.round_id for r in rows] == [1, 2, 3]
        assert all(
            (r.mechanism, r.sampling, r.population, r.sample_size, r.epsilon_pld)
            == ("central", "fixed", N, M, None)
            for r in rows
        )
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            N, M, dp_accounting.GaussianDpEvent(Z)
        )
        reference = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        reference.compose(dp_accounting.SelfComposedDpEvent(event, 3))
        want = reference.get_epsilon(DELTA)
        assert math.isclose(rows[-1].epsilon_rdp, want, rel_tol=1e-9)
        assert rows[-1].epsilon_rdp <= budget
        events = store.events_since(0, limit=10_000)
        types = [e.type for e in events]
        assert types.count("privacy.refused") == 1
        assert types.count("round.committed") == 3
        # each charge is in the event log too, for round watch and the panels
        charged = [e for e in events if e.type == "privacy.charged"]
        assert [e.server_round for e in charged] == [r.round_id for r in rows]
        assert math.isclose(charged[-1].data["epsilon"], rows[-1].epsilon_rdp, rel_tol=1e-12)
        assert charged[-1].data["budget"] == budget
    finally:
        store.close()


def test_local_mode_rounds_fail_rather_than_run_without_noise(project: Project) -> None:
    config = project.write(
        privacy={"mode": "local", "noise_multiplier": 1.0, "epsilon_budget": 10.0}
    )

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        client = admin(config, address)
        try:
            reply = await client.start_round(1)
            ids = list(reply.round_ids)

            async def done() -> bool:
                status = await client.status(ids)
                return all(r.status in ("committed", "failed", "cancelled") for r in status.rounds)

            await wait_until(done, timeout=30, step=0.1)
            status = await client.status(ids)
            assert [r.status for r in status.rounds] == ["failed"]
            assert 'privacy.mode = "local" is not supported' in status.rounds[0].reason
            assert status.head_version == 1
        finally:
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    store = SqlStore.open(config.state_path)
    try:
        assert ledger(store) == []
    finally:
        store.close()


def test_poisson_sampling_is_charged_under_rdp_and_pld(project: Project) -> None:
    z, q = 2.0, 1.0  # q = 1: every connected client, so both clients take part
    one = epsilon(z, 1, DELTA, sampling_rate=q, accountant="pld")
    two = epsilon(z, 2, DELTA, sampling_rate=q, accountant="pld")
    config = project.write(
        privacy={
            "mode": "central",
            "clip_norm": 0.5,
            "noise_multiplier": z,
            "target_delta": DELTA,
            "epsilon_budget": (one + two) / 2,
            "accountant": "pld",
            "sampling": "poisson",
            "sampling_rate": q,
            "population": 2,
        }
    )

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            ids = list((await client.start_round(2)).round_ids)

            async def done() -> bool:
                status = await client.status(ids)
                return all(r.status in ("committed", "failed", "cancelled") for r in status.rounds)

            await wait_until(done, timeout=90, step=0.1)
            status = await client.status(ids)
            assert [r.status for r in status.rounds] == ["committed", "failed"]
            assert status.rounds[1].reason.startswith("privacy budget exhausted")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    store = SqlStore.open(config.state_path)
    try:
        (row,) = ledger(store)
        assert (row.round_id, row.sampling, row.sampling_rate, row.population) == (
            1,
            "poisson",
            1.0,
            None,
        )
        assert row.epsilon_pld == pytest.approx(one, rel=1e-9)
        assert row.epsilon_rdp == pytest.approx(epsilon(z, 1, DELTA, sampling_rate=q), rel=1e-9)
    finally:
        store.close()
