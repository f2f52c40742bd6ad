"""A coordinator killed with SIGKILL in the middle of an upload, then started again.

The round that was open resumes (same tasks, same deadline), the client's task comes back on
its new task stream, and the upload carries on from the bytes the first process had written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest
import torch

from flctl.client import ClientCache, fetch_blob
from flctl.security import load_credentials
from flctl.tensors import fingerprint, load_parameters, save_parameters, spec_of
from flctl.transport.grpc import (
    PROTOCOL_VERSION,
    AdminClient,
    CoordinatorClient,
    pb,
    secure_channel,
)

from .conftest import Processes, certs_gen, flctl, serve, wait_for

pytestmark = pytest.mark.timeout(240)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"
FEATURES = 20000
CONFIG = f"""
[project]
task = "tiny_task.py"
seed = 1

[server]
heartbeat_interval_s = 0.5

[rounds]
min_clients = 1
deadline_s = 120.0
quorum_timeout_s = 60.0

[transport]
max_chunk_bytes = 4096

[task]
in_features = {FEATURES}
"""


def _channel(proj: Path, identity: str, address: str):  # noqa: ANN202
    cert, key, ca = load_credentials(proj / "certs", identity)
    return secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca)


async def _join(proj: Path, address: str) -> tuple[CoordinatorClient, AsyncIterator[pb.Task]]:
    api = CoordinatorClient(_channel(proj, "c1", address))
    spec = spec_of(torch.nn.Linear(FEATURES, 2).state_dict())
    await api.join(
        pb.JoinRequest(protocol_version=PROTOCOL_VERSION, task_fingerprint=fingerprint(spec))
    )
    return api, api.tasks()


async def _round_task(tasks: AsyncIterator[pb.Task], admin: AdminClient) -> pb.Task:
    """Start one round and return the joined client's task for it."""
    first = asyncio.ensure_future(anext(tasks))
    await asyncio.sleep(0.5)  # the task stream is open: the client can be selected
    await admin.start_round(1)
    return await asyncio.wait_for(first, 60)


async def _update(
    api: CoordinatorClient, task: pb.Task, folder: Path
) -> tuple[pb.UploadHeader, bytes]:
    """The task's model, every value nudged by 0.01: the update's header and bytes."""
    model = await fetch_blob(api, ClientCache(folder / "cache"), task.model_digest)
    nudged = {n: t + 0.01 for n, t in load_parameters(model).items()}
    save_parameters(nudged, folder / "update")
    data = (folder / "update").read_bytes()
    header = pb.UploadHeader(
        server_round=task.server_round,
        task_id=task.task_id,
        num_examples=10,
        digest=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    return header, data


async def _pieces(data: bytes, hang: bool = False) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]
    if hang:
        await asyncio.Event().wait()


