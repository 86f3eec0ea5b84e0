#!/usr/bin/env python3
"""Benchmark 3: latency from the client's 250 to the submit_sm at the SMSC, under steady load.

    python bench/end_to_end.py [--quick] [--rate 50] [--seconds 60] [--clients 10]

A steady 50 messages/s for 60 s (--quick: 10 s), each a short SMS mail with a unique
text, through Postfix + sms-milter + spool + `sms-milter dispatcher` + the SMSC simulator
(tests/smsc/server.js, which logs every PDU with its arrival time). For every message:
the delay from the moment smtplib's data() returned the 250 to the arrival of its
submit_sm at the simulator (matched by the unique text). Printed: p50/p99/max (targets
p50 < 50 ms, p99 < 250 ms; negative values mean the SMSC had the SMS before the client
had its 250: the milter commits the job before Postfix answers).

Baseline: the same client and load against Postfix without the milter (relaying to an
smtp-sink): the time to the 250 with and without the milter is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
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
    percentile,
    poll,
    result,
    run,
    say,
    spool_states,
    start_dispatcher,
    tail,
    workdir,
)

TARGET_P50_MS = 50
TARGET_P99_MS = 250
SMS_RCPT = "0041791234567@sms.example.com"
RELAY_RCPT = "bench@relay.example"
TOKEN = re.compile(r"E2E(\d+)X(\d+)")


@dataclass
class Load:
    sent: dict[int, float] = field(default_factory=dict)  # message -> wall time of its 250
    smtp_ms: list[float] = field(default_factory=list)  # MAIL FROM .. 250 after DATA
    lag_ms: list[float] = field(default_factory=list)  # start later than scheduled
    errors: list[str] = field(default_factory=list)


def run_load(port: int, rcpt: str, rate: float, seconds: float, clients: int, run_id: int) -> Load:
    """Open-loop load: message k is due at t0 + k/rate; `clients` persistent SMTP sessions send."""
    n = int(rate * seconds)
    todo: queue.Queue[tuple[int, float] | None] = queue.Queue()
    load = Load()
    lock = threading.Lock()

    def worker() -> None:
        try:
            session = bed.SmtpSession(port, timeout=30)
        except Exception as e:  # noqa: BLE001
            with lock:
                load.errors.append(f"connect: {e!r}")
            return
        try:
            while True:
                item = todo.get()
                if item is None:
                    return
                k, due = item
                text = f"E2E{run_id}X{k:06d} steady load message number {k}"
                msg = bed.make_message(None, text, sender=SMS_SENDER, to=rcpt)
                start = time.time()
                try:
                    r = session.send(SMS_SENDER, [rcpt], msg)
                except Exception as e:  # noqa: BLE001
                    with lock:
                        load.errors.append(f"message {k}: {e!r}")
                    continue
                t250 = time.time()
                with lock:
                    if r["data"] is None or r["data"][0] != 250:
                        load.errors.append(f"message {k}: {r}")
                        continue
                    load.sent[k] = t250
                    load.smtp_ms.append(1000 * (t250 - start))
                    load.lag_ms.append(1000 * max(0.0, start - due))
        finally:
            session.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # sessions connected
    t0 = time.time()
    for k in range(n):
        due = t0 + k / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        todo.put((k, due))
    for _ in threads:
        todo.put(None)
    for t in threads:
        t.join(60)
    return load


class SubmitLog:
    """Reads the simulator's PDU log incrementally: token -> arrival time of its submit_sm."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.arrivals: dict[tuple[int, int], float] = {}
        self.submits = 0

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            if b'"submit_sm"' not in line:
                continue
            rec = json.loads(line)
            if rec.get("command") != "submit_sm":
                continue
            self.submits += 1
            body = bytes.fromhex(rec.get("body_hex", "")).decode("latin-1")
            m = TOKEN.search(body)
            if m:
                self.arrivals.setdefault((int(m.group(1)), int(m.group(2))), rec["t"] / 1000.0)


