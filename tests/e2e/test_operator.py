"""What a new operator trips over, run as they run it: ``flctl`` as a subprocess.

- a refused second ``serve`` leaves the running coordinator's files alone;
- a second ``join`` for a live client id is refused (exit 36) and the first keeps its session;
  ``--replace`` takes over on purpose;
- ``join`` without ``--server`` uses ``server.address`` and says so;
- nothing listening, or a port in use, is said in flctl's words, not gRPC's.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from .conftest import Processes, certs_gen, flctl, one_json, serve, wait_for

pytestmark = pytest.mark.timeout(240)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"
GRPC_WORDS = ("failed to connect to all addresses", "GRPC_VERBOSITY", "add_port", "E1", "ipv4:")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project(tmp_path: Path, *, port: int | None = None, clients: int = 1) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    address = f'address = "127.0.0.1:{port}"\n' if port else ""
    (proj / "flctl.toml").write_text(
        f"""
[project]
task = "tiny_task.py"
seed = 1

[server]
{address}heartbeat_interval_s = 0.5
heartbeat_timeout_s = 3.0

[rounds]
min_clients = 1
"""
    )
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, clients)
    return proj


def _events(proj: Path, kind: str) -> list[dict[str, object]]:
    listed = one_json(flctl("events", "--json", "--type", kind, cwd=proj, check=True).stdout)
    events = listed["events"] if isinstance(listed, dict) else listed
    return [e for e in events if e["type"] == kind]


def test_a_refused_second_serve_leaves_the_running_coordinator_alone(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path)
    pid, address = serve(processes, "coordinator", proj)
    second = flctl("serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj, timeout=60)
    assert second.returncode == 73, second.stderr
    assert "another coordinator holds" in second.stderr
    # the running coordinator's record is still there, and commands still find it
    info = json.loads((proj / ".flctl" / "serve.json").read_text())
    assert info["pid"] == pid and info["address"] == address
    status = flctl("round", "status", "--json", cwd=proj, timeout=60)
    assert status.returncode == 0, status.stderr
    assert one_json(status.stdout)["head"] == 1


def test_a_second_join_is_refused_and_the_first_keeps_its_session(
    tmp_path: Path, processes: Processes
) -> None:
    port = _free_port()
    proj = _project(tmp_path, port=port)
    processes.start("coordinator", "serve", "--no-tui", cwd=proj)
    wait_for(lambda: (proj / ".flctl" / "serve.json").exists(), what="coordinator listening")
    first = processes.start("c1", "join", "--client-id", "c1", cwd=proj)
    wait_for(lambda: "joined" in processes.log("c1"), what="c1 joined")
    # join without --server: the project's server.address, and the output says so
    assert f"joining 127.0.0.1:{port} (server.address in " in processes.log("c1")

    second = flctl("join", "--client-id", "c1", cwd=proj, timeout=120)
    assert second.returncode == 36, second.stdout + second.stderr
    assert "already joined from another `flctl join` process" in second.stderr
    assert "--replace" in second.stderr
    # the first kept its one session throughout: joined once, never told to reconnect
    assert first.poll() is None
    assert "reconnecting" not in processes.log("c1")
    assert len(_events(proj, "client.joined")) == 1

    # --replace takes the session over on purpose
    processes.start("c1-again", "join", "--client-id", "c1", "--replace", cwd=proj)
    wait_for(lambda: "joined" in processes.log("c1-again"), what="the replacement joined")
    joined = _events(proj, "client.joined")
    assert len(joined) == 2 and joined[-1]["data"]["replaced"] is True  # type: ignore[index]
    # the replaced process is refused back in and leaves with the documented code
    assert processes.procs["c1"].wait(60) == 36
    assert "already joined" in processes.log("c1")


def test_join_with_no_coordinator_says_so_and_gives_up_when_asked(tmp_path: Path) -> None:
    port = _free_port()
    proj = _project(tmp_path, port=port)
    started = time.monotonic()
    result = flctl("join", "--client-id", "c1", "--connect-timeout", "2", cwd=proj, timeout=120)
    assert result.returncode == 31, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert f"no coordinator at 127.0.0.1:{port} yet (connection refused)" in text
    assert "is `flctl serve` running there?" in text
    assert "gave up after 2 s" in result.stderr
    assert not any(words in text for words in GRPC_WORDS), text
    assert time.monotonic() - started < 110  # it gave up instead of retrying forever


def test_admin_commands_with_no_coordinator_say_so(tmp_path: Path) -> None:
    port = _free_port()
    proj = _project(tmp_path)
    result = flctl("round", "start", "--server", f"127.0.0.1:{port}", cwd=proj, timeout=120)
    assert result.returncode == 31, result.stdout + result.stderr
    assert f"no coordinator at 127.0.0.1:{port} yet (connection refused)" in result.stderr
    assert "is `flctl serve` running there?" in result.stderr
    assert not any(words in result.stderr for words in GRPC_WORDS), result.stderr


def test_serve_on_a_port_in_use_says_which_and_what_to_do(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = flctl("serve", "--address", f"127.0.0.1:{port}", "--no-tui", cwd=proj, timeout=60)
    assert result.returncode == 31, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in result.stderr
    assert "--address HOST:PORT" in result.stderr
    assert not any(words in result.stderr for words in GRPC_WORDS), result.stderr


def test_two_coordinators_cannot_share_a_port(tmp_path: Path, processes: Processes) -> None:
    proj = _project(tmp_path)
    _, address = serve(processes, "coordinator", proj)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("flctl.toml", "tiny_task.py", "certs"):
        source = proj / name
        if source.is_dir():
            shutil.copytree(source, other / name)
        else:
            shutil.copy(source, other / name)
    result = flctl("serve", "--address", address, "--no-tui", cwd=other, timeout=60)
    assert result.returncode == 31, result.stdout + result.stderr
    assert "is already in use" in result.stderr


BROKEN_TASK = """
import torch

