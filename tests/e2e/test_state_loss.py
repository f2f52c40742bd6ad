"""A lost, truncated or damaged state database is refused, never replaced; backups bring it back.

Every command runs as a subprocess, as a user runs it. The refusals must leave the project
folder exactly as it was (same files, sizes and mtimes): a command that found no usable
database used to write a fresh schema over the lost one and carry on as a new project.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from flctl.store import BlobStore, SqlStore
from tests.e2e.conftest import Processes, certs_gen, flctl, init_project, one_json, serve, wait_for

LOST = 75  # StoreLostError
CORRUPT = 74  # CorruptStoreError
INTEGRITY = 42  # IntegrityError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits project whose store holds three versions, a tag and their blobs."""
    root = tmp_path_factory.mktemp("state")
    flctl("init", "p", "--template", "digits", cwd=root, check=True)
    state = root / "p" / ".flctl"
    blobs = BlobStore(state / "blobs")
    with SqlStore.open(state) as store:
        for n in range(3):
            digest = blobs.put_bytes(f"weights {n}".encode() * 1000)
            kind = "initial" if n == 0 else "import"
            store.add_model(digest=digest, kind=kind, set_head=True, author="coordinator")
        store.add_tag(2, "best", author="local")
        for n in range(50):
            store.append_event("model.tagged", data={"tag": f"t{n}", "note": "é" * 40})
    return root / "p"


@pytest.fixture
def proj(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "p"))


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: (size, mtime in ns)."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(root))] = (info.st_size if path.is_file() else 0, info.st_mtime_ns)
    return out


def _damage(proj: Path, how: str) -> None:
    database = proj / ".flctl" / "state.db"
    if how == "truncated":
        os.truncate(database, 0)
    elif how == "missing":
        database.unlink()
    else:  # flipped bytes everywhere past the file header: the schema and every page
        data = bytearray(database.read_bytes())
        for offset in range(100, len(data), 251):
            data[offset] ^= 0x80
        database.write_bytes(bytes(data))


def _error(result: Any) -> dict[str, Any]:
    document = one_json(result.stdout)
    assert isinstance(document, dict) and "error" in document, result.stdout
    return document["error"]  # type: ignore[no-any-return]


COMMANDS = {
    "models ls": ("models", "ls", "--json"),
    "models verify": ("models", "verify", "--json"),
    "serve": ("serve", "--insecure", "--address", "127.0.0.1:0", "--no-tui"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("how", ["truncated", "missing", "corrupt"])
def test_a_damaged_database_is_refused_and_nothing_is_written(
    proj: Path, how: str, command: str
) -> None:
    _damage(proj, how)
    before = _listing(proj)
    result = flctl(*COMMANDS[command], cwd=proj, timeout=120)
    expected = CORRUPT if how == "corrupt" else LOST
    assert result.returncode == expected, result.stdout + result.stderr
    assert _listing(proj) == before
    if command == "serve":
        message = result.stderr
    else:
        error = _error(result)
        assert error["exit_code"] == expected
        message = error["message"] + " " + error["hint"]
    assert "Traceback" not in result.stderr
    assert "flctl store restore" in message and "--new-state" in message
    if how == "corrupt":
        assert "state database is corrupt" in message
    else:
        assert "held a store" in message


def test_events_and_dp_budget_refuse_a_lost_database(proj: Path) -> None:
    _damage(proj, "missing")
    before = _listing(proj)
    for args in (("events", "--json"), ("dp", "budget", "--json"), ("clients", "ls", "--json")):
        result = flctl(*args, cwd=proj)
        assert result.returncode == LOST, (args, result.stdout + result.stderr)
    assert _listing(proj) == before


def test_serve_new_state_starts_over_and_keeps_the_old_database(
    proj: Path, processes: Processes
) -> None:
    _damage(proj, "truncated")
    processes.start(
        "coordinator",
        "serve",
        "--insecure",
        "--address",
        "127.0.0.1:0",
        "--no-tui",
        "--new-state",
        cwd=proj,
    )
    wait_for((proj / ".flctl" / "serve.json").exists, what="serve.json", timeout=120)
    assert processes.stop("coordinator") == 0
    kept = list((proj / ".flctl").glob("state.db.replaced-*"))
    assert [p.stat().st_size for p in kept if not p.name.endswith(("-wal", "-shm"))] == [0]
    assert "the old database is kept as" in processes.log("coordinator")
    models = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    assert [m["version"] for m in models["models"]] == [1]


def test_backup_while_serving_then_restore_after_a_loss(
    tmp_path: Path, processes: Processes
) -> None:
    proj = init_project(tmp_path, "proj")
    certs_gen(proj, 2)
    _, address = serve(processes, "coordinator", proj)
    store_json = json.loads((proj / ".flctl" / "store.json").read_text())
    flctl("certs", "revoke", "c1", "--reason", "lost laptop", cwd=proj, check=True)
    flctl("models", "tag", "1", "first", cwd=proj, check=True)

    backup = tmp_path / "backup"
    done = one_json(flctl("store", "backup", str(backup), "--json", cwd=proj, check=True).stdout)
    assert done["store_id"] == store_json["store_id"] and done["blobs"] == 1
    assert sorted(p.name for p in backup.iterdir()) == ["manifest.json", "state.db"]
    # restoring is refused while the coordinator runs
    busy = flctl("store", "restore", str(backup), "--json", cwd=proj)
    assert busy.returncode == 73 and _error(busy)["code"] == "conflict"
    assert processes.stop("coordinator") == 0

    models = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    (proj / ".flctl" / "state.db").unlink()
    assert flctl("models", "ls", cwd=proj).returncode == LOST
    restored = flctl("store", "restore", str(backup), "--json", cwd=proj)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert one_json(restored.stdout)["blobs_verified"] == 1
    assert one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout) == models
    certs = one_json(flctl("certs", "ls", "--json", cwd=proj, check=True).stdout)
    assert {c["identity"]: c["revoked"] for c in certs["certificates"]}["c1"] is True

    # the restored coordinator still refuses the revoked client
    _, address = serve(processes, "coordinator-again", proj)
    join = flctl("join", "--server", address, "--client-id", "c1", "--once", cwd=proj, timeout=180)
    assert join.returncode == 23, join.stdout + join.stderr
    assert "revoked" in join.stdout + join.stderr


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_restore_refuses_a_manifest_whose_blob_is_missing_or_altered(
    proj: Path, tmp_path: Path, damage: str
) -> None:
    backup = tmp_path / "backup"
    flctl("store", "backup", str(backup), cwd=proj, check=True)
    manifest = json.loads((backup / "manifest.json").read_text())
    assert len(manifest["blobs"]) == 3
    blob = proj / ".flctl" / "blobs" / "sha256"
    digest = manifest["blobs"][1]["digest"]
    path = blob / digest[:2] / digest[2:]
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[10] ^= 0x01
        path.write_bytes(bytes(data))
    _damage(proj, "truncated")
    before = _listing(proj / ".flctl" / "blobs"), (proj / ".flctl" / "state.db").stat()
    result = flctl("store", "restore", str(backup), "--json", cwd=proj)
    assert result.returncode == INTEGRITY, result.stdout + result.stderr
    error = _error(result)
    assert f"{damage}: {digest}" in error["message"]
    after = _listing(proj / ".flctl" / "blobs"), (proj / ".flctl" / "state.db").stat()
    assert after == before
    assert not list((proj / ".flctl").glob("state.db.*"))
