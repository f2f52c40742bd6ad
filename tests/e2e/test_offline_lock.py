"""Offline admin commands as concurrent subprocesses: they queue, and meet a starting coordinator.

Commands that change the state folder without a coordinator (``models tag``, ``rollback``,
``gc``) queue on ``.flctl/state.lock``; whether a coordinator runs is its own lock's answer
(``.flctl/coordinator.lock``, which names it) and its serve.json, never another command's lock.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flctl.core import COORDINATOR_LOCK, read_holder
from flctl.store import BlobStore, SqlStore

from .conftest import FLCTL, Processes, certs_gen, flctl, init_project, one_json, wait_for

pytestmark = [pytest.mark.timeout(300)]


def _store_with_three_versions(proj: Path) -> str:
    """Versions 1-3 (3 is head) and one blob nothing references; that blob's digest."""
    state = proj / ".flctl"
    blobs = BlobStore(state / "blobs")
    with SqlStore.open(state) as store:
        for version in (1, 2, 3):
            digest = blobs.put_bytes(f"weights of version {version}".encode())
            store.add_model(
                digest=digest,
                kind="initial" if version == 1 else "import",
                parent=None if version == 1 else version - 1,
                set_head=True,
                author="local",
            )
    return blobs.put_bytes(b"an orphan")


def test_ten_concurrent_offline_commands_all_succeed(tmp_path: Path) -> None:
    proj = init_project(tmp_path, "proj")
    orphan = _store_with_three_versions(proj)
    commands = [
        ("models", "tag", "1", "a"),
        ("models", "rollback", "1"),
        ("models", "gc"),
        ("models", "tag", "2", "b"),
        ("models", "rollback", "2"),
        ("models", "gc"),
        ("models", "tag", "3", "c"),
        ("models", "tag", "2", "e"),
        ("models", "gc"),
        ("models", "tag", "1", "d"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    running = [
        subprocess.Popen(
            [*FLCTL, *args, "--json"],
            cwd=proj,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in commands
    ]
    results = [
        (args, *proc.communicate(timeout=240), proc.returncode)
        for args, proc in zip(commands, running, strict=True)
    ]
    failed = [f"{' '.join(a)} exited {rc}: {out}{err}" for a, out, err, rc in results if rc != 0]
    assert not failed, "\n".join(failed)

    # every change landed, each once, recorded as made without a coordinator
    listing = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    models = {m["version"]: m for m in listing["models"]}
    assert sorted(models) == [1, 2, 3, 4, 5]
    rollbacks = sorted(models[v]["source"] for v in (4, 5))
    assert rollbacks == [1, 2]  # in either order: neither is ever the head's weights
    assert {(m["version"], tuple(sorted(m["tags"]))) for m in models.values() if m["tags"]} == {
        (1, ("a", "d")),
        (2, ("b", "e")),
        (3, ("c",)),
    }
    removed = [
        r["digest"] for a, out, _, _ in results if a[1] == "gc" for r in one_json(out)["removed"]
    ]
    assert removed == [orphan]  # one gc removed it; the others found nothing left
    with SqlStore.open(proj / ".flctl") as store:
        events = store.events_since(0)
    kinds = [e.type for e in events]
    assert kinds.count("model.rollback") == 2 and kinds.count("model.tagged") == 5
    assert {e.data["author"] for e in events if e.type.startswith("model.")} == {"local"}


def test_a_command_racing_a_starting_coordinator_goes_through_it(
    tmp_path: Path, processes: Processes
) -> None:
    proj = init_project(tmp_path, "proj")
    state = proj / ".flctl"
    certs_gen(proj, 0)
    # a first run creates the state store and the initial model
    processes.start("first", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj)
    wait_for((state / "serve.json").exists, what="serve.json", timeout=120)
    assert processes.stop("first") == 0
    assert not (state / "serve.json").exists()

    coordinator = processes.start(
        "coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj
    )

    def starting() -> bool:
        holder = read_holder(state / COORDINATOR_LOCK)
        return holder is not None and holder.pid == coordinator.pid

    # its lock names it at once; its serve.json comes once the task is loaded and it listens
    wait_for(starting, what="the coordinator holds its lock", timeout=120, step=0.02)
    if (state / "serve.json").exists():  # pragma: no cover - it loaded its task very fast
        pytest.skip("the coordinator listened before the command could start: no race to test")
    result = flctl("models", "tag", "1", "first", "--json", cwd=proj)
    assert result.returncode == 0, result.stdout + result.stderr
    assert one_json(result.stdout) == {"tag": "first", "version": 1, "previous": None}
    served = json.loads((state / "serve.json").read_text())
    assert served["pid"] == coordinator.pid

    # it went through the coordinator's Admin service: the admin is the author
    events = one_json(flctl("round", "watch", "--json", cwd=proj, check=True).stdout)["events"]
    [tagged] = [e for e in events if e["type"] == "model.tagged"]
    assert tagged["data"]["author"] == "admin"
    # gc cannot go through it: refused, naming the coordinator that really runs
    gc = flctl("models", "gc", "--json", cwd=proj)
    assert gc.returncode == 73
    assert one_json(gc.stdout)["error"]["message"] == (
        f"a coordinator is running (pid {coordinator.pid}, address {served['address']}): "
        "this change must go through it"
    )
    assert processes.stop("coordinator") == 0
