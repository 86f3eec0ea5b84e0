#!/usr/bin/env python3
"""Benchmark: stored voice/fax files and their removal (issue 15 leftovers), SQLite spool.

    python bench/file_gc.py [--quick] [--jobs N] [--files F] [--size BYTES]

1. Commit cost of a fax job whose document is already stored (the milter touches it before
   BEGIN IMMEDIATE and checks it again under the lock), against an SMS job committed the same
   way in the same run (baseline): milliseconds per add_message, median, and the ratio.
2. `queue purge` of N final fax jobs naming F distinct files of BYTES each: the purge (jobs
   and their files, in batches of 5,000) and the sweep that follows, in milliseconds, with
   the files and bytes removed (verified: every file gone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchAbort, banner, cleanup_on_exit, result, run, say, workdir  # noqa: E402
from sms_milter.spool.base import NewJob  # noqa: E402
from sms_milter.spool.files import JobFile  # noqa: E402
from sms_milter.spool.sqlite import SqliteSpool  # noqa: E402
from sms_milter.spool.sqlite import files as stored  # noqa: E402


def _job(i: int, f: JobFile | None) -> NewJob:
    if f is None:
        return NewJob(recipient=f"+4179{i:07d}", originator="SMS", text="hello", parts=1, account="acme")
    return NewJob(recipient=f"+4144{i:07d}", originator="SMS", text="", parts=1, account="acme",
                  device="fax", channel="fax", files=(f,))


def commit_cost(base: Path, rounds: int, size: int) -> tuple[float, float]:
    spool = SqliteSpool(base / "commit.sqlite3")
    try:
        doc = JobFile.of("application/pdf", "a.pdf", b"%PDF-1.4\n" + b"x" * size)
        spool.add_message(None, [_job(0, doc)], 0.0)  # stored once: every later commit reuses it
        sms_ms, fax_ms = [], []
        for i in range(1, rounds + 1):
            for f, out in ((None, sms_ms), (doc, fax_ms)):
                t = time.perf_counter()
                spool.add_message(None, [_job(i, f)], 0.0)
                out.append((time.perf_counter() - t) * 1000)
        return statistics.median(sms_ms), statistics.median(fax_ms)
    finally:
        spool.close()


def purge_cost(base: Path, jobs: int, nfiles: int, size: int) -> tuple[float, float, int, int]:
    spool = SqliteSpool(base / "purge.sqlite3")
    try:
        docs = [JobFile.of("application/pdf", f"{k}.pdf", b"%PDF-1.4\n" + k.to_bytes(4, "big") * (size // 4))
                for k in range(nfiles)]
        ids: list[int] = []
        for start in range(0, jobs, 500):
            batch = [_job(i, docs[i % nfiles]) for i in range(start, min(jobs, start + 500))]
            ids += spool.add_message(None, batch, 0.0).job_ids
        while claimed := spool.claim("b", 1000, 600, per_number=1):
            spool.mark_submitted_many([(j.id, [f"{j.id:x}"], "smpp") for j in claimed])
            spool.record_receipts([(f"{j.id:x}", "delivered", "") for j in claimed])
        if any(spool.get(i).state != "delivered" for i in (ids[0], ids[-1])):
            raise BenchAbort("jobs did not reach delivered")
        t = time.perf_counter()
        while len(spool.purge(time.time() + 60, limit=5000)) == 5000:
            pass
        purge_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        spool.sweep_files()
        sweep_ms = (time.perf_counter() - t) * 1000
        left = stored.stored(spool.path)
        if left or spool.list_jobs(limit=1):
            raise BenchAbort(f"{len(left)} files / jobs left after the purge")
        return purge_ms, sweep_ms, spool.files_removed.files, spool.files_removed.bytes
    finally:
        spool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and jobs (CI smoke)")
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--size", type=int, default=100_000)
    a = ap.parse_args()
    rounds = 50 if a.quick else 300
    jobs = a.jobs or (1000 if a.quick else 10_000)
    banner(f"stored files: commit with a reused file ({rounds} rounds); purge of {jobs} fax jobs"
           f" naming {a.files} files of {a.size} bytes")
    with cleanup_on_exit() as stack:
        base = workdir(stack, "file-gc")
        sms, fax = commit_cost(base, rounds, a.size)
        say(f"commit: sms {sms:.3f} ms, fax reusing a stored file {fax:.3f} ms (ratio {fax / sms:.2f})")
        purge_ms, sweep_ms, nf, nb = purge_cost(base, jobs, a.files, a.size)
        say(f"purge of {jobs} jobs with their files: {purge_ms:.0f} ms ({nf} files, {nb} bytes removed);"
            f" sweep after it: {sweep_ms:.1f} ms")
    result("file_gc", commit_ms_sms=round(sms, 3), commit_ms_fax_reuse=round(fax, 3),
           ratio=round(fax / sms, 2), purge_ms=round(purge_ms), sweep_ms=round(sweep_ms, 1),
           files_removed=nf, bytes_removed=nb)
    return 0


if __name__ == "__main__":
    run(main, "file_gc")
