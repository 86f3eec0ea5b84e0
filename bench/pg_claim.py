#!/usr/bin/env python3
"""Benchmark: the claim with many queued jobs, SQLite and PostgreSQL in the same run (issue 14).

    python bench/pg_claim.py [--jobs N] [--rounds R]

For each backend, N jobs (200,000) are queued in two shapes: to N different numbers, and
to one number (a storm to the on-call phone) plus 200 other numbers. Then `rounds` times the
dispatcher's cycle: claim up to 10 jobs, mark them submitted. Printed: the median
milliseconds per claim (its transaction and commit included) and the RSS of this process.
PostgreSQL runs in a private cluster (tests/pgbed.py) with synchronous_commit=on.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import banner, cleanup_on_exit, result, say, workdir  # noqa: E402
from sms_milter.spool.base import NewJob  # noqa: E402


def _fill(spool, numbers) -> None:
    batch: list[NewJob] = []
    for i, n in enumerate(numbers):
        batch.append(NewJob(recipient=n, originator="SMS", text=f"b {i}", parts=1, account="acme"))
        if len(batch) == 5000:
            spool.add_message(None, batch, 0.0)
            batch = []
    if batch:
        spool.add_message(None, batch, 0.0)


def _cycle(spool, rounds: int) -> float:
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        jobs = spool.claim(f"bench-{r}", 10, 60.0)
        times.append(time.perf_counter() - t0)
        spool.mark_submitted_many([(j.id, [f"{j.id:x}"]) for j in jobs])
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=50)
    a = ap.parse_args()
    banner(f"pg_claim: one claim of up to 10 jobs with {a.jobs:,} jobs queued, SQLite vs PostgreSQL")
    out: dict = {"jobs": a.jobs}
    with cleanup_on_exit() as stack:
        work = workdir(stack, "pg-claim")
        import pgbed
        from sms_milter.spool.postgres import PostgresSpool
        from sms_milter.spool.sqlite import SqliteSpool

        cluster = pgbed.PgCluster().start()
        stack.callback(cluster.destroy)
        shapes = {"distinct": [f"+41{7900000000 + i}" for i in range(a.jobs)],
                  "one-number": ["+41790000000"] * a.jobs + [f"+4179100{i:04d}" for i in range(200)]}
        for shape, numbers in shapes.items():
            for backend in ("sqlite", "postgres"):
                if backend == "sqlite":
                    spool = SqliteSpool(work / f"{shape}.sqlite3")
                else:
                    spool = PostgresSpool(cluster.new_database())
                t0 = time.perf_counter()
                _fill(spool, numbers)
                fill = time.perf_counter() - t0
                ms = _cycle(spool, a.rounds)
                spool.close()
                say(f"{shape:10s} {backend:8s}: queued {len(numbers):,} in {fill:.1f} s;"
                    f" claim median {ms:.1f} ms")
                out[f"{shape}_{backend}_claim_ms"] = round(ms, 2)
        out["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        say(f"this process's max RSS: {out['rss_mb']} MB")
    result("pg_claim", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
