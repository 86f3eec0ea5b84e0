"""Helpers for the dispatcher tests: the node SMSC simulator, a dispatcher process, jobs.

    smsc = Smsc(tmp).start("--hex-ids")
    cfg = dispatcher_config(tmp, smsc.port, notify_port)
    spool = SqliteSpool(tmp / "spool.sqlite3"); ids = add_jobs(spool, [job("+41791234567", "hi")])
    d = DispatcherProc(cfg, tmp / "d.log").start()
    wait_states(spool, ids, {"delivered"})
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bed import free_port, tail, terminate, wait_until, write_config
from sms_milter.spool.base import FINAL_STATES, Job, NewJob
from sms_milter.spool.sqlite import SqliteSpool

SMSC_DIR = Path(__file__).resolve().parent / "smsc"
REPO = Path(__file__).resolve().parent.parent


def node_ready() -> str | None:
    """Why the simulator cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (SMSC_DIR / "node_modules" / "smpp").is_dir():
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=SMSC_DIR, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            return f"npm install in {SMSC_DIR} failed: {r.stderr[-500:]}"
    return None


class Smsc:
    """tests/smsc/server.js as a subprocess; every PDU it got is in `self.log` (JSON lines)."""

    def __init__(self, base: Path, port: int = 0, system_id: str = "gw", password: str = "pw"):
        self.base = Path(base)
        self.want_port = port
        self.port = port
        self.system_id = system_id
        self.password = password
        self.log = self.base / f"smsc-{time.monotonic_ns()}.jsonl"
        self.stderr = self.base / "smsc.stderr"
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()

    def start(self, *options: str) -> Smsc:
        self.base.mkdir(parents=True, exist_ok=True)
        cmd = ["node", str(SMSC_DIR / "server.js"), "--port", str(self.want_port),
               "--system-id", self.system_id, "--password", self.password, "--log", str(self.log), *options]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr, "ab"), text=True, bufsize=1)  # noqa: SIM115
        threading.Thread(target=self._read_stdout, daemon=True).start()
        line = self._expect("LISTENING", 10)
        self.port = int(line.split()[1])
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()

    def _expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self._lines):
                    if line.startswith(prefix):
                        del self._lines[: i + 1]
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise TimeoutError(f"SMSC simulator: no {prefix!r} line; stderr: {tail(self.stderr)}")
                self._cond.wait(min(left, 0.1))

    def control(self, **change: Any) -> None:
        """Change options at run time ({"throttle": 5}, {"command": "drop"}, ...)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(change) + "\n")
        self.proc.stdin.flush()
        self._expect("OK", 5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def records(self, command: str | None = None) -> list[dict]:
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if command is None or rec.get("command") == command:
                out.append(rec)
        return out

    def submits(self, accepted_only: bool = True) -> list[dict]:
        return [r for r in self.records("submit_sm") if not accepted_only or r.get("status") == 0]

    def __enter__(self) -> Smsc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dispatcher_config(base: Path, smpp_port: int, notify_port: int, spool_path: Path | None = None,
                      smpp: dict | None = None, extra: dict | None = None,
                      name: str = "sms-milter.yaml") -> Path:
    """tests/bed.py's fixture config with a fast-reconnecting SMPP section."""
    s = {"reconnect_min": 0.2, "reconnect_max": 1.0, "enquire_link": 5}
    s.update(smpp or {})
    merged: dict[str, Any] = {"provider": {"smpp": s}}
    for k, v in (extra or {}).items():
        merged[k] = v
    return write_config(base, free_port(), notify_port, smpp_port=smpp_port, spool_path=spool_path,
                        extra=merged, name=name)


def dispatcher_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "sms_milter.cli", "dispatcher", "-c", str(config)]


class DispatcherProc:
    def __init__(self, config: Path, logfile: Path):
        self.config = config
        self.logfile = logfile
        self.proc: subprocess.Popen | None = None

    def start(self) -> DispatcherProc:
        env = dict(os.environ, PYTHONPATH=str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(dispatcher_command(self.config), stdin=subprocess.DEVNULL,
                                     stdout=open(self.logfile, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     env=env)
        return self

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        try:
            return terminate(self.proc, timeout, "dispatcher", self.logfile)
        finally:
            self.proc = None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return tail(self.logfile, n)

    def __enter__(self) -> DispatcherProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(AssertionError):
            self.stop()


def job(recipient: str, text: str, originator: str = "+41760000000", **kw: Any) -> NewJob:
    from sms_milter.policy.smstext import count_parts

    kw.setdefault("account", "acme")
    return NewJob(recipient=recipient, originator=originator, text=text, parts=count_parts(text), **kw)


def states(spool: SqliteSpool, ids: Iterable[int]) -> dict[int, Job]:
    want = set(ids)
    return {j.id: j for j in spool.list_jobs() if j.id in want}


def _count(spool: SqliteSpool, ids: list[int], accept: set[str]) -> int:
    n = 0
    for i in range(0, len(ids), 10000):
        chunk = ids[i:i + 10000]
        rows = spool._read(  # noqa: SLF001 (a cheap poll: no Job objects for thousands of rows)
            f"SELECT count(*) AS n FROM jobs WHERE state IN ({','.join('?' * len(accept))})"
            f" AND id IN ({','.join('?' * len(chunk))})", (*sorted(accept), *chunk))
        n += rows[0]["n"]
    return n


def wait_states(spool: SqliteSpool, ids: list[int], accept: set[str] | None = None, timeout: float = 30,
                detail: Any = None) -> dict[int, Job]:
    """Wait until every job is in a state of `accept` (default: any final state); return the jobs."""
    accept = accept or set(FINAL_STATES)

    def why() -> str:
        js = states(spool, ids)
        counts: dict[str, int] = {}
        for j in js.values():
            counts[j.state] = counts.get(j.state, 0) + 1
        return f"states: {counts}\n" + (detail() if callable(detail) else "")

    wait_until(lambda: _count(spool, ids, accept) == len(ids), timeout,
               f"{len(ids)} job(s) in {sorted(accept)}", interval=0.05, detail=why)
    return states(spool, ids)
