"""dispatcher_drain.py --outside: the drain measured the way issue 16's outside run did.

20,000 single-part jobs to distinct numbers are spooled with the dispatcher stopped; then
`sms-milter dispatcher` is started and timed from its PROCESS START (just before the fork)
to the last submit_sm the SMSC simulator logged (its own clock, the JSON log's `t`).
Baseline: smpplib pipelining the same submit_sm octets to the same simulator with no
window limit (PDUs built and bound before the clock starts: the baseline gets no startup
cost), timed from its first submit to the last submit_sm the simulator logged. Best of
`rounds` each (fresh spool per project round), alternating B P B P ..., and the ratio of
the bests. The dispatcher runs with the shipped SMPP defaults (window, window_max) unless
`--window` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import (
    BenchAbort,
    Smsc,
    banner,
    bed,
    cleanup_on_exit,
    poll,
    result,
    say,
    start_dispatcher,
    tail,
    workdir,
)

TARGET_RATIO = 0.9
_TEXT = "bench {:07d} The quick brown fox jumps over the lazy dog, 0123456789."


def _single_part_jobs(n: int) -> list:
    from sms_milter.spool.base import NewJob

    return [NewJob(recipient=f"+4179{i % 10**7:07d}", originator="+41760000000", text=_TEXT.format(i),
                   parts=1, account="acme") for i in range(n)]


FIRST: list[float] = []  # the first accepted submit's time of the last _submits() call


def _submits(log: Path, offset: int) -> tuple[int, float]:
    """(accepted submit_sm, the last one's time in s) in the SMSC log after `offset`."""
    count, last, first = 0, 0.0, float("inf")
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f:
            if b'"submit_sm"' not in line or not line.endswith(b"\n"):
                continue  # (a line the simulator is still writing is read on the next look)
            rec = json.loads(line)
            if rec.get("command") == "submit_sm" and rec.get("status") == 0:
                count += 1
                last = max(last, rec["t"] / 1000.0)
                first = min(first, rec["t"] / 1000.0)
    FIRST[:] = [first]
    return count, last


def _raw_round(smsc: Smsc, log: Path, n: int) -> float:
    from _sms import raw_pipeline

    off = log.stat().st_size
    raw = raw_pipeline("127.0.0.1", smsc.port, 0, n, window=n)  # no window limit
    if raw.errors:
        raise BenchAbort(f"raw pipeline: {raw.errors} error responses")
    poll(lambda: _submits(log, off)[0] >= raw.parts, 30, "the raw submits in the SMSC log", interval=0.2)
    got, last = _submits(log, off)
    if got != raw.parts:
        raise BenchAbort(f"raw: the SMSC logged {got} submits for {raw.parts} parts")
    poll(lambda: smsc.stats().get("pending_receipts") == 0, 10, "no unacknowledged receipt", interval=0.2)
    return last - raw.started


def _project_round(stack: object, smsc: Smsc, log: Path, work: Path, n: int, window: int | None) -> float:
    from sms_milter.spool.sqlite import SqliteSpool

    work.mkdir(parents=True, exist_ok=True)
    spool = work / "spool.sqlite3"
    smpp: dict = {"window": window} if window else {}
    config = bed.write_config(work, bed.free_port(), bed.free_port(), smpp_port=smsc.port, spool_path=spool,
                              extra={"provider": {"smpp": smpp}} if smpp else None)
    s = SqliteSpool(spool)
    try:
        s.add_message(None, _single_part_jobs(n), 0.0)  # spooled with the dispatcher stopped
    finally:
        s.close()
    logfile = work / "dispatcher.log"
    off = log.stat().st_size
    t0 = time.time()
    disp = start_dispatcher(stack, config, logfile)  # type: ignore[arg-type]
    poll(lambda: _submits(log, off)[0] >= n, 600, f"{n} submits at the SMSC", interval=0.2, alive=[disp])
    got, last = _submits(log, off)
    code = disp.stop(30)
    if code != 0:
        raise BenchAbort(f"the dispatcher exited {code} on SIGTERM:\n{tail(logfile)}")
    if got != n:
        raise BenchAbort(f"the SMSC logged {got} accepted submits for {n} jobs (resent?)")
    startup = FIRST[0] - t0
    say(f"  dispatcher: process start -> first submit_sm {startup:.3f} s (interpreter, imports, spool, "
        f"bind), then {n / max(last - FIRST[0], 1e-6):.0f} SMS/s first -> last")
    poll(lambda: smsc.stats().get("pending_receipts") == 0, 30, "no unacknowledged receipt", interval=0.2)
    return last - t0


def outside(a: argparse.Namespace) -> int:
    n = a.jobs or (2000 if a.quick else 20000)
    rounds = a.rounds or 3
    banner("dispatcher_drain --outside: spooled while stopped; process start -> last submit_sm at the SMSC")
    with cleanup_on_exit() as stack:
        work = workdir(stack, "drain-outside")
        log = work / "smsc.log"
        smsc = Smsc(stack, log)
        say(f"{n} single-part jobs to distinct numbers, {rounds} round(s) each, best of; dispatcher window "
            f"{a.window or 'default (adaptive)'}; SMSC simulator on port {smsc.port}")
        raws: list[float] = []
        projs: list[float] = []
        for r in range(rounds):
            raws.append(_raw_round(smsc, log, n))
            say(f"round {r + 1}: baseline (smpplib, no window limit): first -> last submit_sm "
                f"{raws[-1]:.3f} s = {n / raws[-1]:.0f} SMS/s")
            projs.append(_project_round(stack, smsc, log, work / f"round{r + 1}", n, a.window))
            say(f"round {r + 1}: dispatcher: process start -> last submit_sm {projs[-1]:.3f} s = "
                f"{n / projs[-1]:.0f} SMS/s (pair ratio {raws[-1] / projs[-1]:.2f})")
        best_raw, best_proj = min(raws), min(projs)
        ratio = best_raw / best_proj
        say(f"best: baseline {n / best_raw:.0f} SMS/s, dispatcher {n / best_proj:.0f} SMS/s (from process "
            f"start): ratio {ratio:.2f} (target >= {TARGET_RATIO}) "
            f"{'OK' if ratio >= TARGET_RATIO else 'MISSED'}")
        result("dispatcher_drain_outside", jobs=n, rounds=rounds, raw_sms_s=round(n / best_raw),
               project_sms_s=round(n / best_proj), ratio=round(ratio, 3),
               pair_ratios=[round(b / p, 3) for b, p in zip(raws, projs, strict=True)],
               met=ratio >= TARGET_RATIO)
    return 0
