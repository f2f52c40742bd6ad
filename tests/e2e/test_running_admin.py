"""Changing a running coordinator's state from the CLI: `certs revoke`, `models tag|rollback`.

`flctl serve` and `flctl join` run as subprocesses; the commands find the coordinator through
its serve.json and go through its Admin service, recorded with the admin's identity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import Processes, certs_gen, flctl, init_project, one_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _events(proj: Path) -> list[dict[str, Any]]:
    watch = one_json(flctl("round", "watch", "--json", cwd=proj, check=True).stdout)
    events: list[dict[str, Any]] = watch["events"]
    return events


def _joined(processes: Processes, *client_ids: str) -> bool:
    """Whether each client said it joined (its output: a poll that starts no process)."""
    return all("joined " in processes.log(client_id) for client_id in client_ids)


def test_certs_revoke_and_models_tag_go_through_the_running_coordinator(
    tmp_path: Path, processes: Processes
) -> None:
    proj = init_project(tmp_path, "proj")
    certs_gen(proj, 2)
    processes.start("coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj)
    serve_file = proj / ".flctl" / "serve.json"
    wait_for(serve_file.exists, what="serve.json", timeout=120)
    address = json.loads(serve_file.read_text())["address"]
    joins = {
        cid: processes.start(cid, "join", "--server", address, "--client-id", cid, cwd=proj)
        for cid in ("c1", "c2")
    }
    wait_for(lambda: _joined(processes, "c1", "c2"), what="both clients joined", timeout=120)

    result = flctl("certs", "revoke", "c2", "--reason", "lost laptop", "--json", cwd=proj)
    assert result.returncode == 0, result.stdout + result.stderr
    revoked = one_json(result.stdout)
    assert (revoked["identity"], revoked["serial"], revoked["author"]) == ("c2", None, "admin")
    assert revoked["coordinator"] == address and revoked["already_revoked"] is False
    assert revoked["reason"] == "lost laptop" and revoked["event_seq"] > 0

    # c2's open session ends with the refusal: `flctl join` exits non-zero, it does not retry
    wait_for(lambda: joins["c2"].poll() is not None, what="c2 leaves", timeout=60)
    assert joins["c2"].returncode == 23, processes.log("c2")[-2000:]
    assert "certificate of c2 is revoked" in processes.log("c2")
    assert joins["c1"].poll() is None

    plain = flctl("certs", "revoke", "c2", cwd=proj)
    assert plain.returncode == 0, plain.stderr
    assert "revoked c2 (every certificate) (it was revoked already; recorded again)" in plain.stdout
    assert f"through the coordinator at {address} by admin" in plain.stdout

    # registry changes go through it too, with the admin as author
    tagged = one_json(flctl("models", "tag", "1", "first", "--json", cwd=proj, check=True).stdout)
    assert tagged == {"tag": "first", "version": 1, "previous": None}
    conflict = flctl("models", "rollback", "1", "--json", cwd=proj)
    assert conflict.returncode == 73 and "already holds" in conflict.stdout

    events = _events(proj)
    audit = [e for e in events if e["type"] == "identity.revoked"]
    assert [(e["client_id"], e["data"]["author"]) for e in audit] == [("c2", "admin")] * 2
    refused = [e for e in events if e["type"] == "security.refused"]
    assert refused and all(e["client_id"] == "c2" for e in refused)
    [tag_event] = [e for e in events if e["type"] == "model.tagged"]
    assert tag_event["data"]["author"] == "admin"

    assert processes.stop("c1") == 0
    assert processes.stop("coordinator") == 0
    listing = one_json(flctl("certs", "ls", "--json", cwd=proj, check=True).stdout)
    assert {c["identity"]: c["status"] for c in listing["certificates"]}["c2"] == "revoked"
