"""Scale: one `flctl serve` process serves 100 concurrent clients through 3 rounds, no errors.

The clients are the torch-free swarm (flctl/client/_swarm.py) in one separate process: real
gRPC, mutual TLS with one certificate per client, the real protocol, a tiny model. Every round
must wait for all 100 (min_clients = 100) and commit; the store must credit every client with
every round. Speed is bench/fanout.py's business, not this test's.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import Processes, flctl, one_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLIENTS = 100
ROUNDS = 3
SWARM = [sys.executable, "-m", "flctl.client._swarm"]


@pytest.fixture(scope="module")
def fanout_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with a tiny model (8 x 8 + 8 floats) and certificates for c1..c100."""
    root = tmp_path_factory.mktemp("fanout")
    flctl("init", "p", "--template", "large", "--params", "64", cwd=root, check=True)
    project = root / "p"
    toml = (project / "flctl.toml").read_text()
    for old, new in [
        ("min_clients = 2", f"min_clients = {CLIENTS}"),  # every round waits for all 100
        ("depth = 8 ", "depth = 1 "),
        ("quorum_timeout_s = 120.0", "quorum_timeout_s = 150.0"),
        ("deadline_s = 600.0", "deadline_s = 150.0"),
    ]:
        assert old in toml, old
        toml = toml.replace(old, new)
    (project / "flctl.toml").write_text(toml)
    flctl("certs", "gen", "--clients", str(CLIENTS), cwd=project, check=True)
    return project


def _swarm(project: Path, *args: str, timeout: float = 240) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SWARM, "--project", str(project), *args, "--json"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, dict[str, Any], str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, json.loads(out), err


def _other_model(path: Path) -> None:
    """A safetensors file of a model the coordinator does not run (weight 3 x 3)."""
    header = json.dumps(
        {"0.weight": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 36]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(36))


def test_one_coordinator_serves_100_clients_through_3_rounds(
    fanout_project: Path, processes: Processes
) -> None:
    project = fanout_project
    processes.start("coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=project)
    serve_file = project / ".flctl" / "serve.json"
    wait_for(serve_file.exists, what="serve.json", timeout=120)
    flctl("models", "export", "1", "-o", "model.safetensors", cwd=project, check=True)

    swarm = _swarm(
        project,
        "--spec",
        "model.safetensors",
        "--clients",
        str(CLIENTS),
        "--rounds",
        str(ROUNDS),
        "--timeout",
        "200",
    )
    try:
        started = flctl("round", "start", "--rounds", str(ROUNDS), "--wait", "--json", cwd=project)
    finally:
        code, report, err = _finish(swarm, timeout=240)
    assert started.returncode == 0, started.stdout + started.stderr
    rounds = one_json(started.stdout)["rounds"]
    assert [(r["round"], r["status"], r["num_clients"]) for r in rounds] == [
        (i, "committed", CLIENTS) for i in range(1, ROUNDS + 1)
    ]

    assert code == 0, err[-3000:]
    errors = {c["client_id"]: c["errors"] for c in report["per_client"] if c["errors"]}
    assert report["errors"] == 0 and not errors, errors
    assert report["completed"] == CLIENTS
    assert sorted(c["client_id"] for c in report["per_client"]) == sorted(
        f"c{i}" for i in range(1, CLIENTS + 1)
    )
    for client in report["per_client"]:
        assert [r["server_round"] for r in client["rounds"]] == list(range(1, ROUNDS + 1))
        assert all(r["accepted"] for r in client["rounds"])
    assert [(r["server_round"], r["accepted"]) for r in report["per_round"]] == [
        (i, CLIENTS) for i in range(1, ROUNDS + 1)
    ]

    # the coordinator's own records agree: every round committed, every client credited
    status = one_json(flctl("round", "status", "--json", cwd=project, check=True).stdout)
    assert [r["status"] for r in status["rounds"]] == ["committed"] * ROUNDS
    assert status["head"] == ROUNDS + 1
    update_size = report["per_client"][0]["rounds"][0]["bytes_up"]
    clients = one_json(flctl("clients", "ls", "--json", cwd=project, check=True).stdout)
    credited = {c["client_id"]: (c["rounds_joined"], c["bytes_up"]) for c in clients["clients"]}
    assert credited == {f"c{i}": (ROUNDS, ROUNDS * update_size) for i in range(1, CLIENTS + 1)}

    # a swarm error is counted, reported and turns into a non-zero exit, never swallowed
    _other_model(project / "other.safetensors")
    wrong = _swarm(project, "--spec", "other.safetensors", "--clients", "2", "--timeout", "60")
    code, report, _ = _finish(wrong, timeout=120)
    assert code == 1
    assert report["errors"] == 2 and report["completed"] == 0
    for client in report["per_client"]:
        [error] = client["errors"]
        assert error.startswith("ProtocolMismatchError:"), error
        assert "does not match the coordinator's task" in error

    assert processes.stop("coordinator") == 0