def summary(name: str, xs: list[float]) -> str:
    return (f"{name}: p50 {percentile(xs, 50):7.1f} ms  p99 {percentile(xs, 99):7.1f} ms  "
            f"max {max(xs):7.1f} ms  (n={len(xs)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 s")
    ap.add_argument("--rate", type=float, default=50.0, help="messages per second")
    ap.add_argument("--seconds", type=float, help="duration (default 60, --quick 10)")
    ap.add_argument("--clients", type=int, default=10, help="concurrent SMTP sessions")
    a = ap.parse_args()
    seconds = a.seconds or (10.0 if a.quick else 60.0)
    n = int(a.rate * seconds)
    banner("end_to_end: smtplib -> Postfix -> sms-milter -> spool -> dispatcher -> SMSC simulator")
    missing = dispatcher_available()
    if missing:
        say(f"SKIPPED: not there yet: {missing}")
        result("end_to_end", skipped=missing)
        return 0
    say(f"{a.rate:g} msg/s for {seconds:g} s ({n} messages), {a.clients} persistent SMTP sessions")
    with cleanup_on_exit() as stack:
        work = workdir(stack, "e2e")
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink_port, notify_port, milter_port = bed.free_port(), bed.free_port(), bed.free_port()
        sink = own(stack, Proc(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "256"]))
        notify = own(stack, Proc(["smtp-sink", *user, f"127.0.0.1:{notify_port}", "256"]))
        for p, port in ((sink, sink_port), (notify, notify_port)):
            poll(lambda port=port: bed._port_listening(port), 10, "smtp-sink", alive=[p])
        smsc_log = work / "smsc.jsonl"
        smsc = Smsc(stack, smsc_log)
        spool = work / "spool.sqlite3"
        config = bed.write_config(work, milter_port, notify_port, smpp_port=smsc.port, spool_path=spool)
        milter = bed.Milter(config, work / "milter.log")
        stack.callback(milter.kill9)
        milter.start()
        dlog = work / "dispatcher.log"
        disp = start_dispatcher(stack, config, dlog)
        poll(lambda: "bound to SMSC" in dlog.read_text(errors="replace"), 30, "dispatcher bound",
             alive=[disp])
        plain = bed.Postfix(None, sink_port, None, name=f"eplain{os.getpid()}")
        stack.callback(plain.stop)
        plain.start()
        mpf = bed.Postfix(None, sink_port, f"inet:127.0.0.1:{milter_port}", name=f"emilter{os.getpid()}")
        stack.callback(mpf.stop)
        mpf.start()

        # warm-up: process starts, milter connections, the dispatcher's first claims
        run_load(plain.port, RELAY_RCPT, 20, 1, a.clients, 0)
        warm = run_load(mpf.port, SMS_RCPT, 20, 1, a.clients, 0)
        if warm.errors:
            raise BenchAbort(f"warm-up through the milter failed: {warm.errors[:3]}")

        say(f"baseline: {seconds:g} s against Postfix without the milter ...")
        base = run_load(plain.port, RELAY_RCPT, a.rate, seconds, a.clients, 1)
        if base.errors or len(base.sent) != n:
            raise BenchAbort(f"baseline: {len(base.sent)}/{n} accepted; errors {base.errors[:3]}")
        say(f"project: {seconds:g} s through the milter and the dispatcher ...")
        before = spool_states(spool)
        log = SubmitLog(smsc_log)
        log.read()
        proj = run_load(mpf.port, SMS_RCPT, a.rate, seconds, a.clients, 2)
        if proj.errors or len(proj.sent) != n:
            raise BenchAbort(f"project: {len(proj.sent)}/{n} accepted; errors {proj.errors[:3]}")

        def all_arrived() -> bool:
            log.read()
            return sum(1 for (r, _k) in log.arrivals if r == 2) >= n

        poll(all_arrived, 60, f"{n} submit_sm at the SMSC", interval=0.1, alive=[disp])
        delays = [1000 * (log.arrivals[(2, k)] - t) for k, t in proj.sent.items()]
        after = spool_states(spool)
        new_jobs = sum(after.values()) - sum(before.values())
        if new_jobs != n:
            raise BenchAbort(f"the spool got {new_jobs} new jobs for {n} messages")
        dup = log.submits - len(log.arrivals)
        say(f"verified: {n} x 250 in each run, {new_jobs} new jobs, every message's submit_sm seen "
            f"at the SMSC ({dup} submit_sm without a unique token or repeated)")
        lag = max(proj.lag_ms + base.lag_ms)
        if lag > 100:
            say(f"note: the client fell behind its schedule by up to {lag:.0f} ms (more --clients?)")
        say(summary("250 latency, Postfix alone      ", base.smtp_ms))
        say(summary("250 latency, Postfix + milter   ", proj.smtp_ms))
        say(summary("250 -> submit_sm at the SMSC    ", delays))
        p50, p99 = percentile(delays, 50), percentile(delays, 99)
        ok = p50 < TARGET_P50_MS and p99 < TARGET_P99_MS
        say(f"targets p50 < {TARGET_P50_MS} ms, p99 < {TARGET_P99_MS} ms: {'OK' if ok else 'MISSED'}; "
            f"250 latency ratio (milter / alone, p50) "
            f"{percentile(proj.smtp_ms, 50) / percentile(base.smtp_ms, 50):.2f}")
        result("end_to_end", messages=n, rate=a.rate, p50_ms=round(p50, 1), p99_ms=round(p99, 1),
               max_ms=round(max(delays), 1), smtp_p50_ms_plain=round(percentile(base.smtp_ms, 50), 1),
               smtp_p50_ms_milter=round(percentile(proj.smtp_ms, 50), 1),
               smtp_p99_ms_plain=round(percentile(base.smtp_ms, 99), 1),
               smtp_p99_ms_milter=round(percentile(proj.smtp_ms, 99), 1), met=ok)
        code = disp.stop(30)
        if code != 0:
            raise BenchAbort(f"the dispatcher exited {code} on SIGTERM:\n{tail(dlog)}")
    return 0


if __name__ == "__main__":
    run(main, "end_to_end")
