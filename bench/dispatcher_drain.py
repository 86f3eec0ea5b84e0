#!/usr/bin/env python3
"""Benchmark 2: how fast the dispatcher drains a full spool to an SMSC, receipts included.

    python bench/dispatcher_drain.py [--quick] [--jobs N] [--window W] [--notify]
                                     [--binds 1,2,4] [--postgres --dispatchers 1,2,4]
    python bench/dispatcher_drain.py --outside [--rounds N] [--jobs N] [--window W]

--outside: issue 16's measurement (bench/_drain_outside.py): single-part jobs spooled with
the dispatcher stopped, timed from the dispatcher's process start to the last submit_sm at
the SMSC, against smpplib with no window limit; best of N rounds.

20,000 jobs (a third single-part GSM-7, a third 3-part GSM-7, a third 2-part UCS-2:
40,000 SMS parts) go into a fresh spool in one transaction (SqliteSpool.add_message) while
`sms-milter dispatcher` is bound to the SMSC simulator (tests/smsc/server.js). Measured:
from the commit of the jobs until the last job is `delivered` (its last receipt recorded
in the spool; the spool's done_at).

Baseline: smpplib alone pipelining the same submit_sm octets (built before the clock
starts) to the same simulator with the same window, reading every submit_sm_resp and
every receipt and answering deliver_sm_resp: no spool, no bookkeeping.

The dispatcher runs once per bind count (`--binds`, default 1,2,4: `provider.smpp.binds`,
each bind with the same window), each with a fresh spool, against the one raw baseline.

--postgres puts the spool on a private PostgreSQL cluster (tests/pgbed.py,
synchronous_commit=on); --dispatchers 1,2,4 then runs that many `sms-milter dispatcher`
processes on the one database per run (each with --binds' count), one run per count.

Prints SMS/s (parts) and jobs/s for both and the ratio. Targets: >= 3,000 SMS/s with
receipts recorded, and >= 0.5 of the raw pipeline. --notify gives the jobs a sender, so
every delivered job also owes a notification mail (handed to an smtp-sink).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SMS_SENDER,
    BenchAbort,
    Proc,
    Smsc,
    banner,
    bed,
    cleanup_on_exit,
    dispatcher_available,
    own,
    poll,
    result,
    run,
    say,
    spool_query,
    spool_states,
    start_dispatcher,
    tail,
    use_postgres,
    workdir,
)

TARGET_SMS_S = 3000
TARGET_RATIO = 0.5


def wait_bound(logfile: Path, disp: Proc, timeout: float = 30) -> None:
    poll(lambda: "bound to SMSC" in logfile.read_text(errors="replace"), timeout,
         "the dispatcher to bind to the SMSC", alive=[disp])


def drain(spool: Path, n: int, disps: list[Proc], logfile: Path, sender: str) -> tuple[float, int]:
    """Commit n jobs while the dispatcher is bound; (seconds to the last receipt recorded, parts)."""
    from _sms import jobs

    batch = jobs(0, n, sender)
    parts = sum(j.parts for j in batch)
    s = bed.spool_at(spool)
    try:
        s.add_message(None, batch, 0.0)  # one transaction; wakes the dispatcher
        t0 = time.time()
    finally:
        s.close()
    # No deadline for the whole drain, but a stall (no job finished for 30 s) is a failure.
    stall = 30.0
    seen = [-1, time.monotonic(), time.monotonic()]  # delivered, when it last changed, last report

    def finished() -> bool:
        st = spool_states(spool)
        bad = {k: v for k, v in st.items() if k in ("failed", "expired")}
        if bad:
            raise BenchAbort(f"jobs ended {bad}; dispatcher log tail:\n{tail(logfile)}")
        done = st.get("delivered", 0)
        t = time.monotonic()
        if done != seen[0]:
            seen[0], seen[1] = done, t
        elif t - seen[1] > stall:
            raise BenchAbort(f"stalled: {done}/{n} delivered and no progress for {stall:g} s; "
                             f"states {st}\n{stuck_report(spool, logfile)}")
        if t - seen[2] > 10:
            say(f"  ... {done}/{n} delivered")
            seen[2] = t
        return done == n

    poll(finished, 24 * 3600, f"all {n} jobs delivered", interval=0.1, alive=disps)
    t_end = spool_query(spool, "SELECT max(done_at) FROM jobs")[0][0]
    return t_end - t0, parts


def stuck_report(spool: Path, logfile: Path, limit: int = 10) -> str:
    """The jobs that did not finish: their row, their parts, what the dispatcher logged about them."""
    rows = spool_query(spool, "SELECT id, state, parts, attempts, last_error, lease_owner IS NOT NULL"
                              " FROM jobs WHERE state != 'delivered' ORDER BY id LIMIT ?", (limit,))
    log = logfile.read_text(errors="replace").splitlines()
    out = []
    for jid, state, parts, attempts, err, leased in rows:
        prt = spool_query(spool, "SELECT seq, ref, state FROM parts WHERE job_id=? ORDER BY seq", (jid,))
        out.append(f"  job {jid}: {state}, {parts} part(s), attempts {attempts}, leased {bool(leased)}, "
                   f"last_error {err!r}, parts {prt}")
        out += [f"    log: {line}" for line in log if f"job {jid} " in line][-4:]
    return "\n".join(out)


def project_run(stack: object, smsc: Smsc, work: Path, n: int, window: int, binds: int,
                notify: bool, dispatchers: int = 1) -> tuple[float, int]:
    """One run of `dispatchers` dispatcher processes with `binds` binds each on one spool:
    (SMS/s from commit to the last receipt stored, parts)."""
    work.mkdir(parents=True, exist_ok=True)
    spool = work / "spool.sqlite3"
    notify_port = bed.free_port()
    if notify:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink = own(stack, Proc(["smtp-sink", *user, f"127.0.0.1:{notify_port}", "256"]))
        poll(lambda: bed._port_listening(notify_port), 10, "notification smtp-sink", alive=[sink])
    config = bed.write_config(work, bed.free_port(), notify_port, smpp_port=smsc.port, spool_path=spool,
                              extra={"provider": {"smpp": {"window": window, "binds": binds}}})
    bed.spool_at(spool).close()  # create the schema before the dispatchers open it
    logfile = work / "dispatcher.log"  # all of them: "bound to SMSC" counted over the processes
    disps = [start_dispatcher(stack, config, logfile) for _ in range(dispatchers)]
    for disp in disps:
        wait_bound(logfile, disp)
    poll(lambda: logfile.read_text(errors="replace").count("bound to SMSC") >= binds * dispatchers, 30,
         f"all {binds * dispatchers} binds", alive=disps)
    st0 = smsc.stats()
    seconds, parts = drain(spool, n, disps, logfile, SMS_SENDER if notify else "")
    st1 = smsc.stats()
    accepted = st1.get("next_id", 0) - st0.get("next_id", 0)
    if accepted != parts:
        raise BenchAbort(f"the SMSC accepted {accepted} submits for {parts} parts (resent or lost)")
    poll(lambda: smsc.stats().get("pending_receipts") == 0, 10,
         "the SMSC to have no unacknowledged receipt after the dispatcher run", interval=0.2)
    refs = spool_query(spool, "SELECT count(*), sum(CASE WHEN state='delivered' THEN 1 ELSE 0 END)"
                              " FROM parts")[0]
    if refs[0] != parts or refs[1] != parts:
        raise BenchAbort(f"parts table: {refs[1]}/{refs[0]} delivered, expected {parts}")
    proj_sms = parts / seconds
    say(f"project ({dispatchers} dispatcher(s), {binds} bind(s) each, receipts recorded): {parts} SMS in "
        f"{seconds:.2f} s: {proj_sms:.0f} SMS/s, {n / seconds:.0f} jobs/s")
    for disp in disps:
        code = disp.stop(30)
        if code != 0:
            raise BenchAbort(f"a dispatcher exited {code} on SIGTERM:\n{tail(logfile)}")
    say(f"verified: all {n} jobs delivered, every part's receipt stored, the SMSC accepted exactly "
        f"{parts} submits")
    return proj_sms, parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 jobs")
    ap.add_argument("--jobs", type=int, help="jobs to drain (default 20000, --quick 2000)")
    ap.add_argument("--window", type=int, help="SMPP window for both (default: the dispatcher's default)")
    ap.add_argument("--binds", default="1,2,4",
                    help="bind counts, one dispatcher run each against the same raw baseline (default 1,2,4)")
    ap.add_argument("--notify", action="store_true",
                    help="jobs with a sender: every delivery also queues a notification mail")
    ap.add_argument("--postgres", action="store_true",
                    help="the spool on a private PostgreSQL cluster (synchronous_commit=on)")
    ap.add_argument("--dispatchers", default="1",
                    help="dispatcher process counts on one spool, one run each (default 1; e.g. 1,2,4 "
                         "with --postgres)")
    ap.add_argument("--outside", action="store_true",
                    help="process start -> last submit_sm at the SMSC vs smpplib with no window limit")
    ap.add_argument("--rounds", type=int, help="--outside: rounds each, best of (default 3)")
    a = ap.parse_args()
    if a.outside:
        from _drain_outside import outside

        return outside(a)
    n = a.jobs or (2000 if a.quick else 20000)
    counts = {}
    for opt in ("binds", "dispatchers"):
        text = getattr(a, opt)
        try:
            counts[opt] = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--{opt} {text!r}: comma-separated integers, e.g. 1,2,4")
        if not counts[opt] or min(counts[opt]) < 1:
            ap.error(f"--{opt} {text!r}: at least one count, each >= 1")
    bind_counts, disp_counts = counts["binds"], counts["dispatchers"]
    if a.dispatchers != "1" and a.binds == "1,2,4":
        bind_counts = [1]  # --dispatchers alone: one bind each
    banner("dispatcher_drain: spool -> sms-milter dispatcher -> SMSC simulator, receipts back")
    missing = dispatcher_available()
    if missing:
        say(f"SKIPPED: not there yet: {missing}")
        result("dispatcher_drain", skipped=missing)
        return 0
    from sms_milter.model import SmppConfig

    window = a.window or SmppConfig.window
    with cleanup_on_exit() as stack:
        work = workdir(stack, "drain")
        if a.postgres:
            say(f"spool: PostgreSQL {use_postgres(stack)} (private cluster, synchronous_commit=on, fsync=on)")
        smsc = Smsc(stack, None)
        say(f"{n} jobs (1/3 GSM-7 x1, 1/3 GSM-7 x3, 1/3 UCS-2 x2), window {window}, SMSC simulator on "
            f"port {smsc.port}")

        # ---- baseline: smpplib alone
        from _sms import raw_pipeline

        st0 = smsc.stats()
        raw = raw_pipeline("127.0.0.1", smsc.port, 0, n, window)
        if raw.errors or raw.receipts != raw.parts:
            raise BenchAbort(f"raw pipeline: {raw.errors} error responses, "
                             f"{raw.receipts}/{raw.parts} receipts")
        st1 = smsc.stats()
        if st1.get("next_id", 0) - st0.get("next_id", 0) != raw.parts:
            raise BenchAbort(f"the SMSC accepted {st1.get('next_id', 0) - st0.get('next_id', 0)} submits, "
                             f"expected {raw.parts}")
        # Every receipt acknowledged: none left for the dispatcher's bind to inherit.
        poll(lambda: smsc.stats().get("pending_receipts") == 0, 10,
             "the SMSC to have no unacknowledged receipt after the raw run", interval=0.2)
        raw_sms = raw.parts / raw.seconds
        say(f"baseline (smpplib alone, no spool): {raw.parts} SMS in {raw.seconds:.2f} s: "
            f"{raw_sms:.0f} SMS/s, {n / raw.seconds:.0f} jobs/s")

        # ---- project: the dispatcher(s), once per (dispatchers, binds) (fresh spool each time)
        runs = []
        for procs in disp_counts:
            for binds in bind_counts:
                name = f"binds{binds}" if procs == 1 else f"dispatchers{procs}-binds{binds}"
                proj_sms, parts = project_run(stack, smsc, work / name, n, window, binds, a.notify, procs)
                ratio = proj_sms / raw_sms
                ok_abs, ok_ratio = proj_sms >= TARGET_SMS_S, ratio >= TARGET_RATIO
                label = str(binds) if procs == 1 else f"{procs}x{binds}"
                runs.append((label, proj_sms, ratio, ok_abs and ok_ratio))
                say(f"{procs} dispatcher(s), binds {binds}: {proj_sms:.0f} SMS/s (target >= {TARGET_SMS_S}) "
                    f"{'OK' if ok_abs else 'MISSED'}; ratio to raw smpplib (one connection, window {window}) "
                    f"{ratio:.2f} (target >= {TARGET_RATIO}) {'OK' if ok_ratio else 'MISSED'}")
        if len(runs) > 1:
            say("runs (binds, or dispatchers x binds): "
                + ", ".join(f"{b} -> {sms:.0f} SMS/s ({r:.2f} of raw)" for b, sms, r, _ in runs)
                + " (same SMSC, same raw baseline, one after the other)")
        first = runs[0]  # the headline figures: the first bind count (1 by default)
        result("dispatcher_drain", spool="postgres" if a.postgres else "sqlite", jobs=n, parts=parts,
               window=window, raw_sms_s=round(raw_sms),
               raw_jobs_s=round(n / raw.seconds), project_sms_s=round(first[1]),
               project_jobs_s=round(first[1] * n / parts), ratio=round(first[2], 3),
               binds_sms_s={str(b): round(sms) for b, sms, _, _ in runs},
               binds_ratio={str(b): round(r, 3) for b, _, r, _ in runs}, met=first[3])
    return 0


if __name__ == "__main__":
    run(main, "dispatcher_drain")
