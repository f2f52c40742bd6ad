"""The in-process transport against the gRPC transport's contract.

The same coordinator (``Coordinator(in_process=True)``: no listener) serves in-process clients
(:class:`flctl.coordinator.LocalClients`, what ``flctl simulate`` drives). A download reads the
same bytes; every malformed update is refused with the same error and the same message as over
gRPC, leaves no file behind and makes the task's refusal final; a good update is accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flctl.coordinator import Coordinator, LocalClients
from flctl.core.errors import FlctlError
from flctl.core.work import Task, UploadHeader
from flctl.store import BlobStore
from flctl.tensors import load_parameters, save_parameters
from flctl.transport.grpc import pb

from .conftest import Project, wait_until
from .test_transfers import _open_round, start, stop

pytestmark = pytest.mark.timeout(120)


def _update_files(base: Path, folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each case: the update file, and the header fields that differ from a good header."""
    folder.mkdir(parents=True, exist_ok=True)
    model = load_parameters(base)
    files: dict[str, dict[str, torch.Tensor]] = {
        "good": {n: t + 0.01 if t.is_floating_point() else t for n, t in model.items()},
        "nan": {n: t * float("nan") for n, t in model.items()},
        "shape": {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)},
    }
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name, params in files.items():
        path = folder / name
        save_parameters(params, path)
        out[name] = (path, {})
    good = out["good"][0]
    out["digest"] = (good, {"digest": "0" * 64})
    out["oversize"] = (good, {"size": 10**12})
    out["examples"] = (good, {"num_examples": 0})
    out["metrics"] = (good, {"metrics": {"loss": float("inf")}})
    return out


def _fields(task: Task | pb.Task, path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    data = path.read_bytes()
    fields: dict[str, Any] = {
        "server_round": int(task.server_round),
        "task_id": task.task_id,
        "num_examples": 10,
        "digest": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    fields.update(changes)
    return fields


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 65536):
        yield data[i : i + 65536]


async def _over_grpc(project: Project, folder: Path) -> tuple[dict[str, str], bytes]:
    """What the gRPC transport answers each case: the refusal (or "accepted")."""
    h = await start(project)
    try:
        task = await _open_round(h, project)
        cases = _update_files(h.blobs.path(h.digest), folder)
        answers: dict[str, str] = {}
        engine = h.coordinator._engine
        assert engine is not None and engine.open is not None
        for name, (path, changes) in cases.items():
            if name == "good":
                continue
            fields = _fields(task, path, changes)
            metrics = fields.pop("metrics", {})
            header = pb.UploadHeader(**fields)
            for key, value in metrics.items():
                header.metrics[key].double_value = value
            try:
                reply = await h.api.upload(header, _pieces(path.read_bytes()))
                answers[name] = "accepted" if reply.accepted else reply.reason
            except FlctlError as exc:
                answers[name] = f"{type(exc).__name__}: {exc.message}"
            engine.open.refused.clear()  # each refusal is final for the task: reopen it
        path, changes = cases["good"]
        reply = await h.api.upload(
            pb.UploadHeader(**_fields(task, path, changes)), _pieces(path.read_bytes())
        )
        answers["good"] = "accepted" if reply.accepted else reply.reason

        class Sink:
            data = bytearray()

            def write(self, chunk: bytes | memoryview) -> int:
                self.data.extend(chunk)
                return len(chunk)

        sink = Sink()
        await h.api.download(task.model_digest, sink)
        return answers, bytes(sink.data)
    finally:
        await stop(h)


async def _in_process(project: Project, folder: Path) -> tuple[dict[str, str], bytes, Path]:
    """What the in-process transport answers each case; the model bytes; the blob folder."""
    config = project.write(rounds={"min_clients": 1})
    coordinator = Coordinator(config, in_process=True)
    assert await coordinator.start() == "in-process"
    try:
        local = coordinator.local
        assert isinstance(local, LocalClients)
        session = local.connect("c1")
        coordinator.queue_rounds(1, admin="test")
        task = await asyncio.wait_for(local.next_task(session), 20)
        assert task is not None and task.kind == "fit"
        model = local.model_path(task.model_digest)
        cases = _update_files(model, folder)
        blobs = BlobStore(config.state_path / "blobs")
        before = sorted(p for p in blobs.root.rglob("*") if p.is_file())
        engine = coordinator._engine
        assert engine is not None and engine.open is not None
        answers: dict[str, str] = {}
        for name, (path, changes) in cases.items():
            if name == "good":
                continue
            header = UploadHeader(**_fields(task, path, changes))
            try:
                answer = await local.upload(session, header, path)
                answers[name] = "accepted" if answer.accepted else answer.reason
            except FlctlError as exc:
                answers[name] = f"{type(exc).__name__}: {exc.message}"
            assert path.exists()  # refused: the caller's file stays, for it to remove
            engine.open.refused.clear()
        # refusals left nothing in the state folder's blobs
        assert sorted(p for p in blobs.root.rglob("*") if p.is_file()) == before
        path, changes = cases["good"]
        answer = await local.upload(session, UploadHeader(**_fields(task, path, changes)), path)
        answers["good"] = "accepted" if answer.accepted else answer.reason
        assert not path.exists()  # accepted: the file moved into the blob store
        store = coordinator.store
        assert store is not None
        await wait_until(lambda: store.get_round(task.server_round).status == "committed")
        return answers, model.read_bytes(), blobs.root
    finally:
        await coordinator.stop()


def test_in_process_uploads_are_refused_as_over_grpc(
    project: Project, tmp_path: Path, certs_template: Path
) -> None:
    import shutil

    from .conftest import HERE

    other = tmp_path / "in-process"
    other.mkdir()
    shutil.copytree(certs_template, other / "certs")
    shutil.copy(HERE / "tiny_task.py", other / "tiny_task.py")

    grpc_answers, grpc_model = asyncio.run(_over_grpc(project, tmp_path / "grpc-files"))
    local_answers, local_model, _ = asyncio.run(_in_process(Project(other), tmp_path / "files"))
    assert local_model == grpc_model  # the same model, read where it rests
    assert set(local_answers) == {
        "good",
        "nan",
        "shape",
        "digest",
        "oversize",
        "examples",
        "metrics",
    }
    assert local_answers["good"] == grpc_answers["good"] == "accepted"
    for name in ("nan", "shape", "digest", "oversize", "examples", "metrics"):
        assert local_answers[name] == grpc_answers[name], name
        assert local_answers[name].split(":")[0].endswith("Error"), local_answers[name]
    assert "NaN or Inf" in local_answers["nan"]
    assert "exceeds the limit" in local_answers["oversize"]
    assert "do not match the digest" in local_answers["digest"]
