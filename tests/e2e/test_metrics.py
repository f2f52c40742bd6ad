"""``flctl --log-format json serve --metrics-address``, run as a user runs it.

A real coordinator and two real clients; ``/metrics`` is scraped before, during and after one
round and parsed with prometheus-client's own parser: the round's counters move as the round
does, and no counter (nor histogram count, sum or bucket) ever goes down between scrapes.
Every line the coordinator wrote on stderr is one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import FLCTL, Processes, flctl, one_json, wait_for

pytestmark = pytest.mark.timeout(240)

TINY_TASK = Path(__file__).resolve().parents[1] / "integration" / "tiny_task.py"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
#: Samples that may never decrease during a run: counters and histograms' parts.
MONOTONIC = ("_total", "_count", "_sum", "_bucket")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(url: str) -> Samples | None:
    """Every sample of one scrape, or None while nothing answers there yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_a_round_and_json_logs_parse(tmp_path: Path, processes: Processes) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text(
        """
[project]
task = "tiny_task.py"
seed = 1

[server]
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 3.0

[rounds]
min_clients = 2

[task]
fit_sleep_s = 1.0  # long enough to scrape the round while both clients train
"""
    )
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    flctl("certs", "gen", "--clients", "2", cwd=proj, check=True)

    metrics_port = _free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    out_path, err_path = tmp_path / "logs" / "serve.out", tmp_path / "logs" / "serve.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        coordinator = subprocess.Popen(
            [
                *FLCTL,
                "--log-format",
                "json",
                "serve",
                "--address",
                "127.0.0.1:0",
                "--no-tui",
                "--metrics-address",
                f"127.0.0.1:{metrics_port}",
            ],
            cwd=proj,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
    processes.procs["coordinator"] = coordinator  # stopped by the fixture, by pid
    serve_file = proj / ".flctl" / "serve.json"

    def listening() -> str | None:
        try:
            info = json.loads(serve_file.read_text())
        except (OSError, ValueError):
            return None
        return str(info["address"]) if info.get("pid") == coordinator.pid else None

    address = wait_for(listening, what="the coordinator listening")
    scrapes: list[Samples] = []

    def scrape_until(predicate: Callable[[Samples], bool], what: str) -> Samples:
        def attempt() -> Samples | None:
            samples = _scrape(url)
            if samples is None:
                return None
            scrapes.append(samples)
            return samples if predicate(samples) else None

        return wait_for(attempt, what=what, timeout=120, step=0.1)  # type: ignore[no-any-return]

    started = scrape_until(lambda s: _get(s, "flctl_leader") == 1, "leader 1 on /metrics")
    assert _get(started, "flctl_head_model_version") == 1
    assert _get(started, "flctl_rounds_total", status="committed") == 0

    for client in ("c1", "c2"):
        processes.start(client, "join", "--client-id", client, "--server", address, cwd=proj)
    scrape_until(lambda s: _get(s, "flctl_clients", state="idle") == 2, "two clients idle")

    queued = flctl("round", "start", "--server", address, "--json", cwd=proj, check=True)
    assert one_json(queued.stdout) == {"round_ids": [1]}
    during = scrape_until(
        lambda s: _get(s, "flctl_clients", state="training") == 2, "both clients training"
    )
    assert _get(during, "flctl_rounds_total", status="committed") == 0
    assert _get(during, "flctl_round_phase_seconds_count", phase="selecting") == 1

    after = scrape_until(
        lambda s: _get(s, "flctl_rounds_total", status="committed") == 1, "round 1 committed"
    )
    assert _get(after, "flctl_rounds_total", status="failed") == 0
    assert _get(after, "flctl_updates_accepted_total") == 2
    assert _get(after, "flctl_received_bytes_total") > 0
    assert _get(after, "flctl_head_model_version") == 2
    assert _get(after, "flctl_round_duration_seconds_count", status="committed") == 1
    assert _get(after, "flctl_aggregation_seconds_count") == 1
    for phase in ("selecting", "training", "aggregating"):
        assert _get(after, "flctl_round_phase_seconds_count", phase=phase) == 1, phase
    assert _get(after, "flctl_events_total", type="round.committed") == 1

    # counters (and histograms) only ever increased, scrape after scrape
    assert len(scrapes) >= 3
    for before, later in zip(scrapes, scrapes[1:], strict=False):
        for key, value in before.items():
            if key[0].endswith(MONOTONIC):
                assert later.get(key, value) >= value, (key, value, later.get(key))
                assert key in later, f"{key} disappeared"

    assert processes.stop("coordinator") == 0
    lines = err_path.read_text().splitlines()
    assert lines, "serve wrote no log lines"
    records = [json.loads(line) for line in lines]  # each one a whole JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert record["time"].endswith("Z")
    committed = [r for r in records if r.get("event") == "round.committed"]
    assert len(committed) == 1 and committed[0]["round"] == 1
    assert committed[0]["data"]["model_version"] == 2
    assert any(r.get("event") == "client.joined" and r.get("client") == "c1" for r in records)
    assert any(r["logger"] == "flctl.serve" and url in r["message"] for r in records)
    assert out_path.read_text() == ""  # the event lines went to the log, not to stdout


def test_a_bad_or_busy_metrics_address_is_refused_before_the_state_is_touched(
    tmp_path: Path,
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "flctl.toml").write_text('[project]\ntask = "tiny_task.py"\n')
    shutil.copy(TINY_TASK, proj / "tiny_task.py")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        cases = [
            ("nonsense", 10, "config", "is not HOST:PORT"),
            ("0.0.0.0:9464", 10, "config", "not a loopback address"),
            (busy, 31, "unavailable", "is already in use"),
        ]
        for address, code, name, words in cases:
            args = ("serve", "--address", "127.0.0.1:0", "--no-tui", "--metrics-address", address)
            plain = flctl(*args, cwd=proj, timeout=120)
            assert plain.returncode == code, plain.stderr
            assert words in plain.stderr and "Traceback" not in plain.stderr
            logged = flctl("--log-format", "json", *args, cwd=proj, timeout=120)
            assert logged.returncode == code
            [line] = [json.loads(text) for text in logged.stderr.splitlines()]
            assert line["level"] == "ERROR" and words in line["message"]
            assert line["error"]["code"] == name and line["error"]["exit_code"] == code
    assert not (proj / ".flctl").exists()  # no state folder, no lock, no serve.json
