"""``flctl status`` on a one-coordinator project (SQLite): the coordinator serve.json names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import Processes, certs_gen, flctl, one_json, serve

pytestmark = pytest.mark.timeout(240)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"


def test_status_names_the_running_coordinator_and_exits_31_without_one(
    tmp_path: Path, processes: Processes
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text('[project]\ntask = "tiny_task.py"\n')
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    certs_gen(proj, 1)
    none = flctl("status", cwd=proj)
    assert none.returncode == 31 and "no coordinator leads" in none.stderr

    _, address = serve(processes, "coordinator", proj)
    doc = one_json(flctl("status", "--json", cwd=proj, check=True).stdout)
    assert doc["backend"] == "sqlite" and doc["store"].endswith("state.db")
    assert doc["leader"] == address and doc["health"] == {address: "SERVING"}
    assert doc["epochs"] == [] and doc["coordinators"] == []
    plain = flctl("status", cwd=proj, check=True).stdout
    assert f"leader: {address}" in plain

    assert processes.stop("coordinator") == 0
    gone = flctl("status", "--server", address, "--json", cwd=proj)
    assert gone.returncode == 31
    error = one_json(gone.stdout)["error"]
    assert error["code"] == "unavailable" and error["details"]["health"] == {address: "UNREACHABLE"}
