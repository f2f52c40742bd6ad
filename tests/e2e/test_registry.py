"""``flctl models ...`` as subprocesses, on the store of a digits project.

The store is built in-process, the way a short job would leave it, without running a
federation: version 1 is the template's initial model (``build_model`` with the project's seed),
versions 2 and 3 are aggregates of rounds 1 and 2, each with two accepted client updates, all
committed through the store's own round API.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flctl.core import TaskContext, load_config, load_task
from flctl.store import BlobStore, SqlStore
from flctl.tensors import load_parameters, save_parameters
from tests.e2e.conftest import flctl, one_json

METRICS = [
    {"accuracy": 0.1, "loss": 2.3},
    {"accuracy": 0.6, "loss": 1.2},
    {"accuracy": 0.8, "loss": 0.7},
]


def _put(blobs: BlobStore, state: dict[str, torch.Tensor], tmp: Path) -> str:
    path = tmp / "m.safetensors"
    save_parameters(state, path)
    return blobs.put_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    flctl("init", "p", "--template", "digits", cwd=root, check=True)
    project = root / "p"
    config = load_config(project / "flctl.toml")
    task = load_task(config.task_path)
    torch.manual_seed(config.project.seed)
    model = task.build_model(TaskContext(role="coordinator", seed=config.project.seed))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snapshot = {
        "rounds": vars(config.rounds),
        "strategy": {"name": config.strategy.name, **config.strategy.params},
        "task": dict(config.task),
        "seed": 0,
    }
    blobs = BlobStore(config.state_path / "blobs")
    with SqlStore.open(config.state_path) as store:
        digest = _put(blobs, state, root)
        store.add_model(
            digest=digest, kind="initial", set_head=True, metrics=METRICS[0], author="coordinator"
        )
        generator = torch.Generator().manual_seed(1)
        for step in (1, 2):
            [server_round] = store.create_rounds(1, snapshot)
            store.set_round_status(
                server_round, "training", base_version=step, selected=["c1", "c2"]
            )
            for n, client in ((60, "c1"), (40, "c2")):
                update = {
                    k: v + 0.01 * torch.randn(v.shape, generator=generator)
                    if v.is_floating_point()
                    else v
                    for k, v in state.items()
                }
                store.add_update(
                    server_round=server_round,
                    client_id=client,
                    task_id=f"t{server_round}-{client}",
                    status="accepted",
                    digest=_put(blobs, update, root),
                    num_examples=n,
                    metrics={"train_loss": 1.0 / step},
                )
            state = {
                k: v + 0.05 * torch.randn(v.shape, generator=generator)
                if v.is_floating_point()
                else v
                for k, v in state.items()
            }
            store.commit_round(
                server_round,
                digest=_put(blobs, state, root),
                metrics=METRICS[step],
                num_clients=2,
            )
    return project


@pytest.fixture
def proj(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built project for each test (tests change the store)."""
    return Path(shutil.copytree(built, tmp_path / "p"))


def _json(proj: Path, *args: str, code: int = 0) -> Any:
    result = flctl("models", *args, "--json", cwd=proj)
    assert result.returncode == code, result.stdout + result.stderr
    return one_json(result.stdout)


def _blob_files(proj: Path) -> dict[str, bytes]:
    root = proj / ".flctl" / "blobs"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(proj: Path) -> dict[str, int]:
    conn = sqlite3.connect(proj / ".flctl" / "state.db")
    try:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("models", "tags", "events", "refs", "rounds", "updates")
        }
    finally:
        conn.close()


def _events(proj: Path, type_: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(proj / ".flctl" / "state.db")
    try:
        rows = conn.execute("SELECT data FROM events WHERE type = ?", (type_,)).fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]) for r in rows]


def _blob(proj: Path, digest: str) -> Path:
    return proj / ".flctl" / "blobs" / "sha256" / digest[:2] / digest[2:]


MODEL_KEYS = {
    "version",
    "digest",
    "parent",
    "round",
    "kind",
    "status",
    "reason",
    "author",
    "source",
    "metrics",
    "config_hash",
    "tags",
    "created",
    "is_head",
}


# -- reading ----------------------------------------------------------------------------------


