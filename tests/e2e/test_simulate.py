"""``flctl simulate`` as a user runs it: virtual clients on digits, through the deployed engine."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from .conftest import FLCTL, flctl, init_project, one_json, wait_for

pytestmark = pytest.mark.timeout(300)


def _project(tmp_path: Path, extra: str = "", name: str = "sim") -> Path:
    proj = init_project(tmp_path, name)
    if extra:
        toml = proj / "flctl.toml"
        toml.write_text(toml.read_text() + "\n" + extra + "\n")
    return proj


def _events(proj: Path, kind: str) -> list[dict[str, Any]]:
    result = flctl("events", "--type", kind, "--json", "--limit", "10000", cwd=proj, check=True)
    events: list[dict[str, Any]] = one_json(result.stdout)["events"]
    return events


def _committed(proj: Path) -> int:
    """Rounds committed so far, read from the state database without a flctl process (a
    poll that answers in milliseconds); 0 while the database does not exist yet."""
    database = proj / ".flctl" / "state.db"
    if not database.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM events WHERE type = 'round.committed'"
            ).fetchone()
    except sqlite3.Error:  # the schema is still being written
        return 0
    return int(count)


def test_fifty_clients_on_digits_commit_every_round_as_a_deployed_run_would(
    tmp_path: Path,
) -> None:
    proj = _project(tmp_path)
    result = flctl(
        "simulate", "--clients", "50", "--rounds", "3", "--per-round", "10", "--workers", "1",
        "--json", cwd=proj, check=True,
    )  # fmt: skip
    report = one_json(result.stdout)
    assert report["clients"] == 50 and report["workers"] == 1 and report["backend"] == "local"
    rounds = report["rounds"]
    assert [r["status"] for r in rounds] == ["committed"] * 3
    assert all(r["num_clients"] == 10 and r["jobs"] == 10 for r in rounds)
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in rounds)
    assert report["head_version"] == 4 and len(report["head_digest"]) == 64
    assert report["peak_rss"]["workers"] > 0
    # the store holds what a deployed run writes: versions, rounds, events
    models = one_json(flctl("models", "ls", "--json", cwd=proj, check=True).stdout)
    rows = models["models"] if isinstance(models, dict) else models
    assert sorted(m["version"] for m in rows) == [1, 2, 3, 4]
    queued = _events(proj, "round.queued")
    assert [e["data"].get("admin") for e in queued] == ["simulate"] * 3
    accepted = _events(proj, "update.accepted")
    assert len(accepted) == 30
    assert {e["client_id"] for e in accepted} <= {f"sim-{i:05d}" for i in range(50)}
    run = json.loads((proj / ".flctl" / "simulation" / "run.json").read_text())
    assert run["clients"] == 50 and run["ids"] == [1, 2, 3]
    # round watch replays the recorded run: no coordinator runs once a simulation has ended
    watched = one_json(flctl("round", "watch", "--json", cwd=proj, check=True).stdout)["events"]
    assert [e["round"] for e in watched if e["type"] == "round.committed"] == [1, 2, 3]
    replay = flctl("round", "watch", "--no-follow", cwd=proj, check=True).stdout
    assert "round 3 committed" in replay
    # the worker's updates moved into the blob store: none is left behind
    assert list((proj / ".flctl" / "simulation" / "updates").iterdir()) == []


def test_a_client_whose_fit_raises_fails_only_itself(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    task = proj / "task.py"
    text = task.read_text()
    marker = 'the local partition; return it with the FedAvg weight."""\n'
    assert marker in text
    task.write_text(
        text.replace(
            marker,
            marker
            + "        if self.context.partition_id == 3:\n"
            + "            raise RuntimeError('partition 3 is broken')\n",
        )
    )
    result = flctl(
        "simulate", "--clients", "6", "--rounds", "1", "--per-round", "6", "--workers", "1",
        "--json", cwd=proj, check=True,
    )  # fmt: skip
    (round_one,) = one_json(result.stdout)["rounds"]
    assert round_one["status"] == "committed" and round_one["num_clients"] == 5
    failed = [e for e in _events(proj, "client.state") if e["data"].get("state") == "failed"]
    assert [e["client_id"] for e in failed] == ["sim-00003"]
    assert "partition 3 is broken" in failed[0]["data"]["reason"]


def test_dropouts_below_quorum_fail_the_round_with_the_deployed_reason(tmp_path: Path) -> None:
    proj = _project(tmp_path, "[simulation]\ndropout_rate = 1.0\n")
    result = flctl(
        "simulate", "--clients", "4", "--rounds", "1", "--per-round", "3", "--workers", "1",
        "--json", cwd=proj,
    )  # fmt: skip
    assert result.returncode == 81, result.stderr  # RoundFailedError's code, as round start
    (round_one,) = one_json(result.stdout)["rounds"]
    assert round_one["status"] == "failed" and round_one["dropped"] == 3
    # the engine's own words, as for deployed clients whose training failed
    reason = round_one["reason"]
    assert reason.startswith("3 of 3 selected clients failed (")
    assert "dropped out (simulation.dropout_rate)" in reason
    assert reason.endswith("with 0 of 2 required updates")


