"""Two ``flctl serve`` processes on one PostgreSQL store: one leads, one stands by, and the
standby takes over when the leader is killed with SIGKILL; clients given both addresses
follow, and the job finishes."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from flctl.security import load_credentials
from flctl.store import SqlStore, list_coordinators, list_leaders
from flctl.transport.grpc import probe_health
from tests.postgres import PostgresServer

from .conftest import Processes, certs_gen, flctl, one_json, wait_for

pytestmark = pytest.mark.timeout(300)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"


def _json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as response:
        answer: dict[str, object] = json.loads(response.read())
    return answer


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
    certs_gen(a, 1)
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
    # watchers given both addresses follow the take-over: the event lines of round watch, the
    # dashboard's link to the leader
    processes.start("watch", "round", "watch", "--follow", "--server", both, cwd=a)
    processes.start("dashboard", "dashboard", "--address", "127.0.0.1:0", "--server", both, cwd=a)
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
        wait_for(
            lambda: "round 4 committed" in processes.log("watch"),
            what="round watch follows the new leader",
            timeout=60,
        )
        assert f"following the next leader of {both}" in processes.log("watch")
        dashboard = re.search(r"dashboard: (http://\S+)", processes.log("dashboard"))
        assert dashboard is not None
        wait_for(
            lambda: _json(dashboard.group(1) + "healthz").get("leader") == second,
            what="the dashboard follows the new leader",
            timeout=60,
        )
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
    # registry changes go through the leader; written offline beside it, they are refused
    tagged = one_json(
        flctl("models", "tag", "head", "best", "--server", both, "--json", cwd=b, check=True).stdout
    )
    assert tagged["tag"] == "best"
    offline = flctl("models", "tag", "1", "first", cwd=a)
    assert offline.returncode == 73, offline.stdout + offline.stderr
    assert f"a coordinator leads this store ({second}, epoch 2)" in offline.stderr
    client_log = processes.log("c1")
    assert f"joined {first}" in client_log and f"joined {second}" in client_log, client_log


def test_a_leader_that_loses_its_database_session_steps_down_and_the_standby_leads(
    tmp_path: Path, processes: Processes, pg_url: str, postgres_server: PostgresServer
) -> None:
    a, b = _projects(tmp_path, pg_url)
    first = f"127.0.0.1:{_free_port()}"
    second = f"127.0.0.1:{_free_port()}"
    leader = processes.start("coord-a", "serve", "--address", first, "--no-tui", cwd=a)
    wait_for(lambda: _health(a, first) == "SERVING", what="a leads", timeout=120)
    # b is reached through another name than the one it listens on (NAT, port mapping)
    processes.start(
        "coord-b", "serve", "--address", second, "--advertise", "coord-b.example:7070",
        "--no-tui", cwd=b,
    )  # fmt: skip
    wait_for(lambda: _health(a, second) == "NOT_SERVING", what="b stands by", timeout=120)
    standby = one_json(flctl("status", "--server", first, "--json", cwd=a).stdout)
    assert {c["address"] for c in standby["coordinators"]} == {first, "coord-b.example:7070"}

    assert postgres_server.terminate_sessions(leader.pid) >= 1  # its connections are cut
    assert leader.wait(30) in (76, 77)  # stepped down: unavailable or fenced, never serving on
    log = processes.log("coord-a")
    assert "lost the leadership of the store" in log and "Traceback" not in log
    wait_for(lambda: _health(a, second) == "SERVING", what="b takes over", timeout=60)
    status = one_json(flctl("status", "--server", f"{first},{second}", "--json", cwd=a).stdout)
    assert (status["leader"], status["epoch"]) == (second, 2)
    assert status["epochs"][-1]["address"] == "coord-b.example:7070"


def test_refusals_at_start_a_database_away_and_a_task_of_another_model(
    tmp_path: Path, processes: Processes, pg_url: str
) -> None:
    a, b = _projects(tmp_path, pg_url)
    # the database cannot be reached: its URL named (password hidden), exit 76, nothing served
    away = flctl(
        "serve", "--address", f"127.0.0.1:{_free_port()}", "--no-tui", cwd=a, timeout=60,
        env={"FLCTL_STORE_URL": f"postgresql+psycopg://flctl:s3cret@127.0.0.1:{_free_port()}/x"},
    )  # fmt: skip
    assert away.returncode == 76, away.stderr
    assert "flctl:***@127.0.0.1" in away.stderr and "s3cret" not in away.stderr
    assert "Traceback" not in away.stderr

    first = f"127.0.0.1:{_free_port()}"
    processes.start("coord-a", "serve", "--address", first, "--no-tui", cwd=a)
    wait_for(lambda: _health(a, first) == "SERVING", what="a leads", timeout=120)
    # b's task builds another model: it refuses to stand by for this store
    toml = b / "flctl.toml"
    toml.write_text(toml.read_text() + "in_features = 7\n")
    other = flctl("serve", "--address", f"127.0.0.1:{_free_port()}", "--no-tui", cwd=b)
    assert other.returncode == 90, other.stderr
    assert "differs from the head model" in other.stderr
    assert _health(a, first) == "SERVING"