def test_ls_show_and_diff(proj: Path) -> None:
    assert _json(proj, "tag", "2", "best") == {"tag": "best", "version": 2, "previous": None}

    ls = _json(proj, "ls")
    assert set(ls) == {"models", "head"} and ls["head"] == 3
    assert [m["version"] for m in ls["models"]] == [3, 2, 1]
    assert all(set(m) == MODEL_KEYS for m in ls["models"])
    v3, v2, v1 = ls["models"]
    assert (v3["kind"], v3["is_head"], v3["round"], v3["parent"], v3["author"]) == (
        "aggregate",
        True,
        2,
        2,
        "round",
    )
    assert (v1["kind"], v1["parent"], v2["tags"]) == ("initial", None, ["best"])
    assert [m["version"] for m in _json(proj, "ls", "--limit", "1")["models"]] == [3]

    show = _json(proj, "show", "3")
    assert set(show) == {
        "model",
        "lineage",
        "round",
        "strategy",
        "strategy_state",
        "config",
        "config_hash",
        "tensors",
        "size_bytes",
        "blob",
        "secure_aggregation",
    }
    assert show["secure_aggregation"] is None  # a plain FedAvg round
    assert [x["version"] for x in show["lineage"]] == [3, 2, 1]
    assert show["lineage"][-1]["kind"] == "initial"
    contributors = show["round"]["contributors"]
    assert [(c["client_id"], c["num_examples"]) for c in contributors] == [("c1", 60), ("c2", 40)]
    assert contributors[0]["metrics"] == {"train_loss": 0.5}
    assert show["round"]["round"] == 2 and show["round"]["metrics"] == METRICS[2]
    assert show["strategy"] == "fedavg" and show["config"]["strategy"] == {"name": "fedavg"}
    assert show["strategy_state"] is None  # FedAvg keeps none
    canonical = json.dumps(show["config"], sort_keys=True)
    assert show["config_hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    digest = show["model"]["digest"]
    stored = load_parameters(_blob(proj, digest))
    assert show["tensors"]["count"] == len(stored)
    assert show["tensors"]["parameters"] == sum(t.numel() for t in stored.values())
    assert show["size_bytes"] == _blob(proj, digest).stat().st_size and show["blob"] == "present"

    # the same version by tag, by digest prefix and as head
    assert _json(proj, "show", "best")["model"]["version"] == 2
    assert _json(proj, "show", digest[:8])["model"]["version"] == 3
    assert _json(proj, "show", "head")["model"]["version"] == 3
    assert _json(proj, "show", "42", code=71)["error"]["code"] == "not_found"
    assert _json(proj, "show", digest[:4], code=40)["error"]["code"] == "invalid_argument"

    diff = _json(proj, "diff", "1", "3")
    assert set(diff) == {
        "a",
        "b",
        "same_digest",
        "tensors",
        "only_in_a",
        "only_in_b",
        "total",
        "metrics",
    }
    assert diff["a"]["version"] == 1 and diff["b"]["version"] == 3 and not diff["same_digest"]
    first = load_parameters(_blob(proj, ls["models"][2]["digest"]))
    assert [t["name"] for t in diff["tensors"]] == sorted(first)
    for row in diff["tensors"]:
        a, b = first[row["name"]].double(), stored[row["name"]].double()
        assert row["l2"] == pytest.approx(float(torch.linalg.vector_norm(b - a)), rel=1e-9)
        assert row["relative"] == pytest.approx(
            float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a)), rel=1e-9
        )
        assert row["max_abs"] == pytest.approx(float((b - a).abs().max()), rel=1e-9)
    assert diff["total"]["l2"] > 0 and diff["only_in_a"] == diff["only_in_b"] == []
    assert diff["metrics"]["accuracy"] == {"a": 0.1, "b": 0.8, "delta": pytest.approx(0.7)}


def test_plain_output_when_piped(proj: Path) -> None:
    ls = flctl("models", "ls", cwd=proj, check=True).stdout.splitlines()
    newest = dict(zip(ls[0].split("\t"), ls[1].split("\t"), strict=True))
    assert newest["version"] == "3" and newest["kind"] == "aggregate (head)"
    assert newest["accuracy"] == "0.8000"
    show = flctl("models", "show", "3", cwd=proj, check=True)
    assert "model version 3" in show.stderr  # piped, titles go to stderr
    assert "lineage: 3 (aggregate) <- 2 (aggregate) <- 1" in show.stdout
    assert "c1: 60 examples" in show.stdout and "strategy: fedavg" in show.stdout
    assert "config.strategy.name: fedavg" in show.stdout and "{" not in show.stdout
    diff = flctl("models", "diff", "2", "2", cwd=proj, check=True)
    assert "identical weights" in diff.stderr and "total: l2=0" in diff.stdout


