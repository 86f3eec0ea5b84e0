#!/usr/bin/env python3
"""Benchmark 1: SMTP throughput of Postfix with the sms-milter in the path.

    python bench/milter_path.py [--quick] [--rounds N] [--messages N] [--profile]

smtp-source (20 sessions, 5,000 messages of 1 KB) into a private Postfix, twice:

- baseline: the messages go to a normal relay recipient; Postfix has no milter and
  relays them to a fast smtp-sink;
- project: the same count to an SMS recipient (00417...@sms.example.com) from an
  authorized sender; Postfix asks the milter, which validates the message, commits the
  job to the SQLite spool (WAL, synchronous=FULL) and discards the mail.

Each round runs the baseline and the project back to back (in alternating order) and
takes their ratio; the median msg/s of each and the median of the rounds' ratios are
printed (target >= 0.8). Each round is verified: smtp-source
exited 0, the maillog shows no reject/tempfail, the baseline's messages all reached the
sink, the project's spool got exactly one new job per message.

--profile adds one more project round with the milter sampled by py-spy (if installed,
`pip install py-spy`) or run under cProfile (all threads) and prints the top functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import grp
import io
import os
import pstats
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    SMS_SENDER,
    BenchAbort,
    Proc,
    banner,
    bed,
    cleanup_on_exit,
    median,
    own,
    poll,
    result,
    run,
    say,
    spool_max_id,
    spool_query,
    use_postgres,
    workdir,
)

SMS_RCPT = "0041791234567@sms.example.com"
RELAY_RCPT = "bench@relay.example"
TARGET_RATIO = 0.8
# What must not appear in the maillog of a round: a refused or deferred message.
BAD_LOG = re.compile(r"NOQUEUE: reject|milter-reject|\breject: |status=(?:deferred|bounced)"
                     r"|warning: milter|fatal:|panic:")


@dataclass
class Bed:
    sink: Proc
    plain: bed.Postfix  # no milter
    milter_pf: bed.Postfix  # smtpd_milters = the sms-milter
    milter: bed.Milter
    config: Path
    spool: Path


def smtp_source(port: int, sessions: int, messages: int, size: int, sender: str, rcpt: str,
                helo: str) -> float:
    """Run smtp-source; seconds it took. Raises BenchAbort unless it exited 0."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size), "-M", helo,
           "-f", sender, "-t", rcpt, f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU["smtp-source"] = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    if r.returncode != 0:
        raise BenchAbort(f"smtp-source exited {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}")
    return elapsed


