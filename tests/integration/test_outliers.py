"""Byzantine detection in real rounds: every accepted update scored, outliers flagged or dropped.

A real coordinator on 127.0.0.1 (mutual TLS) and five real clients of the tiny task, one of
which (c5) sign-flips its change and scales it by 5. One round per case: the scores are stored
with every update and emitted as ``update.scored``; with ``exclude_outliers = "flag"`` c5 is
recorded as an outlier and the aggregate is unchanged; with ``"drop"`` the aggregate is that of
the four others. The Admin service's Status reply carries the round's updates with the scores
and verdicts the store holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from flctl.aggregation import FedAvg, WeightedUpdate
from flctl.cli._scores import update_doc
from flctl.coordinator import Coordinator
from flctl.core import events as ev
from flctl.store import SqlStore, UpdateRecord
from flctl.tensors import load_parameters
from flctl.transport.grpc import pb

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(180)

CLIENTS = ["c1", "c2", "c3", "c4", "c5"]


def _stored_update(update: UpdateRecord) -> dict[str, Any]:
    return {
        "client_id": update.client_id,
        "status": update.status,
        "reason": update.reason,
        "num_examples": update.num_examples,
        "scores": update.scores,
        "outlier": update.outlier,
        "excluded": update.is_excluded,
    }


def _assert_status_lists_the_stored_updates(replies: list[pb.StatusReply], stored: Any) -> None:
    """Round 1's updates in each Status reply (asked for, and as the latest) are the store's."""
    for reply in replies:
        (info,) = reply.rounds
        assert info.server_round == 1 and info.updates_listed and not info.updates_left_out
        assert [update_doc(u) for u in info.updates] == [_stored_update(u) for u in stored]


def _run_round(project: Project, strategy: dict[str, Any]) -> tuple[SqlStore, Path, str]:
    config = project.write(
        rounds={"min_clients": 4, "deadline_s": 60.0, "quorum_timeout_s": 60.0},
        strategy=strategy,
        task={"lr": 0.1, "flip_client": "c5"},
    )

    async def main() -> str:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, c, partition=i) for i, c in enumerate(CLIENTS)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        try:
            registry = coordinator._registry
            assert registry is not None
            await wait_until(lambda: len(registry.connected()) == len(CLIENTS), timeout=60)
            reply = await client.start_round(1)

            async def ended() -> bool:
                status = await client.status(list(reply.round_ids))
                return all(r.status in ("committed", "failed") for r in status.rounds)

            await wait_until(ended, timeout=120, step=0.1)
            (info,) = (await client.status(list(reply.round_ids))).rounds
            store = coordinator.store
            assert store is not None
            # with exclude_outliers "off" the round commits without waiting for its scores:
            # they are taken just after it
            await wait_until(
                lambda: all(
                    u.scores is not None for u in store.updates_for_round(1, status="accepted")
                ),
                timeout=60,
            )
            replies = [await client.status(), await client.status([1])]
            _assert_status_lists_the_stored_updates(replies, store.updates_for_round(1))
            return f"{info.status}: {info.reason}"
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    outcome = asyncio.run(main())
    return SqlStore.open(config.state_path, read_only=True), config.state_path / "blobs", outcome


def _blob(blobs: Path, digest: str) -> Path:
    return blobs / "sha256" / digest[:2] / digest[2:]


@pytest.mark.parametrize("mode", ["off", "flag", "drop"])
def test_every_update_is_scored_and_the_flipped_one_is_flagged_or_dropped(
    project: Project, mode: str
) -> None:
    # incremental: the dropped update is subtracted from the round's running sum
    strategy: dict[str, Any] = {"name": "fedavg", "exclude_outliers": mode, "incremental": True}
    store, blobs, outcome = _run_round(project, strategy)
    try:
        assert outcome == "committed: "
        updates = {u.client_id: u for u in store.updates_for_round(1, status="accepted")}
        assert sorted(updates) == CLIENTS
        for update in updates.values():
            assert update.scores is not None and update.scores["l2"] > 0, update
            assert update.scores["median_distance"] is None  # fedavg: no median pass
        honest = [updates[c].scores["l2"] for c in CLIENTS[:4]]  # type: ignore[index]
        assert updates["c5"].scores["l2"] > 3 * max(honest)  # type: ignore[index]
        events = store.events_since(0, limit=10_000)
        scored = [e for e in events if e.type == ev.UPDATE_SCORED]
        assert sorted(e.client_id for e in scored) == CLIENTS
        excluded = [e for e in events if e.type == ev.UPDATE_EXCLUDED]
        marked = {c for c, u in updates.items() if u.outlier}
        if mode == "off":
            assert not excluded and not marked
        else:
            assert marked == {"c5"} and [e.client_id for e in excluded] == ["c5"]
            assert excluded[0].data["score"] == "l2" and excluded[0].data["mode"] == mode
            assert updates["c5"].is_excluded is (mode == "drop")
        (committed,) = [e for e in events if e.type == ev.ROUND_COMMITTED]
        assert committed.data["aggregation"] == "incremental"
        assert committed.data["num_clients"] == (4 if mode == "drop" else 5)
        head = store.head()
        assert head is not None
        model = load_parameters(_blob(blobs, head.digest))
        base = store.get_model(1)
        kept = CLIENTS[:4] if mode == "drop" else CLIENTS
        FedAvg().aggregate(
            _blob(blobs, base.digest),
            [
                WeightedUpdate(_blob(blobs, updates[c].digest), updates[c].num_examples, c)
                for c in kept
            ],
            blobs.parent / "expected.safetensors",
        )
        expected = load_parameters(blobs.parent / "expected.safetensors")
        for name, tensor in expected.items():
            torch.testing.assert_close(model[name], tensor, rtol=1e-5, atol=1e-6)
    finally:
        store.close()


def test_a_whole_round_strategy_scores_the_distance_to_the_median(project: Project) -> None:
    store, _, outcome = _run_round(project, {"name": "fedmedian", "exclude_outliers": "flag"})
    try:
        assert outcome == "committed: "
        updates = {u.client_id: u for u in store.updates_for_round(1, status="accepted")}
        distances = {c: u.scores["median_distance"] for c, u in updates.items() if u.scores}
        assert sorted(distances) == CLIENTS and all(d is not None for d in distances.values())
        assert distances["c5"] > 3 * max(distances[c] for c in CLIENTS[:4])  # type: ignore[operator]
        assert {c for c, u in updates.items() if u.outlier} == {"c5"}
        (committed,) = [
            e for e in store.events_since(0, limit=10_000) if e.type == ev.ROUND_COMMITTED
        ]
        assert committed.data["aggregation"] == "whole"
    finally:
        store.close()


@pytest.mark.parametrize(("mode", "aggregation"), [("flag", "streamed"), ("drop", "whole")])
def test_a_round_summed_while_uploading_is_used_only_if_it_took_those_updates(
    project: Project, mode: str, aggregation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Streaming (the default): flagging keeps the streamed model; dropping c5 discards it."""
    caplog.set_level("INFO", logger="flctl.coordinator")
    store, blobs, outcome = _run_round(project, {"name": "fedavg", "exclude_outliers": mode})
    try:
        assert outcome == "committed: "
        assert "aggregating while 5 updates upload" in caplog.text
        events = store.events_since(0, limit=10_000)
        (committed,) = [e for e in events if e.type == ev.ROUND_COMMITTED]
        assert committed.data["aggregation"] == aggregation
        if mode == "drop":
            assert "aggregating whole: the round took other updates" in caplog.text
        updates = {u.client_id: u for u in store.updates_for_round(1, status="accepted")}
        kept = CLIENTS[:4] if mode == "drop" else CLIENTS
        base = store.get_model(1)
        FedAvg().aggregate(
            _blob(blobs, base.digest),
            [
                WeightedUpdate(_blob(blobs, updates[c].digest), updates[c].num_examples, c)
                for c in kept
            ],
            blobs.parent / "expected.safetensors",
        )
        head = store.head()
        assert head is not None
        # the same bits as the whole-round pass over the updates the round took
        assert (
            _blob(blobs, head.digest).read_bytes()
            == (blobs.parent / "expected.safetensors").read_bytes()
        )
    finally:
        store.close()
