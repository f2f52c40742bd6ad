"""The validation gate from the command line: `round start --wait`, `models ls`, `events`.

`flctl serve` and two `flctl join` run as subprocesses on the integration tests' tiny task,
whose clients return inverted, huge weights from round 2 on (finite, so they are accepted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import Processes, certs_gen, flctl, one_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"

FLCTL_TOML = """\
[project]
task = "tiny_task.py"
seed = 1

[server]
heartbeat_interval_s = 0.5

[rounds]
min_clients = 2
deadline_s = 60.0

[gate]
mode = "metric"
metric = "loss"
better = "lower"
max_regression = 1.0

[task]
lr = 0.1
sabotage_from_round = 2
"""


def test_a_rejected_round_exits_83_and_its_model_is_listed_with_all(
    tmp_path: Path, processes: Processes
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(FLCTL_TOML)
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 2)
    processes.start("coordinator", "serve", "--address", "127.0.0.1:0", "--no-tui", cwd=proj)
    serve_file = proj / ".flctl" / "serve.json"
    wait_for(serve_file.exists, what="serve.json", timeout=120)
    address = json.loads(serve_file.read_text())["address"]
    for cid in ("c1", "c2"):
        processes.start(cid, "join", "--server", address, "--client-id", cid, cwd=proj)

    result = flctl("round", "start", "--rounds", "2", "--wait", "--json", cwd=proj)
    assert result.returncode == 83, result.stdout + result.stderr
    document = one_json(result.stdout)
    assert [r["status"] for r in document["rounds"]] == ["committed", "rejected"]
    assert document["model_version"] == 2
    rejected_round = document["rounds"][1]
    assert rejected_round["model_version"] == 3
    assert rejected_round["reason"].startswith("loss ")
    assert "of version 2 (the best version); max_regression is 1" in rejected_round["reason"]

    listed = one_json(flctl("models", "ls", "--all", "--json", cwd=proj, check=True).stdout)
    assert listed["head"] == 2
    newest = listed["models"][0]
    assert (newest["version"], newest["kind"], newest["status"]) == (3, "aggregate", "rejected")
    assert newest["reason"] == rejected_round["reason"] and newest["is_head"] is False
    default = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    assert [m["version"] for m in default["models"]] == [2, 1]

    events = one_json(
        flctl("events", "--type", "model.rejected", "--json", cwd=proj, check=True).stdout
    )
    [event] = events["events"]
    assert event["data"]["version"] == 3 and event["data"]["reason"] == rejected_round["reason"]
    assert processes.stop("coordinator") == 0
