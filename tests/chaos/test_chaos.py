"""Crash safety: ``flctl serve`` killed with SIGKILL at seeded points of a job, then restarted.

A few trials of the chaos harness (tests/chaos/harness.py): each runs a 3-round job with a
coordinator and three clients as subprocesses, kills the coordinator at seeded moments
(mid-upload, mid-training, while aggregating, right after a commit, ...) and restarts it on
the same port each time. Every invariant of crash safety (tests/chaos/invariants.py) must hold
in every trial, the event log's completeness and deferred rollbacks included; ``bench/chaos.py``
runs many more trials.

A fail-over trial: two coordinators on a PostgreSQL store, the leader killed while clients
train, the standby takes over; the leadership's checks hold too (``bench/failover.py`` runs
many more).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.chaos.harness import TrialResult, TrialSpec, run_trial
from tests.chaos.invariants import KillPoint, StateReader, check_invariants

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: Two jobs of 3 rounds, each killed 3 times at the moments its seed draws (bench/chaos.py
#: draws many more). The first: mid-upload, while clients train, right after a commit; it also
#: asks for a rollback while round 1 runs, which the coordinator defers until that round ends.
#: The second: after an update was accepted, while aggregating, and at a moment when the
#: tables hold a change (an accepted update, an ended round) that the event log does not yet
#: (a change and its events share one transaction, so that moment should never come).
TRIALS = (
    TrialSpec(seed=3, kills=3, rollback=True),
    TrialSpec(seed=54, kills=3, triggers=("selecting", "accepted", "aggregating", "unlogged")),
)


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> list[TrialResult]:
    root = tmp_path_factory.mktemp("chaos")
    # The trials share nothing (folders, ports, processes) and spend most of their time
    # waiting for their processes: they run side by side, in about the time of the longest.
    with ThreadPoolExecutor(len(TRIALS)) as pool:
        return list(pool.map(lambda spec: run_trial(spec, root / f"trial-{spec.seed}"), TRIALS))


def _report(trials: list[TrialResult]) -> str:
    return "\n".join(t.describe() for t in trials)


def test_every_invariant_holds_in_every_trial(trials: list[TrialResult]) -> None:
    """Acknowledged updates, blobs, head, rounds, partial files, the event log, rollbacks."""
    assert [t.error for t in trials] == [""] * len(TRIALS), _report(trials)
    broken = [(t.seed, c.name, c.detail) for t in trials for c in t.checks if not c.held]
    assert broken == [], _report(trials)
    checked = {c.name for t in trials for c in t.checks}
    assert {
        "acknowledged_updates_recorded",
        "models_intact",
        "no_partial_files",
        "event_log_complete",
        "deferred_rollbacks_resolved",
    } <= checked


def test_each_trial_killed_the_coordinator_and_rounds_were_resumed(
    trials: list[TrialResult],
) -> None:
    assert all(any(k.fired for k in t.kills) for t in trials), _report(trials)
    # a kill inside a round whose deadline allows it: the restarted coordinator resumes it
    assert sum(t.resumed for t in trials) >= 1, _report(trials)
    assert sum(t.committed for t in trials) >= 1, _report(trials)


def test_the_checks_catch_a_broken_state(trials: list[TrialResult], tmp_path: Path) -> None:
    """The invariants are not vacuous: break a finished trial's state and they say so."""
    source = Path(trials[0].folder) / "proj" / ".flctl"
    state = tmp_path / "state"
    shutil.copytree(source, state)
    reader = StateReader(state)
    head_digest = reader.query(
        "SELECT digest FROM models WHERE version = (SELECT version FROM refs WHERE name = 'head')"
    )[0][0]
    blob = reader.blob_path(head_digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    (state / "uploads" / "0123.part").write_bytes(b"half an update")
    checks = check_invariants(
        reader,
        rounds=len(reader.rounds()) + 1,  # one more round queued than the state holds
        acknowledged={"c9": {1}},  # a client told "accepted" for an update nobody recorded
        kills=[KillPoint(reader.last_seq(), 1, "training")],  # no outcome after this point
        clients_alive={"c1": True, "c2": False},
    )
    broken = {c.name for c in checks if not c.held}
    made = {
        "acknowledged_updates_recorded",
        "models_intact",
        "no_open_round",
        "open_round_resumed_or_failed",
        "no_partial_files",
        "clients_stayed",
    }
    already = {c.name for c in trials[0].checks if not c.held}  # reported by the test above
    assert made <= broken, checks
    assert broken - made <= already, checks


def test_a_failover_trial_holds_every_invariant(pg_url: str, tmp_path: Path) -> None:
    """The leader killed while clients train: the standby takes over and the job finishes."""
    spec = TrialSpec(
        seed=1, rounds=3, kills=1, triggers=("training",), failover=True, store_url=pg_url
    )
    trial = run_trial(spec, tmp_path / "failover")
    report = trial.describe()
    assert trial.error == "", report
    assert [(c.name, c.detail) for c in trial.checks if not c.held] == [], report
    assert {"epochs_increase", "one_writer_per_epoch"} <= {c.name for c in trial.checks}
    (kill,) = trial.kills
    assert kill.fired and kill.epoch == 1 and kill.killed and kill.takeover_s is not None, report
    assert trial.committed >= 1 and trial.lost_updates == 0, report

    # the leadership's checks are not vacuous: an event of the old epoch after the take-over,
    # an epoch that never ended, and a part file left in the shared blob folder
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as db:
        db.execute("UPDATE events SET epoch = 1 WHERE seq = (SELECT MAX(seq) FROM events)")
        db.execute("UPDATE leaders SET ended = NULL WHERE epoch = 1")
    blobs = tmp_path / "failover" / "blobs"
    (blobs / "uploads" / "0123.part").write_bytes(b"half an update")
    reader = StateReader(tmp_path / "failover" / "a" / ".flctl", pg_url, blobs)
    try:
        checks = check_invariants(
            reader, rounds=3, acknowledged={}, kills=[], clients_alive={}, epochs=2
        )
    finally:
        reader.close()
    broken = {c.name for c in checks if not c.held}
    assert broken == {"epochs_increase", "one_writer_per_epoch", "no_partial_files"}, checks
