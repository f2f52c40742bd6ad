"""Rounds end to end inside one process: real gRPC over mutual TLS, real SQLite and blobs."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from flctl.coordinator import Coordinator
from flctl.core import load_task
from flctl.core.errors import CertificateError, ProtocolMismatchError
from flctl.security import generate_project_certs, load_credentials
from flctl.store import BlobStore, SqlStore
from flctl.tensors import fingerprint, read_spec, sha256_file
from flctl.transport.grpc import PROTOCOL_VERSION, CoordinatorClient, pb, secure_channel

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)


async def _run_clients(runners, stop):  # noqa: ANN001, ANN202
    return [asyncio.create_task(r.run(stop)) for r in runners]


async def _wait_rounds(client, ids, timeout=60.0):  # noqa: ANN001, ANN202
    async def done() -> bool:
        reply = await client.status(ids)
        return all(r.status in ("committed", "failed", "cancelled") for r in reply.rounds)

    await wait_until(done, timeout=timeout, step=0.1)
    return await client.status(ids)


def test_three_rounds_commit_and_blobs_hash_to_digests(project: Project) -> None:
    config = project.write()

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = await _run_clients(runners, stop)
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            reply = await client.start_round(3)
            assert list(reply.round_ids) == [1, 2, 3]
            status = await _wait_rounds(client, list(reply.round_ids))
            assert [r.status for r in status.rounds] == ["committed"] * 3
            assert all(r.num_clients == 2 for r in status.rounds)
            assert status.head_version == 4
            assert 0.0 <= status.rounds[-1].metrics["accuracy"].double_value <= 1.0
            models = await client.list_models()
            assert [m.version for m in models.models] == [4, 3, 2, 1]
            assert [m.kind for m in models.models][-1] == "initial"
            # each round started from the previous round's model
            received = runners[0]._client.received  # type: ignore[attr-defined]
            assert len(received) == 3
            # the client's cache is bounded (client.cache_models = 2): the model of round 1
            # was removed before the model of round 3 was fetched
            by_version = {m.version: m.digest for m in models.models}
            cached = {p.name for p in (config.root / ".cache" / "c1" / "blobs").iterdir()}
            assert cached == {by_version[2], by_version[3]}
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    store = SqlStore.open(config.state_path)
    blobs = BlobStore(config.state_path / "blobs")
    try:
        models = store.list_models()
        assert len(models) == 4
        for m in models:
            assert sha256_file(blobs.path(m.digest)) == m.digest
        assert store.head().version == 4  # type: ignore[union-attr]
        assert store.updates_for_round(1, status="accepted")
        events = store.events_since(0, limit=10_000)
        types = [e.type for e in events]
        assert types.count("round.committed") == 3
        # each commit says how long the coordinator's own phases took (this project evaluates
        # on the server)
        for event in (e for e in events if e.type == "round.committed"):
            assert 0.0 < event.data["aggregate_s"] < event.data["duration_s"]
            assert 0.0 < event.data["evaluate_s"] < event.data["duration_s"]
        assert "coordinator.stopped" in types
    finally:
        store.close()


def test_client_from_another_ca_is_refused(project: Project, tmp_path: Path) -> None:
    config = project.write()
    rogue = tmp_path / "rogue"
    generate_project_certs(rogue, ["c1"])

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            runner = make_runner(config, address, "c1", backoff_cap_s=0.5)
            runner._options = runner._options.__class__(  # swap in the rogue identity
                **{
                    **runner._options.__dict__,
                    "cert_pem": (rogue / "c1.crt").read_bytes(),
                    "key_pem": (rogue / "c1.key").read_bytes(),
                }
            )
            with pytest.raises(CertificateError, match="refused the TLS handshake"):
                await asyncio.wait_for(runner.run(asyncio.Event()), 30)
            assert coordinator._registry.connected() == []  # type: ignore[union-attr]
        finally:
            await coordinator.stop()

    asyncio.run(main())


def test_model_mismatch_is_refused_with_what_differs(project: Project) -> None:
    config = project.write()
    other = project.root / "other_task.py"
    other.write_text(
        (project.root / "tiny_task.py")
        .read_text()
        .replace("torch.nn.Linear(_features(context), 2)", "torch.nn.Linear(_features(context), 3)")
    )

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            from dataclasses import replace

            from flctl.core import ProjectConfig

            runner = make_runner(
                replace(config, project=ProjectConfig(task="other_task.py", seed=1)), address, "c1"
            )
            with pytest.raises(
                ProtocolMismatchError, match=r"shape \[3, 4\] vs the coordinator's \[2, 4\]"
            ):
                await asyncio.wait_for(runner.run(asyncio.Event()), 30)
        finally:
            await coordinator.stop()

    asyncio.run(main())


@pytest.mark.parametrize("min_clients", [2, 1])
def test_vanished_client_fails_the_round_at_deadline_or_quorum_allows(
    project: Project, min_clients: int
) -> None:
    config = project.write(
        rounds={"min_clients": min_clients, "deadline_s": 2.0}, task={"hang_client": "c2"}
    )
    task_module = load_task(config.task_path)

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = await _run_clients(runners, stop)
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            reply = await client.start_round(1)
            status = await _wait_rounds(client, list(reply.round_ids), timeout=30)
            (info,) = status.rounds
            if min_clients == 2:
                assert info.status == "failed"
                assert "deadline passed with 1 of 2 required updates" in info.reason
                assert status.head_version == 1
            else:
                assert info.status == "committed"
                assert info.num_clients == 1
                assert status.head_version == 2
        finally:
            task_module.release_hung_clients()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_client_leaving_mid_round_ends_the_round_early(project: Project) -> None:
    """A selected client whose stream closes is waited for rejoin_grace_s, not the deadline."""
    config = project.write(
        rounds={"min_clients": 2, "deadline_s": 60.0, "rejoin_grace_s": 1.0},
        task={"hang_client": "c2"},
    )
    task_module = load_task(config.task_path)

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop1, stop2 = asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(make_runner(config, address, "c1").run(stop1))
        t2 = asyncio.create_task(make_runner(config, address, "c2", partition=1).run(stop2))
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 2)  # type: ignore[union-attr]
            reply = await client.start_round(1)
            await wait_until(lambda: coordinator._engine.open is not None)  # type: ignore[union-attr]
            await asyncio.sleep(0.3)
            stop2.set()  # c2 leaves while "training"
            status = await _wait_rounds(client, list(reply.round_ids), timeout=20)
            assert status.rounds[0].status == "failed"
            assert "selected clients left" in status.rounds[0].reason
        finally:
            task_module.release_hung_clients()
            stop1.set()
            stop2.set()
            with contextlib.suppress(Exception):
                await asyncio.gather(t1, t2)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_roles_are_enforced_both_ways(project: Project) -> None:
    from flctl.core.errors import PermissionDeniedError
    from flctl.security import load_credentials
    from flctl.transport.grpc import AdminClient, secure_channel

    config = project.write()

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            # a client certificate on the Admin service
            cert, key, ca = load_credentials(config.certs_path, "c1")
            rogue_admin = AdminClient(
                secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca)
            )
            with pytest.raises(
                PermissionDeniedError, match="client certificate may not call the Admin"
            ):
                await rogue_admin.start_round(1)
            await rogue_admin.close()
            # an admin certificate joining as a client: refused, the runner gives up at once
            runner = make_runner(config, address, "c1")
            cert, key, ca = load_credentials(config.certs_path, "admin")
            runner._options = runner._options.__class__(
                **{**runner._options.__dict__, "cert_pem": cert, "key_pem": key}
            )
            with pytest.raises(
                PermissionDeniedError, match="admin certificate may not call the Coordinator"
            ):
                await asyncio.wait_for(runner.run(asyncio.Event()), 30)
            store = coordinator.store
            assert store is not None and store.list_rounds() == []
        finally:
            await coordinator.stop()

    asyncio.run(main())


def test_client_started_first_waits_for_the_coordinator(project: Project) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = project.write(server={"address": f"127.0.0.1:{port}"}, rounds={"min_clients": 1})
    events: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        runner = make_runner(config, f"127.0.0.1:{port}", "c1", backoff_cap_s=0.5, once=True)
        runner._on_event = lambda kind, details: events.append(kind)
        task = asyncio.create_task(runner.run(stop))
        await wait_until(lambda: events.count("reconnecting") >= 2, timeout=20)
        coordinator = Coordinator(config)
        await coordinator.start()
        client = admin(config, coordinator.bound_address)
        try:
            await wait_until(lambda: "joined" in events, timeout=20)
            reply = await client.start_round(1)
            status = await _wait_rounds(client, list(reply.round_ids))
            assert status.rounds[0].status == "committed"
            assert await asyncio.wait_for(task, 20) == 1  # --once: leaves after one round
        finally:
            stop.set()
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
    assert events[-1] == "left"


def test_a_client_silent_past_the_heartbeat_timeout_is_dropped(project: Project) -> None:
    """Its task stream is still open, but it stopped heartbeating: offline, out of the round."""
    config = project.write(server={"heartbeat_timeout_s": 1.0}, rounds={"min_clients": 1})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        cert, key, ca = load_credentials(config.certs_path, "c1")
        api = CoordinatorClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))
        try:
            store = coordinator.store
            assert store is not None
            head = store.head()
            assert head is not None
            spec = read_spec(BlobStore(config.state_path / "blobs").path(head.digest))
            await api.join(
                pb.JoinRequest(
                    protocol_version=PROTOCOL_VERSION, task_fingerprint=fingerprint(spec)
                )
            )
            stream = api.tasks()
            pending = asyncio.ensure_future(anext(stream))
            await wait_until(lambda: len(coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
            # no heartbeat is ever sent: within a few seconds the session is ended
            await wait_until(
                lambda: any(e.type == "client.left" for e in store.events_since(0)), timeout=15
            )
            left = [e for e in store.events_since(0) if e.type == "client.left"]
            assert left[0].client_id == "c1" and "no heartbeat" in left[0].data["reason"]
            assert coordinator._registry.connected() == []  # type: ignore[union-attr]
            assert [c.state for c in store.list_clients()] == ["offline"]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pending, 5)  # the stream was ended by the coordinator
        finally:
            await api.close()
            await coordinator.stop()

    asyncio.run(main())


def test_over_selection_commits_with_the_first_n_to_report(project: Project) -> None:
    """Ask 2 + 1; c3 never finishes: the round commits with c1 and c2, without the deadline."""
    config = project.write(
        rounds={
            "min_clients": 2,
            "clients_per_round": 2,
            "over_selection": 1,
            "deadline_s": 120.0,
        },
        task={"hang_client": "c3"},
    )
    task_module = load_task(config.task_path)

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [
            asyncio.create_task(make_runner(config, address, c, partition=i).run(stop))
            for i, c in enumerate(["c1", "c2", "c3"])
        ]
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 3)  # type: ignore[union-attr]
            reply = await client.start_round(1)
            status = await _wait_rounds(client, list(reply.round_ids), timeout=60)
            assert status.rounds[0].status == "committed"
            assert status.rounds[0].num_clients == 2
            store = coordinator.store
            assert store is not None
            started = [e for e in store.events_since(0) if e.type == "round.started"]
            assert sorted(started[0].data["selected"]) == ["c1", "c2", "c3"]
            accepted = store.updates_for_round(reply.round_ids[0], status="accepted")
            assert sorted(u.client_id for u in accepted) == ["c1", "c2"]
        finally:
            task_module.release_hung_clients()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.gather(*runners)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_a_failed_round_is_retried_as_configured(project: Project) -> None:
    """rounds.retries = 1: the round that fails for lack of quorum is queued once more."""
    config = project.write(
        rounds={"min_clients": 2, "quorum_timeout_s": 0.5, "retries": 1},
    )

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        client = admin(config, address)
        try:
            reply = await client.start_round(1)
            (first,) = reply.round_ids
            store = coordinator.store
            assert store is not None
            await wait_until(
                lambda: [r.status for r in store.list_rounds()] == ["failed", "failed"],
                timeout=30,
            )
            second = store.list_rounds()[1]
            assert second.config["retry_of"] == first and second.config["attempt"] == 1
            queued = [e for e in store.events_since(0) if e.type == "round.queued"]
            assert [e.data.get("retry_of") for e in queued] == [None, first]
            await asyncio.sleep(1.0)
            assert len(store.list_rounds()) == 2  # retried once, not again
        finally:
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_admin_certificates_may_join_as_clients_only_when_configured(project: Project) -> None:
    """server.allow_admin_clients = true: an operator's admin certificate runs a client."""
    config = project.write(server={"allow_admin_clients": True}, rounds={"min_clients": 1})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        try:
            runner = make_runner(config, address, "c1", once=True)
            cert, key, _ = load_credentials(config.certs_path, "admin")
            runner._options = runner._options.__class__(
                **{**runner._options.__dict__, "cert_pem": cert, "key_pem": key}
            )
            run = asyncio.create_task(runner.run(asyncio.Event()))
            await wait_until(lambda: len(coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
            assert coordinator._registry.connected()[0].client_id == "admin"  # type: ignore[union-attr]
            client = admin(config, address)
            try:
                await client.start_round(1)
            finally:
                await client.close()
            assert await asyncio.wait_for(run, 60) == 1
            store = coordinator.store
            assert store is not None
            assert [u.client_id for u in store.updates_for_round(1, status="accepted")] == ["admin"]
        finally:
            await coordinator.stop()

    asyncio.run(main())
