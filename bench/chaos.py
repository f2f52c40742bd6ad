"""Crash safety: many chaos trials, each a job whose coordinator is killed with SIGKILL.

Each trial (tests/chaos/harness.py) runs ``flctl serve`` and three ``flctl join`` clients as
subprocesses in a fresh project, queues R rounds, kills the coordinator K times at seeded
moments (any moment, while selecting, while clients train, mid-upload, after an update is
accepted, while aggregating or evaluating, right after a commit), restarts it on the same port
each time, waits until no round is open and checks the invariants of crash safety
(tests/chaos/invariants.py). Trial i uses seed S + i.

It reports how many trials held every invariant, the rounds committed and failed, how many
rounds a restarted coordinator resumed, where the kills landed and the distinct reasons of the
failed rounds. Folders of trials that broke an invariant are kept (their logs are the evidence);
the others are removed unless ``--keep``.

    python bench/chaos.py --trials 50 [--seed 1] [--rounds 3] [--kills 2] [--json]
        [--triggers moment upload ...] [--rollback] [--deadline S] [--grace S] [--keep]
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

from tests.chaos.harness import DELAY_BOUNDS, TRIGGERS, TrialResult, TrialSpec  # noqa: E402
from tests.chaos.report import print_tail, run_trials, spread, summarize_trials  # noqa: E402


def summarize(results: list[TrialResult], spec: dict[str, Any], wall_s: float) -> dict[str, Any]:
    fired = [k for t in results for k in t.kills if k.fired]
    resumed = [r for t in results for r in t.rounds if r["resumed"]]
    summary = summarize_trials(results, spec, wall_s)
    summary["resumed_committed"] = sum(r["status"] == "committed" for r in resumed)
    summary["restart_s"] = spread([k.restart_s for k in fired])
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print()
    print(f"invariants held in {s['held']} of {s['trials']} trials ({s['wall_s']:.0f} s)")
    print(
        f"rounds: {s['rounds']}, committed {s['committed']}, failed {s['failed']}; "
        f"resumed after a restart {s['resumed']} (of which committed {s['resumed_committed']})"
    )
    k = s["kills"]
    print(
        f"kills: {k['fired']} of {k['planned']} landed ({k['mid_upload']} mid-upload); "
        f"restart to serving: median {s['restart_s']['median']} s, max {s['restart_s']['max']} s"
    )
    print_tail(s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="seed of the first trial")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=TrialSpec.deadline_s)
    parser.add_argument("--grace", type=float, default=TrialSpec.rejoin_grace_s)
    parser.add_argument(
        "--triggers",
        nargs="+",
        default=list(TRIGGERS),
        choices=list(DELAY_BOUNDS),
        help="what kills wait for (default: every moment of a job)",
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="also ask for a rollback to version 1 while round 1 runs (deferred)",
    )
    parser.add_argument("--root", type=Path, help="folder for the trials (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep the folders of every trial")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="flctl-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    spec_args = {
        "rounds": args.rounds,
        "kills": args.kills,
        "deadline_s": args.deadline,
        "rejoin_grace_s": args.grace,
        "triggers": args.triggers,
        "rollback": args.rollback,
    }
    started = time.monotonic()
    specs = (
        TrialSpec(
            seed=args.seed + i,
            rounds=args.rounds,
            kills=args.kills,
            deadline_s=args.deadline,
            rejoin_grace_s=args.grace,
            triggers=tuple(args.triggers),
            rollback=args.rollback,
        )
        for i in range(args.trials)
    )
    # with --json, stdout is one JSON document: progress goes to stderr
    progress = sys.stderr if args.json else sys.stdout
    results = run_trials(specs, root, keep=args.keep, progress=progress)
    summary = summarize(results, {"seed": args.seed, **spec_args}, time.monotonic() - started)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if not any(root.iterdir()):
        root.rmdir()
    return 0 if summary["held"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
