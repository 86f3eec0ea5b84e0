"""The running milter's life besides mail: systemd notifications, SIGHUP reloads, /metrics,
and the JSON log format of both daemons.

`MilterRuntime.tick()` runs on the milter's event loop (Server.on_tick, at least every
0.2 s): WATCHDOG=1 therefore proves the loop itself turns, and a reload swaps the
configuration between two callbacks, never in the middle of a decision.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from datetime import UTC, datetime

from . import metrics, sdnotify
from .config import ConfigError, load
from .model import Config

log = logging.getLogger("sms_milter")


class DaemonRuntime(ABC):
    """What a daemon's loop does on every turn besides its work: WATCHDOG, a STATUS line every
    5 s, and a SIGHUP reload between two pieces of work. A daemon says how to describe itself
    (`status`), which settings only a restart changes (`restart_only`) and how to put a new
    configuration to use (`apply`, which returns the detail of the reload's log line)."""

    name = "daemon"

    def __init__(self, config_path: str | None, reload: threading.Event, sd: sdnotify.Notifier,
                 logger: logging.Logger):
        self.config_path = config_path
        self.reload = reload
        self.sd = sd
        self.log = logger
        self.next_status = 0.0

    @property
    @abstractmethod
    def cfg(self) -> Config:
        """The configuration in use now."""

    @abstractmethod
    def status(self) -> str:
        """A one-line summary for systemd's STATUS."""

    @abstractmethod
    def restart_only(self, old: Config, new: Config) -> list[tuple[str, object, object]]:
        """(name, old value, new value) of the settings a reload cannot change."""

    @abstractmethod
    def apply(self, old: Config, new: Config) -> str:
        """Use `new` from now on; the detail of the reload's log line."""

    def on_turn(self) -> None:  # noqa: B027 (optional: most daemons need nothing more)
        """Anything else a turn of the loop does first."""

    def tick(self) -> None:
        try:
            self.sd.tick()
            self.on_turn()
            if self.reload.is_set():
                self.reload.clear()
                self.do_reload()
            now = time.monotonic()
            if now >= self.next_status:
                self.next_status = now + 5.0
                self.sd.status(self.status())
        except Exception:  # noqa: BLE001 (bookkeeping never stops the daemon's work)
            self.log.exception("%s housekeeping failed", self.name)

    def do_reload(self) -> None:
        """Re-read the file; on success the next piece of work uses it (open sessions go on)."""
        self.sd.reloading()
        new = reload_config(self.config_path)
        if new is not None:
            old = self.cfg
            later = [what for what, a, b in self.restart_only(old, new) if a != b]
            detail = self.apply(old, new)
            metrics.RELOADS.labels("ok").inc()
            self.log.info("configuration reloaded from %s: %s%s", self.config_path, detail,
                          f"; {', '.join(later)} changed: takes effect at restart" if later else "")
        self.sd.ready(self.status())


class MilterRuntime(DaemonRuntime):
    """`tick()` runs on the milter's event loop (Server.on_tick, at least every 0.2 s)."""

    name = "milter"

    def __init__(self, server: object, config_path: str, reload: threading.Event,
                 sd: sdnotify.Notifier):
        from .adapter import Server

        assert isinstance(server, Server)
        super().__init__(config_path, reload, sd, log)
        self.server = server

    @property
    def cfg(self) -> Config:
        return self.server.gateway.cfg

    def status(self) -> str:
        t = metrics.TALLY
        return (f"listening on {self.server.spec}; {len(self.server.conns)} MTA connection(s); "
                f"{t['accepted']} accepted, {t['rejected']} rejected, {t['tempfailed']} tempfailed")

    def restart_only(self, old: Config, new: Config) -> list[tuple[str, object, object]]:
        return [("milter.socket", old.milter.socket, new.milter.socket), ("spool", old.spool, new.spool),
                ("metrics.milter", old.metrics.milter, new.metrics.milter)]

    def apply(self, old: Config, new: Config) -> str:
        gateway = self.server.gateway
        gateway.cfg = new
        spool = gateway.spool
        if hasattr(spool, "validity"):
            spool.validity = new.smpp.validity
        return f"{len(new.domains)} domain(s), {len(new.accounts)} account(s)"


def reload_config(path: str | None) -> Config | None:
    """The configuration file read again, or None after one log line saying why not."""
    if path is None:
        log.error("configuration reload: no configuration file to re-read; keeping the old one")
        metrics.RELOADS.labels("failed").inc()
        return None
    try:
        return load(path)
    except ConfigError as e:
        why = "; ".join(e.problems)
    except Exception as e:  # noqa: BLE001 (a reload never stops the daemon, never a traceback)
        why = f"{path}: {type(e).__name__}: {e}"
    log.error("configuration reload failed, keeping the old configuration: %s", why)
    metrics.RELOADS.labels("failed").inc()
    return None


# -- logging -------------------------------------------------------------------------------
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JobQueueIds(logging.Filter):
    """Puts the Postfix queue id in front of the dispatcher's `job N ...` lines, as the
    milter's lines have it, so that one grep follows a message from Postfix to the SMSC.

    The dispatcher records each job's queue id when it hands the job to the provider
    (`note`); the last `size` are kept. A line about a job not among them stays as it is.
    """

    def __init__(self, size: int = 20_000):
        super().__init__()
        self.size = size
        self.ids: dict[int, str] = {}
        self.order: deque[int] = deque()  # oldest first
        self.lock = threading.Lock()

    def note(self, job_id: int, queue_id: str) -> None:
        if not queue_id:
            return
        with self.lock:
            self.ids[job_id] = queue_id
            self.order.append(job_id)
            while len(self.order) > self.size:
                self.ids.pop(self.order.popleft(), None)

    def filter(self, record: logging.LogRecord) -> bool:
        fmt, args = record.msg, record.args
        if isinstance(fmt, str) and fmt.startswith("job %d") and isinstance(args, tuple) and args:
            qid = self.ids.get(args[0])  # type: ignore[call-overload]
            if qid:
                record.msg = "%s: " + fmt
                record.args = (qid, *args)
        return True


JOB_QUEUE_IDS = JobQueueIds()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, queue_id, message, logger, pid and any extra fields.

    The message is the same text as the plain format (it still starts with the queue id);
    `queue_id` is taken from it where the line has one (`"%s: ..."` with the id first), and
    a dispatcher line about a job (`"job %d ..."`) carries `job_id`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        d: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "queue_id": None,
            "message": msg,
            "logger": record.name,
            "pid": self.pid,
        }
        fmt, args = record.msg, record.args
        if isinstance(fmt, str) and isinstance(args, tuple) and args:
            if fmt.startswith("%s: ") and isinstance(args[0], str) and args[0] != "NOQUEUE":
                d["queue_id"] = args[0]
                fmt, args = fmt[4:], args[1:]
            if fmt.startswith("job %d") and args and isinstance(args[0], int):
                d["job_id"] = args[0]
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in d:
                d[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            d["traceback"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)
