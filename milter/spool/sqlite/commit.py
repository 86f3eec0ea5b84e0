"""The SQLite spool's commit path: the milter's group commit (many messages, one transaction,
one fsync), idempotency keys, and the limits checked inside it."""

from __future__ import annotations

import json
import os
import sqlite3
import time

from .. import lifecycle
from ..base import (
    AddRequest,
    AddResult,
    LimitPlan,
    NewJob,
    OutMail,
    SpoolDataError,
    SpoolError,
)
from ..files import files_to_json
from ..unstorable import unstorable
from .files import store as store_files
from .limits import LimitSide
from .schema import SCHEMA, migrate
from .store import _busy, log

# A message's own values that SQLite cannot store (text that is no valid Unicode, a number
# out of range, a constraint): that message is refused, its neighbours in the batch commit.
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, ValueError, TypeError,
                OverflowError)


class _Isolate(Exception):
    """A message's values failed in a batch written without savepoints: write it again with them."""


class CommitSide(LimitSide):
    def add_message(self, key: str | None, jobs: list[NewJob], key_ttl: float = 0.0,
                    mails: list[OutMail] | None = None, limits: LimitPlan | None = None) -> AddResult:
        """One message, committed now (a lock held past the spool's busy timeout: SpoolError)."""
        req = AddRequest(key, jobs, key_ttl, mails or [], limits=limits)
        self.commit_now([req])
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def commit_now(self, batch: list[AddRequest]) -> None:
        """Commit these messages in one transaction in the calling thread, waiting for a lock
        held by another process at most the busy timeout (for callers that may block: the
        pipe transport, tools, tests). The milter's event loop never calls this: it calls
        try_commit() and retries on later loop turns until each message's deadline."""
        give_up = time.monotonic() + self.busy_timeout
        pause = 0.002
        while not self.try_commit(batch):
            if time.monotonic() >= give_up:
                err = SpoolError(f"spool {self.path} stayed locked by another process for "
                                 f"{self.busy_timeout:g} s")
                for r in batch:
                    r.error = err
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def try_commit(self, batch: list[AddRequest]) -> bool:
        """One transaction for these messages, or False at once if another process holds the
        write lock (nothing written, no request answered: try again later).

        The commit connection never waits (busy_timeout 0): the milter's event loop calls
        this and must never stall. Before each commit the spool file's identity is compared
        with the one opened (an fstat-cheap stat): a spool deleted or replaced under us
        gets 451 (never a 250 into a deleted inode) and is reopened once the path exists.
        One message whose data cannot be stored gets a SpoolDataError and the others commit:
        the batch is written as one plain transaction first (no cost per message); only if a
        message's values fail is it rolled back and written again with a SAVEPOINT per
        message. A failure of the spool itself fails all."""
        with self._commit_lock:
            db = self._commit_db
            moved = self._moved() if db is not None else None
            if moved is not None:
                self._drop_commit_db()
                log.error("%s; answering 451 until it is back", moved)
                return self._fail_all(batch, SpoolError(moved))
            if db is None:
                try:
                    db = self._open_commit_db()
                except SpoolError as e:
                    return self._fail_all(batch, e)  # the next commit tries to open it again
                if db is None:
                    return False  # busy while initialising: try again
            files = [f for r in batch for j in r.jobs for f in j.files]
            if files:  # voice/fax files: on disk and fsynced before the jobs naming them commit
                try:
                    store_files(self.path, files)
                except SpoolError as e:
                    return self._fail_all(batch, e)
            for isolate in (False, True):
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    if _busy(e):
                        return False
                    return self._fail_all(batch, SpoolError(f"spool busy or unwritable: {e}"))
                try:
                    if files:  # again under the lock: a purge may have removed one in between
                        store_files(self.path, files)
                    results = self._insert_batch(db, batch, isolate)
                    db.execute("COMMIT")
                    break
                except Exception as e:  # the spool itself failed: every message gets the error
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    if isinstance(e, _Isolate):
                        continue  # again, each message in its own savepoint
                    if _busy(e):
                        return False
                    err = e if isinstance(e, SpoolError) else SpoolError(f"spool write failed: {e}")
                    return self._fail_all(batch, err)
        for r, res in zip(batch, results, strict=True):
            if isinstance(res, SpoolError):
                r.error = res
            else:
                r.result = res
        self.wake()
        return True

    @staticmethod
    def _fail_all(batch: list[AddRequest], err: SpoolError) -> bool:
        for r in batch:
            r.error = err
        return True

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _moved(self) -> str | None:
        """Why the commit connection's file is no longer the spool at self.path, or None."""
        now = self._identity()
        if now is None:
            return f"spool file {self.path} was deleted under the running milter"
        if now != self._commit_ident:
            return f"spool file {self.path} was replaced under the running milter"
        return None

    def _drop_commit_db(self) -> None:
        if self._commit_db is not None:
            try:
                self._commit_db.close()
            except sqlite3.Error:
                pass
        self._commit_db = None

    def _open_commit_db(self) -> sqlite3.Connection | None:
        """The commit connection (busy_timeout 0); None if the schema could not be checked
        because another process holds the lock. A spool path that does not exist is not
        created here (it was deleted: an operator's business): SpoolError until it is back."""
        if self._identity() is None:
            raise SpoolError(f"cannot open spool {self.path}: the file does not exist")
        db = self._connect(busy_timeout=0.0)
        try:
            db.executescript(SCHEMA)
            migrate(db)  # a spool file put back from before MIGRATIONS is brought up to date
        except sqlite3.Error as e:
            db.close()
            if _busy(e):
                return None
            raise SpoolError(f"cannot initialise spool {self.path}: {e}") from None
        ident = self._identity()
        if ident is None:
            db.close()
            raise SpoolError(f"cannot open spool {self.path}: the file does not exist")
        if self._commit_ident is not None and ident != self._commit_ident:
            log.warning("spool file %s reopened (it had been replaced or recreated)", self.path)
        self._commit_db, self._commit_ident = db, ident
        return db

    def _insert_batch(self, db: sqlite3.Connection, batch: list[AddRequest],
                      isolate: bool = False) -> list[AddResult | SpoolError]:
        now = self.clock()
        self._usage_cache.clear()  # limits (w7-limits): usage read in this transaction only
        keys = list({r.key for r in batch if r.key is not None})
        known: dict[str, AddResult] = {}
        for i in range(0, len(keys), 500):  # SQLite allows 999 parameters in a statement
            chunk = keys[i:i + 500]
            rows = db.execute(f"SELECT key, job_ids FROM messages WHERE expires_at>? AND key IN "
                              f"({','.join('?' * len(chunk))})", (now, *chunk))
            for row in rows:
                known[row[0]] = AddResult(tuple(json.loads(row[1])), True)
        out: list[AddResult | SpoolError] = []
        for r in batch:
            if r.key is not None and r.key in known:
                out.append(known[r.key])
                continue
            # -- limits (w7-limits): checked here, counted below, inside this transaction --------
            jobs, dedupe_keys = r.jobs, list[str]()
            if r.limits is not None:
                stop, jobs, dedupe_keys = self._limits_check(db, r, r.limits, now)
                if stop is not None:
                    out.append(stop)
                    continue
            if isolate:
                db.execute("SAVEPOINT msg")
            try:
                ids = tuple(self._insertjob_from_row(db, j, now) for j in jobs)
                if r.mails:
                    db.executemany("INSERT INTO outbox(rcpt, content, created_at, next_at) VALUES (?,?,?,?)",
                                   [(m.rcpt, m.content, now, now) for m in r.mails])
                if r.key is not None:
                    db.execute("INSERT OR REPLACE INTO messages(key, job_ids, expires_at) VALUES (?,?,?)",
                               (r.key, json.dumps(ids), now + r.key_ttl))
                if r.limits is not None:  # limits (w7-limits): count what this message committed
                    self._limits_count(db, jobs, ids, dedupe_keys, r.limits, now)
            except _DATA_ERRORS as e:  # this message's values, not the spool: it alone fails
                if not isolate:
                    raise _Isolate() from e
                db.execute("ROLLBACK TO msg")
                db.execute("RELEASE msg")
                out.append(SpoolDataError(unstorable(r, e)))
                continue
            if isolate:
                db.execute("RELEASE msg")
            if r.key is not None:
                known[r.key] = AddResult(ids, True)  # the same message again in this batch
            out.append(AddResult(ids, False))
        return out

    def _insertjob_from_row(self, db: sqlite3.Connection, j: NewJob, now: float) -> int:
        not_before, expires, deferred = lifecycle.schedule(now, j.not_before, j.expires_at, self.validity)
        cur = db.execute(
            "INSERT INTO jobs(recipient, originator, text, parts, account, device, sender, subject, "
            "message_id, notify, queue_id, trans_ref, flash, urls, deferred, created_at, not_before, "
            "expires_at, channel, language, files) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (j.recipient, j.originator, j.text, j.parts, j.account, j.device, j.sender, j.subject,
             j.message_id, j.notify, j.queue_id, j.trans_ref, int(j.flash),
             json.dumps(j.urls) if j.urls else "{}",
             int(deferred), now, not_before, expires, j.channel, j.language, files_to_json(j.files)),
        )
        return int(cur.lastrowid or 0)
