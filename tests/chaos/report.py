"""What the chaos benchmarks (bench/chaos.py, bench/failover.py) share: the trial loop, the
summary of many trials, and its printed tail."""

from __future__ import annotations

import shutil
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tests.chaos.harness import TrialResult, TrialSpec, run_trial

__all__ = ["print_tail", "run_trials", "spread", "summarize_trials"]

_ENDED = ("failed", "cancelled", "rejected")


def spread(values: list[float]) -> dict[str, float | None]:
    """Median and max, rounded to 10 ms (None for no values)."""
    return {
        "median": round(statistics.median(values), 2) if values else None,
        "max": round(max(values), 2) if values else None,
    }


def run_trials(
    specs: Iterable[TrialSpec], root: Path, *, keep: bool, progress: TextIO
) -> list[TrialResult]:
    """Run each trial in ``root/trial-SEED``; remove the folders of those that held."""
    results = []
    for spec in specs:
        result = run_trial(spec, root / f"trial-{spec.seed}")
        results.append(result)
        print(result.describe(), file=progress, flush=True)
        if result.held and not keep:
            shutil.rmtree(result.folder, ignore_errors=True)
    return results


def summarize_trials(
    results: list[TrialResult], spec: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """What every chaos benchmark reports: trials held, rounds, kills, failures, breakages."""
    rounds = [r for t in results for r in t.rounds]
    fired = [k for t in results for k in t.kills if k.fired]
    return {
        "trials": len(results),
        "held": sum(t.held for t in results),
        "config": spec,
        "rounds": len(rounds),
        "committed": sum(r["status"] == "committed" for r in rounds),
        "failed": sum(r["status"] in _ENDED for r in rounds),
        "resumed": sum(bool(r["resumed"]) for r in rounds),
        "failure_reasons": dict(
            Counter(r["reason"] for r in rounds if r["status"] in _ENDED).most_common()
        ),
        "kills": {
            "planned": sum(len(t.kills) for t in results),
            "fired": len(fired),
            "by_trigger": dict(Counter(k.trigger for k in fired).most_common()),
            "by_phase": dict(Counter(k.phase for k in fired).most_common()),
            "mid_upload": sum(k.uploads_in_flight > 0 for k in fired),
        },
        "orphan_blobs": sum(t.orphan_blobs for t in results),
        "broken": [
            {"seed": t.seed, "error": t.error, "folder": t.folder}
            | {c.name: c.detail for c in t.checks if not c.held}
            for t in results
            if not t.held
        ],
        "wall_s": round(wall_s, 1),
        "per_trial": [t.to_dict() for t in results],
    }


def print_tail(s: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """The end of a printed summary: where kills landed, failures, broken trials."""
    k = s["kills"]
    print("  by trigger: " + ", ".join(f"{n} {c}" for n, c in k["by_trigger"].items()), file=out)
    print("  by phase:   " + ", ".join(f"{n} {c}" for n, c in k["by_phase"].items()), file=out)
    print(
        f"blobs left unnamed by a kill (harmless, content-addressed): {s['orphan_blobs']}",
        file=out,
    )
    if s["failure_reasons"]:
        print("failure reasons:", file=out)
        for reason, count in s["failure_reasons"].items():
            print(f"  {count:3d}  {reason}", file=out)
    for broken in s["broken"]:
        print(f"BROKEN seed {broken['seed']}: {broken}", file=out)
