"""The CLI's contract: help, exit codes, one JSON document, no tracebacks."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import FLCTL, Processes, certs_gen, flctl, init_project, one_json, serve, wait_for


def test_help_smoke(tmp_path: Path) -> None:
    result = flctl("--help", cwd=tmp_path, check=True)
    for name in ("demo", "init", "serve", "join", "certs", "round", "models"):
        assert name in result.stdout
    assert flctl("round", "-h", cwd=tmp_path, check=True).stdout.count("start") >= 1


def test_bad_config_is_a_clear_error_with_its_exit_code(tmp_path: Path) -> None:
    (tmp_path / "flctl.toml").write_text("[rounds]\nmin_clients = 'many'\n")
    result = flctl("models", "ls", cwd=tmp_path)
    assert result.returncode == 10
    assert "`rounds.min_clients` must be an integer" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    as_json = flctl("models", "ls", "--json", cwd=tmp_path)
    assert as_json.returncode == 10
    assert one_json(as_json.stdout)["error"]["code"] == "config"


def test_outside_a_project(tmp_path: Path) -> None:
    result = flctl("round", "start", "--json", cwd=tmp_path)
    assert result.returncode == 11
    assert "no flctl.toml" in one_json(result.stdout)["error"]["message"]


def test_round_start_without_a_coordinator(tmp_path: Path) -> None:
    init_project(tmp_path, "p")
    result = flctl("round", "start", "--json", cwd=tmp_path / "p")
    assert result.returncode == 31
    assert "no running coordinator" in one_json(result.stdout)["error"]["message"]


def test_unknown_template_and_init_json(tmp_path: Path) -> None:
    bad = flctl("init", "p", "--template", "nope", cwd=tmp_path)
    assert bad.returncode == 10 and "unknown template" in bad.stderr
    good = one_json(flctl("init", "p", "--json", cwd=tmp_path, check=True).stdout)
    assert good["template"] == "digits" and "task.py" in good["files"]
    forced = flctl("init", "p", "--force", cwd=tmp_path)
    assert forced.returncode == 0


def test_insecure_refuses_a_public_address(tmp_path: Path) -> None:
    init_project(tmp_path, "p")
    result = flctl("serve", "--insecure", "--address", "0.0.0.0:0", "--no-tui", cwd=tmp_path / "p")
    assert result.returncode == 10
    assert "loopback only" in result.stderr


def test_serve_without_certificates_says_what_to_run(tmp_path: Path) -> None:
    init_project(tmp_path, "p")
    result = flctl("serve", "--no-tui", cwd=tmp_path / "p")
    assert result.returncode == 21
    assert "flctl certs gen" in result.stderr


@pytest.mark.parametrize(
    "args", [("demo", "--clients", "0", "--json"), ("round", "start", "--rounds", "0", "--json")]
)
def test_invalid_numbers(tmp_path: Path, args: tuple[str, ...]) -> None:
    init_project(tmp_path, "p")
    result = flctl(*args, cwd=tmp_path / "p")
    assert result.returncode != 0
    assert "error" in json.loads(result.stdout)


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`flctl events | head -1`: a closed pipe is a normal end, not an error with a crash log."""
    from flctl.store import SqlStore

    init_project(tmp_path, "p")
    store = SqlStore.open(tmp_path / "p" / ".flctl")
    try:
        # Far more than a pipe holds, so flctl is still writing when the reader leaves.
        with store.transaction():
            for i in range(6000):
                store.append_event("client.joined", client_id=f"client-{i}")
    finally:
        store.close()
    home = Path(os.environ["FLCTL_HOME"])
    with subprocess.Popen(
        [*FLCTL, "events", "--limit", "6000"],
        cwd=tmp_path / "p",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert "client-0" in proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        code = proc.wait(timeout=240)
    assert "error" not in stderr.lower(), stderr
    assert code == 128 + signal.SIGPIPE
    assert not (home / "logs").exists() or not any((home / "logs").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operating_a_coordinator_through_a_pipe(tmp_path: Path, processes: Processes) -> None:
    """Piped, `round start` says what it queued, `round status` is a tab-separated table and
    `round watch` replays the log and ends; `--follow` still follows, and says how to leave."""
    proj = init_project(tmp_path, "p")
    certs_gen(proj, 1)
    # no client joins: round 1 waits for its quorum to the end, so the coordinator must not
    # wait --drain-timeout for it when it is stopped
    serve(processes, "coordinator", proj, "--drain-timeout", "0")

    started = flctl("round", "start", "--rounds", "2", cwd=proj, check=True)
    assert started.stdout == "queued rounds 1, 2\n"
    assert one_json(flctl("round", "start", "--json", cwd=proj, check=True).stdout) == {
        "round_ids": [3]
    }

    status = flctl("round", "status", cwd=proj, check=True)
    header, *rows = status.stdout.splitlines()
    assert header.split("\t") == [
        "round",
        "status",
        "clients",
        "accuracy",
        "loss",
        "time",
        "reason",
    ]
    assert [row.split("\t")[0] for row in rows] == ["1", "2", "3"]
    assert "clients connected" in status.stderr

    watch = flctl("round", "watch", cwd=proj, timeout=60, check=True)
    lines = watch.stdout.splitlines()
    assert [n for n in (1, 2, 3) if any(f"round {n} queued" in line for line in lines)] == [1, 2, 3]
    assert "Ctrl-C" not in watch.stderr

    following = processes.start("watch", "round", "watch", "--follow", cwd=proj)
    wait_for(lambda: "round 3 queued" in processes.log("watch"), what="replay", timeout=60)
    assert "Ctrl-C to leave" in processes.log("watch")
    assert following.poll() is None  # still following
