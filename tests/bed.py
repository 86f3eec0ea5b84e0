"""Real-peer test bed: a private Postfix, the sms-milter process, capturing SMTP sinks.

A small library (no pytest import). Used by tests/conftest.py; usable by hand too:

    sink = MailSink().start()
    cfg = write_config(tmp, milter_port, notify_port, spool_path=tmp / "spool.sqlite3")
    milter = Milter(cfg, tmp / "milter.log").start()
    pf = Postfix(tmp / "pf", sink_port=sink.port, milter_socket=f"inet:127.0.0.1:{milter_port}").start()
    print(smtp_send(pf.port, "c4ca423@client.example", ["0041791234567@sms.example.com"], msg))

Everything started here is stopped by its stop() and, as a last resort, at interpreter exit.
A Postfix master left behind by a killed test run is stopped by the next Postfix.start().
"""

from __future__ import annotations

import atexit
import contextlib
import email
import email.policy
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02, detail: Callable[[], str] | None = None) -> Any:
    """Poll `predicate` until it returns a truthy value; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def tail(path: Path | str, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def _port_listening(port: int) -> bool:
    """True when something LISTENs on TCP `port` (from /proc/net/tcp{,6}: no connection made)."""
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                found_table = True
                for line in f:
                    parts = line.split()
                    local, state = parts[1], parts[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    if not found_table:  # no /proc: fall back to a real connection attempt
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    return False


def _unix_listening(path: str) -> bool:
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                # flags 00010000 = __SO_ACCEPTCON (listening)
                if len(parts) >= 8 and parts[-1] == path and int(parts[3], 16) & 0x10000:
                    return True
        return False
    except OSError:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
            return True
        return False


def parse_socket(spec: str) -> tuple[str, str | int]:
    """`inet:HOST:PORT`, `inet:PORT@HOST` or `unix:/path` -> ("inet", port) / ("unix", path)."""
    if spec.startswith("unix:"):
        return "unix", spec[5:]
    if spec.startswith("inet:"):
        rest = spec[5:]
        if "@" in rest:
            return "inet", int(rest.partition("@")[0])
        return "inet", int(rest.rsplit(":", 1)[1])
    raise ValueError(f"unknown socket spec {spec!r}")


# --------------------------------------------------------------------------- sinks


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    message: EmailMessage = field(repr=False)
    peer: Any = None

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class MailSink:
    """A capturing SMTP server (aiosmtpd) on 127.0.0.1:<free port>."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._controller = None

    # aiosmtpd handler hook
    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        msg = email.message_from_bytes(content, policy=email.policy.default)
        rec = Received(envelope.mail_from, list(envelope.rcpt_tos), content, msg, session.peer)
        with self._lock:
            self._messages.append(rec)
        return "250 2.0.0 OK captured"

    def start(self) -> MailSink:
        from aiosmtpd.controller import Controller

        self._controller = Controller(self, hostname="127.0.0.1", port=self.port,
                                      enable_SMTPUTF8=True, ready_timeout=10)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            with contextlib.suppress(Exception):
                self._controller.stop()
            self._controller = None

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[Received], bool] = lambda m: True,
                 timeout: float = 10, count: int = 1) -> list[Received]:
        """Poll until at least `count` captured messages satisfy `predicate`; return them all."""
        def hits():
            found = [m for m in self.messages if predicate(m)]
            return found if len(found) >= count else None

        return wait_until(hits, timeout, f"{count} matching message(s) at the sink on port {self.port}",
                          detail=lambda: "captured so far: "
                          f"{[(m.mail_from, m.rcpt_tos, m.subject) for m in self.messages]}")

    def matching(self, predicate: Callable[[Received], bool]) -> list[Received]:
        return [m for m in self.messages if predicate(m)]

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- Postfix

