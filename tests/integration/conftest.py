"""A real coordinator on 127.0.0.1:0 with mutual TLS, real clients, real SQLite and files."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flctl.client import Client, JoinOptions, Runner
from flctl.core import Config, TaskContext, load_config, load_task
from flctl.security import generate_project_certs, load_credentials
from flctl.transport.grpc import AdminClient, secure_channel

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def certs_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs") / "certs"
    generate_project_certs(folder, ["c1", "c2", "c3", "c4", "c5"])
    return folder


@dataclass
class Project:
    root: Path

    def write(self, **sections: dict[str, Any]) -> Config:
        base: dict[str, dict[str, Any]] = {
            "project": {"task": "tiny_task.py", "seed": 1},
            "server": {"address": "127.0.0.1:0", "heartbeat_interval_s": 0.5},
            "rounds": {"min_clients": 2, "deadline_s": 20.0, "quorum_timeout_s": 20.0},
            "data": {"num_partitions": 3},
            "task": {"lr": 0.1},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        lines = []
        for name, values in base.items():
            lines.append(f"[{name}]")
            for key, value in values.items():
                lines.append(
                    f"{key} = {value!r}"
                    if not isinstance(value, bool)
                    else f"{key} = {str(value).lower()}"
                )
        text = "\n".join(lines).replace("'", '"') + "\n"
        (self.root / "flctl.toml").write_text(text)
        return load_config(self.root / "flctl.toml")


@pytest.fixture
def project(tmp_path: Path, certs_template: Path) -> Project:
    shutil.copytree(certs_template, tmp_path / "certs")
    shutil.copy(HERE / "tiny_task.py", tmp_path / "tiny_task.py")
    return Project(tmp_path)


def make_runner(
    config: Config,
    address: str,
    client_id: str,
    *,
    partition: int = 0,
    wrap: Callable[[Client], Client] | None = None,
    runner_class: type[Runner] = Runner,
    **overrides: Any,
) -> Runner:
    """A client of the project's task for ``client_id`` (``wrap`` may decorate the client;
    ``runner_class`` may be a test's subclass of :class:`Runner`)."""
    task = load_task(config.task_path)
    context = TaskContext(
        role="client",
        seed=config.project.seed,
        client_id=client_id,
        partition_id=partition,
        num_partitions=config.data.num_partitions,
        config=dict(config.task),
    )
    cert, key, ca = load_credentials(config.certs_path, client_id)
    options = JoinOptions(
        server=address,
        client_id=client_id,
        cert_pem=cert,
        key_pem=key,
        ca_pem=ca,
        cache_dir=config.root / ".cache" / client_id,
        **overrides,
    )
    client = task.client_fn(context)
    return runner_class(wrap(client) if wrap is not None else client, options)


def admin(config: Config, address: str) -> AdminClient:
    cert, key, ca = load_credentials(config.certs_path, "admin")
    return AdminClient(secure_channel(address, cert_pem=cert, key_pem=key, ca_pem=ca))


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, step: float = 0.05
) -> None:
    """Poll a condition (sync or async) until true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")