from flctl.client import Client


def build_model(context):
    return torch.nn.Linear(4, 2)


class Broken(Client):
    def __init__(self, context):
        self.model = build_model(context)

    def get_parameters(self):
        return self.model.state_dict()

    def fit(self, parameters, config):
        self.model.load_state_dict(parameters)
        return paramters, 10, {}  # the typo a user makes


def client_fn(context):
    return Broken(context)
"""


def test_a_task_that_raises_is_reported_in_the_users_terms(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path, clients=2)
    (proj / "task.py").write_text(BROKEN_TASK)
    toml = (proj / "flctl.toml").read_text().replace('"tiny_task.py"', '"task.py"')
    (proj / "flctl.toml").write_text(toml.replace("min_clients = 1", "min_clients = 2"))
    line = (
        BROKEN_TASK.splitlines().index("        return paramters, 10, {}  # the typo a user makes")
        + 1
    )
    reason = f"fit raised NameError: name 'paramters' is not defined (task.py:{line})"
    _, address = serve(processes, "coordinator", proj)
    for client in ("c1", "c2"):
        processes.start(client, "join", "--server", address, "--client-id", client, cwd=proj)
    ran = flctl("round", "start", "--wait", "--json", cwd=proj, timeout=180)
    assert ran.returncode == 81, ran.stdout + ran.stderr
    (round_,) = one_json(ran.stdout)["rounds"]
    # the operator reads what went wrong, per client, not "selected clients left"
    assert round_["reason"] == (
        f"2 of 2 selected clients failed (c1, c2: {reason}) with 0 of 2 required updates"
    )
    status = one_json(flctl("round", "status", "--json", cwd=proj, check=True).stdout)
    assert reason in json.dumps(status)
    listed = flctl("events", cwd=proj, check=True).stdout
    assert f"client c1 failed round 1: {reason}" in listed
    # the data owner sees the traceback of their own code, flctl's frames trimmed
    log = processes.log("c1")
    assert "Traceback (most recent call last):" in log
    assert f'task.py", line {line}, in fit' in log
    assert "flctl/client" not in log and "_runner.py" not in log


def test_serve_refuses_a_head_that_task_py_no_longer_builds(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path)
    serve(processes, "coordinator", proj)
    assert processes.stop("coordinator") == 0
    events_before = flctl("events", "--json", cwd=proj, check=True).stdout
    # task.py now builds another model (8 inputs, not 4): no client could load the head
    toml = proj / "flctl.toml"
    toml.write_text(toml.read_text() + "\n[task]\nin_features = 8\n")
    result = flctl("serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj, timeout=120)
    assert result.returncode == 90, result.stdout + result.stderr
    assert "tiny_task.py builds a model that differs from the head model v1 in " in result.stderr
    assert "tensor 'weight': shape [2, 8] vs the head's [2, 4]" in result.stderr
    assert "start a new one" in result.stderr
    # refused means unchanged: no event, no serve.json
    assert flctl("events", "--json", cwd=proj, check=True).stdout == events_before
    assert not (proj / ".flctl" / "serve.json").exists()


def test_a_task_that_fails_to_load_shows_the_users_traceback(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    broken = BROKEN_TASK.replace("class Broken", "imprt os\nclass Broken")
    line = broken.splitlines().index("imprt os") + 1
    (proj / "task.py").write_text(broken)
    toml = (proj / "flctl.toml").read_text().replace('"tiny_task.py"', '"task.py"')
    (proj / "flctl.toml").write_text(toml)
    result = flctl("join", "--client-id", "c1", "--connect-timeout", "1", cwd=proj, timeout=120)
    assert result.returncode == 90, result.stdout + result.stderr
    assert "Traceback (most recent call last):" in result.stderr
    assert f'task.py", line {line}' in result.stderr  # Python's own caret display
    assert f"importing the task raised SyntaxError: invalid syntax (task.py:{line})" in (
        result.stderr
    )
    assert "flctl/core" not in result.stderr and "<frozen" not in result.stderr
