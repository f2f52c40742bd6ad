"""Changes made through a running coordinator's Admin service: revoke, rollback, tag.

A real coordinator on 127.0.0.1:0 with mutual TLS, real clients with the tiny task, real
SQLite and blobs; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from typing import Any

import pytest
import torch

from flctl.coordinator import Coordinator
from flctl.core import load_task
from flctl.core.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from flctl.security import generate_project_certs, identity_from_pem, load_credentials
from flctl.store import BlobStore, SqlStore, list_revocations, revoke
from flctl.tensors import load_parameters
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    CoordinatorClient,
    pb,
    secure_channel,
)

from .conftest import Project, admin, make_runner, wait_until

pytestmark = pytest.mark.timeout(120)


def _store(coordinator: Coordinator) -> SqlStore:
    assert coordinator.store is not None
    return coordinator.store


def _connected(coordinator: Coordinator) -> list[str]:
    registry = coordinator._registry
    assert registry is not None
    return [s.client_id for s in registry.connected()]


def _events(coordinator: Coordinator, type_: str) -> list[Any]:
    return [e for e in _store(coordinator).events_since(0, limit=10_000) if e.type == type_]


def _snapshot(coordinator: Coordinator) -> tuple[Any, ...]:
    """What a refusal must leave as it was: rounds, updates, models, head, blobs."""
    store = _store(coordinator)
    blobs = sorted(p.name for p in (coordinator.state_dir / "blobs").rglob("*") if p.is_file())
    rounds = store.list_rounds()
    updates = [store.updates_for_round(r.id) for r in rounds]
    return rounds, updates, store.list_models(), store.head(), blobs


def _client_api(config: Any, address: str, client_id: str) -> CoordinatorClient:
    cert, key, ca = load_credentials(config.certs_path, client_id)
    return CoordinatorClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))


def _join_request() -> pb.JoinRequest:
    return pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_fingerprint="x")


async def _wait_rounds(client: Any, ids: list[int], timeout: float = 40.0) -> Any:
    async def done() -> bool:
        reply = await client.status(ids)
        return all(r.status in ("committed", "failed", "cancelled") for r in reply.rounds)

    await wait_until(done, timeout=timeout, step=0.1)
    return await client.status(ids)


def test_revoke_ends_the_open_session_and_refuses_every_later_call(project: Project) -> None:
    config = project.write(rounds={"min_clients": 1})
    c2_serial = identity_from_pem((config.certs_path / "c2.crt").read_bytes()).serial

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = {
            cid: make_runner(config, address, cid, partition=i)
            for i, cid in enumerate(["c1", "c2", "c3"])
        }
        tasks = {cid: asyncio.create_task(r.run(stop)) for cid, r in runners.items()}
        client = admin(config, address)
        try:
            await wait_until(lambda: len(_connected(coordinator)) == 3)
            before = _snapshot(coordinator)

            reply = await client.revoke("c1", reason="lost laptop")
            assert (reply.identity, reply.serial, reply.author) == ("c1", "", "admin")
            assert reply.reason == "lost laptop" and not reply.already_revoked
            # its open task stream ends with the refusal: the join loop exits, it does not retry
            with pytest.raises(PermissionDeniedError, match="certificate of c1 is revoked"):
                await asyncio.wait_for(tasks["c1"], 15)
            assert "c1" not in _connected(coordinator)

            # a new call with its certificate is refused before anything else is looked at
            api = _client_api(config, address, "c1")
            try:
                with pytest.raises(PermissionDeniedError, match="certificate of c1 is revoked"):
                    await api.join(_join_request())
                with pytest.raises(PermissionDeniedError, match="certificate of c1 is revoked"):
                    await api.heartbeat(pb.HeartbeatRequest(state="idle"))
            finally:
                await api.close()
            assert _snapshot(coordinator) == before

            # recorded with the admin's identity, in the store and the event log
            (record,) = list_revocations(_store(coordinator))
            assert (record.identity, record.serial, record.author) == ("c1", None, "admin")
            (revoked,) = _events(coordinator, "identity.revoked")
            assert revoked.seq == reply.event_seq and revoked.client_id == "c1"
            assert revoked.data == {"serial": None, "reason": "lost laptop", "author": "admin"}
            refused = _events(coordinator, "security.refused")
            assert {e.data["rpc"] for e in refused} >= {"Tasks", "Join", "Heartbeat"}
            assert all(e.client_id == "c1" == e.data["identity"] for e in refused)
            assert all(e.data["reason"] == "identity revoked" for e in refused)
            # the runner left on the stream's refusal: the only Join refused is ours above
            assert [e.data["rpc"] for e in refused].count("Join") == 1
            left = [e for e in _events(coordinator, "client.left") if e.client_id == "c1"]
            assert left and left[0].data["reason"] == "revoked"

            # revoking again is recorded again, and says so
            again = await client.revoke("c1")
            assert again.already_revoked and again.event_seq > reply.event_seq

            # one certificate only: another serial leaves c2 alone; its own serial ends it
            other = await client.revoke("c2", serial=c2_serial + 1)
            assert other.serial == format(c2_serial + 1, "x") and not other.already_revoked
            await asyncio.sleep(0.3)
            assert "c2" in _connected(coordinator) and not tasks["c2"].done()
            await client.revoke("c2", serial=c2_serial)
            with pytest.raises(PermissionDeniedError, match="certificate of c2 is revoked"):
                await asyncio.wait_for(tasks["c2"], 15)
            serial_refusals = [
                e for e in _events(coordinator, "security.refused") if e.client_id == "c2"
            ]
            assert serial_refusals[0].data["reason"] == f"certificate serial {c2_serial:x} revoked"

            # bad requests change nothing
            with pytest.raises(InvalidInputError):
                await client.revoke("c3", reason="x" * 2000)
            bad = pb.RevokeRequest(identity="c3", serial="../12")
            with pytest.raises(InvalidInputError):
                await client._call(client._stub.Revoke, bad, 10.0)
            assert len(list_revocations(_store(coordinator))) == 4

            # the coordinator carries on with the client it still trusts
            assert _connected(coordinator) == ["c3"]
            ids = list((await client.start_round(1)).round_ids)
            (info,) = (await _wait_rounds(client, ids)).rounds
            assert info.status == "committed" and info.num_clients == 1
        finally:
            stop.set()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_revocations_in_the_store_are_enforced_from_the_start(project: Project) -> None:
    config = project.write()
    config.state_path.mkdir(parents=True, exist_ok=True)
    with SqlStore.open(config.state_path) as store:
        revoke(store, "c3", reason="left the consortium")
        revoke(store, "admin")  # a revoked operator is refused on the Admin service too

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        client = admin(config, address)
        try:
            with pytest.raises(PermissionDeniedError, match="certificate of c3 is revoked"):
                await asyncio.wait_for(make_runner(config, address, "c3").run(asyncio.Event()), 30)
            with pytest.raises(PermissionDeniedError, match="certificate of admin is revoked"):
                await client.status()
            rpcs = [(e.client_id, e.data["rpc"]) for e in _events(coordinator, "security.refused")]
            assert rpcs == [("c3", "Join"), ("admin", "Status")]
            assert _store(coordinator).list_clients() == []
        finally:
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_rollback_with_no_round_open_moves_head_and_the_next_round_starts_from_it(
    project: Project,
) -> None:
    config = project.write()

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        store = _store(coordinator)
        blobs = BlobStore(coordinator.state_dir / "blobs")
        try:
            await wait_until(lambda: len(_connected(coordinator)) == 2)
            ids = list((await client.start_round(2)).round_ids)
            status = await _wait_rounds(client, ids)
            assert [r.status for r in status.rounds] == ["committed"] * 2
            assert status.head_version == 3
            # each round's phases, from its events; left out when not asked for
            paged = await client.status(limit=2)
            assert all(
                {p.phase for p in r.phases} >= {"training", "aggregating"} for r in paged.rounds
            )
            assert all(p.seconds >= 0 for r in paged.rounds for p in r.phases)
            bare = await client.status(limit=2, phases=False)
            assert [len(r.phases) for r in bare.rounds] == [0, 0]
            v1 = store.get_model(1)

            reply = await client.rollback("1", reason="round 2 overfit")
            assert not reply.deferred
            assert (reply.version, reply.source_version, reply.previous_head) == (4, 1, 3)
            assert reply.digest == v1.digest
            head = store.head()
            assert head is not None and head.version == 4
            assert (head.kind, head.source, head.parent, head.author) == ("rollback", 1, 3, "admin")
            assert head.reason == "round 2 overfit"
            (event,) = _events(coordinator, "model.rollback")
            assert event.data == {
                "version": 4,
                "digest": v1.digest,
                "source": 1,
                "previous_head": 3,
                "author": "admin",
                "reason": "round 2 overfit",
            }

            # refusals: the head already holds those weights; an unknown version
            with pytest.raises(ConflictError, match="already holds the weights"):
                await client.rollback("1")
            with pytest.raises(NotFoundError):
                await client.rollback("99")

            # the next round starts from the rolled-back weights
            received = len(runners[0]._client.received)  # type: ignore[attr-defined]
            ids = list((await client.start_round(1)).round_ids)
            (info,) = (await _wait_rounds(client, ids)).rounds
            assert info.status == "committed"
            sent = [e for e in _events(coordinator, "task.sent") if e.server_round == ids[0]]
            assert {e.data["model_digest"] for e in sent} == {v1.digest}
            got = runners[0]._client.received[received]  # type: ignore[attr-defined]
            want = load_parameters(blobs.path(v1.digest))
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
            assert store.get_round(ids[0]).base_version == 4

            # tags through the coordinator, with the admin as author
            tag = await client.tag("1", "best")
            assert (tag.version, tag.name, tag.previous) == (1, "best", 0)
            with pytest.raises(ConflictError, match="already names version 1"):
                await client.tag("3", "best")
            moved = await client.tag("3", "best", force=True)
            assert (moved.version, moved.previous) == (3, 1)
            with pytest.raises(InvalidInputError):
                await client.tag("3", "head")
            assert store.resolve_model("best").version == 3
            assert [t.author for t in store.list_tags()] == ["admin"]
            tagged = _events(coordinator, "model.tagged")
            assert [(e.data["version"], e.data["previous"], e.data["author"]) for e in tagged] == [
                (1, None, "admin"),
                (3, 1, "admin"),
            ]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_rollback_during_an_open_round_is_applied_when_the_round_ends(project: Project) -> None:
    config = project.write(
        rounds={"min_clients": 2, "deadline_s": 30.0}, task={"hang_client": "c2"}
    )
    task_module = load_task(config.task_path)

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runners = [make_runner(config, address, f"c{i}", partition=i - 1) for i in (1, 2)]
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        client = admin(config, address)
        store = _store(coordinator)
        try:
            await wait_until(lambda: len(_connected(coordinator)) == 2)
            first = list((await client.start_round(1)).round_ids)
            engine = coordinator._engine
            assert engine is not None
            await wait_until(lambda: engine.open is not None)  # c2 hangs in fit: round 1 stays open
            v1 = store.get_model(1)

            reply = await client.rollback("1", reason="undo round 1")
            assert reply.deferred and reply.server_round == first[0]
            assert (reply.version, reply.source_version, reply.digest) == (0, 1, v1.digest)
            assert f"round {first[0]} is running" in reply.message
            assert store.head().version == 1  # type: ignore[union-attr]
            assert _events(coordinator, "model.rollback") == []
            (deferred,) = _events(coordinator, "model.rollback_deferred")
            assert deferred.data["author"] == "admin" and deferred.data["source"] == 1
            second = list((await client.start_round(1)).round_ids)

            task_module.release_hung_clients()
            status = await _wait_rounds(client, first + second)
            assert [r.status for r in status.rounds] == ["committed", "committed"]
            # round 1 made version 2; the rollback then made version 3 (v1's weights) the head,
            # and round 2 started from it
            v2, v3 = store.get_model(2), store.get_model(3)
            assert (v2.kind, v2.server_round) == ("aggregate", first[0])
            assert (v3.kind, v3.digest, v3.parent, v3.author) == ("rollback", v1.digest, 2, "admin")
            assert store.get_round(second[0]).base_version == 3
            sent = [e for e in _events(coordinator, "task.sent") if e.server_round == second[0]]
            assert {e.data["model_digest"] for e in sent} == {v1.digest}
            (applied,) = _events(coordinator, "model.rollback")
            committed = _events(coordinator, "round.committed")
            started = _events(coordinator, "round.started")
            assert committed[0].seq < applied.seq < started[1].seq
        finally:
            task_module.release_hung_clients()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_serve_warns_about_its_own_certificate_expiring(project: Project, caplog: Any) -> None:
    shutil.rmtree(project.root / "certs")
    generate_project_certs(project.root / "certs", ["c1"], days=5)
    config = project.write()

    async def main() -> None:
        coordinator = Coordinator(config)
        await coordinator.start()
        try:
            (warning,) = _events(coordinator, "coordinator.warning")
            assert 4 < warning.data["days_left"] < 5.1
            assert "expires in" in warning.data["message"]
            assert warning.data["certificate"].endswith("server.crt")
        finally:
            await coordinator.stop()

    with caplog.at_level("WARNING", logger="flctl.coordinator"):
        asyncio.run(main())
    assert any("certificate" in r.getMessage() for r in caplog.records)


def test_round_cancel_ends_the_running_round_and_queued_ones(project: Project) -> None:
    """Training (a client hangs): cancel it and the queue; both end cancelled, with the admin."""
    config = project.write(
        rounds={"min_clients": 1, "deadline_s": 60.0}, task={"hang_client": "c1"}
    )
    task_module = load_task(config.task_path)

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runner = asyncio.create_task(make_runner(config, address, "c1").run(stop))
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
            first, second = (await client.start_round(2)).round_ids
            await wait_until(lambda: coordinator._engine.open is not None)  # type: ignore[union-attr]
            with pytest.raises(NotFoundError):
                await client.cancel_round([999])
            reply = await client.cancel_round(queued=True, reason="wrong data")
            assert list(reply.cancelled) == [first, second]
            status = await _wait_rounds(client, [first, second])
            assert [r.status for r in status.rounds] == ["cancelled", "cancelled"]
            assert all(r.reason == "cancelled by admin: wrong data" for r in status.rounds)
            again = await client.cancel_round([first])
            assert list(again.cancelled) == [] and "already cancelled" in again.message
            store = coordinator.store
            assert store is not None
            assert store.head().version == 1  # type: ignore[union-attr]  # nothing committed
        finally:
            task_module.release_hung_clients()
            stop.set()
            with contextlib.suppress(Exception):
                await runner
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_status_explains_the_open_round(project: Project) -> None:
    """c1 reports, c2 hangs in training: status says so, and what the deadline will do."""
    config = project.write(
        rounds={"min_clients": 2, "deadline_s": 60.0}, task={"hang_client": "c2"}
    )
    task_module = load_task(config.task_path)

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
            (first,) = (await client.start_round(1)).round_ids

            async def explained() -> Any:
                reply = await client.status()
                o = reply.open_round
                states = {p.client_id: p.state for p in o.participants}
                return reply if states == {"c1": "reported", "c2": "training"} else None

            await wait_until(explained)
            reply = await client.status()
            o = reply.open_round
            assert o.server_round == first and o.min_clients == 2
            assert o.at_deadline == "fail: 1 of the 2 required updates so far"
            assert o.deadline_unix > reply.rounds[0].created_unix
            await client.cancel_round()
            await _wait_rounds(client, [first])
            assert not (await client.status()).HasField("open_round")
        finally:
            task_module.release_hung_clients()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.gather(*runners)
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_calls_beyond_an_identitys_rate_limit_are_refused(project: Project) -> None:
    config = project.write(server={"rate_limit_per_s": 1.0, "rate_limit_burst": 3})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        client = admin(config, address)
        try:
            for _ in range(3):
                await client.status()  # the burst
            with pytest.raises(ResourceExhaustedError, match="rate limit"):
                await client.status()
            with pytest.raises(ResourceExhaustedError):
                await client.list_models()  # every RPC draws from the same bucket
            store = coordinator.store
            assert store is not None
            refused = [e for e in store.events_since(0) if e.type == "security.refused"]
            assert len(refused) == 1  # one event per identity per second, not one per call
            assert refused[0].client_id == "admin" and "rate limit" in refused[0].data["reason"]
            await asyncio.sleep(1.1)  # the bucket refills
            await client.status()
        finally:
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_evict_ends_a_session_and_its_token_and_is_audited(project: Project) -> None:
    config = project.write(rounds={"min_clients": 1})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        stop = asyncio.Event()
        runner = make_runner(config, address, "c1", backoff_cap_s=0.5)
        task = asyncio.create_task(runner.run(stop))
        client = admin(config, address)
        try:
            await wait_until(lambda: len(coordinator._registry.connected()) == 1)  # type: ignore[union-attr]
            session = coordinator._registry.get("c1")  # type: ignore[union-attr]
            assert session is not None
            reply = await client.evict("c1", reason="maintenance")
            assert reply.evicted and "may join again" in reply.message
            assert not (await client.evict("nobody")).evicted
            store = coordinator.store
            assert store is not None
            evicted = [e for e in store.events_since(0) if e.type == "client.evicted"]
            assert evicted[0].client_id == "c1"
            assert evicted[0].data == {"admin": "admin", "reason": "maintenance"}
            # the client joins again by itself, with a new session
            await wait_until(
                lambda: (
                    (s := coordinator._registry.get("c1")) is not None  # type: ignore[union-attr]
                    and s.streaming
                    and s.session_id != session.session_id
                )
            )
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await task
            await client.close()
            await coordinator.stop()

    asyncio.run(main())


def test_status_lists_updates_within_the_reply_budget(project: Project) -> None:
    """The updates of the rounds asked for, newest first, until the reply's budget is spent.

    The smallest message limit (max_chunk_bytes 4096): round 2's 1000 rejected updates with
    long reasons are far over it, yet every reply gets through and says what it left out.
    """
    config = project.write(transport={"max_chunk_bytes": 4096})

    async def main() -> None:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        client = admin(config, address)
        try:
            # the round engine waits for a StartRound now: rounds queued below stay queued
            assert not (await client.status()).rounds
            store = _store(coordinator)
            first, second, third = store.create_rounds(3)
            for server_round, count in ((first, 5), (second, 1000), (third, 5)):
                for i in range(count):
                    update = store.add_update(
                        server_round=server_round,
                        client_id=f"c{i % 5 + 1}",
                        task_id=f"t{i}",
                        status="rejected" if server_round == second else "accepted",
                        reason=f"{i}: " + "x" * 290 if server_round == second else "",
                        num_examples=10,
                    )
                    if update.status == "accepted":
                        store.set_update_scores(update.id, {"l2": 1.5, "cosine": None})
                store.fail_round(server_round, "made by the test")
            (queued,) = store.create_rounds(1)  # not started: never the latest listed

            asked = await client.status([first, second, third])
            listed = {int(r.server_round): r for r in asked.rounds}
            assert all(r.updates_listed for r in asked.rounds)
            assert len(listed[third].updates) == 5 and not listed[third].updates_left_out
            kept = len(listed[second].updates)
            assert 0 < kept < 1000 and kept + listed[second].updates_left_out == 1000
            # the earliest, in arrival order
            assert [u.reason.split(":")[0] for u in listed[second].updates] == [
                str(i) for i in range(kept)
            ]
            # once the budget is spent, the older rounds' updates are all left out
            assert not listed[first].updates and listed[first].updates_left_out == 5
            assert asked.ByteSize() <= 4096 + 64 * 1024 - 4096

            (update,) = listed[third].updates[:1]
            assert update.HasField("scores") and update.scores.l2 == 1.5
            assert not update.scores.HasField("cosine")  # not computed: absent, not 0
            assert not update.scores.HasField("median_distance")

            latest = await client.status()
            assert [r.server_round for r in latest.rounds if r.updates_listed] == [third]
            assert [int(r.server_round) for r in latest.rounds] == [first, second, third, queued]
            assert len(latest.rounds[2].updates) == 5

            many = await client.status(list(range(1, 21)))  # 4 rounds exist
            assert [r.server_round for r in many.rounds] == [first, second, third, queued]

            # pages: the newest 2, then the 2 before them; the total counts every round
            page = await client.status(limit=2)
            assert [r.server_round for r in page.rounds] == [third, queued]
            assert page.rounds_total == 4
            page = await client.status(limit=2, before_round=third)
            assert [r.server_round for r in page.rounds] == [first, second]

            await client.start_round(1)  # round.queued: an admin event
            events = await client.list_events(limit=3, type_filter="round")
            assert "round.queued" in [e.type for e in events.events]
            assert all(e.type.startswith("round.") for e in events.events)
            audit = await client.list_events(type_filter="admin")
            assert [e.type for e in audit.events] == ["round.queued"]
            assert events.last_seq >= max(e.seq for e in events.events)
            assert [e.seq for e in events.events] == sorted(
                (e.seq for e in events.events), reverse=True
            )
        finally:
            await client.close()
            await coordinator.stop()

    asyncio.run(main())