def test_stragglers_past_the_deadline_are_refused_as_late(tmp_path: Path) -> None:
    proj = _project(
        tmp_path,
        "[simulation]\nstraggler_fraction = 1.0\nstraggler_delay_s = 3.0\n",
    )
    toml = proj / "flctl.toml"
    toml.write_text(toml.read_text().replace("deadline_s = 120", "deadline_s = 1.5"))
    result = flctl(
        "simulate", "--clients", "3", "--rounds", "1", "--per-round", "2", "--workers", "1",
        "--json", cwd=proj,
    )  # fmt: skip
    assert result.returncode == 81, result.stderr
    (round_one,) = one_json(result.stdout)["rounds"]
    assert round_one["stragglers"] == 2
    # the round waited for its deadline, as for deployed clients that report late
    assert round_one["reason"] == "the deadline passed with 0 of 2 required updates"
    assert 1.5 <= round_one["seconds"] < 3.0


#: Rounds of the interrupted run: its interrupt comes a moment after round 2 commits (a round
#: takes a fraction of a second), well before the last: 40, since on a loaded CI machine 12
#: left too little room before the interrupt landed.
INTERRUPTED_ROUNDS = 40


def test_an_interrupted_simulation_resumes_from_the_last_committed_round(
    tmp_path: Path,
) -> None:
    proj = _project(tmp_path)
    log = (tmp_path / "simulate.log").open("wb")
    proc = subprocess.Popen(
        [*FLCTL, "simulate", "--clients", "20", "--rounds", str(INTERRUPTED_ROUNDS),
         "--per-round", "5", "--workers", "1", "--no-tui"],
        cwd=proj, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    log.close()
    try:
        wait_for(lambda: _committed(proj) >= 2, timeout=120, what="2 rounds")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = (tmp_path / "simulate.log").read_text()
    assert "flctl simulate --resume" in output and "Traceback" not in output
    committed_before = len(_events(proj, "round.committed"))
    assert 2 <= committed_before < INTERRUPTED_ROUNDS
    # a new run over the rounds this one left queued is refused, and changes nothing
    events_before = len(_events(proj, "round"))
    refused = flctl("simulate", "--clients", "20", "--rounds", "1", cwd=proj)
    assert refused.returncode != 0 and "queued rounds of an earlier run" in refused.stderr
    assert "flctl simulate --resume" in refused.stderr
    assert len(_events(proj, "round")) == events_before
    result = flctl("simulate", "--resume", "--json", cwd=proj, check=True)
    report = one_json(result.stdout)
    assert report["resumed"] and report["clients"] == 20 and report["per_round"] == 5
    assert all(r["status"] == "committed" for r in report["rounds"])
    # the run owed INTERRUPTED_ROUNDS rounds in all: the resumed part brought the rest (the
    # round the interrupt ended again, as a new round)
    assert len(_events(proj, "round.committed")) == INTERRUPTED_ROUNDS
    assert len(report["rounds"]) == INTERRUPTED_ROUNDS - committed_before
    run = json.loads((proj / ".flctl" / "simulation" / "run.json").read_text())
    assert run["interrupted"] == []


def test_bad_options_are_refused_and_change_nothing(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    for args, needle in [
        (["--clients", "1", "--rounds", "1"], "below rounds.min_clients"),
        (["--clients", "10", "--rounds", "1", "--per-round", "11"], "more than --clients"),
        (["--clients", "10", "--rounds", "0"], "--rounds must be at least 1"),
        (["--clients", "10", "--rounds", "1", "--backend", "slurm"], "--backend must be"),
        (["--resume"], "no simulation to resume"),
    ]:
        result = flctl("simulate", *args, cwd=proj)
        assert result.returncode != 0, args
        assert needle in result.stderr + result.stdout, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (proj / ".flctl").exists()


def test_the_same_seed_gives_the_same_models_whatever_the_workers(tmp_path: Path) -> None:
    digests = []
    for workers in ("1", "2"):
        proj = _project(tmp_path, name=f"w{workers}")
        result = flctl(
            "simulate", "--clients", "20", "--rounds", "2", "--per-round", "5",
            "--workers", workers, "--json", cwd=proj, check=True,
        )  # fmt: skip
        report = one_json(result.stdout)
        assert report["workers"] == int(workers)
        digests.append(report["head_digest"])
    # the selection, the partitions, each fit and the summation order follow from the seed
    assert digests[0] == digests[1]