_REGISTRY = Path(tempfile.gettempdir()) / "sms-milter-bed-postfix"
_live_postfix: set[Postfix] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def reap_stale_postfix() -> list[str]:
    """Stop Postfix masters left behind by earlier bed runs whose owning process is gone.

    Each started instance leaves `<registry>/<owner pid>-<n>` holding its config dir; only
    masters whose pid file lives in such a dir are touched (by pid, never by name).
    """
    reaped = []
    if not _REGISTRY.is_dir():
        return reaped
    for entry in _REGISTRY.iterdir():
        try:
            owner = int(entry.name.split("-")[0])
        except ValueError:
            continue
        if _pid_alive(owner) and owner != os.getpid():
            continue
        if owner == os.getpid():
            continue
        confdir = Path(entry.read_text().strip()) if entry.is_file() else None
        if confdir is not None and confdir.is_dir():
            Postfix._force_stop(confdir)
            reaped.append(str(confdir))
            if confdir.parent.name.startswith("sms-milter-bed-pf-"):
                shutil.rmtree(confdir.parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            entry.unlink()
    return reaped


class PostfixError(RuntimeError):
    pass


class Postfix:
    """A private Postfix instance under `base` (config, queue, data dirs and maillog inside).

    The milter is wired in with `smtpd_milters` only (never `non_smtpd_milters`), with
    `milter_default_action = tempfail`; what Postfix relays goes to `[127.0.0.1]:sink_port`.
    Several instances coexist: separate dirs, ports, `syslog_name`, pid and lock files.
    """

    _seq = 0

    def __init__(self, base: Path | str | None, sink_port: int, milter_socket: str | None,
                 port: int | None = None, extra_main: dict[str, str] | None = None,
                 name: str | None = None):
        if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
            raise PostfixError(
                "postfix is not installed: run .ci/run (apt-get install -y postfix miltertest)")
        # The postfix user must traverse every directory above queue/data (pytest's tmp
        # dirs are 0700): by default the instance lives in its own 0755 dir under /tmp.
        self._own_base = base is None
        if base is None:
            base = tempfile.mkdtemp(prefix="sms-milter-bed-pf-")
        self.base = Path(base).resolve()
        self.confdir = self.base / "etc"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        self.port = port or free_port()
        self.sink_port = sink_port
        self.milter_socket = milter_socket
        Postfix._seq += 1
        self.name = name or f"pfbed{os.getpid()}x{Postfix._seq}"
        self.extra_main = dict(extra_main or {})
        self._registry_entry: Path | None = None
        self.running = False

    # ---- configuration
    def main_cf(self) -> dict[str, str]:
        if self.milter_socket:
            kind, where = parse_socket(self.milter_socket)
            milter = f"inet:127.0.0.1:{where}" if kind == "inet" else f"unix:{where}"
        else:
            milter = ""
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": self.name,
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "mx.bed.example",
            "mydomain": "bed.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery in the test bed",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "mynetworks_style": "host",
            "relay_domains": "sms.example.com, tm.example.com, .tm.example.com, relay.example",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_client_restrictions": "",
            "smtpd_helo_restrictions": "",
            "smtpd_sender_restrictions": "",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_auth_destination, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_delay_reject": "yes",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_junk_command_limit": "10000",
            "smtpd_recipient_limit": "1000",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_banner": "$myhostname ESMTP bed",
            "smtpd_milters": milter,
            "milter_protocol": "6",
            "milter_default_action": "tempfail",
            "milter_connect_timeout": "2s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "15s",
            "biff": "no",
            "append_dot_mydomain": "no",
            "maximal_queue_lifetime": "10m",
            "bounce_queue_lifetime": "10m",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "10s",
            "in_flow_delay": "0",
            "notify_classes": "",
            "message_size_limit": "10240000",
            "debug_peer_level": "2",
        }
        if not self.milter_socket:
            del cf["smtpd_milters"]
        cf.update(self.extra_main)
        return cf

    def master_cf(self) -> str:
        n = "n"
        rows = [
            (f"127.0.0.1:{self.port}", "inet", n, "-", n, "-", "-", "smtpd"),
            ("pickup", "unix", n, "-", n, "60", "1", "pickup"),
            ("cleanup", "unix", n, "-", n, "-", "0", "cleanup"),
            ("qmgr", "unix", n, "-", n, "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", n, "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", n, "-", "0", "bounce"),
            ("defer", "unix", "-", "-", n, "-", "0", "bounce"),
            ("trace", "unix", "-", "-", n, "-", "0", "bounce"),
            ("verify", "unix", "-", "-", n, "-", "1", "verify"),
            ("flush", "unix", n, "-", n, "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", n, "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", n, "-", "1", "proxymap"),
            ("smtp", "unix", "-", "-", n, "-", "-", "smtp"),
            ("relay", "unix", "-", "-", n, "-", "-", "smtp"),
            ("showq", "unix", n, "-", n, "-", "-", "showq"),
            ("error", "unix", "-", "-", n, "-", "-", "error"),
            ("retry", "unix", "-", "-", n, "-", "-", "error"),
            ("discard", "unix", "-", "-", n, "-", "-", "discard"),
            ("local", "unix", "-", n, n, "-", "-", "local"),
            ("lmtp", "unix", "-", "-", n, "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", n, "-", "1", "anvil"),
            ("scache", "unix", "-", "-", n, "-", "1", "scache"),
            ("postlog", "unix-dgram", n, "-", n, "-", "1", "postlogd"),
        ]
        return "".join("{:<22} {:<10} {:<5} {:<5} {:<5} {:<6} {:<5} {}\n".format(*r) for r in rows)

    def write_config(self) -> None:
        for d in (self.confdir, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        for parent in self.base.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise PostfixError(f"{parent} is not searchable by the postfix user (mode "
                                   f"{oct(os.stat(parent).st_mode & 0o777)}): put the instance elsewhere "
                                   "(Postfix(base=None, ...) makes its own dir under /tmp)")
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.confdir / "main.cf").write_text("# written by tests/bed.py\n" + main)
        (self.confdir / "master.cf").write_text("# written by tests/bed.py\n" + self.master_cf())
        # dynamicmaps.cf (Debian) lists the map plugins; postconf warns without it.
        dyn = Path("/etc/postfix/dynamicmaps.cf")
        if dyn.exists() and not (self.confdir / "dynamicmaps.cf").exists():
            shutil.copy(dyn, self.confdir / "dynamicmaps.cf")
            if Path("/etc/postfix/dynamicmaps.cf.d").is_dir():
                shutil.copytree("/etc/postfix/dynamicmaps.cf.d", self.confdir / "dynamicmaps.cf.d",
                                dirs_exist_ok=True)
        shutil.chown(self.queue, "root", "root")
        os.chmod(self.queue, 0o755)
        shutil.chown(self.data, "postfix", "postfix")
        os.chmod(self.data, 0o700)
        self.maillog.touch()

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, MAIL_CONFIG=str(self.confdir))
        return subprocess.run(["postfix", "-c", str(self.confdir), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    # ---- lifecycle
    @property
    def master_pid(self) -> int | None:
        pid = _read_pid(self.queue / "pid" / "master.pid")
        return pid if pid and _pid_alive(pid) else None

    def start(self) -> Postfix:
        reap_stale_postfix()
        self.write_config()
        self._register()
        r = self._postfix("start")
        if r.returncode != 0:
            self._force_stop(self.confdir)
            raise PostfixError(f"postfix -c {self.confdir} start failed (exit {r.returncode})\n"
                               f"{r.stdout}{r.stderr}\n--- maillog tail:\n{tail(self.maillog)}")
        self.running = True
        _live_postfix.add(self)
        try:
            wait_until(lambda: _port_listening(self.port), 15, f"Postfix smtpd on 127.0.0.1:{self.port}",
                       detail=lambda: tail(self.maillog))
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if not self.running and self.master_pid is None:
            self._unregister()
            return
        pid = self.master_pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop", timeout=20)
        if pid is not None:
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not _pid_alive(pid), 10, "postfix master exit")
        self._force_stop(self.confdir)
        self.running = False
        _live_postfix.discard(self)
        self._unregister()
        if self._own_base and not os.environ.get("BED_KEEP"):
            shutil.rmtree(self.base, ignore_errors=True)

    @staticmethod
    def _force_stop(confdir: Path) -> None:
        """Stop the master of `confdir` whatever state it is in (stop, abort, then SIGKILL its pid)."""
        confdir = Path(confdir)
        queue = None
        with contextlib.suppress(OSError):
            for line in (confdir / "main.cf").read_text().splitlines():
                if line.startswith("queue_directory"):
                    queue = Path(line.split("=", 1)[1].strip())
        if queue is None:
            return
        pidfile = queue / "pid" / "master.pid"
        pid = _read_pid(pidfile)
        if not pid or not _pid_alive(pid):
            return
        env = dict(os.environ, MAIL_CONFIG=str(confdir))
        for action in ("stop", "abort"):
            with contextlib.suppress(Exception):
                subprocess.run(["postfix", "-c", str(confdir), action], env=env, capture_output=True,
                               timeout=20, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _pid_alive(pid):
                return
        # Last resort: the master's process group (master runs as its own session leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

    def _register(self) -> None:
        _REGISTRY.mkdir(exist_ok=True)
        self._registry_entry = _REGISTRY / f"{os.getpid()}-{self.name}"
        self._registry_entry.write_text(str(self.confdir))

    def _unregister(self) -> None:
        if self._registry_entry is not None:
            with contextlib.suppress(OSError):
                self._registry_entry.unlink()
            self._registry_entry = None

    def reload(self) -> None:
        r = self._postfix("reload")
        if r.returncode != 0:
            raise PostfixError(f"postfix reload failed: {r.stderr}\n{tail(self.maillog)}")

    def set_main(self, **settings: str) -> None:
        """Change main.cf settings of a running instance and reload."""
        self.extra_main.update(settings)
        self.write_config()
        self.reload()

    # ---- logs and queue
    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, regex: str, timeout: float = 10, since: int = 0) -> re.Match:
        """Wait until the maillog (from byte offset `since`) matches `regex`; return the match."""
        rx = re.compile(regex, re.M)

        def probe():
            return rx.search(self.log()[since:])

        return wait_until(probe, timeout, f"maillog line matching {regex!r}",
                          detail=lambda: tail(self.maillog, 30))

    def log_offset(self) -> int:
        return len(self.log())

    def queue_ids(self) -> list[str]:
        """Messages still in the Postfix queue (postqueue -j)."""
        r = subprocess.run(["postqueue", "-c", str(self.confdir), "-j"], capture_output=True, text=True,
                           timeout=20)
        return [json.loads(line)["queue_id"] for line in r.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.confdir), "-f"], capture_output=True, timeout=20)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- the milter

