"""Secure aggregation as a user runs it: `flctl simulate`, and `serve` + `join` through a crash."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from .conftest import Processes, flctl, one_json, wait_for

pytestmark = pytest.mark.timeout(300)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"


def _events(proj: Path, kind: str) -> list[dict[str, Any]]:
    result = flctl("events", "--type", kind, "--json", "--limit", "1000", cwd=proj, check=True)
    events: list[dict[str, Any]] = one_json(result.stdout)["events"]
    return events


def test_simulate_with_secure_aggregation_commits_each_round_from_masked_inputs(
    tmp_path: Path,
) -> None:
    flctl("init", "sim", cwd=tmp_path, check=True)
    proj = tmp_path / "sim"
    toml = proj / "flctl.toml"
    toml.write_text(toml.read_text() + "\n[secagg]\nenabled = true\nnum_shares = 2\n")
    result = flctl(
        "simulate", "--clients", "6", "--rounds", "2", "--per-round", "5", "--workers", "1",
        "--json", cwd=proj, check=True,
    )  # fmt: skip
    report = one_json(result.stdout)
    assert [r["status"] for r in report["rounds"]] == ["committed"] * 2
    assert all(r["num_clients"] == 5 for r in report["rounds"])
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in report["rounds"])
    committed = _events(proj, "round.committed")
    assert [e["data"]["aggregation"] for e in committed] == ["secure", "secure"]
    unmasked = _events(proj, "secagg.unmasked")
    assert len(unmasked) == 2 and all(len(e["data"]["survivors"]) == 5 for e in unmasked)
    started = _events(proj, "secagg.started")
    assert all(e["data"]["num_neighbours"] == 2 for e in started)  # SecAgg+: 2 of 4 others
    # every accepted update is a masked input, and the versions say how they were made
    accepted = _events(proj, "update.accepted")
    assert len(accepted) == 10
    shown = one_json(flctl("models", "show", "3", "--json", cwd=proj, check=True).stdout)
    assert shown["secure_aggregation"]["enabled"] is True
    assert shown["secure_aggregation"]["num_shares"] == 2
    text = flctl("models", "show", "3", cwd=proj, check=True).stdout
    assert "secure (SecAgg+" in text
    # no plaintext update is left in the simulation's folder
    assert list((proj / ".flctl" / "simulation" / "updates").iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(proj: Path, server: str, *rounds: int) -> dict[str, Any]:
    args = [a for r in rounds for a in ("--round", str(r))]
    result = flctl("round", "status", *args, "--server", server, "--json", cwd=proj)
    return one_json(result.stdout) if result.returncode == 0 else {}


def test_serve_and_join_a_coordinator_killed_mid_secagg_fails_that_round_and_the_next_runs(
    tmp_path: Path, processes: Processes
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    (proj / "flctl.toml").write_text(
        f"""
[project]
task = "tiny_task.py"
seed = 2

[server]
address = "{address}"
heartbeat_interval_s = 0.5

[rounds]
min_clients = 3
deadline_s = 60.0
quorum_timeout_s = 60.0

[secagg]
enabled = true
stage_timeout_s = 10.0

[task]
fit_sleep_s = 3.0
"""
    )
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    flctl("certs", "gen", "--clients", "3", cwd=proj, check=True)
    first = processes.start("coordinator", "serve", "--no-tui", cwd=proj)
    for cid in ("c1", "c2", "c3"):
        processes.start(cid, "join", "--server", address, "--client-id", cid, cwd=proj)
    wait_for(
        lambda: _status(proj, address).get("connected_clients") == 3,
        what="3 clients joined",
        timeout=120,
    )
    flctl("round", "start", "--server", address, cwd=proj, check=True)

    def keys_shared() -> bool:
        rounds = _status(proj, address, 1).get("rounds", [])
        return bool(rounds) and (rounds[0].get("secagg") or {}).get("stage") == "share_keys"

    # the keys are shared and every client is training (3 s): the coordinator dies now
    wait_for(keys_shared, what="the key stages closed", timeout=60, step=0.05)
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    processes.start("coordinator-2", "serve", "--no-tui", cwd=proj)
    wait_for(
        lambda: _status(proj, address).get("connected_clients") == 3,
        what="the clients back",
        timeout=120,
    )
    (failed,) = _status(proj, address, 1)["rounds"]
    assert failed["status"] == "failed"
    assert "coordinator restarted during secure aggregation" in failed["reason"]
    result = flctl("round", "start", "--wait", "--server", address, "--json", cwd=proj, check=True)
    (done,) = one_json(result.stdout)["rounds"]
    assert done["status"] == "committed", done
    (shown,) = _status(proj, address, done["round"])["rounds"]
    assert shown["secagg"]["outcome"] == "unmasked"
    assert shown["secagg"]["survivors"] == 3 and shown["secagg"]["threshold"] == 2
    text = flctl("round", "status", "--server", address, cwd=proj, check=True)
    assert f"round {done['round']}: secure aggregation unmasked the sum of 3 of 3" in (
        text.stdout + text.stderr
    )
    assert "masked input accepted" in processes.log("c1")  # what the data owner sees
    assert processes.stop("coordinator-2") == 0
    head = one_json(flctl("models", "show", "head", "--json", cwd=proj, check=True).stdout)
    assert head["secure_aggregation"]["enabled"] is True
    assert head["round"]["round"] == done["round"]
