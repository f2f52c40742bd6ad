"""Two ``flctl serve`` processes on one PostgreSQL store: one leads, one stands by, and the
standby takes over when the leader is killed with SIGKILL; clients given both addresses
follow, and the job finishes."""

from __future__ import annotations

import shutil
import signal
import socket
from pathlib import Path

import pytest

from flctl.security import load_credentials
from flctl.store import SqlStore, list_coordinators, list_leaders
from flctl.transport.grpc import probe_health

from .conftest import Processes, flctl, one_json, wait_for

pytestmark = pytest.mark.timeout(300)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"


def _config(url: str, blobs: Path) -> str:
    return f"""
[project]
task = "tiny_task.py"
seed = 1

[server]
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 5.0

[rounds]
min_clients = 1
deadline_s = 60.0
quorum_timeout_s = 60.0

[store]
url = "{url}"
blobs = "{blobs}"

[task]
fit_sleep_s = 0.3
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health(proj: Path, address: str) -> str:
    cert, key, ca = load_credentials(proj / "certs", "admin")
    return probe_health(address, cert_pem=cert, key_pem=key, ca_pem=ca, timeout=2.0)


def _projects(tmp_path: Path, pg_url: str) -> tuple[Path, Path]:
    """Two project folders (two machines): same task, certificates, store and blob folder."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "flctl.toml").write_text(_config(pg_url, tmp_path / "shared-blobs"))
    shutil.copy(TINY_TASK, a / "tiny_task.py")
    flctl("certs", "gen", "--clients", "1", cwd=a, check=True)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    return a, b


def test_the_standby_takes_over_a_killed_leader_and_the_job_finishes(
    tmp_path: Path, processes: Processes, pg_url: str
) -> None:
    a, b = _projects(tmp_path, pg_url)
    first = f"127.0.0.1:{_free_port()}"
    second = f"127.0.0.1:{_free_port()}"
    both = f"{first},{second}"
    init = one_json(flctl("store", "init", "--json", cwd=a, check=True).stdout)
    assert (init["backend"], init["action"]) == ("postgresql", "created")
    assert "***" not in init["store"] or "@" in init["store"]

    leader = processes.start("coord-a", "serve", "--address", first, "--no-tui", cwd=a)
    wait_for(lambda: _health(a, first) == "SERVING", what="a leads", timeout=120)
    processes.start("coord-b", "serve", "--address", second, "--no-tui", cwd=b)
    wait_for(lambda: _health(a, second) == "NOT_SERVING", what="b stands by", timeout=120)
    assert "standing by" in processes.log("coord-b")

    status = one_json(flctl("status", "--server", both, "--json", cwd=b, check=True).stdout)
    assert (status["leader"], status["epoch"]) == (first, 1)
    assert status["health"] == {first: "SERVING", second: "NOT_SERVING"}
    assert {c["address"]: c["role"] for c in status["coordinators"]} == {
        first: "leader",
        second: "standby",
    }

    # a client given both addresses joins the leader; a standby refuses with the leader's name
    processes.start("c1", "join", "--client-id", "c1", "--server", both, cwd=a)
    refused = flctl("round", "start", "--server", second, cwd=a)
    assert refused.returncode == 37, refused.stderr
    assert f"is a standby; the leader is {first}" in refused.stderr
    assert "Traceback" not in refused.stderr

    started = one_json(
        flctl(
            "round", "start", "--rounds", "4", "--server", both, "--json", cwd=a, check=True
        ).stdout
    )
    assert len(started["round_ids"]) == 4

    store = SqlStore(pg_url, read_only=True)
    try:

        def committed() -> int:
            return sum(r.status == "committed" for r in store.list_rounds())

        wait_for(lambda: committed() >= 1, what="a round commits on a", timeout=120)
        leader.send_signal(signal.SIGKILL)  # no clean-up of any kind
        assert leader.wait(30) == -signal.SIGKILL
        wait_for(lambda: _health(a, second) == "SERVING", what="b takes over", timeout=60)
        status = one_json(flctl("status", "--server", both, "--json", cwd=a, check=True).stdout)
        assert (status["leader"], status["epoch"]) == (second, 2)
        assert status["health"][first] == "UNREACHABLE"
        assert [(e["epoch"], e["address"]) for e in status["epochs"]] == [(1, first), (2, second)]
        # the queued rounds run on b, with the client that followed the take-over
        wait_for(lambda: committed() == 4, what="all four rounds commit", timeout=180)
        rounds = store.list_rounds()
        assert [r.status for r in rounds] == ["committed"] * 4
        # and a round started through both addresses goes to the new leader
        done = one_json(
            flctl("round", "start", "--server", both, "--wait", "--json", cwd=a, check=True).stdout
        )
        assert [r["status"] for r in done["rounds"]] == ["committed"]

        leaders = list_leaders(store)
        assert [(x.epoch, x.address) for x in leaders] == [(1, first), (2, second)]
        roles = {c.address: c.role for c in list_coordinators(store)}
        assert roles[second] == "leader"
        with store.session() as session:
            epochs = [
                row[0]
                for row in session.connection().exec_driver_sql(
                    "SELECT epoch FROM events ORDER BY seq"
                )
            ]
        assert epochs == sorted(epochs) and set(epochs) == {1, 2}
        # every committed model's blob is in the shared folder with its digest
        verify = one_json(flctl("models", "verify", "--json", cwd=b, check=True).stdout)
        assert verify["problems"] == [] if "problems" in verify else verify
    finally:
        store.close()
    client_log = processes.log("c1")
    assert f"joined {first}" in client_log and f"joined {second}" in client_log, client_log
