"""`flctl join` killed with SIGKILL in the middle of a download and of an upload, then run again.

A TCP relay (tests/relay.py) between the client and the coordinator holds back the bytes of
one direction after a budget, so the transfer stops part-way at a known point whatever the
machine's speed; the client is killed there. The next `flctl join` (straight to the
coordinator) must carry on from the bytes already on disk: the client's partial download, the
coordinator's part file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from tests.relay import Relay

from .conftest import Processes, certs_gen, flctl, serve, wait_for

pytestmark = pytest.mark.timeout(240)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"
FEATURES = 250_000  # Linear(250000, 2): a 2 MB model, so a transfer has a middle
MODEL_BYTES = (FEATURES * 2 + 2) * 4
CONFIG = f"""
[project]
task = "tiny_task.py"
seed = 3

[server]
heartbeat_interval_s = 0.5

[rounds]
min_clients = 1
deadline_s = 180.0
quorum_timeout_s = 120.0
rejoin_grace_s = 120.0

[transport]
max_chunk_bytes = 65536

[task]
in_features = {FEATURES}
"""


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(CONFIG)
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    return proj


def _kill(processes: Processes, name: str) -> None:
    proc = processes.procs[name]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _size_when(path_of: Callable[[], list[Path]], what: str) -> int:
    """The size of the one file ``path_of`` finds, once it has some bytes and stops growing."""
    last = [-1]

    def settled() -> int | None:
        paths = path_of()
        if len(paths) != 1:
            return None
        size = paths[0].stat().st_size
        if size > 0 and size == last[0]:
            return size
        last[0] = size
        return None

    return int(wait_for(settled, what=what, timeout=120, step=0.3))


def _kill_half_way(
    processes: Processes,
    proj: Path,
    relay: Relay,
    part_files: Callable[[], list[Path]],
    transfer: str,
) -> int:
    """Join c1 through ``relay``, start a round, and SIGKILL c1 once the relay holds the
    ``transfer`` back and its one part file (``part_files``) stops growing: that file's size."""
    try:
        processes.start("c1", "join", "--server", relay.address, "--client-id", "c1", cwd=proj)
        wait_for(lambda: "joined" in processes.log("c1"), what="c1 joined", timeout=120)
        flctl("round", "start", "--json", cwd=proj, check=True)
        assert relay.held_back.wait(120), f"the {transfer} never reached the relay's budget"
        size = _size_when(part_files, f"the {transfer}'s part file")
        _kill(processes, "c1")
    finally:
        relay.release()
        relay.close()
    return size


def _rejoin_until_the_round_ends(processes: Processes, proj: Path, address: str) -> None:
    """Run ``flctl join`` for c1 again, straight to the coordinator, until the round ends."""
    processes.start("c1-again", "join", "--server", address, "--client-id", "c1", cwd=proj)
    wait_for(lambda: _round_ended(proj), what="the round to end", timeout=180, step=0.2)


def _round_ended(proj: Path) -> bool:
    """Whether round 1 committed or failed, read from the state database (a poll that starts
    no process; the test reads the outcome with flctl round status)."""
    database = proj / ".flctl" / "state.db"
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT status FROM rounds WHERE id = 1").fetchone()
    return row is not None and row[0] in ("committed", "failed")


def _bytes_down(proj: Path) -> int:
    result = flctl("clients", "ls", "--json", cwd=proj, check=True)
    (row,) = json.loads(result.stdout)["clients"]
    return int(row["bytes_down"])


def _round_status(proj: Path) -> dict:  # type: ignore[type-arg]
    result = flctl("round", "status", "--json", cwd=proj, check=True)
    rounds = json.loads(result.stdout)["rounds"]
    return rounds[0]


def test_a_client_killed_mid_download_resumes_from_its_partial_file(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path)
    _, address = serve(processes, "coordinator", proj)
    port = int(address.rsplit(":", 1)[1])
    relay = Relay(port, direction="down", budget=MODEL_BYTES // 2)
    cache = proj / ".flctl-client" / "c1"
    seen = _kill_half_way(
        processes, proj, relay, lambda: list((cache / "partial").glob("*.part")), "download"
    )
    assert 0 < seen < MODEL_BYTES

    (partial,) = (cache / "partial").glob("*.part")
    held = partial.stat().st_size  # what the killed process had written
    assert seen <= held < MODEL_BYTES
    digest = partial.name.removesuffix(".part")
    # the coordinator adds a download's bytes to the client's count when its stream ends: the
    # first process's, once the relay has closed its connections
    before = wait_for(lambda: _bytes_down(proj), what="the first download counted", step=0.3)

    _rejoin_until_the_round_ends(processes, proj, address)
    assert _round_status(proj)["status"] == "committed"
    log = processes.log("c1-again")
    assert f"resuming the download of model {digest[:12]} from byte {held}" in log, log
    blob = cache / "blobs" / digest
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
    # the second process fetched only what the first had not written
    assert _bytes_down(proj) - before == blob.stat().st_size - held
    assert list((cache / "partial").glob("*.part")) == []


def test_a_client_killed_mid_upload_resumes_from_the_coordinators_part_file(
    tmp_path: Path, processes: Processes
) -> None:
    proj = _project(tmp_path)
    _, address = serve(processes, "coordinator", proj)
    port = int(address.rsplit(":", 1)[1])
    # what goes up before the update (handshake, Join, the task stream, heartbeats) is a few
    # kilobytes: half the model's bytes stop the upload about half-way
    relay = Relay(port, direction="up", budget=MODEL_BYTES // 2)
    uploads = proj / ".flctl" / "uploads"
    held = _kill_half_way(processes, proj, relay, lambda: list(uploads.glob("*.part")), "upload")
    assert 0 < held < MODEL_BYTES
    # the client kept its update and the header naming it, for the next process
    kept = list((proj / ".flctl-client" / "c1" / "uploads").glob("*.header"))
    assert len(kept) == 1

    _rejoin_until_the_round_ends(processes, proj, address)
    status = _round_status(proj)
    assert status["status"] == "committed", status
    log = processes.log("c1-again")
    assert "resuming the upload of the update kept on disk" in log, log
    assert "the coordinator holds " in log and " bytes: resuming from there" in log, log
    said = int(log.split("the coordinator holds ", 1)[1].split(" ", 1)[0])
    assert held <= said < MODEL_BYTES + 4096  # at least what was on disk when the client died
    assert list(uploads.iterdir()) == []
    events = json.loads(flctl("events", "--json", cwd=proj, check=True).stdout)
    types = [e["type"] for e in (events["events"] if isinstance(events, dict) else events)]
    assert "upload.resumed" in types
