"""Fuzz a live coordinator at scale with the security suite's generator.

Starts a coordinator in-process on 127.0.0.1 (a temporary project: the tiny task, mutual TLS,
one round open with c1 and c2 selected, no rate limit), sends --count calls made by
tests/security/fuzzing.py (random bytes, mutated and field-mutated valid messages; each call's
RPC drawn uniformly from the 15 of both services, with c1's and admin's credentials), then
checks the suite's invariants: every call ended with a status within its deadline (only the
Tasks and Watch streams may run into theirs), no INTERNAL answer, the state unchanged but for the event log, the coordinator still answers Status and a
new Join, and the uploads the calls began are gone once the round ends.

    python bench/fuzz.py [--count 10000] [--seed 0] [--json]

Exit status 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # refused handshakes and the like, by design
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the generator is in tests/

from tests.security.arena import Arena  # noqa: E402
from tests.security.fuzzing import TARGETS, Fuzzer, generate, start_fuzz_arena  # noqa: E402


class _Errors(logging.Handler):
    """Counts the coordinator's ERROR records (each unexpected exception logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def run(count: int, seed: int) -> dict[str, Any]:
    errors = _Errors()
    flctl_log = logging.getLogger("flctl")
    flctl_log.addHandler(errors)
    flctl_log.propagate = False
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with tempfile.TemporaryDirectory(prefix="flctl-fuzz-") as tmp:
        arena: Arena = start_fuzz_arena(Path(tmp) / "project", loop)
        fuzzer = Fuzzer(arena)
        try:
            before = fuzzer.view()
            rng = random.Random(seed)
            started = time.perf_counter()
            slowest = 0.0
            for _ in range(count):
                target = rng.choice(TARGETS)
                outcome = fuzzer.send(generate(rng, target, fuzzer.seeds))
                if outcome is not None and not target.follows:
                    slowest = max(slowest, outcome.seconds)
            elapsed = time.perf_counter() - started
            changes = before.changes(fuzzer.view())
            problems = fuzzer.healthy()
            staged = len(fuzzer.staging())
            fuzzer.end_round()
            left = fuzzer.staging()
        finally:
            fuzzer.close()
            arena.close()
    loop.close()
    tally = fuzzer.tally
    return {
        "count": count,
        "seed": seed,
        "sent": tally.sent,
        "skipped_admin_changes": tally.skipped,
        "rejoins": tally.rejoins,
        "seconds": round(elapsed, 1),
        "calls_per_s": round(tally.sent / elapsed, 1),
        "slowest_call_s": round(slowest, 3),
        "origins": dict(sorted(tally.origins.items())),
        "by_status": tally.by_status(),
        "by_rpc": tally.by_rpc(),
        "unexpected": tally.unexpected,
        "coordinator_errors_logged": errors.count,
        "state_unchanged": not changes,
        "changes": changes[:20],
        "healthy": not problems,
        "health_problems": problems,
        "uploads_begun_then_discarded": staged,
        "staging_left_after_round": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="calls to send")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    result = run(args.count, args.seed)
    ok = (
        not result["unexpected"]
        and result["state_unchanged"]
        and result["healthy"]
        and not result["staging_left_after_round"]
    )
    result["ok"] = ok
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"fuzz: {result['sent']} calls sent (seed {result['seed']}) in {result['seconds']} s, "
            f"{result['calls_per_s']} calls/s; {result['skipped_admin_changes']} admin changes "
            f"not sent; slowest non-streaming call {result['slowest_call_s']} s"
        )
        print(f"  made by: {result['origins']}")
        print("  statuses:")
        for status, n in result["by_status"].items():
            print(f"    {status:<20} {n:>6}")
        print("  per RPC:")
        for method, counts in result["by_rpc"].items():
            shown = ", ".join(f"{s} {n}" for s, n in counts.items())
            print(f"    {method:<12} {shown}")
        print(f"  unexpected: {len(result['unexpected'])}")
        for line in result["unexpected"][:20]:
            print(f"    {line}")
        print(f"  state unchanged: {result['state_unchanged']} {result['changes'] or ''}")
        print(f"  healthy afterwards: {result['healthy']} {result['health_problems'] or ''}")
        print(
            f"  begun uploads discarded with the round: {result['uploads_begun_then_discarded']}"
            f" (left: {len(result['staging_left_after_round'])})"
        )
        print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
