"""The PostgreSQL spool's connection and transaction layer (psycopg 3).

One connection per process (opened lazily, again after a fork), used by one thread at a
time under a lock; statements are prepared server-side on first use (`prepare_threshold=0`:
every statement here is static, lists go in as arrays). A connection that breaks (the
server restarted, `pg_terminate_backend`, a failover) is dropped and the call raises
SpoolError; the next call connects again. After a failed connect, calls fail at once for a
short while instead of each waiting for a connect timeout. Error texts never carry the
password of the URL.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pgerr
from psycopg.rows import dict_row

from ..base import SpoolError

T = TypeVar("T")
Conn = psycopg.Connection[dict[str, Any]]

CONNECT_BACKOFF = 0.5  # seconds a failed connect makes later calls fail without trying
STATEMENT_TIMEOUT = 60.0  # seconds: no statement of the spool may hang a daemon for longer
# Errors a whole transaction may simply be run again after (nothing was written).
RETRYABLE = (pgerr.DeadlockDetected, pgerr.SerializationFailure)


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for logs and check-config."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparsable URL)"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def password_of(url: str) -> str:
    try:
        pw = urlsplit(url).password
    except ValueError:
        return ""
    return unquote(pw) if pw else ""


# -- text PostgreSQL cannot store as it is -----------------------------------------------------
# A client's header may hold a NUL, which PostgreSQL's text type refuses (SQLite stores it):
# such a value is stored as MARK + its JSON string (which escapes the NUL), and so is a value
# that happens to start with MARK, so reading it back is unambiguous.
MARK = "\ue000"


def enc(s: str) -> str:
    if "\x00" in s or s[:1] == MARK:
        return MARK + json.dumps(s)
    return s


def enc_opt(s: str | None) -> str | None:
    return None if s is None else enc(s)


def dec(s: str) -> str:
    if s[:1] == MARK:
        try:
            out = json.loads(s[1:])
        except ValueError:
            return s
        return out if isinstance(out, str) else s
    return s


class Db:
    """A lazily (re)connected psycopg connection with transactions that map every database
    failure to SpoolError."""

    def __init__(self, url: str, timeout: float, application: str = "sms-milter"):
        self.url = url
        self.timeout = timeout
        self.application = application
        self._password = password_of(url)
        self._conn: Conn | None = None
        self._pid = 0
        self._down_until = 0.0
        self._down_why = ""
        self.lock = threading.RLock()
        self.on_connect: Callable[[Conn], None] | None = None  # e.g. the schema check

    def scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text.replace(self.url, redact(self.url))

    def error(self, what: str, e: BaseException) -> SpoolError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return SpoolError(self.scrub(f"{what}: {msg}"))

    def connect(self, autocommit: bool = True) -> Conn:
        """A new connection (not the shared one): the caller owns it."""
        conn: Conn = psycopg.connect(
            self.url, autocommit=autocommit, row_factory=dict_row, prepare_threshold=0,
            connect_timeout=max(2, math.ceil(self.timeout)), application_name=self.application,
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT * 1000)}")
        return conn

    def conn(self) -> Conn:
        """The process's connection (call with self.lock held)."""
        c = self._conn
        if c is not None and self._pid == os.getpid() and not c.closed and not c.broken:
            return c
        if c is not None and self._pid == os.getpid():
            self.drop()
        self._conn = None  # a connection inherited over fork is never used (nor closed) here
        now = time.monotonic()
        if now < self._down_until:
            raise SpoolError(self._down_why)
        try:
            c = self.connect()
            if self.on_connect is not None:
                try:
                    self.on_connect(c)
                except BaseException:
                    c.close()
                    raise
        except (psycopg.Error, OSError) as e:
            err = self.error("cannot connect to the PostgreSQL spool", e)
            self._down_until, self._down_why = now + CONNECT_BACKOFF, str(err)
            raise err from None
        self._conn, self._pid = c, os.getpid()
        return c

    def drop(self) -> None:
        c, self._conn = self._conn, None
        if c is not None and self._pid == os.getpid():
            try:
                c.close()
            except psycopg.Error:
                pass

    def tx(self, fn: Callable[..., T], *args: Any, retry: bool = True) -> T:
        """Run fn(conn, *args) in one transaction; SpoolError on any database failure. A stale
        connection found dead at BEGIN is replaced and the transaction run once more;
        deadlocks and serialization failures are run again too (nothing was written)."""
        with self.lock:
            for attempt in range(4):
                c = self.conn()
                try:
                    c.execute("BEGIN")
                except psycopg.Error as e:
                    self.drop()
                    if attempt == 0 and retry:
                        continue
                    raise self.error("spool unavailable", e) from None
                try:
                    out = fn(c, *args)
                    c.execute("COMMIT")
                    return out
                except BaseException as e:
                    self.rollback(c)
                    if isinstance(e, RETRYABLE) and attempt < 3:
                        continue
                    if isinstance(e, psycopg.Error):
                        raise self.error("spool write failed", e) from None
                    raise
            raise SpoolError("spool transaction failed")  # not reached

    def rollback(self, c: Conn) -> None:
        if c.broken or c.closed:
            self.drop()
            return
        try:
            c.execute("ROLLBACK")
        except psycopg.Error:
            self.drop()

    def read(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """One statement on its own (autocommit)."""
        with self.lock:
            for attempt in range(2):
                c = self.conn()
                try:
                    return c.execute(sql, params).fetchall()
                except psycopg.Error as e:
                    if c.broken or c.closed:
                        self.drop()
                        if attempt == 0:
                            continue
                    raise self.error("spool read failed", e) from None
            raise SpoolError("spool read failed")  # not reached

    def close(self) -> None:
        with self.lock:
            self.drop()
