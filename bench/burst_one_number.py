#!/usr/bin/env python3
"""A burst to one handset: 500 mails to one number through Postfix + sms-milter + dispatcher + SMSC.

    python bench/burst_one_number.py [--quick] [--mails 500] [--clients 10] [--per-number 200]

Issue 16: a monitoring storm is normal traffic. 500 mails, each with a unique numbered text,
to one SMS number, sent by `--clients` persistent SMTP sessions as fast as Postfix answers,
through a private Postfix with the milter, with `sms-milter dispatcher` running and bound to
the SMSC simulator (tests/smsc/server.js, every PDU logged with its arrival time). Twice,
in the same run, each with a fresh spool and dispatcher:

- baseline: `pipeline_per_number: 1` (one job of a number on the wire at a time: the old way);
- project: the shipped default (`pipeline_per_number: 200`: trains, ADR 0003).

Printed for each: end to end SMS/s (first mail's start -> last submit_sm at the SMSC), the
SMTP side alone (first start -> last 250: the most end to end can be), and the dispatcher's
drain of the burst (first -> last submit_sm of it at the SMSC); the project / baseline
ratio. Verified: every mail got 250, the SMSC accepted each SMS exactly once, in the order
of the jobs' ids (the order the milter committed them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
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
    start_dispatcher,
    tail,
    workdir,
)

RCPT = "0041791239876@sms.example.com"
DEST = "41791239876"
TARGET_SMS_S = 2000
TOKEN = re.compile(r"BURST(\d+)N(\d+)")


def send_burst(port: int, mails: int, clients: int, run_id: int) -> tuple[float, float]:
    """Send `mails` mails to RCPT over `clients` sessions; (wall time of the first start, of the last 250)."""
    todo = list(range(mails))
    lock = threading.Lock()
    errors: list[str] = []
    last = [0.0]

    def worker() -> None:
        session = bed.SmtpSession(port, timeout=30)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    k = todo.pop(0)
                text = f"BURST{run_id}N{k:05d} host db{k % 7} is DOWN"
                msg = bed.make_message(None, text, sender=SMS_SENDER, to=RCPT)
                r = session.send(SMS_SENDER, [RCPT], msg)
                with lock:
                    if r["data"] is None or r["data"][0] != 250:
                        errors.append(f"mail {k}: {r}")
                    last[0] = max(last[0], time.time())
        finally:
            session.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise BenchAbort(f"{len(errors)} mails not accepted: {errors[:3]}")
    return t0, last[0]


def submits(log: Path, run_id: int) -> list[tuple[float, int]]:
    """(arrival time, mail number) of every accepted submit_sm of this run, in arrival order."""
    out = []
    for line in log.read_bytes().splitlines():
        if b'"submit_sm"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("command") != "submit_sm" or rec.get("status") != 0 or rec.get("destination_addr") != DEST:
            continue
        m = TOKEN.search(bytes.fromhex(rec.get("body_hex", "")).decode("latin-1"))
        if m and int(m.group(1)) == run_id:
            out.append((rec["t"] / 1000.0, int(m.group(2))))
    return out


def one_run(stack: object, smsc: Smsc, log: Path, work: Path, sink_port: int, mails: int, clients: int,
            per_number: int, run_id: int) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    spool = work / "spool.sqlite3"
    milter_port = bed.free_port()
    config = bed.write_config(work, milter_port, bed.free_port(), smpp_port=smsc.port, spool_path=spool,
                              extra={"limits": {"identical_seconds": 0},
                                     "provider": {"smpp": {"pipeline_per_number": per_number}}})
    milter = bed.Milter(config, work / "milter.log")
    stack.callback(milter.kill9)  # type: ignore[attr-defined]
    milter.start()
    dlog = work / "dispatcher.log"
    disp = start_dispatcher(stack, config, dlog)  # type: ignore[arg-type]
    poll(lambda: "bound to SMSC" in dlog.read_text(errors="replace"), 30, "dispatcher bound", alive=[disp])
    pf = bed.Postfix(None, sink_port, f"inet:127.0.0.1:{milter_port}", name=f"burst{run_id}{os.getpid()}")
    stack.callback(pf.stop)  # type: ignore[attr-defined]
    pf.start()
    t0, t250 = send_burst(pf.port, mails, clients, run_id)
    poll(lambda: len(submits(log, run_id)) >= mails, 300, f"{mails} submit_sm at the SMSC", interval=0.2,
         alive=[disp])
    got = submits(log, run_id)
    if len(got) != mails or len({k for _, k in got}) != mails:
        raise BenchAbort(f"the SMSC accepted {len(got)} submits for {mails} mails "
                         f"({len({k for _, k in got})} distinct)")
    # Order: the SMSC's arrival order must be the order of the job ids (the commit order).
    rows = spool_query(spool, "SELECT id, text FROM jobs ORDER BY id")
    by_id = [int(m.group(2)) for _, text in rows if (m := TOKEN.search(text)) and int(m.group(1)) == run_id]
    if [k for _, k in got] != by_id:
        raise BenchAbort("the SMSC got this number's SMS out of the order of their jobs")
    code = disp.stop(30)
    if code != 0:
        raise BenchAbort(f"the dispatcher exited {code} on SIGTERM:\n{tail(dlog)}")
    first, last = got[0][0], got[-1][0]
    out = {"e2e": mails / (last - t0), "smtp": mails / (t250 - t0), "drain": mails / max(last - first, 1e-6)}
    # The same burst again with the dispatcher stopped, then started: process start -> last submit.
    backlog_id = run_id + 100
    send_burst(pf.port, mails, clients, backlog_id)
    t_start = time.time()
    disp = start_dispatcher(stack, config, dlog)  # type: ignore[arg-type]
    poll(lambda: len(submits(log, backlog_id)) >= mails, 300, f"{mails} backlog submit_sm at the SMSC",
         interval=0.2, alive=[disp])
    got = submits(log, backlog_id)
    by_id = [int(m.group(2)) for _, text in spool_query(spool, "SELECT id, text FROM jobs ORDER BY id")
             if (m := TOKEN.search(text)) and int(m.group(1)) == backlog_id]
    if len(got) != mails or [k for _, k in got] != by_id:
        raise BenchAbort(f"backlog: {len(got)} submits for {mails}, or out of the jobs' order")
    out["backlog"] = mails / (got[-1][0] - t_start)
    out["backlog_sending"] = mails / max(got[-1][0] - got[0][0], 1e-6)  # first -> last submit_sm
    if disp.stop(30) != 0:
        raise BenchAbort(f"the dispatcher failed on SIGTERM:\n{tail(dlog)}")
    pf.stop()
    milter.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 mails")
    ap.add_argument("--mails", type=int, help="mails in the burst (default 500, --quick 100)")
    ap.add_argument("--clients", type=int, default=10, help="concurrent SMTP sessions")
    ap.add_argument("--per-number", type=int, default=0,
                    help="the project's pipeline_per_number (default: the shipped default)")
    a = ap.parse_args()
    a.mails = a.mails or (100 if a.quick else 500)
    banner("burst_one_number: 500 mails to one handset, Postfix -> sms-milter -> dispatcher -> SMSC")
    missing = dispatcher_available()
    if missing:
        say(f"SKIPPED: not there yet: {missing}")
        result("burst_one_number", skipped=missing)
        return 0
    from sms_milter.model import SmppConfig

    per_number = a.per_number or SmppConfig.pipeline_per_number
    with cleanup_on_exit() as stack:
        work = workdir(stack, "burst")
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink_port = bed.free_port()
        sink = own(stack, Proc(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "256"]))
        poll(lambda: bed._port_listening(sink_port), 10, "smtp-sink", alive=[sink])
        log = work / "smsc.jsonl"
        smsc = Smsc(stack, log)
        figures = {}
        runs = (("baseline (pipeline_per_number 1)", 1),
                (f"project (pipeline_per_number {per_number})", per_number))
        for run_id, (label, pn) in enumerate(runs, 1):
            f = one_run(stack, smsc, log, work / f"run{run_id}", sink_port, a.mails, a.clients, pn, run_id)
            figures[pn] = f
            say(f"{label}: end to end {f['e2e']:.0f} SMS/s (SMTP side alone {f['smtp']:.0f} mails/s), "
                f"dispatcher drain of the burst {f['drain']:.0f} SMS/s; the same as a backlog (dispatcher "
                f"started after): {f['backlog']:.0f} SMS/s from process start, "
                f"{f['backlog_sending']:.0f} SMS/s first -> last submit_sm; order and count verified")
        base, proj = figures[1], figures[per_number]
        ok = proj["e2e"] >= TARGET_SMS_S
        say(f"end to end: project {proj['e2e']:.0f} vs baseline {base['e2e']:.0f} SMS/s: ratio "
            f"{proj['e2e'] / base['e2e']:.2f}; drain ratio {proj['drain'] / base['drain']:.2f}; target >= "
            f"{TARGET_SMS_S} SMS/s end to end {'OK' if ok else 'MISSED'} (the SMTP side alone took the mails "
            f"at {proj['smtp']:.0f}/s)")
        say(f"backlog of {a.mails} to the number, dispatcher started after: process start -> last "
            f"submit_sm {proj['backlog']:.0f} vs {base['backlog']:.0f} SMS/s (ratio "
            f"{proj['backlog'] / base['backlog']:.2f}); first -> last submit_sm "
            f"{proj['backlog_sending']:.0f} vs {base['backlog_sending']:.0f} SMS/s (ratio "
            f"{proj['backlog_sending'] / base['backlog_sending']:.2f}; target >= {TARGET_SMS_S} "
            f"{'OK' if proj['backlog_sending'] >= TARGET_SMS_S else 'MISSED'})")
        result("burst_one_number", mails=a.mails, clients=a.clients, per_number=per_number,
               baseline={k: round(v) for k, v in base.items()},
               project={k: round(v) for k, v in proj.items()},
               e2e_ratio=round(proj["e2e"] / base["e2e"], 2), met=ok)
    return 0


if __name__ == "__main__":
    run(main, "burst_one_number")
