"""One coordinator per state folder; a starting one waits for an offline command's moment."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys

import pytest

import flctl.coordinator._coordinator as coordinator_module
from flctl.coordinator import Coordinator
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
        with (state / "coordinator.lock").open("a") as held:  # an offline `models rollback`
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            coordinator = Coordinator(config)
            starting = asyncio.create_task(coordinator.start())
            await asyncio.sleep(0.5)
            assert not starting.done()  # waiting for the lock, not refused
        address = await asyncio.wait_for(starting, 60)  # the command let go: it starts
        try:
            assert address.startswith("127.0.0.1:")
            assert json.loads((state / "serve.json").read_text())["pid"] == os.getpid()
        finally:
            await coordinator.stop()

    asyncio.run(main())


def test_a_lock_held_too_long_is_refused_with_what_holds_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = project.write()
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(coordinator_module, "LOCK_WAIT_S", 0.3)

    async def main() -> None:
        with (state / "coordinator.lock").open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ConflictError, match="another flctl command has held"):
                await Coordinator(config).start()

    asyncio.run(main())
