"""SIGTERM on ``flctl serve``: the running round gets --drain-timeout to end, then exit 0."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest

from .conftest import Processes, certs_gen, flctl, wait_for

pytestmark = pytest.mark.timeout(240)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"


def _project(tmp_path: Path, task: str) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(
        f"""
[project]
task = "tiny_task.py"

[server]
heartbeat_interval_s = 0.5

[rounds]
min_clients = 1
deadline_s = 60.0

[task]
{task}
"""
    )
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    return proj


def _rounds(proj: Path) -> dict[int, tuple[str, str]]:
    with sqlite3.connect(f"file:{proj / '.flctl' / 'state.db'}?mode=ro", uri=True) as db:
        return {i: (s, r) for i, s, r in db.execute("SELECT id, status, reason FROM rounds")}


def _events(proj: Path) -> list[str]:
    with sqlite3.connect(f"file:{proj / '.flctl' / 'state.db'}?mode=ro", uri=True) as db:
        return [t for (t,) in db.execute("SELECT type FROM events ORDER BY seq")]


def _start(processes: Processes, proj: Path, *serve_args: str) -> str:
    processes.start(
        "coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", *serve_args, cwd=proj
    )
    serve_file = proj / ".flctl" / "serve.json"
    wait_for(serve_file.exists, what="serve.json", timeout=120)
    address = json.loads(serve_file.read_text())["address"]
    processes.start("c1", "join", "--server", address, "--client-id", "c1", cwd=proj)
    return address


def test_sigterm_lets_the_running_round_commit_and_keeps_the_queue(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path, "fit_sleep_s = 3.0")
    _start(processes, proj, "--drain-timeout", "60")
    flctl("round", "start", "--rounds", "2", cwd=proj, check=True)
    wait_for(lambda: _rounds(proj).get(1, ("",))[0] == "training", what="round 1 training")
    processes.procs["coordinator"].send_signal(signal.SIGTERM)
    assert processes.procs["coordinator"].wait(60) == 0
    rounds = _rounds(proj)
    assert rounds[1][0] == "committed"
    assert rounds[2][0] == "queued"  # not started while draining: the next start runs it
    events = _events(proj)
    assert events.index("coordinator.draining") < events.index("round.committed")
    assert events[-1] == "coordinator.stopped"
    assert not (proj / ".flctl" / "serve.json").exists()


def test_sigterm_fails_a_round_that_does_not_end_within_the_drain_timeout(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path, 'hang_client = "c1"')
    _start(processes, proj, "--drain-timeout", "1")
    flctl("round", "start", "--rounds", "1", cwd=proj, check=True)
    wait_for(lambda: _rounds(proj).get(1, ("",))[0] == "training", what="round 1 training")
    processes.procs["coordinator"].send_signal(signal.SIGTERM)
    assert processes.procs["coordinator"].wait(60) == 0
    status, reason = _rounds(proj)[1]
    assert status == "failed" and reason == "coordinator stopped"
    assert "coordinator.draining" in _events(proj)


def test_sigterm_while_a_round_waits_for_clients_says_so(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path, "")
    processes.start(
        "coordinator",
        "serve",
        "--address",
        "127.0.0.1:0",
        "--no-tui",
        "--drain-timeout",
        "1",
        cwd=proj,
    )
    wait_for((proj / ".flctl" / "serve.json").exists, what="serve.json", timeout=120)
    # no client joins: round 1 waits for its quorum
    flctl("round", "start", "--rounds", "2", cwd=proj, check=True)
    wait_for(lambda: _rounds(proj).get(1, ("",))[0] == "selecting", what="round 1 selecting")
    processes.procs["coordinator"].send_signal(signal.SIGTERM)
    assert processes.procs["coordinator"].wait(60) == 0
    rounds = _rounds(proj)
    status, reason = rounds[1]
    assert status == "failed"
    assert reason.startswith("coordinator stopped while waiting for clients: 0 connected"), reason
    assert rounds[2] == ("queued", "")  # the queue waits for the next start
