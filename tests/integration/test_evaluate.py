"""Federated evaluation: rounds.evaluate = "clients" / "both" runs the clients' evaluate."""

from __future__ import annotations

import asyncio

import pytest

from flctl.coordinator import Coordinator
from flctl.core import load_task
from flctl.transport.grpc import from_value_map

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)


def _events(coordinator: Coordinator, type_: str) -> list:  # type: ignore[type-arg]
    return [e for e in coordinator.store.events_since(0, limit=10_000) if e.type == type_]


async def _one_round(project: Project, clients: list[str], **rounds: object):  # noqa: ANN202
    """Run one round with ``clients`` (partitions 0, 1, ...); return (round, model, events)."""
    task = rounds.pop("task", {})
    config = project.write(
        rounds={"evaluate_timeout_s": 30.0, **rounds},
        task={"lr": 0.1, **task},  # type: ignore[dict-item]
    )
    coordinator = Coordinator(config)
    address = await coordinator.start()
    stop = asyncio.Event()
    runners = [make_runner(config, address, c, partition=i) for i, c in enumerate(clients)]
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    client = admin(config, address)
    try:
        await wait_until(lambda: len(coordinator._registry.connected()) == len(clients))  # type: ignore[union-attr]
        await client.start_round(1)

        async def done() -> bool:
            reply = await client.status([1])
            return reply.rounds[0].status in ("committed", "failed", "rejected")

        await wait_until(done, timeout=60.0, step=0.1)
        info = (await client.status([1])).rounds[0]
        model = (await client.list_models()).models[0]
        events = {
            t: _events(coordinator, t)
            for t in ("evaluation.reported", "evaluation.failed", "task.sent")
        }
        return info, model, events
    finally:
        load_task(config.task_path).release_hung_clients()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        await coordinator.stop()


def test_clients_evaluate_and_their_weighted_metrics_are_the_rounds(project: Project) -> None:
    info, model, events = asyncio.run(_one_round(project, ["c1", "c2"], evaluate="clients"))
    assert info.status == "committed", info.reason
    assert info.reason == ""
    metrics = from_value_map(info.metrics)
    # c1 evaluates 8 held-out examples, c2 16: weighted by examples, not by client
    assert metrics["examples"] == pytest.approx((8 * 8 + 16 * 16) / 24)
    reported = {e.client_id: e.data for e in events["evaluation.reported"]}
    assert sorted(reported) == ["c1", "c2"]
    assert metrics["loss"] == pytest.approx(
        sum(d["loss"] * d["num_examples"] for d in reported.values()) / 24
    )
    assert metrics["accuracy"] == pytest.approx(
        sum(d["metrics"]["accuracy"] * d["num_examples"] for d in reported.values()) / 24
    )
    # the clients' evaluation is the round's: no server metric, no fit metric
    assert set(metrics) == {"loss", "accuracy", "examples"}
    # stored with the model version too, and evaluated that very model
    assert model.server_round == 1 and from_value_map(model.metrics) == metrics
    evaluate_tasks = [e for e in events["task.sent"] if e.data.get("kind") == "evaluate"]
    assert {e.data["model_digest"] for e in evaluate_tasks} == {model.digest}


def test_both_keeps_server_metrics_and_a_raising_evaluate_fails_only_its_own(
    project: Project,
) -> None:
    info, model, events = asyncio.run(
        _one_round(project, ["c1", "c2", "c3"], evaluate="both", task={"evaluate_raises": "c2"})
    )
    # the round commits with all three updates: c2's evaluate failed, not its fit
    assert info.status == "committed"
    assert info.num_clients == 3
    metrics = from_value_map(info.metrics)
    # the server's evaluation as with "server", the clients' beside it
    assert {"loss", "accuracy"} <= set(metrics)
    assert {"clients.loss", "clients.accuracy", "clients.examples"} <= set(metrics)
    # c1 (8 examples) and c3 (24) made the clients' aggregate; c2 did not
    assert metrics["clients.examples"] == pytest.approx((8 * 8 + 24 * 24) / 32)
    assert sorted(e.client_id for e in events["evaluation.reported"]) == ["c1", "c3"]
    (failed,) = events["evaluation.failed"]
    assert failed.client_id == "c2"
    assert failed.data["reason"].startswith(
        "evaluate raised RuntimeError: held-out split unreadable (tiny_task.py:"
    )
    # round status shows why (its reason), the round committed all the same
    assert "evaluation failed on 1 of 3 clients (c2: evaluate raised RuntimeError" in info.reason
    assert from_value_map(model.metrics) == metrics


def test_the_round_goes_on_without_an_evaluation_that_does_not_arrive(project: Project) -> None:
    info, _, events = asyncio.run(
        _one_round(
            project,
            ["c1", "c2"],
            evaluate="clients",
            evaluate_timeout_s=1.0,
            task={"evaluate_hang": "c2"},
        )
    )
    assert info.status == "committed"
    # c1's evaluation alone (8 examples) makes the round's metrics
    assert from_value_map(info.metrics)["examples"] == pytest.approx(8.0)
    (failed,) = events["evaluation.failed"]
    assert failed.client_id == "c2"
    assert failed.data["reason"] == "no evaluation within 1 s (rounds.evaluate_timeout_s)"
    assert "c2: no evaluation within 1 s" in info.reason
