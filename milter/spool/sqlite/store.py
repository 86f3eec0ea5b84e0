"""The SQLite spool's plumbing: the connection, transactions, wake-ups, and the state
change every side writes (a job reaching a state, with the notifications lifecycle says it owes)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import lifecycle
from ..base import (
    SpoolError,
)
from .schema import SCHEMA, migrate

if TYPE_CHECKING:
    from .limits import _Usage

log = logging.getLogger("sms_milter.spool")

WAKE_SLOTS = 8  # dispatchers on one spool that can be woken directly (more still poll)
DEFAULT_VALIDITY = 48 * 3600.0


def _busy(e: BaseException) -> bool:
    """Is this SQLite error "another connection holds the lock" (retry later)?"""
    if not isinstance(e, sqlite3.OperationalError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(e)
    return "locked" in text or "busy" in text


class Store:
    """What every side of SqliteSpool shares: the dispatcher/CLI connection, the commit
    connection's state, the wake-up sockets."""

    def __init__(self, path: str | Path, busy_timeout: float = 5.0, validity: float = DEFAULT_VALIDITY):
        self.path = str(Path(path).resolve())
        self.busy_timeout = busy_timeout
        self.validity = validity
        self._lock = threading.Lock()  # guards self._db (dispatcher/CLI calls)
        self._db = self._connect()
        self._init_schema()
        self._commit_lock = threading.Lock()  # guards self._commit_db
        self._commit_db: sqlite3.Connection | None = None
        self._commit_ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._wake_tx: socket.socket | None = None
        self._wake_rx: socket.socket | None = None
        digest = hashlib.sha256(self.path.encode()).hexdigest()[:24]
        self._wake_names = [f"\0sms-milter-{digest}-{i}".encode() for i in range(WAKE_SLOTS)]
        self._wake_live: list[bytes] = []
        self._wake_probe_at = 0.0
        self._limits_pruned_at = 0.0
        self._usage_cache: dict[str, _Usage] = {}  # account -> its usage, within one commit transaction
        self.clock = time.time  # the commit's "now" (the limit counters' clock; tests drive it)

    def _connect(self, busy_timeout: float | None = None) -> sqlite3.Connection:
        timeout = self.busy_timeout if busy_timeout is None else busy_timeout
        try:
            Path(self.path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # The spool holds sender addresses (secrets): 0640 whatever the umask; SQLite gives
            # the -wal and -shm files the database file's mode. Only a missing file is opened
            # here: closing a descriptor of a file this process has open in SQLite would drop
            # SQLite's POSIX locks on it.
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640))
            st = os.stat(self.path)
            if st.st_mode & 0o037 and st.st_uid == os.geteuid():
                os.chmod(self.path, st.st_mode & 0o7740)
            db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        except (sqlite3.Error, OSError) as e:
            raise SpoolError(f"cannot open spool {self.path}: {e}") from None
        return db

    def _init_schema(self) -> None:
        try:
            with self._lock:
                self._db.executescript(SCHEMA)
                migrate(self._db)
        except sqlite3.Error as e:
            raise SpoolError(f"cannot initialise spool {self.path}: {e}") from None

    def _tx(self, db: sqlite3.Connection, fn, *args):
        """Run fn(db, *args) in one BEGIN IMMEDIATE transaction; SpoolError on any failure."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise SpoolError(f"spool busy or unwritable: {e}") from None
        try:
            out = fn(db, *args)
            db.execute("COMMIT")
            return out
        except BaseException as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, sqlite3.Error):
                raise SpoolError(f"spool write failed: {e}") from None
            raise

    def _run(self, fn, *args):
        with self._lock:
            return self._tx(self._db, fn, *args)

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise SpoolError(f"spool read failed: {e}") from None

    def close(self) -> None:
        with self._commit_lock:
            if self._commit_db is not None:
                self._commit_db.close()
                self._commit_db = None
        for s in (self._wake_tx, self._wake_rx):
            if s is not None:
                s.close()
        with self._lock:
            self._db.close()

    # -- wake-ups ------------------------------------------------------------------------
    def wake(self) -> None:
        if self._wake_tx is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setblocking(False)
            self._wake_tx = s
        now = time.monotonic()
        # Every slot now and then (a dispatcher may have started); in between only the
        # slots where a dispatcher listened last time: a wake-up per commit stays cheap.
        if now >= self._wake_probe_at:
            self._wake_probe_at = now + 1.0
            names = self._wake_names
            self._wake_live = []
        else:
            names = self._wake_live
        for name in names:
            try:
                self._wake_tx.sendto(b"!", name)
            except BlockingIOError:
                pass  # its buffer is full: it is awake anyway
            except OSError:
                continue  # nobody listens there
            if names is self._wake_names:
                self._wake_live.append(name)

    def wait_for_work(self, timeout: float) -> None:
        if self._wake_rx is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            for name in self._wake_names:
                try:
                    s.bind(name)
                    break
                except OSError:
                    continue
            else:
                s.close()
                time.sleep(min(timeout, 0.2))  # every slot taken: fall back to a short poll
                return
            s.setblocking(False)
            self._wake_rx = s
        import select

        ready, _, _ = select.select([self._wake_rx], [], [], timeout)
        if ready:
            try:
                while self._wake_rx.recv(64):
                    pass
            except BlockingIOError:
                pass

    # -- a job reaching a state (lifecycle decides; this stores) -----------------------------
    def _set_final(self, db: sqlite3.Connection, job_id: int, state: str, error: str, now: float) -> bool:
        row = db.execute("SELECT state, notify, sender, urls FROM jobs WHERE id=?", (job_id,)).fetchone()
        if not lifecycle.may_become(None if row is None else row["state"], state):
            return False
        db.execute(
            "UPDATE jobs SET state=?, last_error=CASE WHEN ?='' THEN last_error ELSE ? END,"
            " done_at=CASE WHEN ? IN ('delivered','failed','expired') THEN ? ELSE done_at END,"
            " lease_owner=NULL, lease_until=NULL WHERE id=?",
            (state, error, error, state, now, job_id))
        self._add_events(db, job_id, state, row["notify"], row["sender"], row["urls"], now)
        return True

    def _add_events(self, db: sqlite3.Connection, job_id: int, state: str, notify: str, sender: str,
                    urls: str, now: float) -> None:
        db.executemany("INSERT INTO events(job_id, kind, status, at, next_at) VALUES (?,?,?,?,?)",
                       self._events_for(job_id, state, notify, sender, urls, now))

    @staticmethod
    def _events_for(job_id: int, state: str, notify: str, sender: str, urls: str,
                    now: float) -> list[tuple[int, str, str, float, float]]:
        """The events rows a job owes on reaching `state` (lifecycle.owed_events decides)."""
        return [(job_id, kind, state, now, now)
                for kind in lifecycle.owed_events(state, notify, sender, urls)]