_live_milters: set[Milter] = set()


def milter_command() -> list[str]:
    """How to run `sms-milter`: the script next to this interpreter, on PATH, or `python -m`."""
    beside = Path(sys.executable).parent / "sms-milter"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("sms-milter")
    if found:
        return [found]
    return [sys.executable, "-m", "sms_milter.cli"]


class MilterError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child: SIGKILL me when the test process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


class Milter:
    """`sms-milter milter -c CONFIG` as a subprocess; output appended to `logfile`.

    The child gets PR_SET_PDEATHSIG=SIGKILL so a killed test run leaves no milter behind;
    note that Linux sends it when the *thread* that called start() exits: start milters
    from the main thread (or a thread that outlives them).
    """

    def __init__(self, config: Path | str, logfile: Path | str | None = None, socket_spec: str | None = None):
        self.config = Path(config)
        self.logfile = Path(logfile) if logfile else self.config.with_name("milter.log")
        if socket_spec is None:
            socket_spec = yaml.safe_load(self.config.read_text())["milter"]["socket"]
        self.socket_spec = socket_spec
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def listening(self) -> bool:
        kind, where = parse_socket(self.socket_spec)
        return _port_listening(int(where)) if kind == "inet" else _unix_listening(str(where))

    def start(self, timeout: float = 10) -> Milter:
        if self.proc is not None and self.proc.poll() is None:
            return self
        kind, where = parse_socket(self.socket_spec)
        if kind == "inet" and _port_listening(int(where)):
            raise MilterError(f"something already listens on the milter port {where}")
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.logfile, "ab")  # noqa: SIM115 (owned by the child)
        log.write(f"\n===== bed: starting milter at {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([*milter_command(), "milter", "-c", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=str(self.config.parent), preexec_fn=_die_with_parent)
        log.close()
        _live_milters.add(self)

        def up():
            if self.proc.poll() is not None:
                raise MilterError(f"sms-milter exited with {self.proc.returncode} before listening on "
                                  f"{self.socket_spec}\n--- {self.logfile} tail:\n{tail(self.logfile)}")
            return self.listening()

        try:
            wait_until(up, timeout, f"sms-milter listening on {self.socket_spec}",
                       detail=lambda: f"--- {self.logfile} tail:\n{tail(self.logfile)}")
        except TimeoutError as e:
            self.kill9()
            raise MilterError(str(e)) from None
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM; assert the process exits within `timeout`. Returns its exit code."""
        if self.proc is None:
            return None
        try:
            return terminate(self.proc, timeout, "sms-milter", self.logfile)
        finally:
            _live_milters.discard(self)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _live_milters.discard(self)

    def restart(self) -> Milter:
        self.stop()
        self.proc = None
        return self.start()

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""


@atexit.register
def _cleanup_at_exit() -> None:
    for m in list(_live_milters):
        with contextlib.suppress(Exception):
            m.kill9()
    for p in list(_live_postfix):
        with contextlib.suppress(Exception):
            p.stop()


# --------------------------------------------------------------------------- config + CLI

HASHED_PASSWORD = "h4shed"


def hash_password_or_none(password: str) -> str | None:
    try:
        from sms_milter.policy.auth import hash_password
    except ImportError:
        return None
    return hash_password(password)


def terminate(proc: subprocess.Popen, timeout: float, what: str, logfile: Path) -> int:
    """SIGTERM; the exit code. A process still running after `timeout` is killed (-9) and
    the test fails with the tail of its log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{what} did not exit within {timeout:g}s of SIGTERM\n"
                                 f"--- {logfile} tail:\n{tail(logfile)}") from None
    return proc.returncode


