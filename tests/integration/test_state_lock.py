"""One coordinator per state folder; offline commands queue on one lock and meet it truthfully.

A starting coordinator waits for an offline command's moment; an offline command waits for the
one before it, and for a starting coordinator's serve.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import flctl.cli._common as common
import flctl.coordinator._coordinator as coordinator_module
from flctl.cli._common import lock_or_running
from flctl.coordinator import Coordinator
from flctl.core import COORDINATOR_LOCK, STATE_LOCK, read_holder, try_lock
from flctl.core.errors import ConflictError

from .conftest import Project

pytestmark = pytest.mark.timeout(120)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid now (barring reuse within the test)


def test_a_second_coordinator_on_the_same_state_is_refused_at_once(project: Project) -> None:
    config = project.write()

    async def main() -> None:
        first = Coordinator(config)
        await first.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ConflictError, match="another coordinator holds"):
                await Coordinator(config).start()
            assert loop.time() - started < coordinator_module.LOCK_WAIT_S
        finally:
            await first.stop()

    asyncio.run(main())


def test_a_coordinator_waits_for_an_offline_command_holding_the_state(
    project: Project,
) -> None:
    config = project.write()
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    # what a coordinator killed with SIGKILL leaves: a serve.json naming a dead process
    (state / "serve.json").write_text(json.dumps({"pid": _dead_pid(), "address": "127.0.0.1:1"}))

    async def main() -> None:
        held = try_lock(state / STATE_LOCK, "models rollback")  # an offline command writes
        assert held is not None
        with held:
            coordinator = Coordinator(config)
            starting = asyncio.create_task(coordinator.start())
            await asyncio.sleep(0.5)
            assert not starting.done()  # waiting for the lock, not refused
        address = await asyncio.wait_for(starting, 60)  # the command let go: it starts
        try:
            assert address.startswith("127.0.0.1:")
            assert json.loads((state / "serve.json").read_text())["pid"] == os.getpid()
            holder = read_holder(state / COORDINATOR_LOCK)
            assert holder is not None and (holder.command, holder.pid) == ("serve", os.getpid())
        finally:
            await coordinator.stop()

    asyncio.run(main())


def test_a_lock_held_too_long_is_refused_with_what_holds_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = project.write()
    state = config.state_path
    monkeypatch.setattr(coordinator_module, "LOCK_WAIT_S", 0.3)

    async def main() -> None:
        held = try_lock(state / STATE_LOCK, "models gc")
        assert held is not None
        with held, pytest.raises(ConflictError) as info:
            await Coordinator(config).start()
        assert re.fullmatch(
            rf"another flctl command has held {re.escape(str(state))} for 0.3 s: "
            rf"flctl models gc \(pid {os.getpid()}, since \d\d:\d\d:\d\d\)",
            info.value.message,
        )

    asyncio.run(main())


# ------------------------------------------------------------- offline commands (lock_or_running)


def test_offline_writers_queue_on_one_lock_and_a_stuck_one_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / ".flctl"
    held = try_lock(state / STATE_LOCK, "models gc")
    assert held is not None
    monkeypatch.setattr(common, "LOCK_WAIT_S", 0.3)
    with held, pytest.raises(ConflictError) as info, lock_or_running(state, "models tag"):
        pytest.fail("entered while another command holds the state folder")
    assert re.fullmatch(
        rf"{re.escape(str(state))} is held by flctl models gc "
        rf"\(pid {os.getpid()}, since \d\d:\d\d:\d\d\); waited 0.3 s",
        info.value.message,
    )
    # once it lets go, the next writer holds the state folder: no coordinator, whatever a
    # stale serve.json says
    (state / "serve.json").write_text(json.dumps({"pid": _dead_pid(), "address": "127.0.0.1:1"}))
    with lock_or_running(state, "models tag") as running:
        assert running is None
        holder = read_holder(state / STATE_LOCK)
        assert holder is not None and (holder.command, holder.pid) == ("models tag", os.getpid())
        assert try_lock(state / STATE_LOCK) is None and try_lock(state / COORDINATOR_LOCK) is None
    after = try_lock(state / STATE_LOCK)
    assert after is not None
    after.close()


def test_a_command_meeting_a_starting_coordinator_waits_for_its_serve_file(
    tmp_path: Path,
) -> None:
    state = tmp_path / ".flctl"
    # an earlier coordinator's leftover, then one starting: its lock taken, no serve.json yet
    state.mkdir()
    (state / "serve.json").write_text(json.dumps({"pid": _dead_pid(), "address": "127.0.0.1:1"}))
    starting = try_lock(state / COORDINATOR_LOCK, "serve")
    assert starting is not None
    listening = {"pid": os.getpid(), "address": "127.0.0.1:7070", "insecure": False}

    def listen() -> None:
        time.sleep(0.5)
        (state / "serve.json").write_text(json.dumps(listening))

    thread = threading.Thread(target=listen)
    with starting:
        thread.start()
        try:
            with lock_or_running(state, "models tag") as running:
                assert running == listening  # go through its Admin service
                writer = try_lock(state / STATE_LOCK)  # other writers are not held up
                assert writer is not None
                writer.close()
        finally:
            thread.join()


def test_a_coordinator_that_never_listens_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / ".flctl"
    starting = try_lock(state / COORDINATOR_LOCK, "serve")
    assert starting is not None
    monkeypatch.setattr(common, "START_WAIT_S", 0.3)
    with starting, pytest.raises(ConflictError) as info, lock_or_running(state, "models gc"):
        pytest.fail("entered while a coordinator starts")
    assert f"a coordinator is starting in {state} (pid {os.getpid()}, starting since " in (
        info.value.message
    )
