"""Helpers to run ``flctl`` exactly as a user does: as a subprocess, in a project folder."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FLCTL = [sys.executable, "-m", "flctl"]


def flctl(
    *args: str,
    cwd: Path,
    timeout: float = 240,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [*FLCTL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"flctl {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


_CERTS: dict[int, Path] = {}
#: Held while certs_gen or init_project makes what it copies (tests may call them from threads).
_MADE_LOCK = threading.Lock()


def certs_gen(proj: Path, clients: int) -> None:
    """Give ``proj`` the certificates ``flctl certs gen --clients N`` writes (CA, server,
    admin, c1..cN, and their index) in its ``certs`` folder.

    The command runs once per run for each N, in a project of its own, and its folder is
    copied (file modes kept): each test's coordinator and clients live in a folder and on a
    port of their own, so a CA per test buys nothing but a process (over a second) per test.
    test_certs_lifecycle and test_by_hand run ``certs gen`` in their project as a user does.
    """
    with _MADE_LOCK:
        made = _CERTS.get(clients)
        if made is None:
            root = Path(tempfile.mkdtemp(prefix=f"flctl-certs-{clients}-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            (root / "flctl.toml").write_text('[project]\nname = "certificates"\n')
            flctl("certs", "gen", "--clients", str(clients), cwd=root, check=True)
            made = _CERTS[clients] = root / "certs"
    shutil.copytree(made, proj / "certs")


_INITS: dict[tuple[str, ...], Path] = {}


def init_project(parent: Path, name: str, *args: str) -> Path:
    """The project ``flctl init NAME ARGS`` writes in ``parent``: ``parent / name``.

    The command runs once per run for each NAME and ARGS, in a folder of its own, and the
    project it wrote is copied: what it writes depends on them alone, and it is a process of
    over a second. The tests of ``init`` itself run it as a user does.
    """
    key = (name, *args)
    with _MADE_LOCK:
        made = _INITS.get(key)
        if made is None:
            root = Path(tempfile.mkdtemp(prefix="flctl-init-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            flctl("init", name, *args, cwd=root, check=True)
            made = _INITS[key] = root / name
    return Path(shutil.copytree(made, parent / name))


def one_json(stdout: str) -> Any:
    """stdout must be exactly one JSON document."""
    return json.loads(stdout)


class Processes:
    """Background flctl processes that are always stopped, by PID, at the end of a test."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, cwd: Path) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [*FLCTL, *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, timeout: float = 20) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "coordinator"):
            self.stop(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_for(predicate, timeout: float = 120, step: float = 0.1, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} not met within {timeout} s")


def serve(processes: Processes, name: str, proj: Path, *args: str) -> tuple[int, str]:
    """Start ``flctl serve`` (with ``args``) on a free loopback port in ``proj``; its pid and
    address once it listens (its serve.json names it)."""
    proc = processes.start(name, "serve", "--address", "127.0.0.1:0", "--no-tui", *args, cwd=proj)
    serve_file = proj / ".flctl" / "serve.json"

    def ready() -> dict[str, Any] | None:
        try:
            info = json.loads(serve_file.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and info.get("pid") == proc.pid else None

    info = wait_for(ready, what=f"{name} listening", timeout=120)
    return proc.pid, str(info["address"])