# Set by conftest when the suite runs on PostgreSQL (--spool=postgres or SMS_MILTER_TEST_SPOOL=postgres):
# a function giving a fresh database URL; every config written then has `spool: {url: ...}`.
SPOOL_URL_FACTORY: Callable[[], str] | None = None
_SPOOL_URLS: dict[str, str] = {}


def write_config(dir: Path | str, milter_port: int, notify_port: int, smpp_port: int = 2775,  # noqa: A002
                 spool_path: Path | str | None = None, extra: dict | None = None,
                 name: str = "sms-milter.yaml", spool_url: str | None = None) -> Path:
    """The test fixture configuration (INTERFACE.md format). `extra` is deep-merged on top.

    The `hashed` account gets a `password_hash` when sms_milter.policy.auth.hash_password
    exists; otherwise a plain `password` (and a comment saying so) so the file still loads.
    """
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    spool_path = Path(spool_path) if spool_path else d / "spool.sqlite3"
    hashed: dict[str, Any] = {"userkey": "HASH1", "senders": [{"address": "hashed@client.example"}]}
    h = hash_password_or_none(HASHED_PASSWORD)
    if h is None:
        hashed["password"] = HASHED_PASSWORD
    else:
        hashed["password_hash"] = h
    cfg: dict[str, Any] = {
        "milter": {"socket": f"inet:127.0.0.1:{milter_port}", "max_message_bytes": 65536, "spool_timeout": 1},
        "spool": {"path": str(spool_path)},
        "domains": {"sms.example.com": {"style": "aspsms"}, "tm.example.com": {"style": "telemessage"}},
        "accounts": {
            "acme": {
                "userkey": "ACME123", "password": "s3cret",
                "senders": [{"address": "c4ca423@client.example", "originator": "+41760000000"},
                            {"address": "plain@client.example"}],
                "originator": "SMS", "max_parts": 6, "notify": "",
            },
            "hashed": hashed,
            "netlimited": {"userkey": "NET1", "password": "n3t",
                           "senders": [{"address": "net@client.example"}], "networks": ["192.0.2.0/24"]},
            "tmco": {"senders": [{"domain": "tm-client.example"}], "template": "{subject},{body}",
                     "max_parts": 3},
        },
        "provider": {"smpp": {"host": "127.0.0.1", "port": smpp_port, "system_id": "gw", "password": "pw"}},
        "notify": {"smtp": f"127.0.0.1:{notify_port}", "from": "sms-gateway@example.com"},
    }
    if spool_url is None and SPOOL_URL_FACTORY is not None and not (extra and "spool" in extra):
        # one database per spool path: a config written again (a reload test) keeps its spool
        spool_url = spool_url_for(spool_path)
    if spool_url is not None:
        cfg["spool"] = {"url": spool_url}
    if extra:
        _deep_merge(cfg, extra)
    path = d / name
    header = "# written by tests/bed.py\n"
    if h is None:
        header += "# sms_milter.policy.auth.hash_password missing: account 'hashed' uses a plain password\n"
    path.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def on_postgres() -> bool:
    """The suite runs with --spool=postgres: the spools the tests start are PostgreSQL databases."""
    return SPOOL_URL_FACTORY is not None


