"""Fail-over: many chaos trials, each a job whose leading coordinator is killed with SIGKILL.

Each trial (tests/chaos/harness.py, ``TrialSpec(failover=True)``) runs two ``flctl serve``
processes on one PostgreSQL store (a new database per trial, on a PostgreSQL server this script
starts from tests/postgres.py and stops at the end) and a shared blob folder, each in a project
folder of its own on a fixed loopback port: one leads, the other stands by. Three ``flctl
join`` clients are given both addresses (each ``fit`` takes at least ``--fit-sleep`` seconds,
1 by default, so that the job outlasts its kills), R rounds are queued with ``flctl round
start --server A,B``, and the leader is killed K times at seeded moments (any moment, while
selecting, while clients train, mid-upload, while aggregating, right after a commit) plus a
seeded delay. After each kill the standby takes over, and the killed coordinator is started
again as the new standby before the next kill may come. Once no round is open, every process
is stopped and the invariants of crash safety are checked, with the leadership's: epochs 1
to K + 1, each ended but the last, and no event written out of its epoch
(tests/chaos/invariants.py). Trial i uses seed S + i.

It reports how many trials held every invariant, the rounds committed and failed (and why),
the accepted updates lost (acknowledged to a client or logged, but not in the store), how long
the take-over took (kill -> the other coordinator's health service says SERVING) and how long
until the next round committed, where the kills landed, and the wall time. Folders of trials
that broke an invariant are kept (their logs are the evidence); the others are removed unless
``--keep``.

    python bench/failover.py --trials 20 [--seed 1] [--rounds 10] [--kills 2] [--json]
        [--triggers moment upload ...] [--fit-sleep S] [--deadline S] [--grace S] [--root DIR]
        [--keep]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives in tests/chaos

from tests.chaos.harness import DELAY_BOUNDS, TrialResult, TrialSpec  # noqa: E402
from tests.chaos.report import print_tail, run_trials, spread, summarize_trials  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

#: What the kills of a fail-over trial wait for by default (the issue's moments, and any).
FAILOVER_TRIGGERS = ("moment", "selecting", "training", "upload", "aggregating", "committed")


def summarize(results: list[TrialResult], spec: dict[str, Any], wall_s: float) -> dict[str, Any]:
    fired = [k for t in results for k in t.kills if k.fired]
    summary = summarize_trials(results, spec, wall_s)
    summary["accepted_updates"] = sum(t.accepted_updates for t in results)
    summary["lost_updates"] = sum(t.lost_updates for t in results)
    summary["takeover_s"] = spread([k.takeover_s for k in fired if k.takeover_s is not None])
    summary["next_commit_s"] = spread(
        [k.next_commit_s for k in fired if k.next_commit_s is not None]
    ) | {"none_after": sum(k.next_commit_s is None for k in fired)}
    summary["standby_again_s"] = spread([k.restart_s for k in fired])
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print()
    print(f"invariants held in {s['held']} of {s['trials']} trials ({s['wall_s']:.0f} s)")
    print(
        f"rounds: {s['rounds']}, committed {s['committed']}, failed {s['failed']}; "
        f"resumed after a take-over {s['resumed']}"
    )
    print(f"accepted updates: {s['accepted_updates']}, lost: {s['lost_updates']}")
    k = s["kills"]
    print(
        f"kills of the leader: {k['fired']} of {k['planned']} landed ({k['mid_upload']} mid-upload)"
    )
    print(
        f"kill -> the standby SERVING: median {s['takeover_s']['median']} s, "
        f"max {s['takeover_s']['max']} s"
    )
    print(
        f"kill -> next round committed: median {s['next_commit_s']['median']} s, "
        f"max {s['next_commit_s']['max']} s ({s['next_commit_s']['none_after']} kills: none after)"
    )
    print(
        f"kill -> the killed one standing by again: median {s['standby_again_s']['median']} s, "
        f"max {s['standby_again_s']['max']} s"
    )
    print_tail(s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="seed of the first trial")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=TrialSpec.deadline_s)
    parser.add_argument("--grace", type=float, default=TrialSpec.rejoin_grace_s)
    parser.add_argument(
        "--fit-sleep",
        type=float,
        default=1.0,
        help="each fit takes at least this long, so that a job outlasts its kills (s)",
    )
    parser.add_argument(
        "--triggers",
        nargs="+",
        default=list(FAILOVER_TRIGGERS),
        choices=list(DELAY_BOUNDS),
        help="what kills wait for (default: %(default)s)",
    )
    parser.add_argument("--root", type=Path, help="folder for the trials (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep the folders of every trial")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="flctl-failover-"))
    root.mkdir(parents=True, exist_ok=True)
    spec_args = {
        "rounds": args.rounds,
        "kills": args.kills,
        "deadline_s": args.deadline,
        "rejoin_grace_s": args.grace,
        "fit_sleep_s": args.fit_sleep,
        "triggers": args.triggers,
    }
    # with --json, stdout is one JSON document: progress goes to stderr
    progress = sys.stderr if args.json else sys.stdout
    started = time.monotonic()
    server = PostgresServer()
    try:
        server.start()
        specs = (
            TrialSpec(
                seed=args.seed + i,
                rounds=args.rounds,
                kills=args.kills,
                deadline_s=args.deadline,
                rejoin_grace_s=args.grace,
                fit_sleep_s=args.fit_sleep,
                triggers=tuple(args.triggers),
                store_url=server.new_database(),
                failover=True,
            )
            for i in range(args.trials)
        )
        results = run_trials(specs, root, keep=args.keep, progress=progress)
    finally:
        server.stop()
    summary = summarize(
        results, {"seed": args.seed, "failover": True, **spec_args}, time.monotonic() - started
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if not any(root.iterdir()):
        root.rmdir()
    return 0 if summary["held"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