def log_since(pf: bed.Postfix, offset: int) -> str:
    with open(pf.maillog, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def log_size(pf: bed.Postfix) -> int:
    return pf.maillog.stat().st_size


def check_clean_log(text: str, what: str) -> None:
    bad = [line for line in text.splitlines() if BAD_LOG.search(line)]
    if bad:
        raise BenchAbort(f"{what}: {len(bad)} reject/tempfail line(s) in the maillog, e.g.\n  "
                         + "\n  ".join(bad[:5]))


# CPU seconds of the last round by part: smtp-source, postfix (every process of the
# instance), sink, milter; the round's work from the first SMTP connection until the last
# message is relayed (baseline) or discarded (project). On a 2-core box that Postfix,
# smtp-source and the milter keep busy, throughput follows CPU per message; unlike msg/s
# this figure hardly moves when other jobs share the machine.
CPU: dict[str, float] = {}


def tree_cpu(root: int | None) -> float:
    """CPU seconds of a process, its live descendants and every child they reaped."""
    if root is None:
        return 0.0
    parent: dict[int, int] = {}
    spent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(d)] = int(f[1])
        spent[int(d)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    total, todo = 0, [root]
    kids: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        kids.setdefault(pp, []).append(pid)
    while todo:
        pid = todo.pop()
        total += spent.get(pid, 0)
        todo += kids.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU of Postfix, the sink and the milter over one round (smtp-source's comes from
    smtp_source())."""

    def __init__(self, b: Bed, pf: bed.Postfix):
        self.pids = {"postfix": pf.master_pid, "sink": b.sink.pid, "milter": b.milter.pid}
        self.t0 = {k: tree_cpu(p) for k, p in self.pids.items()}

    def done(self, n: int) -> None:
        for k, p in self.pids.items():
            CPU[k] = tree_cpu(p) - self.t0[k]
        CPU["messages"] = n


def cpu_line() -> str:
    n = CPU.get("messages") or 1
    parts = [k for k in ("postfix", "smtp-source", "sink", "milter") if CPU.get(k)]
    total = sum(CPU[k] for k in parts)
    return (f"CPU {1000 * total / n:.2f} ms/msg (" + ", ".join(f"{k} {1000 * CPU[k] / n:.2f}" for k in parts)
            + ")")


def cpu_per_msg() -> float:
    return sum(CPU.get(k, 0.0) for k in ("postfix", "smtp-source", "sink", "milter")) / (CPU.get("messages")
                                                                                       or 1)


def baseline_round(b: Bed, n: int, sessions: int, size: int, tag: str) -> float:
    off = log_size(b.plain)
    meter = CpuMeter(b, b.plain)
    elapsed = smtp_source(b.plain.port, sessions, n, size, SMS_SENDER, RELAY_RCPT, f"{tag}.bench.example")

    def relayed() -> bool:
        return log_since(b.plain, off).count(f"to=<{RELAY_RCPT}>, relay=127.0.0.1") >= n

    # Not timed: wait until Postfix has relayed everything, so rounds do not overlap.
    poll(relayed, 300, f"{n} messages relayed to the sink", interval=0.2, alive=[b.sink])
    text = log_since(b.plain, off)
    check_clean_log(text, f"baseline round {tag}")
    sent = len(re.findall(r"status=sent", text))
    if sent != n:
        raise BenchAbort(f"baseline round {tag}: {sent} messages relayed, expected {n}")
    meter.done(n)
    CPU.pop("milter", None)  # not in this path
    return n / elapsed


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (all threads) so far."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def project_round(b: Bed, n: int, sessions: int, size: int, tag: str, rcpt: str = SMS_RCPT,
                  expect_jobs: int | None = -1) -> float:
    """expect_jobs: new spool jobs the round must leave (-1: n; None: at most one, the
    identical-SMS dedupe makes every later copy of smtp-source's text no job)."""
    if expect_jobs == -1:
        expect_jobs = n
    number = "+" + rcpt.split("@")[0][2:]
    off = log_size(b.milter_pf)
    before = spool_max_id(b.spool)
    meter = CpuMeter(b, b.milter_pf)
    cpu0 = cpu_seconds(b.milter.pid)
    elapsed = smtp_source(b.milter_pf.port, sessions, n, size, SMS_SENDER, rcpt, f"{tag}.bench.example")
    # The milter answers only after the commit: the jobs are already there.
    rows = spool_query(b.spool, "SELECT count(*), min(parts), max(parts), count(DISTINCT message_id),"
                                " sum(CASE WHEN state='queued' THEN 1 ELSE 0 END),"
                                " sum(CASE WHEN recipient=? THEN 1 ELSE 0 END) FROM jobs WHERE id>?",
                       (number, before))
    count, pmin, pmax, mids, queued, right_rcpt = rows[0]
    if (count != expect_jobs) if expect_jobs is not None else count > 1:
        raise BenchAbort(f"project round {tag}: the spool got {count} new jobs, expected "
                         f"{expect_jobs if expect_jobs is not None else 'at most 1'} "
                         f"(milter log: {b.milter.logfile})")
    if count and (mids != count or queued != count or right_rcpt != count):
        raise BenchAbort(f"project round {tag}: jobs not as expected: {mids} distinct Message-IDs, "
                         f"{queued} queued, {right_rcpt} to {number} of {count}")

    def discarded() -> bool:
        return log_since(b.milter_pf, off).count("milter-discard") >= n

    poll(discarded, 60, f"{n} milter-discard lines in the maillog", interval=0.2)
    meter.done(n)
    CPU.pop("sink", None)  # not in this path
    check_clean_log(log_since(b.milter_pf, off), f"project round {tag}")
    if b.milter_pf.queue_ids():
        raise BenchAbort(f"project round {tag}: mail left in the Postfix queue (expected all discarded)")
    cpu = cpu_seconds(b.milter.pid) - cpu0
    if not tag.startswith("w"):
        say(f"  (milter CPU {1000 * cpu / n:.2f} ms/msg, {100 * cpu / elapsed:.0f}% of one core; "
            f"jobs of {pmin}-{pmax} SMS parts each)")
    return n / elapsed


def let_postfix_in(spec: str) -> None:
    """A unix socket, 0660 with Postfix's group: Postfix gets in through its group, as
    `usermod -aG sms-milter postfix` lets it in production."""
    if spec.startswith("unix:"):
        os.chown(spec[5:], -1, grp.getgrnam("postfix").gr_gid)
        os.chmod(spec[5:], 0o660)


def reference_postfix(stack: contextlib.ExitStack, argv: Callable[[str], list[str]], kind: str, path: Path,
                      sink_port: int, name: str, what: str) -> bed.Postfix:
    """A reference milter (argv(its socket spec in Postfix's spelling)) on a socket of the
    same kind as the project's, and a private Postfix that uses it."""
    port = bed.free_port()
    spec = f"unix:{path}" if kind == "unix" else f"inet:127.0.0.1:{port}"
    own(stack, Proc(argv(spec)))
    poll(lambda: bed._unix_listening(str(path)) if kind == "unix" else bed._port_listening(port), 10,
         f"{what} listening")
    let_postfix_in(spec)
    pf = bed.Postfix(None, sink_port, spec, name=f"{name}{os.getpid()}")
    stack.callback(pf.stop)
    pf.start()
    return pf


def build_noop_milter(work: Path) -> Path | None:
    """bench/noop_milter.c, compiled: the fastest milter possible (needs gcc and libmilter-dev)."""
    src = Path(__file__).with_name("noop_milter.c")
    out = work / "noop_milter"
    if not shutil.which("gcc") or not Path("/usr/include/libmilter/mfapi.h").exists():
        return None
    r = subprocess.run(["gcc", "-O2", "-o", str(out), str(src), "-lmilter", "-lpthread"],
                       capture_output=True, text=True)
    return out if r.returncode == 0 else None


def ceiling_round(pf: bed.Postfix, n: int, sessions: int, size: int, tag: str) -> float:
    """Postfix + a no-op milter on sendmail's C libmilter (DISCARD, like SMS mail): the reference
    for what a conventional milter costs Postfix here."""
    off = log_size(pf)
    elapsed = smtp_source(pf.port, sessions, n, size, SMS_SENDER, SMS_RCPT, f"{tag}.bench.example")
    poll(lambda: log_since(pf, off).count("milter-discard") >= n, 60, f"{n} discards (no-op milter)",
         interval=0.2)
    check_clean_log(log_since(pf, off), f"ceiling round {tag}")
    return n / elapsed


# --------------------------------------------------------------------------- profiling

def short_frame(frame: str) -> str:
    """`func (/long/path/site-packages/libmilter.py:123)` -> `func (libmilter.py:123)`."""
    m = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame
    func, path, line = m.groups()
    p = Path(path)
    with contextlib.suppress(ValueError):
        return f"{func} ({p.resolve().relative_to(REPO)}:{line})"
    if "site-packages" in p.parts:
        return f"{func} ({'/'.join(p.parts[p.parts.index('site-packages') + 1:])}:{line})"
    if "lib" in p.parts and "python3" in path:
        return f"{func} (stdlib {p.name}:{line})"
    return f"{func} ({p.name}:{line})"


def pyspy_top(raw: Path, top: int, totals: bool = True) -> str:
    """Self and total sample counts per function from py-spy's collapsed-stack output."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += c
        self_n[frames[-1]] += c
        for f in set(frames):
            total_n[f] += c
    if not samples:
        return "   (py-spy recorded no samples)"
    out = [f"   {samples} samples",
           f"   top {top} by own time (self %, total %):"]
    for f, c in self_n.most_common(top):
        out.append(f"   {100 * c / samples:6.1f}% {100 * total_n[f] / samples:6.1f}%  {short_frame(f)}")
    if not totals:
        return "\n".join(out)
    out.append(f"   top {top} by total time (including callees), threads' entry points left out:")
    shown = 0
    for f, c in total_n.most_common():
        if c / samples > 0.97:
            continue  # _bootstrap, run, _session: every sample
        out.append(f"   {100 * c / samples:6.1f}% total {100 * self_n[f] / samples:6.1f}% self  "
                   f"{short_frame(f)}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def cprofile_top(prof: Path, top: int) -> str:
    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def profiled_round(b: Bed, n: int, sessions: int, size: int, work: Path, profiler: str, top: int) -> None:
    if profiler == "py-spy":
        # Two samplers at once: --gil shows the milter's Python CPU work; the other also
        # shows threads that are running or runnable outside the GIL (syscalls, SQLite).
        views = {"gil": ["--gil"], "active": []}
        spies: dict[str, tuple[Proc, Path]] = {}
        try:
            for name, extra in views.items():
                raw = work / f"pyspy-{name}.txt"
                spy = Proc(["py-spy", "record", "--pid", str(b.milter.pid), "--rate", "250", "--function",
                            *extra, "--nonblocking", "--format", "raw", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                spies[name] = (spy, raw)
            time.sleep(1.0)  # py-spy attaches
            for spy, _ in spies.values():
                if not spy.alive():
                    err = spy.proc.stderr.read().decode()[-500:]  # type: ignore[union-attr]
                    raise BenchAbort(f"py-spy could not attach: {err} (needs ptrace; "
                                     "try --profiler cprofile)")
            rate = project_round(b, n, sessions, size, "prof")
        finally:
            for spy, _ in spies.values():
                spy.stop(30, signal.SIGINT)
        say(f"profiled project round (py-spy at 250 Hz, all threads): {rate:.0f} msg/s")
        say("view 1: samples of threads holding the GIL (the milter's Python CPU work)")
        print(pyspy_top(spies["gil"][1], top), flush=True)
        say("view 2: all samples py-spy did not classify idle: where the threads are, "
            "waits in recv/send/commit included")
        print(pyspy_top(spies["active"][1], top, totals=False), flush=True)
        return
    # cProfile: restart the milter under the all-threads wrapper on the same port.
    b.milter.stop()
    prof = work / "milter.prof"
    log = open(work / "milter-cprofile.log", "ab")  # noqa: SIM115
    p = Proc([sys.executable, str(REPO / "bench" / "_cprofile_run.py"), str(prof), "milter", "-c",
              str(b.config)], stdout=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    try:
        poll(b.milter.listening, 20, "the profiled milter listening", alive=[p])
        let_postfix_in(b.milter.socket_spec)
        rate = project_round(b, n, sessions, size, "prof")
    finally:
        p.stop(30)
    say(f"profiled project round (cProfile, all threads; slows Python code down): {rate:.0f} msg/s")
    print(cprofile_top(prof, top), flush=True)


# --------------------------------------------------------------------------- main

def scrape_every_second(port: int) -> Callable[[], None]:
    """A Prometheus stand-in: GET /metrics once a second (errors ignored until it listens);
    returns the function that stops it and reports the scrapes."""
    import threading
    import urllib.request

    stop = threading.Event()
    count = [0]

    def loop() -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
                    count[0] += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def done() -> None:
        stop.set()
        t.join(6)
        say(f"/metrics scraped {count[0]} time(s) during the run")

    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1,000 messages each")
    ap.add_argument("--rounds", type=int, help="rounds of each (default 3, --quick 1)")
    ap.add_argument("--messages", type=int, help="messages per round (default 5000, --quick 1000)")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, help="message size for smtp-source -l (default 1024, --outside 300)")
    ap.add_argument("--socket", choices=("inet", "unix"), default="inet",
                    help="how Postfix reaches the sms-milter (default inet, the configuration's default)")
    ap.add_argument("--profile", action="store_true", help="one more project round, profiled")
    ap.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto")
    ap.add_argument("--top", type=int, default=15, help="functions shown by --profile")
    ap.add_argument("--metrics", action="store_true",
                    help="serve the milter's /metrics and scrape it every second during the run")
    ap.add_argument("--limits", action="store_true",
                    help="account acme with every limit on (caps far above the run: nothing refused)")
    ap.add_argument("--postgres", action="store_true",
                    help="the spool on a private PostgreSQL cluster (synchronous_commit=on), not SQLite")
    ap.add_argument("--outside", action="store_true",
                    help="issue 16's outside method: 2,000 x 300 bytes to one number, one Postfix restarted "
                         "between baseline and project, best of 2 rounds each (bench/_outside.py)")
    ap.add_argument("--no-restart", action="store_true", help="--outside without the Postfix restarts")
    ap.add_argument("--no-references", action="store_true",
                    help="--outside without the no-op milter rounds (the ceilings)")
    ap.add_argument("--ab", metavar="VAR=VALUE[,...]", action="append",
                    help="--outside with a second milter started with this environment, A/B in each round")
    ap.add_argument("--dedupe", action="store_true",
                    help="--outside with limits.identical_seconds as shipped (smtp-source's identical "
                         "texts become one job)")
    a = ap.parse_args()
    if a.outside:
        from _outside import outside

        return outside(a)
    a.size = a.size or 1024
    rounds = a.rounds or (1 if a.quick else 3)
    n = a.messages or (1000 if a.quick else 5000)
    profiler = a.profiler
    if profiler == "auto":
        profiler = "py-spy" if shutil.which("py-spy") else "cprofile"

    banner("milter_path: smtp-source -> Postfix (-> sms-milter -> spool)")
    say(f"{rounds} round(s) each of {n} messages x {a.size} bytes, {a.sessions} sessions, "
        f"sms-milter on an {a.socket} socket")
    with cleanup_on_exit() as stack:
        work = workdir(stack, "milter-path")
        if a.postgres:
            say(f"spool: PostgreSQL {use_postgres(stack)} (private cluster, synchronous_commit=on, fsync=on)")
        sink_port, milter_port = bed.free_port(), bed.free_port()
        spool = work / "spool.sqlite3"
        # 1 KB of smtp-source text is ~1,000 GSM-7 characters: 7 SMS parts; allow 10.
        extra: dict = {"accounts": {"acme": {"max_parts": 10}}}
        # smtp-source sends the same text to the same number every time: identical SMS would be
        # one job (limits.identical_seconds), so that rule is off here; --limits turns the others on.
        extra["limits"] = {"identical_seconds": 0}
        if a.limits:
            extra["limits"].update({
                "parts_per_minute": 10**7, "parts_per_hour": 10**8, "parts_per_day": 10**9,
                "parts_per_month": 10**10, "per_recipient_per_hour": 10**8, "recipients_per_message": 10,
                "countries": ["CH", "DE", "FR"], "deny_prefixes": ["+882", "+881"],
                "number_types": ["mobile", "fixed_line_or_mobile"]})
        milter_spec = f"inet:127.0.0.1:{milter_port}"
        if a.socket == "unix":
            os.chmod(work, 0o755)  # smtpd (user postfix) must reach the socket
            milter_spec = f"unix:{work}/milter.sock"
            extra["milter"] = {"socket": milter_spec}
        if a.metrics:
            metrics_port = bed.free_port()
            extra["metrics"] = {"milter": f"127.0.0.1:{metrics_port}"}
            if not os.environ.get("BENCH_NO_SCRAPE"):
                stack.callback(scrape_every_second(metrics_port))
        config = bed.write_config(work, milter_port, bed.free_port(), spool_path=spool, extra=extra)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink_err = open(work / "smtp-sink.err", "wb")  # noqa: SIM115
        stack.callback(sink_err.close)
        sink = own(stack, Proc(["smtp-sink", *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                               stderr=sink_err))
        poll(lambda: bed._port_listening(sink_port), 10, "smtp-sink listening", alive=[sink])
        milter = bed.Milter(config, work / "milter.log")
        stack.callback(milter.kill9)
        milter.start()
        let_postfix_in(milter_spec)
        plain = bed.Postfix(None, sink_port, None, name=f"bplain{os.getpid()}")
        stack.callback(plain.stop)
        plain.start()
        mpf = bed.Postfix(None, sink_port, milter_spec, name=f"bmilter{os.getpid()}")
        stack.callback(mpf.stop)
        mpf.start()
        b = Bed(sink, plain, mpf, milter, config, spool)
        noop = build_noop_milter(work)
        noop_pf = None
        if noop is None:
            say("no-op C milter not built (needs gcc and libmilter-dev): reference rounds skipped")
        else:
            # libmilter's own spelling of an inet socket: inet:PORT@HOST
            noop_pf = reference_postfix(
                stack, lambda spec: [str(noop), spec if spec.startswith("unix:")
                                     else f"inet:{spec.rsplit(':', 1)[1]}@127.0.0.1"],
                a.socket, work / "noop-c.sock", sink_port, "bnoop", "no-op C milter")
            ceiling_round(noop_pf, 100, a.sessions, a.size, "w2")
        py_pf = reference_postfix(
            stack, lambda spec: [sys.executable, str(Path(__file__).with_name("noop_py_milter.py")), spec],
            a.socket, work / "noop-py.sock", sink_port, "bnoopy", "no-op Python milter")
        ceiling_round(py_pf, 100, a.sessions, a.size, "w3")
        # A short warm-up of both paths (first-time process starts, milter connections).
        baseline_round(b, 100, a.sessions, a.size, "w0")
        project_round(b, 100, a.sessions, a.size, "w1")
        base_rates: list[float] = []
        proj_rates: list[float] = []
        ceil_rates: list[float] = []
        noop_rates: list[float] = []
        ratios: list[float] = []
        for i in range(1, rounds + 1):
            # Baseline and project back to back, in alternating order: the machine's speed
            # drifts over tens of seconds, and each round's ratio compares neighbours.
            pair = ["baseline", "project"] if i % 2 else ["project", "baseline"]
            for which in pair:
                if which == "baseline":
                    base_rates.append(baseline_round(b, n, a.sessions, a.size, f"b{i}"))
                    say(f"round {i} baseline (Postfix alone, relay to smtp-sink): "
                        f"{base_rates[-1]:7.0f} msg/s")
                else:
                    proj_rates.append(project_round(b, n, a.sessions, a.size, f"p{i}"))
                    say(f"round {i} project  (Postfix + sms-milter + spool):    "
                        f"{proj_rates[-1]:7.0f} msg/s")
            ratios.append(proj_rates[-1] / base_rates[-1])
            say(f"round {i} ratio {ratios[-1]:.2f}")
            if noop_pf is not None:
                ceil_rates.append(ceiling_round(noop_pf, n, a.sessions, a.size, f"c{i}"))
                say(f"round {i} reference (Postfix + no-op C libmilter):    {ceil_rates[-1]:7.0f} msg/s")
            noop_rates.append(ceiling_round(py_pf, n, a.sessions, a.size, f"n{i}"))
            say(f"round {i} reference (Postfix + our adapter, no work): {noop_rates[-1]:7.0f} msg/s")
        base, proj = median(base_rates), median(proj_rates)
        ratio = median(ratios)
        if ceil_rates:
            ceil = median(ceil_rates)
            say(f"median reference {ceil:.0f} msg/s: a no-op milter on sendmail's C libmilter reaches "
                f"{ceil / base:.2f} of Postfix alone; sms-milter {proj / ceil:.2f}x that")
        say(f"verified: every round's smtp-source exited 0, no reject/tempfail in the maillogs, "
            f"{n} relayed (baseline) / {n} new spool jobs (project) per round")
        say(f"median baseline {base:.0f} msg/s, project {proj:.0f} msg/s; median of the rounds' ratios "
            f"{ratio:.2f} (target >= {TARGET_RATIO}) {'OK' if ratio >= TARGET_RATIO else 'MISSED'}")
        noop = median(noop_rates)
        say(f"median reference {noop:.0f} msg/s: our adapter with no validation and no spool reaches "
            f"{noop / base:.2f} of Postfix alone; validation + durable commit cost {1 - proj / noop:.0%} "
            "of that")
        ceiling = {"noop_c_milter_msg_s": round(median(ceil_rates))} if ceil_rates else {}
        ceiling["noop_adapter_msg_s"] = round(noop)
        result("milter_path", baseline_msg_s=round(base), project_msg_s=round(proj), ratio=round(ratio, 3),
               target_ratio=TARGET_RATIO, met=ratio >= TARGET_RATIO, messages=n, rounds=rounds, **ceiling)
        if a.profile:
            profiled_round(b, n, a.sessions, a.size, work, profiler, a.top)
        code = b.milter.stop()
        if code != 0:
            raise BenchAbort(f"the milter exited {code} on SIGTERM")
    return 0


if __name__ == "__main__":
    run(main, "milter_path")
