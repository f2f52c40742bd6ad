"""A full disk under the coordinator's state folder: refused clearly, nothing left behind.

The state folder lives on a small tmpfs the test mounts (root only: the test fails, with the
reason, where it cannot mount). A filler file takes the room away at chosen moments:

- before an upload begins: BeginUpload is refused with ``storage_full`` (RESOURCE_EXHAUSTED)
  from the free-space check, before any file is made;
- in the middle of an upload's stream: the write fails with ENOSPC, the client hears
  ``storage_full``, and the part file is gone;
- meanwhile a ``storage.full`` event names the path and the free space, ``round status`` shows
  the warning, and a read-only command (``flctl events``) still works;
- once there is room again the same update is accepted and the round commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from flctl.client import ClientCache, fetch_blob
from flctl.coordinator import Coordinator
from flctl.core.errors import StorageFullError, TransportError
from flctl.security import load_credentials
from flctl.tensors import fingerprint, load_parameters, save_parameters, spec_of
from flctl.transport.grpc import PROTOCOL_VERSION, CoordinatorClient, pb, secure_channel

from .conftest import Project, admin, wait_until

pytestmark = pytest.mark.timeout(180)

FEATURES = 250_000  # a model of about 2 MiB
MOUNT_MB = 9


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of MOUNT_MB MiB, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={MOUNT_MB}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"this test mounts a tmpfs and needs root: {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as handle:
        handle.truncate(0)
        remaining = max(0, free - leave)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            handle.write(block[: min(len(block), remaining)])
            remaining -= min(len(block), remaining)
    return filler


async def _pieces(
    data: bytes, size: int = 65536, *, fill_after: int = 0, disk: Path | None = None
) -> AsyncIterator[bytes]:
    """``data`` in chunks; with ``disk``, the disk is filled up after ``fill_after`` chunks."""
    for n, i in enumerate(range(0, len(data), size)):
        if disk is not None and n == fill_after:
            await asyncio.to_thread(_fill, disk, 0)
        yield data[i : i + size]
        await asyncio.sleep(0)


def test_a_full_disk_is_refused_clearly_and_leaves_nothing(
    project: Project, small_disk: Path
) -> None:
    config = project.write(
        project={"task": "tiny_task.py", "seed": 1, "state_dir": str(small_disk / "state")},
        # the test's client sends no heartbeats: it must not be dropped as silent meanwhile
        server={
            "address": "127.0.0.1:0",
            "heartbeat_interval_s": 0.5,
            "heartbeat_timeout_s": 600.0,
            "min_free_mb": 1.0,
        },
        rounds={"min_clients": 1, "deadline_s": 120.0, "quorum_timeout_s": 30.0},
        task={"in_features": FEATURES},
    )
    uploads = config.state_path / "uploads"

    async def main() -> dict[str, object]:
        coordinator = Coordinator(config)
        address = await coordinator.start()
        cert, key, ca = load_credentials(config.certs_path, "c1")
        api = CoordinatorClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))
        operator = admin(config, address)
        try:
            spec = spec_of(torch.nn.Linear(FEATURES, 2).state_dict())
            await api.join(
                pb.JoinRequest(
                    protocol_version=PROTOCOL_VERSION, task_fingerprint=fingerprint(spec)
                )
            )
            tasks = api.tasks()
            first = asyncio.ensure_future(anext(tasks))
            await asyncio.sleep(0.5)
            await operator.start_round(1)
            task = await asyncio.wait_for(first, 60)
            model = await fetch_blob(api, ClientCache(project.root / "cache"), task.model_digest)
            nudged = {n: t + 0.01 for n, t in load_parameters(model).items()}
            save_parameters(nudged, project.root / "update")
            data = (project.root / "update").read_bytes()
            header = pb.UploadHeader(
                server_round=task.server_round,
                task_id=task.task_id,
                num_examples=10,
                digest=hashlib.sha256(data).hexdigest(),
                size=len(data),
            )

            # 1. no room for the update: refused before anything is written
            filler = _fill(small_disk, leave=len(data) // 2)
            with pytest.raises(StorageFullError, match="storage full") as refused:
                await api.begin_upload(header)
            assert refused.value.code == "storage_full"
            assert list(uploads.iterdir()) == []
            status = await operator.status([])
            warnings = list(status.warnings)
            assert warnings and "storage full" in warnings[0] and str(uploads) in warnings[0]
            # a read-only command still works on the full disk
            listed = subprocess.run(
                [sys.executable, "-m", "flctl", "events", "--json", "--type", "storage"],
                cwd=project.root,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert listed.returncode == 0, listed.stderr
            (full,) = json.loads(listed.stdout)["events"]
            assert full["data"]["path"] == str(uploads)
            assert full["data"]["free_bytes"] < len(data)

            # 2. room when the stream starts, none in its middle (another writer took it):
            # ENOSPC is storage_full, and the part file is gone
            filler.unlink()
            begun = await api.begin_upload(header)
            assert begun.accepted
            body = header.__deepcopy__()
            body.upload_id = begun.upload_id
            # The coordinator refuses while our writes are still in flight: grpc.aio may then
            # end the call without the status (the product's client asks BeginUpload again,
            # as below), so any failure of this call will do; what counts is what follows.
            with pytest.raises((StorageFullError, TransportError, asyncio.CancelledError)):
                await api.upload(body, _pieces(data, fill_after=4, disk=small_disk))
            with pytest.raises(StorageFullError, match="storage full"):
                await api.begin_upload(header)  # still full: refused
            # what the cut stream had written is not kept as a resumable part beyond its
            # upload's own files (the storage-full path removes those too)
            assert all(p.stem == body.upload_id for p in uploads.iterdir())

            # 2b. no room when the stream starts: the begun upload is dropped too
            (small_disk / "filler").unlink()
            begun = await api.begin_upload(header)
            body.upload_id = begun.upload_id
            _fill(small_disk, leave=len(data) // 4)
            with pytest.raises(StorageFullError):
                await api.upload(body, _pieces(data))
            assert list(uploads.iterdir()) == []

            # 3. room again: the same update is accepted and the round commits
            (small_disk / "filler").unlink()
            begun = await api.begin_upload(header)
            body.upload_id = begun.upload_id
            reply = await api.upload(body, _pieces(data))
            assert reply.accepted, reply.reason

            async def ended() -> bool:
                s = await operator.status([task.server_round])
                return s.rounds[0].status in ("committed", "failed")

            await wait_until(ended, timeout=60)
            status = await operator.status([task.server_round])
            return {
                "status": status.rounds[0].status,
                "reason": status.rounds[0].reason,
                "warnings": list(status.warnings),
            }
        finally:
            await operator.close()
            await api.close()
            await coordinator.stop()

    try:
        result = asyncio.run(main())
    except grpc.RpcError as exc:  # pragma: no cover - a failure's detail, for the reader
        raise AssertionError(f"unexpected gRPC error: {exc}") from exc
    assert result["status"] == "committed", result["reason"]
    assert result["warnings"] == []
    assert list(uploads.iterdir()) == []
    assert not any(p.name.startswith(".") for p in (config.state_path / "blobs").rglob("*"))
    os.sync()
