"""Dispatcher throughput and latency against the node SMSC simulator.

    python tests/dispatcher_bench.py [--jobs 3000] [--window 200] [--trickle 300]

Drain: N single-part jobs committed at once; SMS/s = N / (last receipt stored - first commit).
Trickle: jobs committed one by one (one transaction each, ~200/s) into an idle dispatcher;
the delay is spool commit (created_at) -> submit_sm arriving at the simulator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bed import free_port, wait_until  # noqa: E402
from dispatcher_bed import DispatcherProc, Smsc, dispatcher_config, job, wait_states  # noqa: E402
from sms_milter.spool.sqlite import SqliteSpool  # noqa: E402
from spool_helpers import add_jobs


def _ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
    return f"median {statistics.median(values) * 1000:.1f} ms, p95 {q[18] * 1000:.1f} ms"


def logged_submits(smsc: Smsc, want: set[str]) -> dict[str, float]:
    """destination -> when the simulator got its submit_sm, once every wanted one is in its log
    (written asynchronously: under load a line can land after the receipt was stored)."""
    found: dict[str, float] = {}

    def complete() -> bool:
        found.update({r["destination_addr"]: r["t"] / 1000 for r in smsc.submits()})
        return want <= found.keys()

    wait_until(complete, 10, "every submit_sm in the simulator's log")
    return found


def run(base: Path, jobs: int = 3000, window: int = 200, trickle: int = 300) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    smsc = Smsc(base).start()
    spool = SqliteSpool(base / "spool.sqlite3")
    cfg = dispatcher_config(base, smsc.port, free_port(), spool_path=base / "spool.sqlite3",
                            smpp={"window": window})
    d = DispatcherProc(cfg, base / "bench-dispatcher.log").start()
    out: dict = {}
    try:
        wait_until(lambda: smsc.records("bind_transceiver"), 10, "the bind", detail=d.log_tail)
        # Trickle: latency of a lightly loaded dispatcher.
        tids = []
        for i in range(trickle):
            tids += add_jobs(spool, [job(f"+4179180{i:04d}", f"trickle {i}")])
            time.sleep(0.005)
        tdone = wait_states(spool, tids, {"delivered"}, timeout=60, detail=d.log_tail)
        sub_t = logged_submits(smsc, {j.recipient[1:] for j in tdone.values()})
        tdelays = [sub_t[j.recipient[1:]] - j.created_at for j in tdone.values()]
        # Drain: throughput with receipts.
        ids = add_jobs(spool, [job(f"+4179190{i:04d}", f"bench {i}") for i in range(jobs)])
        done = wait_states(spool, ids, {"delivered"}, timeout=120, detail=d.log_tail)
        first = min(j.created_at for j in done.values())
        elapsed = max(j.done_at or 0 for j in done.values()) - first
        sub_t = logged_submits(smsc, {j.recipient[1:] for j in done.values()})
        ddelays = [sub_t[j.recipient[1:]] - j.created_at for j in done.values()]
        out = {"jobs": jobs, "window": window, "seconds": elapsed, "sms_per_s": jobs / elapsed,
               "drain_delay": _ms(ddelays), "trickle_delay": _ms(tdelays), "trickle_jobs": trickle}
    finally:
        d.stop()
        smsc.stop()
        spool.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--trickle", type=int, default=300)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sms-milter-dbench-") as tmp:
        r = run(Path(tmp), a.jobs, a.window, a.trickle)
    print(f"drain: {r['jobs']} jobs with receipts in {r['seconds']:.2f}s = {r['sms_per_s']:.0f} SMS/s "
          f"(window {r['window']}); commit->submit_sm {r['drain_delay']}")
    print(f"trickle: {r['trickle_jobs']} jobs one commit each: commit->submit_sm {r['trickle_delay']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