def spool_url_for(spool_path: Path | str) -> str | None:
    """The PostgreSQL database standing in for this spool path when the suite runs on
    PostgreSQL (the one write_config puts into configs with that path); None on SQLite."""
    if SPOOL_URL_FACTORY is None:
        return None
    url = _SPOOL_URLS.get(str(spool_path))
    if url is None:
        url = _SPOOL_URLS[str(spool_path)] = SPOOL_URL_FACTORY()
    return url


def spool_at(spool_path: Path | str, **kw: Any) -> Any:
    """The test's own handle on the spool at this path, on the backend the suite runs on."""
    url = spool_url_for(spool_path)
    if url is None:
        from sms_milter.spool.sqlite import SqliteSpool
        return SqliteSpool(spool_path, **kw)
    from sms_milter.spool.postgres import PostgresSpool
    return PostgresSpool(url, **kw)


def spool_sql(spool_path: Path | str, sql: str, *params: object) -> Any:
    """Run one SQL statement (`?` placeholders) on the spool at this path, on either backend:
    tests that age jobs or count rows. The first column of the first row, if any."""
    url = spool_url_for(spool_path)
    if url is None:
        import sqlite3
        db = sqlite3.connect(spool_path)
        try:
            row = db.execute(sql, params).fetchone()
            db.commit()
        finally:
            db.close()
        return row[0] if row else None
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        cur = c.execute(sql.replace("?", "%s"), params)
        row = cur.fetchone() if cur.description else None
    return row[0] if row else None


