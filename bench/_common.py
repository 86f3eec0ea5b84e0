"""Shared plumbing of the benchmarks: processes, cleanup, the SMSC simulator, the spool.

Not a framework: a few helpers on top of tests/bed.py (the private-Postfix test bed),
which the benchmarks reuse as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import bed  # noqa: E402  (tests/bed.py: Postfix, Milter, write_config, free_port, ...)

SMSC_JS = REPO / "tests" / "smsc" / "server.js"
DISPATCHER_SERVICE = REPO / "milter" / "dispatcher" / "service.py"
SMS_SENDER = "c4ca423@client.example"  # authorized sender of account "acme" in bed.write_config


# --------------------------------------------------------------------------- machine, output

def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPU(s), {model}, Python {platform.python_version()}, {platform.system()} " \
           f"{platform.release()}"


def banner(title: str) -> None:
    print(f"== {title}", flush=True)
    print(f"   machine: {machine()}", flush=True)


def say(msg: str) -> None:
    print(f"   {msg}", flush=True)


def result(name: str, **figures: Any) -> None:
    """The machine-readable summary line run_all.py collects."""
    print("RESULT " + json.dumps({"bench": name, **figures}, sort_keys=True), flush=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


# --------------------------------------------------------------------------- cleanup

class BenchAbort(Exception):
    """A verification failed: the figures would be meaningless."""


def run(main: Callable[[], int], name: str) -> None:
    """A benchmark script's entry point: exit 1 with one line on a failed verification, 130
    on Ctrl-C (cleanup_on_exit has stopped everything either way)."""
    try:
        sys.exit(main())
    except BenchAbort as e:
        print(f"{name}: FAILED VERIFICATION: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def cleanup_on_exit() -> Iterator[contextlib.ExitStack]:
    """An ExitStack that also runs on SIGTERM/SIGHUP (turned into KeyboardInterrupt) and Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with contextlib.ExitStack() as stack:
            yield stack
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def workdir(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A fresh directory under /tmp, removed at the end unless BENCH_KEEP is set."""
    d = Path(tempfile.mkdtemp(prefix=f"sms-milter-bench-{prefix}-"))
    os.chmod(d, 0o755)
    if not os.environ.get("BENCH_KEEP"):
        import shutil

        stack.callback(shutil.rmtree, d, True)
    else:
        stack.callback(print, f"   (kept {d})")
    return d


class Proc:
    """A child process we own: stopped by pid (SIGTERM, then SIGKILL) when the bench ends."""

    def __init__(self, args: Sequence[str], *, stdout: int | IO[Any] | None = subprocess.DEVNULL,
                 stderr: int | IO[Any] | None = subprocess.STDOUT, stdin: int | None = subprocess.DEVNULL,
                 env: dict[str, str] | None = None, cwd: Path | None = None, text: bool = False):
        self.args = list(args)
        self.proc = subprocess.Popen(self.args, stdout=stdout, stderr=stderr, stdin=stdin,
                                     env=env, cwd=cwd, text=text)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def own(stack: contextlib.ExitStack, p: Proc, timeout: float = 10) -> Proc:
    stack.callback(p.stop, timeout)
    return p


# --------------------------------------------------------------------------- /proc

def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, ... of a process in kB (empty if it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            m = re.match(r"(Vm\w+|Threads):\s+(\d+)", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        kids: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(x) for x in (task / "children").read_text().split()]
        return kids
    return []


# --------------------------------------------------------------------------- spool

def use_postgres(stack: contextlib.ExitStack) -> str:
    """Run this benchmark's spools on a private PostgreSQL cluster (tests/pgbed.py): every config
    bed.write_config writes then has `spool: {url: ...}`, a database per spool path; the queries
    below go to that database. The cluster is removed at exit. Returns the server version."""
    import pgbed

    why = pgbed.why_not()
    if why:
        raise BenchAbort(f"--postgres: {why}")
    cluster = pgbed.PgCluster().start()
    stack.callback(cluster.destroy)
    bed.SPOOL_URL_FACTORY = cluster.new_database
    return str(cluster.sql("SHOW server_version")[0][0])


def _pg_query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
    url = bed.spool_url_for(path)
    if url is None:
        return None
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        if c.execute("SELECT to_regclass('jobs')").fetchone() == (None,):
            return []
        return [tuple(r) for r in c.execute(sql.replace("?", "%s"), params).fetchall()]


def spool_max_id(path: Path) -> int:
    pg = _pg_query(path, "SELECT coalesce(max(id), 0) FROM jobs")
    if pg is not None:
        return int(pg[0][0]) if pg else 0
    if not Path(path).exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        try:
            return int(db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def spool_query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    pg = _pg_query(path, sql, params)
    if pg is not None:
        return pg
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute(sql, params).fetchall()


def spool_states(path: Path, since_id: int = 0) -> dict[str, int]:
    return {s: n for s, n in spool_query(path, "SELECT state, count(*) FROM jobs WHERE id>? GROUP BY state",
                                         (since_id,))}


# --------------------------------------------------------------------------- SMSC simulator, dispatcher

def dispatcher_available() -> str | None:
    """None when the dispatcher and the SMSC simulator exist; else what is missing."""
    missing = []
    if not SMSC_JS.exists():
        missing.append(str(SMSC_JS.relative_to(REPO)))
    if not (SMSC_JS.parent / "node_modules" / "smpp").is_dir():
        missing.append("tests/smsc/node_modules/smpp (npm ci in tests/smsc)")
    try:
        src = DISPATCHER_SERVICE.read_text()
    except OSError:
        src = ""
    if not re.search(r"^def run\(", src, re.M):
        missing.append("milter/dispatcher/service.py with a run() function")
    return ", ".join(missing) or None


class Smsc:
    """tests/smsc/server.js on a free port; every PDU logged as a JSON line to `log`."""

    def __init__(self, stack: contextlib.ExitStack, log: Path | None, *options: str):
        self.log = log
        args = ["node", str(SMSC_JS), "--port", "0", *options]
        if log is not None:
            args += ["--log", str(log)]
        self.p = own(stack, Proc(args, stdout=subprocess.PIPE, stderr=None, stdin=subprocess.PIPE,
                                 text=True))
        assert self.p.proc.stdout is not None
        line = self._readline(15)
        m = re.match(r"LISTENING (\d+)", line or "")
        if not m:
            raise RuntimeError(f"SMSC simulator did not start: {line!r}")
        self.port = int(m.group(1))

    def _readline(self, timeout: float) -> str | None:
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.p.proc.stdout.readline()),  # type: ignore[union-attr]
                             daemon=True)
        t.start()
        t.join(timeout)
        return box[0].strip() if box else None

    def stats(self) -> dict[str, Any]:
        assert self.p.proc.stdin is not None
        self.p.proc.stdin.write('{"command": "stats"}\n')
        self.p.proc.stdin.flush()
        for _ in range(5):
            line = self._readline(5) or ""
            if line.startswith("STATS "):
                return json.loads(line[6:])
        return {}


def start_dispatcher(stack: contextlib.ExitStack, config: Path, logfile: Path,
                     wrapper: Sequence[str] = ()) -> Proc:
    log = open(logfile, "ab")  # noqa: SIM115 (owned by the child)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = own(stack, Proc([*wrapper, *bed.milter_command(), "dispatcher", "-c", str(config)], stdout=log,
                        stderr=subprocess.STDOUT, env=env, cwd=config.parent), timeout=30)
    log.close()
    return p


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
         alive: Sequence[Proc] = ()) -> Any:
    """bed.wait_until that also fails fast when a process we need has died."""
    def check() -> Any:
        for p in alive:
            if not p.alive():
                raise BenchAbort(f"{p.args[:4]} exited with {p.proc.returncode} while waiting for {what}")
        return predicate()

    return bed.wait_until(check, timeout, what, interval=interval)


def tail(path: Path, lines: int = 20) -> str:
    return bed.tail(path, lines)


def now() -> float:
    return time.perf_counter()