def test_sigkill_mid_upload_then_restart_resumes_the_round_and_the_upload(
    tmp_path: Path, processes: Processes
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(CONFIG)
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    pid, address = serve(processes, "coordinator", proj)
    uploads = proj / ".flctl" / "uploads"

    async def first_life() -> tuple[pb.Task, pb.UploadHeader, bytes, int]:
        api, tasks = await _join(proj, address)
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            task = await _round_task(tasks, admin)
            header, data = await _update(api, task, tmp_path)
            begun = await api.begin_upload(header)
            half = len(data) // 2
            first_part = header.__deepcopy__()
            first_part.upload_id = begun.upload_id
            call = asyncio.ensure_future(api.upload(first_part, _pieces(data[:half], hang=True)))
            part = uploads / f"{begun.upload_id}.part"
            for _ in range(600):
                if part.exists() and part.stat().st_size >= half - 16384:
                    break
                await asyncio.sleep(0.05)
            held = part.stat().st_size
            assert 0 < held <= half
            os.kill(pid, signal.SIGKILL)  # no clean-up of any kind
            with pytest.raises(BaseException):  # noqa: B017,PT011 - the connection is gone
                await asyncio.wait_for(call, 30)
            return task, header, data, held
        finally:
            await admin.close()
            await api.close()

    task, header, data, held = asyncio.run(first_life())
    assert processes.procs["coordinator"].wait(30) == -signal.SIGKILL
    pid, address = serve(processes, "coordinator-2", proj)

    async def second_life() -> dict:  # type: ignore[type-arg]
        api, tasks = await _join(proj, address)
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            again = await asyncio.wait_for(anext(tasks), 60)  # the resumed round's task
            assert (again.server_round, again.task_id) == (task.server_round, task.task_id)
            begun = await api.begin_upload(header)
            assert begun.accepted and begun.committed_offset == held
            rest = header.__deepcopy__()
            rest.upload_id, rest.offset = begun.upload_id, held
            reply = await api.upload(rest, _pieces(data[held:]))
            assert reply.accepted, reply.reason
            for _ in range(600):
                status = await admin.status([task.server_round])
                if status.rounds[0].status in ("committed", "failed"):
                    break
                await asyncio.sleep(0.1)
            events = [e async for e in admin.watch(0, follow=False)]
            return {
                "status": status.rounds[0].status,
                "reason": status.rounds[0].reason,
                "types": [e.type for e in events],
            }
        finally:
            await admin.close()
            await api.close()

    result = asyncio.run(second_life())
    assert result["status"] == "committed", result["reason"]
    assert "round.resumed" in result["types"] and "upload.resumed" in result["types"]
    assert list(uploads.iterdir()) == []
    assert processes.stop("coordinator-2") == 0


def test_a_rollback_deferred_behind_a_round_survives_sigkill(
    tmp_path: Path, processes: Processes
) -> None:
    """Asked for while a round runs, then the coordinator is killed: applied after restart."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(CONFIG)
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    # a first life writes version 1; an imported version 2 (not head) is the rollback target
    serve(processes, "coordinator", proj)
    assert processes.stop("coordinator") == 0
    flctl("models", "export", "1", "-o", str(tmp_path / "v1.safetensors"), cwd=proj, check=True)
    nudged = {n: t + 0.5 for n, t in load_parameters(tmp_path / "v1.safetensors").items()}
    save_parameters(nudged, tmp_path / "v2.safetensors")
    flctl("models", "import", str(tmp_path / "v2.safetensors"), cwd=proj, check=True)
    pid, address = serve(processes, "coordinator-2", proj)

    async def open_round() -> int:
        api, tasks = await _join(proj, address)
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            task = await _round_task(tasks, admin)  # the round is open; c1 never answers
            return int(task.server_round)
        finally:
            await admin.close()
            await api.close()

    server_round = asyncio.run(open_round())
    deferred = flctl("models", "rollback", "2", "--reason", "undo", "--json", cwd=proj)
    assert deferred.returncode == 0, deferred.stderr
    assert json.loads(deferred.stdout)["deferred"] is True
    os.kill(pid, signal.SIGKILL)
    assert processes.procs["coordinator-2"].wait(30) == -signal.SIGKILL
    _pid, address = serve(processes, "coordinator-3", proj)

    async def end_round() -> list[pb.Event]:
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            await admin.cancel_round([server_round], reason="test over")
            for _ in range(300):
                events = [e async for e in admin.watch(0, follow=False)]
                if any(e.type in ("model.rollback", "model.rollback_failed") for e in events):
                    return events
                await asyncio.sleep(0.1)
            raise AssertionError("the deferred rollback was never resolved")
        finally:
            await admin.close()

    events = asyncio.run(end_round())
    types = [e.type for e in events]
    assert "round.resumed" in types and "model.rollback_deferred" in types
    (applied,) = [e for e in events if e.type == "model.rollback"]
    data = json.loads(applied.data_json)
    assert (data["source"], data["author"], data["reason"]) == (2, "admin", "undo")
    ended = next(e for e in events if e.type == "round.cancelled")
    assert ended.seq < applied.seq
    listed = json.loads(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    assert listed["head"] == data["version"]
    assert processes.stop("coordinator-3") == 0


def test_a_round_killed_while_selecting_selects_again_after_restart(
    tmp_path: Path, processes: Processes
) -> None:
    """No task had gone out: the restarted coordinator selects again instead of failing it."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(CONFIG)
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    pid, address = serve(processes, "coordinator", proj)
    started = flctl("round", "start", "--json", cwd=proj, check=True)
    (server_round,) = json.loads(started.stdout)["round_ids"]

    def selecting() -> bool:  # read from the state database: a poll that starts no process
        database = proj / ".flctl" / "state.db"
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT status FROM rounds WHERE id = ?", (server_round,)).fetchone()
        return row is not None and row[0] == "selecting"

    wait_for(selecting, what="round selecting", timeout=60)  # no client: it waits for quorum
    os.kill(pid, signal.SIGKILL)
    assert processes.procs["coordinator"].wait(30) == -signal.SIGKILL
    _pid, address = serve(processes, "coordinator-2", proj)

    async def second_life() -> tuple[pb.Task, list[str]]:
        api, tasks = await _join(proj, address)
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            task = await asyncio.wait_for(anext(tasks), 60)
            await admin.cancel_round([server_round], reason="test over")
            events = [e async for e in admin.watch(0, follow=False)]
            return task, [e.type for e in events if e.server_round == server_round]
        finally:
            await admin.close()
            await api.close()

    task, types = asyncio.run(second_life())
    assert task.server_round == server_round
    assert "round.failed" not in types
    assert types.index("round.resumed") < types.index("round.started")
    assert processes.stop("coordinator-2") == 0


def test_a_resumed_round_waits_past_the_rejoin_grace_for_a_client_still_training(
    tmp_path: Path, processes: Processes
) -> None:
    """A client in a long fit when the coordinator died rejoins only after it: still counted.

    The grace (1 s here) is for a client whose connection drops; a resumed round waits for
    its selected clients until its deadline, until each is seen again.
    """
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(
        CONFIG.replace("deadline_s", "rejoin_grace_s = 1.0\ndeadline_s")
    )
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    pid, address = serve(processes, "coordinator", proj)

    async def first_life() -> pb.Task:
        api, tasks = await _join(proj, address)
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            task = await _round_task(tasks, admin)
            os.kill(pid, signal.SIGKILL)  # while the client "trains"
            return task
        finally:
            await admin.close()
            await api.close()

    task = asyncio.run(first_life())
    assert processes.procs["coordinator"].wait(30) == -signal.SIGKILL
    _pid, address = serve(processes, "coordinator-2", proj)

    async def second_life() -> tuple[str, str, list[str]]:
        admin = AdminClient(_channel(proj, "admin", address))
        try:
            # the client's fit goes on for 4 grace periods before it comes back
            await asyncio.sleep(4.0)
            status = await admin.status([task.server_round])
            assert status.rounds[0].status == "training", status.rounds[0].reason
            api, tasks = await _join(proj, address)
            try:
                again = await asyncio.wait_for(anext(tasks), 60)
                assert (again.server_round, again.task_id) == (task.server_round, task.task_id)
                header, data = await _update(api, task, tmp_path)
                reply = await api.upload(header, _pieces(data))
                assert reply.accepted, reply.reason
            finally:
                await api.close()
            for _ in range(600):
                status = await admin.status([task.server_round])
                if status.rounds[0].status in ("committed", "failed"):
                    break
                await asyncio.sleep(0.1)
            events = [e async for e in admin.watch(0, follow=False)]
            return status.rounds[0].status, status.rounds[0].reason, [e.type for e in events]
        finally:
            await admin.close()

    status, reason, types = asyncio.run(second_life())
    assert status == "committed", reason
    assert "round.resumed" in types and "round.failed" not in types
    assert processes.stop("coordinator-2") == 0
