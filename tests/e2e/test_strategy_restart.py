"""A server optimizer's state survives a coordinator killed with SIGKILL.

Two runs of the same digits project under ``[strategy] name = "fedadam"``, one client, the same
seed and one torch thread: run A makes 3 rounds in one coordinator's life; run B makes 2,
loses its coordinator to SIGKILL, and makes round 3 in a second coordinator's life. FedAdam's
moments and step go with each committed version (``models.state_digest``) and come back at
restart, so round 3 of run B is run A's round 3, bit for bit (docs/strategies.md, "Server
optimizers keep state between rounds").
"""

from __future__ import annotations

import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import Processes, certs_gen, flctl, init_project, one_json, serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SEED = 7

# The digits template's flctl.toml, as `flctl init` writes it -> what these runs need: one
# client (the first of the template's three partitions), one short local epoch, FedAdam.
EDITS = {
    "min_clients = 2": "min_clients = 1",
    "deadline_s = 120": "deadline_s = 30",
    "quorum_timeout_s = 60": "quorum_timeout_s = 30",
    'name = "fedavg"': 'name = "fedadam"',
    "local_epochs = 2": "local_epochs = 1",
}


def _project(root: Path) -> Path:
    """A digits project with the edits above and the certificates of one client, c1."""
    root.mkdir()
    proj = init_project(root, "proj", "--template", "digits", "--seed", str(SEED))
    toml = (proj / "flctl.toml").read_text()
    for old, new in EDITS.items():
        assert toml.count(old) == 1, f"the digits template no longer has {old!r}"
        toml = toml.replace(old, new)
    assert "num_threads = 1" in toml  # the client trains on one torch thread
    (proj / "flctl.toml").write_text(toml)
    certs_gen(proj, 1)
    return proj


def _join(processes: Processes, name: str, proj: Path, address: str) -> None:
    processes.start(
        name, "join", "--server", address, "--client-id", "c1", "--threads", "1", cwd=proj
    )


def _rounds(processes: Processes, coordinator: str, proj: Path, count: int) -> dict[int, int]:
    """Run ``count`` rounds to their end, each committed; the model version of each round."""
    result = flctl("round", "start", "--rounds", str(count), "--wait", "--json", cwd=proj)
    log = processes.log(coordinator)[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr + log
    rounds = one_json(result.stdout)["rounds"]
    assert [r["status"] for r in rounds] == ["committed"] * count, rounds
    return {int(r["round"]): int(r["model_version"]) for r in rounds}


def _life(
    processes: Processes, coordinator: str, client: str, proj: Path, count: int
) -> tuple[int, dict[int, int]]:
    """Serve ``proj``, join c1 to it and run ``count`` rounds: the coordinator's pid and the
    model version of each round."""
    pid, address = serve(processes, coordinator, proj)
    _join(processes, client, proj, address)
    return pid, _rounds(processes, coordinator, proj, count)


def _show(proj: Path, version: int) -> dict[str, Any]:
    """``models show --json`` of one version."""
    shown = flctl("models", "show", str(version), "--json", cwd=proj, check=True)
    return one_json(shown.stdout)  # type: ignore[no-any-return]


def test_fedadam_state_survives_sigkill_and_round_3_matches_an_uninterrupted_run(
    tmp_path: Path, processes: Processes
) -> None:
    proj_a = _project(tmp_path / "a")
    proj_b = tmp_path / "b" / "proj"
    shutil.copytree(proj_a, proj_b)  # the same project, before either has any state

    # run A: rounds 1-3 in one coordinator's life; run B: rounds 1-2, SIGKILL, then round 3
    # in the restarted coordinator. A and B's first life run side by side (two projects, each
    # with its own coordinator and client, nothing shared; one torch thread each).
    with ThreadPoolExecutor(2) as pool:
        run_a = pool.submit(_life, processes, "a-coordinator", "a-c1", proj_a, 3)
        run_b = pool.submit(_life, processes, "b-coordinator", "b-c1", proj_b, 2)
        (_pid, versions), (pid, b_versions) = run_a.result(), run_b.result()
    assert versions == {1: 2, 2: 3, 3: 4}  # version 1 is the initial model
    assert b_versions == {1: 2, 2: 3}
    os.kill(pid, signal.SIGKILL)  # round 2 has committed; no clean-up of any kind
    a2, a3 = _show(proj_a, versions[2]), _show(proj_a, versions[3])
    processes.stop("a-c1")
    assert processes.stop("a-coordinator") == 0
    assert processes.procs["b-coordinator"].wait(30) == -signal.SIGKILL
    processes.stop("b-c1")  # it would keep calling the first coordinator's port
    b2 = _show(proj_b, versions[2])

    # the same first two rounds (so the task is deterministic), and a state to carry over:
    # FedAdam's m, v and step, stored with the version round 2 committed
    assert b2["model"]["digest"] == a2["model"]["digest"]
    assert b2["strategy"] == "fedadam"
    state = b2["strategy_state"]
    assert state is not None and state["blob"] == "present", state
    names = {t["name"] for t in state["tensors"]}
    assert "step" in names, names
    assert any(n.startswith("m.") for n in names) and any(n.startswith("v.") for n in names)
    assert state["digest"] == a2["strategy_state"]["digest"]

    _pid, address = serve(processes, "b-coordinator-2", proj_b)
    _join(processes, "b-c1-2", proj_b, address)
    assert _rounds(processes, "b-coordinator-2", proj_b, 1) == {3: 4}
    b3 = _show(proj_b, versions[3])
    assert b3["model"]["parent"] == versions[2]
    assert b3["model"]["digest"] == a3["model"]["digest"], "round 3 differs after the restart"
    assert b3["strategy_state"]["digest"] == a3["strategy_state"]["digest"]
    assert processes.stop("b-c1-2") == 0
    assert processes.stop("b-coordinator-2") == 0
