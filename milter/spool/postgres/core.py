"""What every part of the PostgreSQL spool shares: the connection, the row -> Job reading,
the notification rules and the wake-ups (LISTEN/NOTIFY with a fallback poll)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import psycopg

from .. import lifecycle
from ..base import Job, SpoolError
from ..files import files_from_json
from .db import Conn, Db, dec, enc, redact
from .schema import migrate

log = logging.getLogger("sms_milter.spool")

CHANNEL = "sms_milter_work"  # LISTEN/NOTIFY channel: new or returned work
DEFAULT_VALIDITY = 48 * 3600.0
JOB_COLUMNS = (
    "id, state, recipient, originator, text, parts, account, device, sender, subject, message_id, "
    "notify, queue_id, trans_ref, flash, urls, created_at, not_before, expires_at, attempts, "
    "last_error, submitted_at, done_at, provider, channel, language, files"
)
# The hot paths' plans must not depend on table statistics (a queue filled since autovacuum's
# last ANALYZE would get sorts and scans of whole tables): index walks, parametrised probes.
PLAN_BY_INDEX = ("SELECT " + ", ".join(f"set_config('enable_{k}', 'off', true)" for k in
                                      ("seqscan", "bitmapscan", "sort", "hashjoin", "mergejoin")))


def job_of(r: dict[str, Any], refs: Iterable[str] = ()) -> Job:
    urls = r["urls"]
    return Job(
        id=r["id"], state=r["state"], recipient=dec(r["recipient"]), originator=dec(r["originator"]),
        text=dec(r["text"]), parts=r["parts"], account=dec(r["account"]), device=dec(r["device"]),
        sender=dec(r["sender"]), subject=dec(r["subject"]), message_id=dec(r["message_id"]),
        notify=r["notify"], queue_id=dec(r["queue_id"]),
        trans_ref=None if r["trans_ref"] is None else dec(r["trans_ref"]),
        flash=bool(r["flash"]), urls=json.loads(urls) if urls not in ("{}", "", None) else {},
        created_at=r["created_at"], not_before=r["not_before"], expires_at=r["expires_at"],
        attempts=r["attempts"], last_error=dec(r["last_error"]), submitted_at=r["submitted_at"],
        done_at=r["done_at"], provider_refs=tuple(refs), provider=r["provider"] or "",
        channel=r["channel"], language=r["language"], files=files_from_json(r["files"]))


def events_for(job_id: int, state: str, notify: str, sender: str, urls: str,
               now: float) -> list[tuple[int, str, str, float, float]]:
    """The event rows (notification mail, URL callback) a job owes on reaching `state`."""
    return [(job_id, kind, state, now, now) for kind in lifecycle.owed_events(state, notify, sender, urls)]


class Core:
    """The connection(s), the wake-ups and the helpers the milter, dispatcher and admin sides use."""

    def __init__(self, url: str, busy_timeout: float = 5.0, validity: float = DEFAULT_VALIDITY,
                 create: bool = True):
        self.url = url
        self.path = redact(url)  # what logs show as "the spool" (never the password)
        self.busy_timeout = busy_timeout
        self.validity = validity
        self.clock = time.time  # the commit's "now" (the limit counters' clock; tests drive it)
        self.db = Db(url, busy_timeout)
        self.db.on_connect = self._check_schema
        self._schema_ok = False
        self._create = create
        self._listen: Conn | None = None
        self._listen_pid = 0
        self._listen_retry_at = 0.0
        self._apart = Db(url, busy_timeout, "sms-milter metrics")
        self._limits_pruned_at = 0.0
        with self.db.lock:
            try:
                self.db.conn()  # connect now: a wrong URL or a database that is down is said at start
            except SpoolError as e:
                if not create:
                    raise
                # A daemon starting while the database is down waits for it (the milter answers
                # 451, the dispatcher retries) instead of exiting.
                log.error("%s; retrying on each use", e)

    def _check_schema(self, conn: Conn) -> None:
        if self._schema_ok:
            return
        if not self._create:
            row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL AS there").fetchone()
            if not (row and row["there"]):
                raise SpoolError(f"spool {self.path} does not exist (nothing has been spooled yet: the"
                                 " database has no sms-milter tables)")
        migrate(conn)
        self._schema_ok = True

    # -- plumbing --------------------------------------------------------------------------
    def _run(self, fn: Any, *args: Any) -> Any:
        return self.db.tx(fn, *args)

    def _read(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return self.db.read(sql, params)

    def file_data(self, sha256: str) -> bytes:
        """A stored file's content (spool.files.FileStore); KeyError if the store does not have it."""
        rows = self._read("SELECT data FROM file_blobs WHERE sha256=%s", (sha256,))
        if not rows:
            raise KeyError(sha256)
        return bytes(rows[0]["data"])

    def close(self) -> None:
        self.db.close()
        self._apart.close()
        if self._listen is not None and self._listen_pid == os.getpid():
            try:
                self._listen.close()
            except psycopg.Error:
                pass
        self._listen = None

    # -- wake-ups --------------------------------------------------------------------------
    def wake(self) -> None:
        """NOTIFY the waiting dispatchers (best effort: they poll anyway)."""
        try:
            self.db.read("SELECT pg_notify(%s, '')", (CHANNEL,))
        except Exception as e:  # noqa: BLE001 (a wake-up is never worth an error)
            log.debug("wake-up not sent: %s", e)

    def wait_for_work(self, timeout: float) -> None:
        """Return when a NOTIFY came (new or returned work) or after `timeout` seconds. Without a
        listening connection (the database is down) it sleeps a while: the caller polls."""
        c = self._listen
        if c is None or self._listen_pid != os.getpid() or c.closed or c.broken:
            self._listen = None
            if time.monotonic() < self._listen_retry_at:
                time.sleep(min(timeout, 0.5))
                return
            try:
                c = self.db.connect()
                c.execute(f"LISTEN {CHANNEL}")
            except (psycopg.Error, OSError) as e:
                log.debug("cannot LISTEN (%s); polling", self.db.scrub(str(e)))
                self._listen_retry_at = time.monotonic() + 1.0
                time.sleep(min(timeout, 0.5))
                return
            self._listen, self._listen_pid = c, os.getpid()
        try:
            got = 0
            for _ in c.notifies(timeout=timeout, stop_after=1):
                got += 1
            if got:  # several commits may have notified: take them all now
                for _ in c.notifies(timeout=0.001, stop_after=1000):
                    pass
        except (psycopg.Error, OSError) as e:
            log.debug("LISTEN connection lost (%s); polling", self.db.scrub(str(e)))
            try:
                c.close()
            except psycopg.Error:
                pass
            self._listen = None
            time.sleep(min(timeout, 0.5))

    # -- shared pieces of transactions -------------------------------------------------------
    def _set_final(self, c: Conn, job_id: int, state: str, error: str, now: float) -> bool:
        row = c.execute("SELECT state, notify, sender, urls FROM jobs WHERE id=%s FOR UPDATE",
                        (job_id,)).fetchone()
        if row is None or not lifecycle.may_become(row["state"], state):
            return False
        c.execute(
            "UPDATE jobs SET state=%s, last_error=CASE WHEN %s='' THEN last_error ELSE %s END,"
            " done_at=coalesce(%s, done_at), lease_owner=NULL, lease_until=NULL WHERE id=%s",
            (state, error, enc(error), lifecycle.done_at(state, now), job_id))
        self._add_events(c, events_for(job_id, state, row["notify"], row["sender"], row["urls"], now))
        return True

    @staticmethod
    def _add_events(c: Conn, events: list[tuple[int, str, str, float, float]]) -> None:
        if events:
            with c.cursor() as cur:
                cur.executemany("INSERT INTO events(job_id, kind, status, at, next_at)"
                                " VALUES (%s,%s,%s,%s,%s)", events)

    def counts_apart(self) -> dict[str, int]:
        """Jobs by state on a connection of its own (the metrics thread)."""
        return {r["state"]: int(r["n"]) for r in self._apart.read(
            "SELECT state, count(*) AS n FROM jobs GROUP BY state")}

    def channel_counts_apart(self) -> dict[str, dict[str, int]]:
        """Jobs by channel and state on a connection of its own (the metrics thread)."""
        out: dict[str, dict[str, int]] = {}
        for r in self._apart.read("SELECT channel, state, count(*) AS n FROM jobs GROUP BY channel, state"):
            out.setdefault(r["channel"], {})[r["state"]] = int(r["n"])
        return out