# -- writing ----------------------------------------------------------------------------------


def test_rollback_writes_a_new_head_with_the_old_digest(proj: Path) -> None:
    before = _json(proj, "ls")
    v1 = before["models"][2]
    done = _json(proj, "rollback", "1", "--reason", "round 2 diverged")
    model = done["model"]
    assert (model["version"], model["kind"], model["digest"]) == (4, "rollback", v1["digest"])
    assert (model["parent"], model["source"], model["is_head"]) == (3, 1, True)
    assert (model["author"], model["reason"]) == ("local", "round 2 diverged")
    assert done["previous_head"] == 3 and done["source"] == 1
    after = _json(proj, "ls")
    assert after["head"] == 4 and after["models"][1:] == [
        {**m, "is_head": False} for m in before["models"]
    ]
    [event] = _events(proj, "model.rollback")
    assert (event["version"], event["source"], event["previous_head"]) == (4, 1, 3)
    assert event["author"] == "local"
    # the head already holds those weights: refused, nothing written
    rows = _rows(proj)
    assert _json(proj, "rollback", "1", code=73)["error"]["code"] == "conflict"
    assert _rows(proj) == rows


def test_export_safetensors_and_torch(proj: Path) -> None:
    digest = _json(proj, "show", "2")["model"]["digest"]
    stored = load_parameters(_blob(proj, digest))

    done = _json(proj, "export", "2", "-o", "m.pt", "--format", "torch")
    assert done["format"] == "torch" and Path(done["file"]).name == "m.pt"
    loaded = torch.load(proj / "m.pt", weights_only=True)
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)

    _json(proj, "export", "2", "-o", "m.safetensors")
    assert (proj / "m.safetensors").read_bytes() == _blob(proj, digest).read_bytes()
    sidecar = json.loads((proj / "m.safetensors.json").read_text())
    assert sidecar["digest"] == digest and sidecar["metrics"] == METRICS[1]
    assert [x["version"] for x in sidecar["lineage"]] == [2, 1]
    assert sidecar["lineage"][1]["metrics"] == METRICS[0]
    # no silent overwrite
    assert _json(proj, "export", "2", "-o", "m.safetensors", code=73)["error"]["code"] == "conflict"


@pytest.mark.parametrize("fifo", ["m.safetensors", "m.safetensors.json"])
def test_export_refuses_to_replace_what_is_not_a_regular_file(proj: Path, fifo: str) -> None:
    """A named pipe (as a device node would be) is left alone, --force or not."""
    os.mkfifo(proj / fifo)
    for force in ([], ["--force"]):
        error = _json(proj, "export", "2", "-o", "m.safetensors", *force, code=40)["error"]
        assert error["code"] == "invalid_argument"
        assert f"{fifo} exists and is not a regular file" in error["message"]
        assert stat.S_ISFIFO((proj / fifo).lstat().st_mode)
    assert not any(p.name.endswith(".tmp") for p in proj.iterdir())


def test_import_checks_the_file_and_writes_nothing_when_refused(proj: Path) -> None:
    head = _json(proj, "show", "head")["model"]
    state = load_parameters(_blob(proj, head["digest"]))
    name = next(k for k, v in state.items() if v.dim() > 1)
    wrong_shape = {**state, name: torch.zeros(3, 3)}
    nan = {k: v.clone() for k, v in state.items()}
    nan[name].view(-1)[0] = float("nan")
    save_parameters(wrong_shape, proj / "wrong.safetensors")
    save_parameters(nan, proj / "nan.safetensors")
    (proj / "junk.bin").write_bytes(b"not a model")
    rows, blobs = _rows(proj), _blob_files(proj)
    for file, needle in (
        ("wrong.safetensors", "shape"),
        ("nan.safetensors", "NaN"),
        ("junk.bin", "not a safetensors file"),
    ):
        error = _json(proj, "import", file, code=40)["error"]
        assert needle in error["message"], error
        assert _rows(proj) == rows and _blob_files(proj) == blobs

    good = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    save_parameters(good, proj / "good.safetensors")
    done = _json(proj, "import", "good.safetensors")
    assert (done["model"]["kind"], done["model"]["version"], done["head"]) == ("import", 4, 3)
    assert done["model"]["parent"] == 3 and done["model"]["author"] == "local"
    assert (
        _blob(proj, done["model"]["digest"]).read_bytes()
        == (proj / "good.safetensors").read_bytes()
    )
    as_head = _json(proj, "import", "good.safetensors", "--head")
    assert as_head["head"] == as_head["model"]["version"] == 5
    assert [e["head"] for e in _events(proj, "model.imported")] == [False, True]