@contextlib.contextmanager
def spool_locked(spool_path: Path | str) -> Iterator[None]:
    """Another process holds the write lock of the spool at this path for the block, on either
    backend (SQLite: BEGIN EXCLUSIVE; PostgreSQL: LOCK TABLE on the tables a commit writes)."""
    url = spool_url_for(spool_path)
    if url is None:
        import sqlite3
        db = sqlite3.connect(spool_path, timeout=10, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")
            db.close()
        return
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("LOCK TABLE jobs, messages IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            c.execute("ROLLBACK")


def _deep_merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


class CliError(RuntimeError):
    pass


def run_cli(config: Path | str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`sms-milter <args[0]> -c CONFIG <args[1:]>`."""
    cmd = [*milter_command(), args[0], "-c", str(config), *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def queue_list(config: Path | str, state: str | None = None) -> list[dict]:
    """`sms-milter queue -c CONFIG list --json` parsed (the contract of INTERFACE.md)."""
    extra = ["--state", state] if state else []
    r = run_cli(config, "queue", "list", "--json", *extra)
    if r.returncode != 0:
        raise CliError(f"sms-milter queue list --json exited {r.returncode}: {r.stderr.strip()}")
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise CliError(f"sms-milter queue list --json printed no JSON ({e}): {r.stdout[:500]!r}") from None
    if not isinstance(data, list):
        raise CliError(f"sms-milter queue list --json must print an array, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- SMTP client

Reply = tuple[int, str]


def _reply(t: tuple[int, bytes | str]) -> Reply:
    code, text = t
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return code, text


def _crlf(msg: bytes | str | EmailMessage) -> bytes:
    if isinstance(msg, EmailMessage):
        msg = msg.as_bytes(policy=email.policy.SMTP)
    if isinstance(msg, str):
        msg = msg.encode("utf-8")
    return re.sub(rb"\r?\n", b"\r\n", msg)


class SmtpSession:
    """One SMTP connection; `send()` may be called several times (RSET between transactions).

    Replies are (code:int, text:str) where text is what follows the code, e.g.
    (550, "5.1.3 Recipient ...") for Postfix relaying a milter's custom reply.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", helo: str = "client.bed.example",
                 xclient: dict[str, str] | None = None, timeout: float = 60):
        self.smtp = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)
        self.helo = helo
        self.ehlo = _reply(self.smtp.ehlo())
        self.transactions = 0
        if xclient:
            args = " ".join(f"{k}={v}" for k, v in xclient.items())
            self.xclient_reply = _reply(self.smtp.docmd("XCLIENT", args))
            if self.xclient_reply[0] != 220:
                raise smtplib.SMTPResponseException(*self.xclient_reply)
            self.ehlo = _reply(self.smtp.ehlo())

    def send(self, mail_from: str, rcpts: Iterable[str], msg: bytes | str | EmailMessage,
             mail_options: Iterable[str] = (), rcpt_options: Iterable[str] = ()) -> dict:
        if self.transactions:
            self.smtp.rset()
        self.transactions += 1
        out: dict[str, Any] = {"mail": None, "rcpt": {}, "data": None}
        out["mail"] = _reply(self.smtp.mail(mail_from, list(mail_options)))
        if out["mail"][0] != 250:
            return out
        for r in rcpts:
            out["rcpt"][r] = _reply(self.smtp.rcpt(r, list(rcpt_options)))
        if not any(c == 250 for c, _ in out["rcpt"].values()):
            return out
        try:
            out["data"] = _reply(self.smtp.data(_crlf(msg)))
        except smtplib.SMTPDataError as e:  # the DATA command itself was refused
            out["data"] = _reply((e.smtp_code, e.smtp_error))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.smtp.quit()
        with contextlib.suppress(Exception):
            self.smtp.close()

    def __enter__(self) -> SmtpSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def smtp_send(port: int, mail_from: str, rcpts: Iterable[str], msg: bytes | str | EmailMessage,
              xclient: dict[str, str] | None = None, **kw: Any) -> dict:
    """One message in one SMTP session: {"mail": (code, text), "rcpt": {addr: (code, text)},
    "data": (code, text) or None (None when MAIL or every RCPT was refused)}."""
    with SmtpSession(port, xclient=xclient) as s:
        return s.send(mail_from, rcpts, msg, **kw)


def smtp_send_many(port: int, transactions: Iterable[tuple[str, Iterable[str], bytes | str | EmailMessage]],
                   xclient: dict[str, str] | None = None) -> list[dict]:
    """Several messages in ONE SMTP session; one result dict (as smtp_send) per message."""
    with SmtpSession(port, xclient=xclient) as s:
        return [s.send(f, r, m) for f, r, m in transactions]


# --------------------------------------------------------------------------- message building

_counter = 0
_counter_lock = threading.Lock()


def unique(prefix: str = "t") -> str:
    """A token unique within this process run, for finding one test's jobs and mails."""
    global _counter
    with _counter_lock:
        _counter += 1
        return f"{prefix}{os.getpid() % 10000:04d}x{_counter:04d}{int(time.time() * 1000) % 100000:05d}"


_NUMBER_BASE = (os.getpid() * 7919 + int(time.time() * 1000)) % 1000


def unique_number(style: str = "aspsms") -> tuple[str, str]:
    """A valid mobile number not used before in this process: (as written in the address, E.164).

    aspsms: ("004179xxxxxxx", "+4179xxxxxxx"); telemessage: ("1781617xxxx", "+1781617xxxx").
    """
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    if style == "telemessage":
        digits = f"{(_NUMBER_BASE * 10 + n) % 10000:04d}"
        return f"1781617{digits}", f"+1781617{digits}"
    digits = f"{(_NUMBER_BASE * 10000 + n) % 10**7:07d}"
    return f"004179{digits}", f"+4179{digits}"


def make_message(subject: str | None = None, body: str = "hello", *, sender: str = "sender@client.example",
                 to: str = "sms@sms.example.com", charset: str = "utf-8", cte: str | None = None,
                 subtype: str = "plain", message_id: str | None = "auto",
                 headers: dict[str, str] | None = None) -> bytes:
    """A single-part text message as raw bytes with a chosen charset and transfer encoding.

    cte: None (8bit when needed, else 7bit), "quoted-printable", "base64", "8bit", "7bit".
    message_id "auto" makes a unique Message-ID; None omits the header.
    """
    import base64
    import quopri

    raw = body.encode(charset)
    if cte is None:
        cte = "7bit" if all(b < 128 for b in raw) else "8bit"
    if cte == "quoted-printable":
        payload = quopri.encodestring(raw.replace(b"\n", b"\r\n")).replace(b"\r\n", b"\n")
    elif cte == "base64":
        payload = base64.encodebytes(raw)
    else:
        payload = raw
    lines = [f"From: <{sender}>", f"To: <{to}>", "Date: Mon, 01 Jan 2024 00:00:00 +0000"]
    if subject is not None:
        if all(ord(c) < 128 for c in subject):
            lines.append(f"Subject: {subject}" if subject else "Subject:")
        else:
            from email.header import Header

            lines.append(f"Subject: {Header(subject, 'utf-8').encode()}")
    if message_id == "auto":
        message_id = f"<{unique('m')}@client.bed.example>"
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines += ["MIME-Version: 1.0", f"Content-Type: text/{subtype}; charset={charset}",
              f"Content-Transfer-Encoding: {cte}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + payload.replace(b"\r\n", b"\n").replace(
        b"\n", b"\r\n")


def _mime_base(subject: str, sender: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Mon, 01 Jan 2024 00:00:00 +0000"
    msg["Message-ID"] = f"<{unique('m')}@client.bed.example>"
    return msg


def make_alternative(subject: str, text: str, html: str, *, sender: str = "sender@client.example",
                     to: str = "sms@sms.example.com") -> bytes:
    """multipart/alternative with a text/plain and a text/html part."""
    msg = _mime_base(subject, sender, to)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


def make_attachment(subject: str, text: str, data: bytes, ctype: str = "application/pdf",
                    filename: str = "doc.pdf", *, sender: str = "sender@client.example",
                    to: str = "sms@sms.example.com") -> bytes:
    """multipart/mixed: a text/plain part plus one attachment."""
    msg = _mime_base(subject, sender, to)
    msg.set_content(text)
    maintype, subtype = ctype.split("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=email.policy.SMTP)


# ---- the raw milter protocol (tests that speak it to the milter themselves, without miltertest)

def milter_packet(cmd: bytes, payload: bytes = b"") -> bytes:
    """One milter protocol packet: 4-byte length, command letter, payload."""
    return struct.pack("!I", len(cmd) + len(payload)) + cmd + payload


def milter_replies(sock: socket.socket, n: int, timeout: float | None = None) -> list[bytes]:
    """The next n reply packets (command letter + payload); fails if the milter hangs up.
    `timeout` (seconds) is set on the socket first when given."""
    if timeout is not None:
        sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < n:
        while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
            chunk = sock.recv(65536)
            assert chunk, f"the milter hung up after {out}"
            buf += chunk
        size = struct.unpack("!I", buf[:4])[0]
        out.append(buf[4:4 + size])
        buf = buf[4 + size:]
    return out
