#!/usr/bin/env python3
"""Benchmark 5: the cost of one claim when one number has a backlog (issue 9, item 16).

    python bench/claim_cost.py [--quick] [--small N] [--large N] [--rounds R]

A monitoring storm to the on-call phone puts tens of thousands of jobs in the queue for
one number; jobs to everyone else must still be claimed at the usual cost. For a backlog
of `small` (1,000) and then `large` (50,000) jobs queued to one number, plus 200 jobs to
200 other numbers, the dispatcher's cycle is run `rounds` times on a real spool file:
claim (SqliteSpool.claim, up to 10 jobs), then mark the claimed jobs submitted (which
makes the next job of each number ready). Measured: milliseconds per claim, median.

Baseline in the same run, on the same spool: the claim query this project used before
(every queued job scanned in id order, each checked against older jobs of its recipient),
run read-only. Prints both, per backlog, and the ratio large/small: about 1 means the
claim cost does not depend on the backlog (target: <= 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import banner, cleanup_on_exit, result, run, say, workdir  # noqa: E402
from sms_milter.spool.base import NewJob  # noqa: E402
from sms_milter.spool.sqlite import SqliteSpool  # noqa: E402

OLD_CLAIM = (  # the claim's SELECT before the `ready` flag (read-only here)
    "SELECT j.id FROM jobs j WHERE j.state='queued' AND j.not_before<=?"
    " AND (j.lease_until IS NULL OR j.lease_until<?)"
    " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.recipient=j.recipient AND o.id<j.id"
    "  AND o.state='queued' AND o.deferred=0) ORDER BY j.id LIMIT ?")


def _job(recipient: str, text: str) -> NewJob:
    return NewJob(recipient=recipient, originator="SMS", text=text, parts=1, account="bench")


def measure(base: Path, backlog: int, rounds: int) -> tuple[float, float]:
    """(ms per claim now, ms per claim with the old query) with `backlog` jobs to one number."""
    spool = SqliteSpool(base / f"claim-{backlog}.sqlite3")
    try:
        spool.add_message(None, [_job("+41790000000", f"storm {i}") for i in range(backlog)], 0.0)
        spool.add_message(None, [_job(f"+4179100{i:04d}", "other") for i in range(200)], 0.0)
        now_ms: list[float] = []
        old_ms: list[float] = []
        seen = 0
        for r in range(rounds):
            t0 = time.perf_counter()
            jobs = spool.claim(f"bench-{r}", 10, 60.0)
            now_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            spool._read(OLD_CLAIM, (time.time(), time.time(), 10))  # noqa: SLF001
            old_ms.append((time.perf_counter() - t0) * 1000)
            if not jobs:
                raise SystemExit(f"claim found nothing in round {r}")
            seen += len(jobs)
            spool.mark_submitted_many([(j.id, [f"{j.id:x}"]) for j in jobs])
        say(f"backlog {backlog:>6}: claim {statistics.median(now_ms):7.3f} ms (median of {rounds}),"
            f" old query {statistics.median(old_ms):7.3f} ms; {seen} jobs claimed")
        return statistics.median(now_ms), statistics.median(old_ms)
    finally:
        spool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (CI smoke)")
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=0)
    a = ap.parse_args()
    rounds = a.rounds or (40 if a.quick else 200)
    banner(f"claim cost: {a.small} vs {a.large} jobs queued to one number, {rounds} claims each")
    with cleanup_on_exit() as stack:
        base = workdir(stack, "claim-cost")
        small, old_small = measure(base, a.small, rounds)
        large, old_large = measure(base, a.large, rounds)
    ratio = large / small if small else float("inf")
    old_ratio = old_large / old_small if old_small else float("inf")
    say(f"ratio {a.large}/{a.small}: claim {ratio:.2f} (old query {old_ratio:.1f})")
    result("claim_cost", claim_ms_small=round(small, 3), claim_ms_large=round(large, 3),
           old_ms_small=round(old_small, 3), old_ms_large=round(old_large, 3), ratio=round(ratio, 2),
           old_ratio=round(old_ratio, 1), met=ratio <= 2.0)
    return 0


if __name__ == "__main__":
    run(main, "claim_cost")
