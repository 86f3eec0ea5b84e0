#!/usr/bin/env python3
"""Benchmark 4: memory footprint (peak RSS, VmHWM) of the milter and of the dispatcher.

    python bench/footprint.py [--quick] [--sessions 100] [--jobs 200000] [--seconds S] [--postgres]
    python bench/footprint.py --dispatcher-only --jobs 1000000    (issue 16: until drained)

- milter: 100 SMTP sessions held open at once through a private Postfix (smtpd process
  limit raised to 150), every one sending SMS mail for a while; the milter then has one
  open MTA connection per session (all served by its one event-loop thread).
- dispatcher: 200,000 jobs inserted directly into the spool (SqliteSpool.add_message, in
  batches of 10,000), then `sms-milter dispatcher` runs against the SMSC simulator for
  60 s or until the spool is drained.

--postgres: both spools on a private PostgreSQL cluster (tests/pgbed.py); the server's
own processes are not counted (they are the database's, as they would be on its own host).

Peak RSS is VmHWM from /proc/PID/status. Target: < 100 MB each. Baseline: a bare
`python -c 'import sms_milter.cli'`. Also printed: spool bytes per job (the file after the
insert, and after the run with every part's message id and receipt stored) and, when the
spool drained, the time from the dispatcher's start to the last job delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
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
    proc_status,
    result,
    run,
    say,
    spool_max_id,
    spool_query,
    spool_states,
    start_dispatcher,
    tail,
    use_postgres,
    workdir,
)

TARGET_MB = 100
SMS_RCPT = "0041791234567@sms.example.com"


def mb(kb: int) -> float:
    return kb / 1024


def bare_import() -> int:
    """VmHWM (kB) of a Python process that only imports sms_milter.cli."""
    code = ("import sms_milter.cli, re; "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def open_sockets(pid: int) -> int:
    """How many sockets a process has open right now."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    except OSError:
        pass
    return n