def test_verify_finds_corrupt_and_missing_blobs(proj: Path) -> None:
    ok = _json(proj, "verify")
    assert ok == {"checked": 3, "ok": 3, "missing": [], "corrupt": []}
    ls = _json(proj, "ls")["models"]
    v3, v2, v1 = (m["digest"] for m in ls)
    blob = _blob(proj, v2)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    _blob(proj, v1).unlink()

    bad = _json(proj, "verify", code=42)
    assert (bad["checked"], bad["ok"]) == (3, 1)
    assert bad["corrupt"] == [{"digest": v2, "versions": [2], "size": len(data)}]
    assert bad["missing"] == [{"digest": v1, "versions": [1]}]
    assert bad["error"]["code"] == "integrity" and bad["error"]["exit_code"] == 42
    plain = flctl("models", "verify", cwd=proj)
    assert plain.returncode == 42 and "corrupt: blob" in plain.stdout
    # a corrupt version cannot be rolled back to or exported
    assert _json(proj, "rollback", "2", code=42)["error"]["code"] == "integrity"
    assert (
        _json(proj, "export", "2", "-o", "x.safetensors", code=42)["error"]["code"] == "integrity"
    )
    assert not (proj / "x.safetensors").exists()


def test_gc_removes_only_unreferenced_blobs(proj: Path) -> None:
    store_root = proj / ".flctl"
    blobs = BlobStore(store_root / "blobs")
    orphan = blobs.put_bytes(b"left behind")
    with SqlStore.open(store_root) as store:
        referenced = {m.digest for m in store.list_models()}
        [open_round] = store.create_rounds(1)
        store.set_round_status(open_round, "training")
        pending = blobs.put_bytes(b"an update the open round may still aggregate")
        store.add_update(
            server_round=open_round, client_id="c1", task_id="t", status="accepted", digest=pending
        )
        # the client updates of the committed rounds 1 and 2 are no longer needed
        spent = {u.digest for r in (1, 2) for u in store.updates_for_round(r)}
    before = set(blobs.digests())
    assert before == referenced | spent | {orphan, pending}

    dry = _json(proj, "gc", "--dry-run")
    assert dry["dry_run"] and {r["digest"] for r in dry["removed"]} == spent | {orphan}
    assert set(blobs.digests()) == before
    done = _json(proj, "gc")
    assert {r["digest"] for r in done["removed"]} == spent | {orphan}
    assert done["bytes_freed"] == dry["bytes_freed"] > 0 and done["kept"] == 4
    assert set(blobs.digests()) == referenced | {pending}
    assert _json(proj, "verify")["ok"] == 3
    assert _json(proj, "gc")["removed"] == []


@pytest.fixture
def coordinator_lock(proj: Path) -> Iterator[None]:
    """Hold the lock a running coordinator holds, and write its serve.json (our pid)."""
    state = proj / ".flctl"
    (state / "serve.json").write_text(json.dumps({"pid": os.getpid(), "address": "127.0.0.1:1"}))
    with (state / "coordinator.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@pytest.mark.usefixtures("coordinator_lock")
def test_writes_go_through_a_running_coordinator_or_are_refused(proj: Path) -> None:
    rows, blobs = _rows(proj), _blob_files(proj)
    # gc cannot go through the coordinator: refused while one holds the lock
    error = _json(proj, "gc", code=73)["error"]
    assert error["message"] == (
        f"a coordinator is running (pid {os.getpid()}, address 127.0.0.1:1): "
        "this change must go through it"
    )
    plain = flctl("models", "gc", cwd=proj)
    assert plain.returncode == 73 and "a coordinator is running" in plain.stderr
    # rollback and tag go through its Admin service, never the store: with no admin certificate
    # they cannot, and once there is one, none answers at the published address
    assert _json(proj, "rollback", "1", code=21)["error"]["message"].endswith("admin.crt not found")
    flctl("certs", "gen", "--clients", "0", cwd=proj, check=True)
    for args in (("rollback", "1"), ("tag", "1", "best")):
        error = _json(proj, *args, code=31)["error"]
        assert error["code"] == "unavailable"
    assert _rows(proj) == rows and _blob_files(proj) == blobs
    # reading needs no lock
    assert _json(proj, "ls")["head"] == 3
    assert _json(proj, "gc", "--dry-run")["dry_run"] is True
