"""DP-FedAvg end to end: central and local noise, adaptive clipping, budget refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import dp_accounting
import pytest
import torch

from flctl.cli._common import round_dict
from flctl.cli._rounds import rounds_exit_code
from flctl.client import Runner
from flctl.coordinator import Coordinator
from flctl.core import Config
from flctl.core.config import PrivacyConfig
from flctl.core.errors import ProtocolMismatchError
from flctl.privacy import Accountant, epsilon, local_round
from flctl.store import BlobStore, SqlStore, ledger
from flctl.tensors import UpdateEncoding, load_parameters, read_metadata

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


def _run_rounds(
    config: Config, count: int, runners: list[Runner], *, timeout: float = 90
) -> tuple[list[Any], list[BaseException | int]]:
    """Run ``count`` rounds with ``runners`` connected; return the rounds and how runners ended."""
    outcome: list[Any] = []
    ends: list[BaseException | int] = []

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        for runner in runners:
            runner._options = dataclasses.replace(runner._options, server=address)
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == len(runners))  # type: ignore[union-attr]
            ids = list((await client.start_round(count)).round_ids)

            async def done() -> bool:
                status = await client.status(ids)
                return all(r.status in ("committed", "failed", "cancelled") for r in status.rounds)

            await wait_until(done, timeout=timeout, step=0.1)
            outcome.extend((await client.status(ids)).rounds)
        finally:
            stop.set()
            ends.extend(await asyncio.gather(*tasks, return_exceptions=True))
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    return outcome, ends


def test_local_dp_job_averages_noised_deltas_and_charges_each_release(project: Project) -> None:
    z, clip = 4.0, 0.5
    two = Accountant(DELTA, [local_round(z)] * 2).epsilon("rdp")
    three = Accountant(DELTA, [local_round(z)] * 3).epsilon("rdp")
    config = project.write(
        privacy={
            "mode": "local",
            "clip_norm": clip,
            "noise_multiplier": z,
            "target_delta": DELTA,
            "epsilon_budget": (two + three) / 2,
        }
    )
    runners = [make_runner(config, "", f"c{i}", partition=i - 1) for i in (1, 2)]
    rounds, _ = _run_rounds(config, 3, runners)
    assert [r.status for r in rounds] == ["committed", "committed", "failed"]
    assert rounds[2].reason.startswith(f"privacy budget exhausted: epsilon would reach {three:.6g}")
    store = SqlStore.open(config.state_path)
    blobs = BlobStore(config.state_path / "blobs")
    try:
        rows = ledger(store)
        assert [r.round_id for r in rows] == [1, 2]
        assert all(
            (r.mechanism, r.noise_multiplier, r.sampling_rate, r.clip_norm)
            == ("local", z, 1.0, clip)
            for r in rows
        )
        # each client's release is a Gaussian of sensitivity 2C, composed over the rounds
        one = Accountant(DELTA, [local_round(z)]).epsilons()
        assert rows[0].epsilon_rdp == pytest.approx(one["rdp"], rel=1e-9)
        assert rows[0].epsilon_pld == pytest.approx(one["pld"], rel=1e-9)
        assert rows[1].epsilon_rdp == pytest.approx(two, rel=1e-9)
        # the uploads are deltas the clients clipped and noised; version 2 is base + their mean
        base = load_parameters(blobs.path(store.get_model(1).digest))
        new = load_parameters(blobs.path(store.get_model(2).digest))
        deltas = []
        for update in store.updates_for_round(1, status="accepted"):
            path = blobs.path(update.digest)
            assert UpdateEncoding.from_metadata(read_metadata(path)).encoding == "delta"
            deltas.append(load_parameters(path))
        assert len(deltas) == 2
        for name, tensor in base.items():
            mean = (deltas[0][name] + deltas[1][name]) / 2
            torch.testing.assert_close(new[name], tensor + mean, rtol=0, atol=1e-5)
        # noise of std z * C = 2 per coordinate: far beyond any clipped delta of norm 0.5
        noise = torch.cat([d.reshape(-1) for d in deltas[0].values()])
        assert float(noise.norm()) > 2 * clip
        charged = [e for e in store.events_since(0, limit=10_000) if e.type == "privacy.charged"]
        assert [e.data["mechanism"] for e in charged] == ["local", "local"]
    finally:
        store.close()


def test_a_client_refuses_a_coordinator_whose_privacy_mode_differs(project: Project) -> None:
    config = project.write(
        rounds={"min_clients": 1, "rejoin_grace_s": 0.2, "deadline_s": 20.0},
        privacy={
            "mode": "local",
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "target_delta": DELTA,
            "epsilon_budget": 1000.0,
        },
    )
    own = PrivacyConfig(mode="central", noise_multiplier=1.0, epsilon_budget=1.0)
    runners = [
        make_runner(config, "", "c1", partition=0),
        make_runner(config, "", "c2", partition=1, privacy=own),
    ]
    rounds, ends = _run_rounds(config, 1, runners)
    assert [r.status for r in rounds] == ["committed"]
    assert rounds[0].num_clients == 1
    assert isinstance(ends[1], ProtocolMismatchError)
    assert 'privacy.mode is "central" and the coordinator\'s is "local"' in ends[1].message
    store = SqlStore.open(config.state_path)
    try:
        assert [u.client_id for u in store.updates_for_round(1)] == ["c1"]
    finally:
        store.close()


def test_adaptive_clipping_moves_the_clip_norm_and_survives_a_restart(project: Project) -> None:
    # every update's norm is far above the starting clip norm: each round the noised fraction
    # of unclipped updates is about 0 (noise std 0.05 / 2 clients), below the target 0.5, so
    # the clip norm grows by about exp(0.2 * 0.5) a round
    z, stddev, start = 0.1, 0.1, 1e-6
    config = project.write(
        privacy={
            "mode": "central",
            "clip_norm": start,
            "adaptive_clip": True,
            "target_quantile": 0.5,
            "clip_learning_rate": 0.2,
            "clip_count_stddev": stddev,
            "noise_multiplier": z,
            "target_delta": DELTA,
            "epsilon_budget": 1e6,
            "sampling": "fixed",
            "population": N,
            "sample_size": M,
        }
    )
    for count in (2, 1):  # two rounds, then a restarted coordinator runs a third
        runners = [make_runner(config, "", f"c{i}", partition=i - 1) for i in (1, 2)]
        rounds, _ = _run_rounds(config, count, runners)
        assert [r.status for r in rounds] == ["committed"] * count
    store = SqlStore.open(config.state_path)
    try:
        rows = ledger(store)
    finally:
        store.close()
    assert [r.round_id for r in rows] == [1, 2, 3]
    assert rows[0].clip_norm == start
    for row, following in zip(rows, rows[1:], strict=False):
        assert following.clip_norm == row.next_clip_norm  # across the restart too
    for row in rows:
        assert row.unclipped_fraction is not None and row.next_clip_norm is not None
        assert abs(row.unclipped_fraction) < 0.5  # 10 noise stds from the target
        assert row.next_clip_norm > row.clip_norm
        assert row.next_clip_norm == pytest.approx(
            row.clip_norm * math.exp(-0.2 * (row.unclipped_fraction - 0.5)), rel=1e-12
        )
    # the count took its share of z: the ledger charges z itself, as one Gaussian mechanism
    want = epsilon(z, 3, DELTA, sampling="fixed", population=N, sample_size=M)
    assert rows[-1].noise_multiplier == z
    assert rows[-1].epsilon_rdp == pytest.approx(want, rel=1e-9)


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


def test_a_local_round_a_crash_interrupted_is_charged_at_the_next_start(
    project: Project,
) -> None:
    z = 2.0
    config = project.write(
        privacy={
            "mode": "local",
            "clip_norm": 1.0,
            "noise_multiplier": z,
            "target_delta": DELTA,
            "epsilon_budget": 100.0,
        }
    )

    async def start_and_stop() -> None:
        coordinator = Coordinator(config)
        await coordinator.start()
        await coordinator.stop()

    asyncio.run(start_and_stop())  # the initial model
    # what a killed coordinator leaves: a round in training with a noised update accepted
    store = SqlStore.open(config.state_path)
    try:
        (crashed, untouched) = store.create_rounds(2)
        for server_round, has_update in ((crashed, True), (untouched, False)):
            store.set_round_status(server_round, "selecting", started=time.time())
            store.set_round_status(
                server_round,
                "training",
                base_version=1,
                selected=["c1"],
                deadline=time.time() + 60,
                tasks={"c1": f"t{server_round}"},
            )
            if has_update:
                store.add_update(
                    server_round=server_round,
                    client_id="c1",
                    task_id=f"t{server_round}",
                    status="accepted",
                    digest="ab" * 32,
                    size=1,
                    num_examples=1,
                )
    finally:
        store.close()
    asyncio.run(start_and_stop())
    asyncio.run(start_and_stop())  # a second restart charges nothing twice
    store = SqlStore.open(config.state_path)
    try:
        assert store.get_round(crashed).status == "failed"
        assert store.get_round(untouched).status == "failed"
        (row,) = ledger(store)
        assert (row.round_id, row.mechanism, row.noise_multiplier) == (crashed, "local", z)
        assert row.epsilon_rdp == pytest.approx(
            Accountant(DELTA, [local_round(z)]).epsilon("rdp"), rel=1e-9
        )
    finally:
        store.close()
