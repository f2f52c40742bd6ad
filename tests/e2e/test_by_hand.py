"""The by-hand journey of docs/quickstart.md, each step a separate flctl process."""

import json
import os
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

from .conftest import Processes, certs_gen, flctl, init_project, one_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_init_certs_serve_join_round_start_models_ls(tmp_path: Path, processes: Processes) -> None:
    flctl("init", "proj", "--template", "digits", cwd=tmp_path, check=True)
    proj = tmp_path / "proj"
    assert {p.name for p in proj.iterdir()} >= {"flctl.toml", "task.py", ".gitignore"}
    again = flctl("init", "proj", cwd=tmp_path)
    assert again.returncode == 12 and "not empty" in again.stderr

    gen = one_json(flctl("certs", "gen", "--clients", "2", "--json", cwd=proj, check=True).stdout)
    assert set(gen["clients"]) == {"c1", "c2"}
    for name in ("ca", "server", "admin", "c1", "c2"):
        assert (proj / "certs" / f"{name}.crt").is_file()
        assert stat.S_IMODE(os.stat(proj / "certs" / f"{name}.key").st_mode) == 0o600

    processes.start("coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj)
    serve_file = proj / ".flctl" / "serve.json"
    wait_for(serve_file.exists, what="serve.json", timeout=120)
    address = json.loads(serve_file.read_text())["address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")

    for cid in ("c1", "c2"):
        processes.start(cid, "join", "--server", address, "--client-id", cid, cwd=proj)

    # Admin commands find the coordinator through serve.json: no --server needed.
    result = flctl("round", "start", "--rounds", "2", "--wait", "--json", cwd=proj, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + processes.log("coordinator")[-3000:]
    doc = one_json(result.stdout)
    assert [r["status"] for r in doc["rounds"]] == ["committed", "committed"]
    assert all(r["num_clients"] == 2 for r in doc["rounds"])
    assert doc["model_version"] == 3

    queued = one_json(flctl("round", "start", "--json", cwd=proj, check=True).stdout)
    assert queued == {"round_ids": [3]}

    watch = one_json(flctl("round", "watch", "--json", cwd=proj, check=True).stdout)
    types = [e["type"] for e in watch["events"]]
    assert types.count("round.committed") >= 2 and "client.joined" in types
    # FedAvg summed the model while the two updates uploaded ([strategy] streaming)
    committed = [e for e in watch["events"] if e["type"] == "round.committed"]
    assert {e["data"]["aggregation"] for e in committed} == {"streamed"}, committed

    status = one_json(
        flctl(
            "round", "status", "--round", "1", "--round", "2", "--json", cwd=proj, check=True
        ).stdout
    )
    assert [r["status"] for r in status["rounds"]] == ["committed", "committed"]
    # the seconds of each phase, from the rounds' events
    assert all({"training", "aggregating"} <= set(r["phases"]) for r in status["rounds"])
    assert status["connected_clients"] == 2 and status["head"] >= 3
    clients = one_json(flctl("clients", "ls", "--json", cwd=proj, check=True).stdout)
    assert clients["live"] is True
    # rounds 1-2 waited for, round 3 queued without --wait may have finished too
    assert {c["client_id"] for c in clients["clients"]} == {"c1", "c2"}
    assert all(c["rounds_joined"] >= 2 for c in clients["clients"])
    assert all(c["state"] != "offline" and c["bytes_up"] > 0 for c in clients["clients"])

    models = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    assert models["head"] >= 3
    assert models["models"][-1]["kind"] == "initial"

    assert processes.stop("c1") == 0
    assert processes.stop("c2") == 0
    assert processes.stop("coordinator") == 0
    assert not serve_file.exists()
    offline = one_json(flctl("clients", "ls", "--json", cwd=proj, check=True).stdout)
    assert offline["live"] is False and {c["state"] for c in offline["clients"]} == {"offline"}
    # models ls works with the coordinator stopped too
    after = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    assert after["head"] == models["head"] or after["head"] == models["head"] + 1


def _queued(proj: Path) -> bool:
    """Whether a round.queued event is written, read from the state database (a poll that
    starts no process)."""
    database = proj / ".flctl" / "state.db"
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return db.execute("SELECT 1 FROM events WHERE type = 'round.queued'").fetchone() is not None


def test_round_start_wait_gives_up_on_a_vanished_coordinator(
    tmp_path: Path, processes: Processes
) -> None:
    """--wait waits --reconnect-timeout for a coordinator that went away, then exits 31."""
    import signal
    import subprocess
    import sys

    proj = init_project(tmp_path, "proj")
    certs_gen(proj, 1)
    coordinator = processes.start(
        "coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj
    )
    serve_file = proj / ".flctl" / "serve.json"
    wait_for(serve_file.exists, what="serve.json", timeout=120)
    # no client joins: the round waits for its quorum while we pull the coordinator away
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flctl",
            "round",
            "start",
            "--wait",
            "--reconnect-timeout",
            "3",
            "--json",
        ],
        cwd=proj,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _queued(proj), what="the round queued", timeout=60)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        out, _ = waiter.communicate(timeout=60)
        assert waiter.returncode == 31
        assert "did not come back within 3 s" in one_json(out)["error"]["message"]
    finally:
        if waiter.poll() is None:
            waiter.kill()
