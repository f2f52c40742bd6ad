"""``flctl simulate --backend ray`` against a real Ray instance this test starts and stops.

Ray is installed by the dev extra (``.ci/run``); a machine where Ray cannot start fails this
test with Ray's own output, never skips it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import flctl, one_json

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_simulation_runs_on_a_local_ray_cluster(tmp_path: Path) -> None:
    ray = Path(sys.executable).parent / "ray"
    assert ray.exists(), f"the ray CLI is missing ({ray}): install flctl's [ray] extra"
    port = _free_port()
    log_path = tmp_path / "ray-head.log"
    with log_path.open("wb") as log:
        head = subprocess.Popen(
            [str(ray), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"Ray's head did not start on 127.0.0.1:{port}:\n{log_path.read_text()}"
                )
            time.sleep(0.5)
        flctl("init", "proj", cwd=tmp_path, check=True)
        proj = tmp_path / "proj"
        env_token = {"RAY_AUTH_MODE": "token"}  # the head's token authentication (its default)
        os.environ.update(env_token)
        try:
            result = flctl(
                "simulate", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}",
                "--clients", "40", "--rounds", "2", "--per-round", "8", "--workers", "1",
                "--json", cwd=proj,
            )  # fmt: skip
        finally:
            for key in env_token:
                os.environ.pop(key, None)
        assert result.returncode == 0, f"{result.stderr}\nray head:\n{log_path.read_text()}"
        report = one_json(result.stdout)
        assert report["backend"] == "ray" and report["workers"] == 1
        assert [r["status"] for r in report["rounds"]] == ["committed", "committed"]
        assert all(r["num_clients"] == 8 for r in report["rounds"])
        assert report["peak_rss"]["workers"] > 0  # the actor reported its own memory
    finally:
        head.send_signal(signal.SIGTERM)  # ends the head's processes with it
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