class Sampler:
    """Samples a process's VmHWM / VmRSS / threads / open sockets every 0.2 s in the background."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_threads = 0
        self.peak_sockets = 0
        self.last: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            st = proc_status(self.pid)
            if st:
                self.last = st
                self.peak_threads = max(self.peak_threads, st.get("Threads", 0))
                self.peak_sockets = max(self.peak_sockets, open_sockets(self.pid))
            self._stop.wait(0.2)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join(5)
        st = proc_status(self.pid)
        if st:
            self.last = st
        return self.last


def milter_footprint(stack: contextlib.ExitStack, sessions: int, seconds: float) -> tuple[int, int, int]:
    """(VmHWM kB, peak threads, messages accepted) of the milter under `sessions` open sessions."""
    work = workdir(stack, "footprint-milter")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink_port, milter_port = bed.free_port(), bed.free_port()
    sink = own(stack, Proc(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "256"]))
    poll(lambda: bed._port_listening(sink_port), 10, "smtp-sink", alive=[sink])
    spool = work / "spool.sqlite3"
    config = bed.write_config(work, milter_port, sink_port, spool_path=spool)
    milter = bed.Milter(config, work / "milter.log")
    stack.callback(milter.kill9)
    milter.start()
    assert milter.pid is not None
    limit = str(max(150, sessions + 50))
    pf = bed.Postfix(None, sink_port, f"inet:127.0.0.1:{milter_port}", name=f"fmilter{os.getpid()}",
                     extra_main={"default_process_limit": limit, "smtpd_client_connection_count_limit": "0"})
    stack.callback(pf.stop)
    pf.start()
    idle_sockets = open_sockets(milter.pid)  # listening socket, wake-ups: not MTA connections
    sampler = Sampler(milter.pid)
    before = spool_max_id(spool)
    barrier = threading.Barrier(sessions + 1, timeout=60)
    lock = threading.Lock()
    counts = {"ok": 0}
    errors: list[str] = []
    deadline = [0.0]
    body = "Footprint test: " + "all sessions are open and sending. " * 8

    def client(i: int) -> None:
        s = None
        try:
            s = bed.SmtpSession(pf.port, timeout=60)
            barrier.wait()  # every session is open before anyone sends
            k = 0
            while time.monotonic() < deadline[0]:
                k += 1
                msg = bed.make_message(None, f"{body} session {i} message {k}", sender=SMS_SENDER,
                                       to=SMS_RCPT)
                r = s.send(SMS_SENDER, [SMS_RCPT], msg)
                with lock:
                    if r["data"] is not None and r["data"][0] == 250:
                        counts["ok"] += 1
                    else:
                        errors.append(f"session {i}: {r}")
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"session {i}: {e!r}")
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()
        finally:
            if s is not None:
                s.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + 3600
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        raise BenchAbort(f"not every session could connect: {errors[:3]}") from None
    deadline[0] = time.monotonic() + seconds
    open_threads = proc_status(milter.pid).get("Threads", 0)
    say(f"milter: {sessions} SMTP sessions open (milter: {open_sockets(milter.pid) - idle_sockets} MTA "
        f"connections, {open_threads} threads), "
        f"sending for {seconds:g} s")
    for t in threads:
        t.join(seconds + 120)
    st = sampler.stop()
    if errors:
        raise BenchAbort(f"{len(errors)} failed session(s)/message(s), e.g. {errors[:3]}\n"
                         f"milter log:\n{tail(milter.logfile)}")
    jobs = spool_max_id(spool) - before
    if jobs != counts["ok"]:
        raise BenchAbort(f"{counts['ok']} messages accepted but {jobs} new jobs in the spool")
    connections = sampler.peak_sockets - idle_sockets
    if connections < sessions:
        raise BenchAbort(f"the milter had at most {connections} MTA connections open at once, "
                         f"not {sessions}")
    code = milter.stop()
    if code != 0:
        raise BenchAbort(f"the milter exited {code}")
    return st.get("VmHWM", 0), sampler.peak_threads, counts["ok"]


SPOOL_SIZES: dict[str, int] = {}  # "inserted", "after": bytes of the spool file (with its WAL)


def spool_bytes(path: Path) -> int:
    if bed.spool_url_for(path) is not None:  # --postgres: the database's size
        return int(spool_query(path, "SELECT pg_database_size(current_database())")[0][0])
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


def dispatcher_footprint(stack: contextlib.ExitStack, njobs: int,
                         seconds: float) -> tuple[int, dict[str, int], float]:
    """(VmHWM kB, job states at the end, seconds run) of the dispatcher on a spool of `njobs`."""
    from _sms import insert

    work = workdir(stack, "footprint-disp")
    spool = work / "spool.sqlite3"
    parts, took = insert(spool, 0, njobs, batch=10_000)
    SPOOL_SIZES["inserted"] = spool_bytes(spool)
    say(f"dispatcher: {njobs} jobs ({parts} SMS parts) inserted in {took:.1f} s "
        f"({SPOOL_SIZES['inserted'] / 2**20:.0f} MB spool, "
        f"{SPOOL_SIZES['inserted'] / njobs:.0f} bytes a job)")
    smsc = Smsc(stack, None)
    config = bed.write_config(work, bed.free_port(), bed.free_port(), smpp_port=smsc.port, spool_path=spool)
    logfile = work / "dispatcher.log"
    disp = start_dispatcher(stack, config, logfile)
    sampler = Sampler(disp.pid)
    t0 = time.monotonic()
    end = t0 + seconds
    last = [t0]

    def drained_or_time() -> bool:
        if time.monotonic() - last[0] >= 15:
            last[0] = time.monotonic()
            st = spool_states(spool)
            hwm = mb(proc_status(disp.pid).get("VmHWM", 0))
            say(f"  ... {st.get('delivered', 0)} delivered, VmHWM {hwm:.1f} MB")
        if time.monotonic() >= end:
            return True
        return spool_states(spool).get("delivered", 0) >= njobs

    poll(drained_or_time, seconds + 60, "the dispatcher run", interval=1.0, alive=[disp])
    ran = time.monotonic() - t0
    st = sampler.stop()
    code = disp.stop(60)
    if code != 0:
        raise BenchAbort(f"the dispatcher exited {code}:\n{tail(logfile)}")
    states = spool_states(spool)
    SPOOL_SIZES["after"] = spool_bytes(spool)
    if states.get("failed") or states.get("expired"):
        raise BenchAbort(f"jobs failed: {states}\n{tail(logfile)}")
    if not states.get("delivered"):
        raise BenchAbort(f"the dispatcher delivered nothing: {states}\n{tail(logfile)}")
    return st.get("VmHWM", 0), states, ran


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 s of sending, 20,000 jobs for 8 s")
    ap.add_argument("--sessions", type=int, default=100, help="concurrent SMTP sessions")
    ap.add_argument("--send-seconds", type=float, help="how long the sessions send (default 20, --quick 5)")
    ap.add_argument("--jobs", type=int, help="jobs in the dispatcher's spool (default 200000, --quick 20000)")
    ap.add_argument("--seconds", type=float,
                    help="dispatcher run time at most (default 60, --quick 8, --dispatcher-only 3600)")
    ap.add_argument("--dispatcher-only", action="store_true",
                    help="only the dispatcher, run until the spool is drained (or --seconds)")
    ap.add_argument("--postgres", action="store_true",
                    help="the spools on a private PostgreSQL cluster (synchronous_commit=on)")
    a = ap.parse_args()
    send_s = a.send_seconds or (5.0 if a.quick else 20.0)
    njobs = a.jobs or (20_000 if a.quick else 200_000)
    disp_s = a.seconds or (8.0 if a.quick else 3600.0 if a.dispatcher_only else 60.0)
    banner("footprint: peak RSS (VmHWM) of the milter and the dispatcher")
    base = bare_import()
    say(f"baseline: bare `python -c 'import sms_milter.cli'`: {mb(base):.1f} MB")
    figures: dict[str, object] = {"baseline_mb": round(mb(base), 1),
                                  "spool": "postgres" if a.postgres else "sqlite"}
    if not a.dispatcher_only:
        with cleanup_on_exit() as stack:
            if a.postgres:
                say(f"spool: PostgreSQL {use_postgres(stack)} (private cluster, synchronous_commit=on)")
            hwm, threads, msgs = milter_footprint(stack, a.sessions, send_s)
        say(f"milter: VmHWM {mb(hwm):.1f} MB ({mb(hwm) / mb(base):.1f}x bare) with {a.sessions} sessions, "
            f"peak {threads} threads, {msgs} messages accepted and spooled; target < {TARGET_MB} MB "
            f"{'OK' if mb(hwm) < TARGET_MB else 'MISSED'}")
        figures.update(milter_mb=round(mb(hwm), 1), milter_threads=threads, milter_messages=msgs)
    missing = dispatcher_available()
    if missing:
        say(f"dispatcher: SKIPPED: not there yet: {missing}")
        figures["dispatcher_skipped"] = missing
        result("footprint", **figures)
        return 0
    with cleanup_on_exit() as stack:
        if a.postgres:
            use_postgres(stack)
        dhwm, states, ran = dispatcher_footprint(stack, njobs, disp_s)
        say(f"dispatcher: VmHWM {mb(dhwm):.1f} MB ({mb(dhwm) / mb(base):.1f}x bare) on a spool of "
            f"{njobs} jobs, "
            f"{ran:.0f} s run, {states.get('delivered', 0)} delivered; target < {TARGET_MB} MB "
            f"{'OK' if mb(dhwm) < TARGET_MB else 'MISSED'}")
        drained = states.get("delivered", 0) >= njobs
        how = f"drained all {njobs} jobs in {ran:.0f} s" if drained else f"not drained in {ran:.0f} s"
        say(f"dispatcher: {how}; spool {SPOOL_SIZES['inserted'] / njobs:.0f} bytes a queued job, "
            f"{SPOOL_SIZES['after'] / njobs:.0f} bytes a job after the run (parts, message ids, receipts)")
        figures.update(dispatcher_mb=round(mb(dhwm), 1), dispatcher_jobs=njobs,
                       dispatcher_delivered=states.get("delivered", 0),
                       drain_seconds=round(ran, 1) if drained else None,
                       spool_bytes_per_job=round(SPOOL_SIZES["inserted"] / njobs),
                       spool_bytes_per_job_after=round(SPOOL_SIZES["after"] / njobs))
    figures["met"] = all(isinstance(v, float) and v < TARGET_MB
                         for k, v in figures.items() if k in ("milter_mb", "dispatcher_mb"))
    result("footprint", **figures)
    return 0


if __name__ == "__main__":
    run(main, "footprint")
