"""The SQLite spool: one file, WAL, synchronous=FULL.

The milter commits in its event-loop thread: every message that ended in one loop
iteration goes into one transaction (one fsync for many concurrent SMTP sessions), and
each session gets its reply only after that commit. The dispatcher's calls are short
transactions on their own connection. Open a spool after fork, never before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from . import base as admin
from .base import (
    FINAL_STATES,
    ORPHAN_MAX_AGE,
    SLOT_LONG,
    SLOT_RCPT,
    SLOT_SHORT,
    AccountUsage,
    AddRequest,
    AddResult,
    AppliedOrphan,
    Event,
    Job,
    LimitPlan,
    LimitUsage,
    NewJob,
    OrphanReceipt,
    OutMail,
    OverduePart,
    ReceiptOutcome,
    SpoolDataError,
    SpoolError,
    SubmittedItem,
    normalize_ref,
    refs_for_lookup,
)

log = logging.getLogger("sms_milter.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'queued',
    recipient TEXT NOT NULL,
    originator TEXT NOT NULL,
    text TEXT NOT NULL,
    parts INTEGER NOT NULL,
    account TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT 'sms',
    sender TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    notify TEXT NOT NULL DEFAULT '',
    queue_id TEXT NOT NULL DEFAULT '',
    trans_ref TEXT,
    flash INTEGER NOT NULL DEFAULT 0,
    urls TEXT NOT NULL DEFAULT '{}',
    deferred INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    not_before REAL NOT NULL,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    lease_owner TEXT,
    lease_until REAL,
    submitted_at REAL,
    done_at REAL
);
-- Claim takes due jobs oldest first: scan the queued ones in id order (jobs_due, an index
-- on not_before, made claim scan every finished job too: replaced).
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs(id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_recipient ON jobs(recipient, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(expires_at) WHERE state IN ('submitted', 'buffered');
CREATE INDEX IF NOT EXISTS jobs_trans_ref ON jobs(account, trans_ref) WHERE trans_ref IS NOT NULL;
CREATE TABLE IF NOT EXISTS parts (
    job_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ref TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'submitted',
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX IF NOT EXISTS parts_ref ON parts(ref);
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY,
    job_ids TEXT NOT NULL,
    expires_at REAL NOT NULL
);
-- Expired keys are pruned by the dispatcher (prune_message_keys), a range at a time.
CREATE INDEX IF NOT EXISTS messages_expiry ON messages(expires_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_due ON events(next_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    rcpt TEXT NOT NULL,
    content BLOB NOT NULL,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_at);
-- Receipts whose message id matched no stored part yet (they came before the submit
-- response was stored): kept here, acknowledged, and applied when a part with that id is
-- stored (mark_submitted*); pruned after ORPHAN_MAX_AGE.
CREATE TABLE IF NOT EXISTS orphan_receipts (
    id INTEGER PRIMARY KEY,
    ref TEXT NOT NULL,
    part_state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orphan_receipts_ref ON orphan_receipts(ref);
CREATE INDEX IF NOT EXISTS orphan_receipts_at ON orphan_receipts(at);
-- Limits (abuse control; new tables and an index only, all IF NOT EXISTS: created on every open,
-- no migration step needed). Parts committed per account (scope '') and per account and destination
-- number (scope = the number) in time slots of `width` seconds, summed over a window at commit
-- time: a check reads at most a few hundred rows, never the jobs. Pruned after a day.
CREATE TABLE IF NOT EXISTS limit_slots (
    account TEXT NOT NULL,
    scope TEXT NOT NULL,
    width INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    PRIMARY KEY (account, scope, width, slot)
) WITHOUT ROWID;
-- Calendar periods (UTC), 'YYYY-MM' and 'YYYY-MM-DD': the month cap and `stats`.
CREATE TABLE IF NOT EXISTS limit_periods (
    account TEXT NOT NULL,
    period TEXT NOT NULL,
    parts INTEGER NOT NULL,
    PRIMARY KEY (account, period)
) WITHOUT ROWID;
-- Identical SMS (account, number, device, text) committed recently: a resend is one SMS.
CREATE TABLE IF NOT EXISTS limit_dedupe (
    key TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
-- The circuit breaker reads the jobs finished within its window.
CREATE INDEX IF NOT EXISTS jobs_done ON jobs(done_at) WHERE done_at IS NOT NULL;
"""

# Ordered schema migrations: MIGRATIONS[i] takes a spool from `PRAGMA user_version` i to i+1
# (SCHEMA above is version 0 and stays as it is). Each runs in one BEGIN IMMEDIATE
# transaction with the version bump, so processes opening the same spool at once migrate it
# exactly once; an older spool is brought up to date when it is opened.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: claim cost independent of one recipient's backlog. `ready` = 1 for a queued job that
    # no older queued non-deferred job of its recipient waits before (the per-recipient head,
    # plus deferred jobs that nothing blocks). Triggers keep it true on every insert, state
    # change and delete, whoever writes; the claim walks the few ready jobs (jobs_ready)
    # instead of every queued job of a recipient with a backlog.
    # Receipts: parts keep the id as the SMSC wrote it (query_sm needs it); orphan receipts
    # keep the handset number they came from (a receipt matches by id AND number); both keep
    # the provider they belong to (ids of two providers are unrelated).
    # Jobs record when their receipt is next asked for with query_sm (receipt_timeout).
    (
        "ALTER TABLE jobs ADD COLUMN ready INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN query_at REAL",
        "ALTER TABLE parts ADD COLUMN wire_ref TEXT",
        "ALTER TABLE orphan_receipts ADD COLUMN source TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE parts ADD COLUMN provider TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE orphan_receipts ADD COLUMN provider TEXT NOT NULL DEFAULT ''",
        "UPDATE jobs SET ready=1 WHERE state='queued' AND NOT EXISTS (SELECT 1 FROM jobs o"
        " WHERE o.recipient=jobs.recipient AND o.id<jobs.id AND o.state='queued' AND o.deferred=0)",
        "CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(id) WHERE ready=1 AND state='queued'",
        "CREATE INDEX IF NOT EXISTS jobs_unreceipted ON jobs(submitted_at)"
        " WHERE state IN ('submitted','buffered')",
        # A new job is ready unless an older queued non-deferred job of its recipient waits.
        "CREATE TRIGGER IF NOT EXISTS jobs_ready_insert AFTER INSERT ON jobs WHEN NEW.state='queued'"
        " BEGIN UPDATE jobs SET ready=1 WHERE id=NEW.id AND NOT EXISTS (SELECT 1 FROM jobs o"
        " WHERE o.recipient=NEW.recipient AND o.id<NEW.id AND o.state='queued' AND o.deferred=0); END",
        # A job that blocked its recipient leaves the queue (submitted, failed, held, ...): the
        # jobs of its recipient up to the next non-deferred one become ready. (`ready` of a job
        # that is not queued means nothing: jobs_ready and the claim look at queued ones only.)
        "CREATE TRIGGER IF NOT EXISTS jobs_ready_leave AFTER UPDATE OF state ON jobs"
        " WHEN OLD.state='queued' AND NEW.state<>'queued' AND OLD.deferred=0"
        " BEGIN UPDATE jobs SET ready=1 WHERE recipient=OLD.recipient AND state='queued' AND ready=0"
        "  AND id<=coalesce((SELECT min(id) FROM jobs WHERE recipient=OLD.recipient AND state='queued'"
        "   AND deferred=0), 9223372036854775807); END",
        "CREATE TRIGGER IF NOT EXISTS jobs_ready_delete AFTER DELETE ON jobs"
        " WHEN OLD.state='queued' AND OLD.deferred=0"
        " BEGIN UPDATE jobs SET ready=1 WHERE recipient=OLD.recipient AND state='queued' AND ready=0"
        "  AND id<=coalesce((SELECT min(id) FROM jobs WHERE recipient=OLD.recipient AND state='queued'"
        "   AND deferred=0), 9223372036854775807); END",
        # A job comes back to the queue (released from hold, retried): ready unless an older one
        # waits; if it blocks (not deferred), the newer jobs of its recipient wait behind it.
        "CREATE TRIGGER IF NOT EXISTS jobs_ready_enter AFTER UPDATE OF state ON jobs"
        " WHEN OLD.state<>'queued' AND NEW.state='queued'"
        " BEGIN UPDATE jobs SET ready=(NOT EXISTS (SELECT 1 FROM jobs o WHERE o.recipient=NEW.recipient"
        "  AND o.id<NEW.id AND o.state='queued' AND o.deferred=0)) WHERE id=NEW.id;"
        " UPDATE jobs SET ready=0 WHERE NEW.deferred=0 AND recipient=NEW.recipient AND state='queued'"
        "  AND id>NEW.id AND ready=1; END",
    ),
)

JOB_COLUMNS = (
    "id, state, recipient, originator, text, parts, account, device, sender, subject, message_id, "
    "notify, queue_id, trans_ref, flash, urls, created_at, not_before, expires_at, attempts, "
    "last_error, submitted_at, done_at"
)
WAKE_SLOTS = 8  # dispatchers on one spool that can be woken directly (more still poll)
DEFAULT_VALIDITY = 48 * 3600.0
# Which job states owe a notification mail under each Notify policy.
NOTIFY_STATES = {
    "ALWAYS": ("delivered", "buffered", "failed", "expired"),
    "": ("delivered", "failed", "expired"),
    "FAILED": ("failed", "expired"),
    "NONE": (),
}


# A message's own values that SQLite cannot store (text that is no valid Unicode, a number
# out of range, a constraint): that message is refused, its neighbours in the batch commit.
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, ValueError, TypeError,
                OverflowError)
_FIELD_NAMES = {"message_id": "the Message-ID header", "subject": "the Subject header",
                "sender": "the envelope sender", "text": "the SMS text", "originator": "the originator",
                "queue_id": "the queue id", "recipient": "the recipient", "account": "the account name",
                "trans_ref": "the TransRefNumber", "device": "the device"}


class _Isolate(Exception):
    """A message's values failed in a batch written without savepoints: write it again with them."""


def _busy(e: BaseException) -> bool:
    """Is this SQLite error "another connection holds the lock" (retry later)?"""
    if not isinstance(e, sqlite3.OperationalError):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(e)
    return "locked" in text or "busy" in text


def _unstorable(r: AddRequest, e: BaseException) -> str:
    """Name the value of this request that SQLite refused (never the value itself)."""
    for j in r.jobs:
        for name, label in _FIELD_NAMES.items():
            value = getattr(j, name)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeError:
                    return f"{label} (it is not valid text)"
    for m in r.mails:
        try:
            m.rcpt.encode("utf-8")
        except UnicodeError:
            return "the reply address (it is not valid text)"
    return f"the message ({type(e).__name__})"


_NOT_DIGIT = re.compile(r"[^0-9]")


def number_key(addr: str) -> str:
    """A phone number as receipts and jobs are compared: its digits without leading zeros
    ('+41791234567', '0041791234567' and '41791234567' are one number); '' if none."""
    if addr.isdigit():  # the usual forms first: '41791234567' (a receipt), '+41791234567' (a job)
        return addr.lstrip("0")
    if addr[1:].isdigit() and addr[:1] == "+":
        return addr[1:].lstrip("0")
    return _NOT_DIGIT.sub("", addr).lstrip("0")


def same_number(a: str, b: str) -> bool:
    """Two number_key()s name one handset: equal, or one is the other written nationally
    (its last 7 or more digits)."""
    if a == b:
        return True
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return len(short) >= 7 and long.endswith(short)


class _Usage:
    """One account's limit counters as read in the current commit transaction, kept up to date
    with what the transaction counts (several messages of one account in one group commit read
    the tables once)."""

    __slots__ = ("account", "short", "long", "month", "recipients")

    def __init__(self, account: str):
        self.account = account
        self.short: dict[int, int] = {}
        self.long: dict[int, int] = {}
        self.month = 0
        self.recipients: dict[str, dict[int, int]] = {}

    def fetch(self, db: sqlite3.Connection, numbers: list[str], now: float) -> None:
        """Read the per-number slots of `numbers` (not read yet in this transaction)."""
        if not numbers:
            return
        for n in numbers:
            self.recipients[n] = {}
        for n, slot, parts in db.execute(
                "SELECT scope, slot, parts FROM limit_slots WHERE account=? AND width=? AND slot>?"
                " AND scope IN (SELECT value FROM json_each(?))",
                (self.account, SLOT_RCPT, now - 3600 - SLOT_RCPT, json.dumps(numbers))):
            self.recipients[n][slot] = parts

    def add(self, number: str, parts: int, now: float) -> None:
        for d, width in ((self.short, SLOT_SHORT), (self.long, SLOT_LONG)):
            k = int(now // width) * width
            d[k] = d.get(k, 0) + parts
        self.month += parts
        rd = self.recipients.get(number)
        if rd is not None:  # a number not read yet is read from the tables (this transaction's rows too)
            k = int(now // SLOT_RCPT) * SLOT_RCPT
            rd[k] = rd.get(k, 0) + parts

    def view(self, now: float) -> LimitUsage:
        return LimitUsage(now=now, short=tuple(sorted(self.short.items())),
                          long=tuple(sorted(self.long.items())), month=self.month,
                          recipients={n: tuple(sorted(v.items())) for n, v in self.recipients.items()})


def _key_ttl(key: str, default: float) -> float:
    """A dedupe key may carry its own lifetime: `<seconds>:<hash>`."""
    head, sep, _ = key.partition(":")
    return float(head) if sep and head.isdigit() else default


def _job(row: sqlite3.Row, refs: Iterable[str] = ()) -> Job:
    return Job(
        id=row["id"], state=row["state"], recipient=row["recipient"], originator=row["originator"],
        text=row["text"], parts=row["parts"], account=row["account"], device=row["device"],
        sender=row["sender"], subject=row["subject"], message_id=row["message_id"],
        notify=row["notify"], queue_id=row["queue_id"], trans_ref=row["trans_ref"],
        flash=bool(row["flash"]), urls=json.loads(row["urls"]) if row["urls"] not in ("{}", "", None) else {},
        created_at=row["created_at"],
        not_before=row["not_before"], expires_at=row["expires_at"], attempts=row["attempts"],
        last_error=row["last_error"], submitted_at=row["submitted_at"], done_at=row["done_at"],
        provider_refs=tuple(refs),
    )


class SqliteSpool:
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

    # -- plumbing ----------------------------------------------------------------------
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
                self._migrate(self._db)
        except sqlite3.Error as e:
            raise SpoolError(f"cannot initialise spool {self.path}: {e}") from None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring the schema to len(MIGRATIONS), one version per transaction, in order."""
        while db.execute("PRAGMA user_version").fetchone()[0] < len(MIGRATIONS):
            db.execute("BEGIN IMMEDIATE")  # busy: raised as it is (the caller may retry later)
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have run it
                if version < len(MIGRATIONS):
                    for stmt in MIGRATIONS[version]:
                        db.execute(stmt)
                    db.execute(f"PRAGMA user_version={version + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

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

    # -- milter side: grouped commits --------------------------------------------------
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
            for isolate in (False, True):
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    if _busy(e):
                        return False
                    return self._fail_all(batch, SpoolError(f"spool busy or unwritable: {e}"))
                try:
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
            self._migrate(db)  # a spool file put back from before MIGRATIONS is brought up to date
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
                ids = tuple(self._insert_job(db, j, now) for j in jobs)
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
                out.append(SpoolDataError(_unstorable(r, e)))
                continue
            if isolate:
                db.execute("RELEASE msg")
            if r.key is not None:
                known[r.key] = AddResult(ids, True)  # the same message again in this batch
            out.append(AddResult(ids, False))
        return out

    # -- limits (abuse control) --------------------------------------------------------------
    def _limits_check(self, db: sqlite3.Connection, r: AddRequest, plan: LimitPlan,
                      now: float) -> tuple[AddResult | None, list[NewJob], list[str]]:
        """Drop jobs identical to one committed within plan.dedupe_ttl, then ask plan.decide per
        account. (result to give instead of committing, or None; the jobs to write; their dedupe
        keys). The request itself is not changed (a batch may be written again)."""
        jobs = r.jobs
        keys = list(plan.dedupe_keys)
        if keys and len(keys) == len(jobs):
            wanted = [k for k in keys if k]
            seen: dict[str, int] = {}
            if wanted:
                for row in db.execute("SELECT key, job_id FROM limit_dedupe WHERE expires_at>? AND key IN"
                                      " (SELECT value FROM json_each(?))", (now, json.dumps(wanted))):
                    seen[row[0]] = row[1]
            if seen:
                kept = [(j, k) for j, k in zip(jobs, keys, strict=True) if k not in seen]
                if not kept:
                    return AddResult(tuple(dict.fromkeys(seen.values())), True), [], []
                jobs = [j for j, _ in kept]
                keys = [k for _, k in kept]
        else:
            keys = []
        if plan.decide is not None:
            by_account: dict[str, tuple[int, dict[str, int]]] = {}
            for j in jobs:
                total, per = by_account.get(j.account, (0, {}))
                per[j.recipient] = per.get(j.recipient, 0) + j.parts
                by_account[j.account] = (total + j.parts, per)
            for account, (parts, per) in by_account.items():
                usage = self._usage_cache.get(account)
                if usage is None:
                    usage = self._usage_cache[account] = self._limit_usage(db, account, now)
                usage.fetch(db, [n for n in per if n not in usage.recipients], now)
                refused = plan.decide(account, usage.view(now), parts, per)
                if refused is not None:
                    return AddResult((), False, refused=refused), [], []
        return None, jobs, keys

    @staticmethod
    def _limit_usage(db: sqlite3.Connection, account: str, now: float) -> _Usage:
        q = ("SELECT slot, parts FROM limit_slots WHERE account=? AND scope='' AND width=? AND slot>?"
             " ORDER BY slot")
        u = _Usage(account)
        u.short.update(db.execute(q, (account, SLOT_SHORT, now - 3600 - SLOT_SHORT)).fetchall())
        u.long.update(db.execute(q, (account, SLOT_LONG, now - 86400 - SLOT_LONG)).fetchall())
        row = db.execute("SELECT parts FROM limit_periods WHERE account=? AND period=?",
                         (account, time.strftime("%Y-%m", time.gmtime(now)))).fetchone()
        u.month = int(row[0]) if row else 0
        return u

    def _limits_count(self, db: sqlite3.Connection, jobs: list[NewJob], ids: tuple[int, ...],
                      keys: list[str], plan: LimitPlan, now: float) -> None:
        """Count the committed jobs' parts in the limit counters (same transaction)."""
        slots: dict[tuple[str, str, int, int], int] = {}
        periods: dict[tuple[str, str], int] = {}
        gm = time.gmtime(now)
        month, day = time.strftime("%Y-%m", gm), time.strftime("%Y-%m-%d", gm)
        for j in jobs:
            cached = self._usage_cache.get(j.account)
            if cached is not None:
                cached.add(j.recipient, j.parts, now)
            for k in ((j.account, "", SLOT_SHORT, int(now // SLOT_SHORT) * SLOT_SHORT),
                      (j.account, "", SLOT_LONG, int(now // SLOT_LONG) * SLOT_LONG),
                      (j.account, j.recipient, SLOT_RCPT, int(now // SLOT_RCPT) * SLOT_RCPT)):
                slots[k] = slots.get(k, 0) + j.parts
            for k2 in ((j.account, month), (j.account, day)):
                periods[k2] = periods.get(k2, 0) + j.parts
        db.executemany("INSERT INTO limit_slots(account, scope, width, slot, parts) VALUES (?,?,?,?,?)"
                       " ON CONFLICT DO UPDATE SET parts=parts+excluded.parts",
                       [(*k, p) for k, p in slots.items()])
        db.executemany("INSERT INTO limit_periods(account, period, parts) VALUES (?,?,?)"
                       " ON CONFLICT DO UPDATE SET parts=parts+excluded.parts",
                       [(*k, p) for k, p in periods.items()])
        if keys:
            db.executemany("INSERT OR REPLACE INTO limit_dedupe(key, job_id, expires_at) VALUES (?,?,?)",
                           [(k, i, now + _key_ttl(k, plan.dedupe_ttl)) for k, i in zip(keys, ids, strict=True)
                            if k])
        if now - self._limits_pruned_at > 60:  # give back the space of old slots now and then
            self._limits_pruned_at = now
            db.execute("DELETE FROM limit_slots WHERE slot<?", (now - 86400 - 2 * SLOT_LONG,))
            db.execute("DELETE FROM limit_dedupe WHERE expires_at<?", (now,))

    def account_usage(self, now: float | None = None) -> list[AccountUsage]:
        """Per account: parts committed today and this calendar month (UTC)."""
        gm = time.gmtime(time.time() if now is None else now)
        month, day = time.strftime("%Y-%m", gm), time.strftime("%Y-%m-%d", gm)
        rows = self._read("SELECT account, sum(CASE WHEN period=? THEN parts ELSE 0 END) AS today,"
                          " sum(CASE WHEN period=? THEN parts ELSE 0 END) AS month FROM limit_periods"
                          " WHERE period IN (?, ?) GROUP BY account ORDER BY account",
                          (day, month, day, month))
        return [AccountUsage(r["account"], int(r["today"]), int(r["month"])) for r in rows]

    def finished_by_prefix(self, since: float, digits: int) -> dict[str, tuple[int, int]]:
        """Jobs finished since `since` by destination prefix: prefix -> (finished, failed/expired)."""
        rows = self._read("SELECT substr(recipient, 1, ?) AS p, count(*) AS n,"
                          " sum(state IN ('failed','expired')) AS bad FROM jobs"
                          " WHERE done_at IS NOT NULL AND done_at>=? GROUP BY p", (digits + 1, since))
        return {r["p"]: (int(r["n"]), int(r["bad"])) for r in rows}

    def prune_message_keys(self, limit: int = 5000) -> int:
        """Delete up to `limit` expired idempotency keys (they no longer match anything); how many."""
        return self._run(lambda db: db.execute(
            "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages WHERE expires_at<=? "
            "ORDER BY expires_at LIMIT ?)", (time.time(), limit)).rowcount)

    def _insert_job(self, db: sqlite3.Connection, j: NewJob, now: float) -> int:
        not_before = j.not_before if j.not_before is not None else now
        expires = j.expires_at if j.expires_at is not None else max(now, not_before) + self.validity
        cur = db.execute(
            "INSERT INTO jobs(recipient, originator, text, parts, account, device, sender, subject, "
            "message_id, notify, queue_id, trans_ref, flash, urls, deferred, created_at, not_before, "
            "expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (j.recipient, j.originator, j.text, j.parts, j.account, j.device, j.sender, j.subject,
             j.message_id, j.notify, j.queue_id, j.trans_ref, int(j.flash),
             json.dumps(j.urls) if j.urls else "{}",
             int(j.not_before is not None and j.not_before > now), now, not_before, expires),
        )
        return int(cur.lastrowid or 0)

    def add_jobs(self, jobs: list[NewJob]) -> list[int]:
        """Direct insert without grouping (tests, benchmarks, tools)."""
        now = time.time()
        ids = self._run(lambda db: [self._insert_job(db, j, now) for j in jobs])
        self.wake()
        return ids

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

    # -- dispatcher side -----------------------------------------------------------------
    def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        """Lease up to `limit` due jobs, oldest first, at most one in flight per recipient
        and never one whose recipient has an older job still waiting (order per recipient)."""

        def fn(db: sqlite3.Connection) -> list[Job]:
            now = time.time()
            # Only ready jobs (per-recipient heads) are looked at: the cost does not grow with
            # one recipient's backlog (jobs_ready; the triggers of MIGRATIONS[0] keep it).
            rows = db.execute(
                f"UPDATE jobs SET lease_owner=?, lease_until=?, attempts=attempts+1 WHERE id IN ("
                " SELECT id FROM jobs WHERE ready=1 AND state='queued' AND not_before<=?"
                "  AND (lease_until IS NULL OR lease_until<?) ORDER BY id LIMIT ?)"
                f" RETURNING {JOB_COLUMNS}",
                (owner, now + lease_seconds, now, now, limit),
            ).fetchall()
            return sorted((_job(r) for r in rows), key=lambda j: j.id)

        return self._run(fn)

    def mark_submitted(self, job_id: int, owner: str, refs: list[str]) -> list[AppliedOrphan]:
        return self.mark_submitted_many([(job_id, refs)])

    def mark_submitted_many(self, items: list[SubmittedItem]) -> list[AppliedOrphan]:
        """mark_submitted for many jobs in one transaction (the dispatcher's hot path): the jobs
        become `submitted`, their parts get their message ids, and every orphan receipt for one
        of those ids (it came before this) is applied and deleted, all in this transaction."""
        if not items:
            return []
        return self._run(lambda db: self._mark_submitted(db, items, time.time()))

    def store_round(self, submitted: list[SubmittedItem], receipts: list[tuple[str, ...]],
                    ) -> tuple[list[AppliedOrphan], list[ReceiptOutcome | None]]:
        """mark_submitted_many(submitted) then record_receipts(receipts), in one transaction
        (the dispatcher's round: one commit, one fsync, for everything that came in)."""
        if not submitted and not receipts:
            return [], []

        def fn(db: sqlite3.Connection) -> tuple[list[AppliedOrphan], list[ReceiptOutcome | None]]:
            now = time.time()
            applied = self._mark_submitted(db, submitted, now) if submitted else []
            return applied, (self._apply_receipts(db, receipts, now) if receipts else [])

        return self._run(fn)

    def _mark_submitted(self, db: sqlite3.Connection, items: list[SubmittedItem],
                        now: float) -> list[AppliedOrphan]:
        db.executemany(
            "UPDATE jobs SET state='submitted', submitted_at=?, lease_owner=NULL, lease_until=NULL,"
            " last_error='', query_at=NULL WHERE id=? AND state='queued'", [(now, it[0]) for it in items])
        refs = [(it[0], i, normalize_ref(r), r, it[2] if len(it) > 2 else "")
                for it in items for i, r in enumerate(it[1])]
        db.executemany("INSERT OR REPLACE INTO parts(job_id, seq, ref, state, wire_ref, provider)"
                       " VALUES (?,?,?,'submitted',?,?)", refs)
        return self._apply_orphans(db, [r[2] for r in refs], now)

    def _apply_orphans(self, db: sqlite3.Connection, refs: list[str], now: float) -> list[AppliedOrphan]:
        """Apply (in arrival order) and delete the orphan receipts for parts just stored."""
        if db.execute("SELECT 1 FROM orphan_receipts LIMIT 1").fetchone() is None:
            return []  # the usual case: one cheap look, nothing to match
        # Forms are symmetric: a receipt id R matches a part id P iff P is a form of R iff R is
        # a form of P (refs_for_lookup), so look the orphans up by every form of the new ids.
        forms = list({f for r in refs for f in refs_for_lookup(r)})
        rows: list[sqlite3.Row] = []
        for i in range(0, len(forms), 5000):
            rows += db.execute("SELECT id, ref, part_state, error, at, source, provider FROM orphan_receipts"
                               " WHERE ref IN (SELECT value FROM json_each(?))",
                               (json.dumps(forms[i:i + 5000]),)).fetchall()
        if not rows:
            return []
        rows.sort(key=lambda r: r["id"])
        outcomes = self._apply_receipts(
            db, [(r["ref"], r["part_state"], r["error"], r["source"], r["provider"]) for r in rows], now,
            keep_orphans=False)
        # One that matched no part (same id, another handset) stays for the part it belongs to.
        db.executemany("DELETE FROM orphan_receipts WHERE id=?",
                       [(r["id"],) for r, o in zip(rows, outcomes, strict=True) if o is not None])
        return [AppliedOrphan(OrphanReceipt(r["ref"], r["part_state"], r["error"], r["at"], r["source"]), o)
                for r, o in zip(rows, outcomes, strict=True) if o is not None]

    def release(self, job_ids: list[int], owner: str, delay: float, error: str = "",
                count_attempt: bool = False) -> None:
        """Give leased jobs back to the queue, due after `delay` seconds."""

        def fn(db: sqlite3.Connection) -> None:
            due = time.time() + delay
            db.executemany(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL, not_before=?,"
                " last_error=CASE WHEN ?='' THEN last_error ELSE ? END,"
                " attempts=attempts-? WHERE id=? AND state='queued'",
                [(due, error, error, 0 if count_attempt else 1, jid) for jid in job_ids])

        self._run(fn)

    def fail(self, job_id: int, error: str, state: str = "failed") -> None:
        def fn(db: sqlite3.Connection) -> None:
            self._set_final(db, job_id, state, error, time.time())

        self._run(fn)

    def _set_final(self, db: sqlite3.Connection, job_id: int, state: str, error: str, now: float) -> bool:
        row = db.execute("SELECT state, notify, sender, urls FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["state"] == state or row["state"] in FINAL_STATES:
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
        """The events (notification mail, URL callback) a job owes on reaching `state`."""
        out = []
        if sender and state in NOTIFY_STATES.get(notify, NOTIFY_STATES[""]):
            out.append((job_id, "mail", state, now, now))
        url_key = "failed" if state == "expired" else state
        if urls and urls != "{}" and url_key in json.loads(urls):
            out.append((job_id, "url", state, now, now))
        return out

    def record_receipt(self, ref: str, part_state: str, error: str = "") -> ReceiptOutcome | None:
        """Apply a delivery receipt for one part. None: no part has that id (yet); the receipt
        is then kept as an orphan (durably, in this transaction) and applied by mark_submitted*
        when a part with that id is stored."""
        return self.record_receipts([(ref, part_state, error)])[0]

    def record_receipts(self, items: list[tuple[str, ...]]) -> list[ReceiptOutcome | None]:
        """record_receipt for many (ref, part_state, error[, source]) in one transaction, in order."""
        if not items:
            return []
        return self._run(lambda db: self._apply_receipts(db, items, time.time()))

    def _apply_receipts(self, db: sqlite3.Connection, items: list[tuple[str, ...]], now: float,
                        keep_orphans: bool = True) -> list[ReceiptOutcome | None]:
        """Apply receipts in order with a handful of statements for the whole batch: find the
        parts and their jobs in bulk, work out each job's state in memory receipt by receipt
        (so a job still passes through every state, e.g. buffered then delivered, and owes the
        same notifications as one receipt at a time), then write the parts back.

        An item is (ref, part_state, error[, source[, provider]]): `source` is the receipt's
        source_addr, the handset number; `provider` the provider it came from (a part stored
        for another provider never matches). Message ids are not unique (an SMSC
        that restarts hands them out again), so a receipt matches a part by id (in any of its
        readings) AND, when the receipt names a number, by the job's recipient; of those the
        part that is not final yet, the id as given before its other readings, the newest
        submit first. A receipt whose id matches only final parts is reported `stale` and
        changes nothing; one that matches no part is kept as an orphan."""
        cands: dict[str, list[tuple[int, int, str]]] = {}  # ref -> (job id, seq, provider)
        jobs: dict[int, list] = {}  # id -> [state, parts, {seq: part state}, notify, sender, urls,
        #                                     recipient digits, submitted_at]

        def find(forms: Iterable[str]) -> None:
            wanted = [f for f in forms if f not in cands]
            for f in wanted:
                cands[f] = []
            for i in range(0, len(wanted), 5000):
                for r in db.execute("SELECT ref, job_id, seq, provider FROM parts WHERE ref IN"
                                    " (SELECT value FROM json_each(?))", (json.dumps(wanted[i:i + 5000]),)):
                    cands[r[0]].append((r[1], r[2], r[3]))
            ids = list({h[0] for f in wanted for h in cands[f]} - jobs.keys())
            for i in range(0, len(ids), 5000):
                chunk = json.dumps(ids[i:i + 5000])
                for r in db.execute("SELECT id, state, parts, notify, sender, urls, recipient, submitted_at"
                                    " FROM jobs WHERE id IN (SELECT value FROM json_each(?))", (chunk,)):
                    jobs[r[0]] = [r[1], r[2], {}, r[3], r[4], r[5], number_key(r[6]), r[7] or 0.0]
                for r in db.execute("SELECT job_id, seq, state FROM parts WHERE job_id IN"
                                    " (SELECT value FROM json_each(?))", (chunk,)):
                    if r[0] in jobs:
                        jobs[r[0]][2][r[1]] = r[2]

        def usable(jid: int, part_provider: str, src: str, provider: str) -> list | None:
            j = jobs.get(jid)
            if j is None or (src and not same_number(src, j[6])):
                return None
            if provider and part_provider and provider != part_provider:
                return None
            return j

        # The id as given first (the usual hit); its other readings (hex/decimal) only for the
        # receipts whose id as given matches no unfinished part of that number.
        lookups: list[list[str]] = [refs_for_lookup(normalize_ref(it[0])) for it in items]
        find({forms[0] for forms in lookups})
        more: set[str] = set()
        for item, forms in zip(items, lookups, strict=True):
            if len(forms) == 1:
                continue
            src, provider = number_key(item[3] if len(item) > 3 else ""), item[4] if len(item) > 4 else ""
            if not any((j := usable(jid, pp, src, provider)) is not None and j[0] not in FINAL_STATES
                       and j[2].get(seq) not in FINAL_STATES for jid, seq, pp in cands[forms[0]]):
                more.update(forms[1:])
        if more:
            find(more)
        out: list[ReceiptOutcome | None] = []
        touched: dict[tuple[int, int], str] = {}
        orphans: list[tuple[str, str, str, float, str, str]] = []
        finals: dict[int, list] = {}  # job id -> [state, last_error or None, done_at or None]
        events: list[tuple[int, str, str, float, float]] = []
        for item, forms in zip(items, lookups, strict=True):
            part_state, error = item[1], item[2]
            source = item[3] if len(item) > 3 else ""
            provider = item[4] if len(item) > 4 else ""
            src = number_key(source or "")
            best: tuple | None = None
            for rank, form in enumerate(forms):
                for jid, seq, part_provider in cands.get(form, ()):
                    j = usable(jid, part_provider, src, provider)
                    if j is None:
                        continue
                    final = j[2].get(seq) in FINAL_STATES or j[0] in FINAL_STATES
                    key = (final, rank, -j[7], -jid, seq)
                    if best is None or key < best:
                        best = key
            if best is None:
                orphans.append((forms[0], part_state, error, now, source or "", provider or ""))
                out.append(None)
                continue
            job_id, seq = -best[3], best[4]
            job = jobs[job_id]
            if best[0]:  # only finished parts have this id (and number): a stale or repeated receipt
                out.append(ReceiptOutcome(job_id, job[0], False, stale=True))
                continue
            hit = (job_id, seq)
            job[2][seq] = touched[hit] = part_state
            states = job[2].values()
            if "failed" in states:
                new = "failed"
            elif "expired" in states:
                new = "expired"
            elif len(job[2]) >= job[1] and all(s == "delivered" for s in states):
                new = "delivered"
            elif "buffered" in states:
                new = "buffered"
            else:
                new = job[0]
            if new == job[0] or job[0] in FINAL_STATES:
                out.append(ReceiptOutcome(job_id, job[0], False))
                continue
            # What _set_final does, for the whole batch at once (written below).
            job[0] = new
            f = finals.setdefault(job_id, [new, None, None])
            f[0] = new
            if error:
                f[1] = error
            if new in FINAL_STATES:
                f[2] = now
            owed = self._events_for(job_id, new, job[3], job[4], job[5], now)
            events += owed
            out.append(ReceiptOutcome(job_id, new, True, bool(owed)))
        if touched:
            db.executemany("UPDATE parts SET state=? WHERE job_id=? AND seq=?",
                           [(st, jid, seq) for (jid, seq), st in touched.items()])
        if finals:
            db.executemany(
                "UPDATE jobs SET state=?, last_error=coalesce(?, last_error), done_at=coalesce(?, done_at),"
                " lease_owner=NULL, lease_until=NULL WHERE id=?",
                [(st, err, done, jid) for jid, (st, err, done) in finals.items()])
        if events:
            db.executemany("INSERT INTO events(job_id, kind, status, at, next_at) VALUES (?,?,?,?,?)", events)
        if orphans and keep_orphans:
            db.executemany("INSERT INTO orphan_receipts(ref, part_state, error, at, source, provider)"
                           " VALUES (?,?,?,?,?,?)", orphans)
        return out

    def prune_orphans(self, max_age: float = ORPHAN_MAX_AGE, limit: int = 1000) -> list[OrphanReceipt]:
        """Delete and return (oldest first) up to `limit` orphan receipts older than max_age s."""

        def fn(db: sqlite3.Connection) -> list[OrphanReceipt]:
            rows = db.execute(
                "DELETE FROM orphan_receipts WHERE id IN (SELECT id FROM orphan_receipts WHERE at<?"
                " ORDER BY id LIMIT ?) RETURNING id, ref, part_state, error, at, source",
                (time.time() - max_age, limit)).fetchall()
            rows.sort(key=lambda r: r["id"])
            return [OrphanReceipt(r["ref"], r["part_state"], r["error"], r["at"], r["source"]) for r in rows]

        return self._run(fn)

    def orphan_count(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM orphan_receipts")[0]["n"])

    def renew_leases(self, job_ids: list[int], owner: str, lease_seconds: float) -> list[int]:
        """Extend this owner's leases on queued jobs; returns the ids whose lease was renewed
        (a job missing from the answer was taken over or finished meanwhile)."""

        def fn(db: sqlite3.Connection) -> list[int]:
            until = time.time() + lease_seconds
            out = []
            for jid in job_ids:
                cur = db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND lease_owner=?"
                                 " AND state='queued'", (until, jid, owner))
                if cur.rowcount:
                    out.append(jid)
            return out

        return self._run(fn)

    def receipts_overdue(self, submitted_before: float, limit: int, next_query: float) -> list[OverduePart]:
        """Open parts of jobs still without a final receipt (`submitted`, or `buffered` after an
        intermediate one) since before `submitted_before`, oldest first; each such job is not
        due again before `next_query`."""

        def fn(db: sqlite3.Connection) -> list[OverduePart]:
            jobs = db.execute(
                "UPDATE jobs SET query_at=? WHERE id IN (SELECT id FROM jobs"
                " WHERE state IN ('submitted','buffered') AND submitted_at<? AND coalesce(query_at, 0)<=?"
                " ORDER BY submitted_at LIMIT ?)"
                " RETURNING id, recipient, originator",
                (next_query, submitted_before, time.time(), limit)).fetchall()
            if not jobs:
                return []
            by_id = {r["id"]: r for r in jobs}
            rows = db.execute(
                "SELECT job_id, seq, coalesce(wire_ref, ref) AS ref, provider FROM parts WHERE job_id IN"
                " (SELECT value FROM json_each(?)) AND state NOT IN ('delivered','failed','expired')"
                " ORDER BY job_id, seq", (json.dumps(list(by_id)),)).fetchall()
            return [OverduePart(r["job_id"], r["seq"], r["ref"], by_id[r["job_id"]]["recipient"],
                                by_id[r["job_id"]]["originator"], r["provider"]) for r in rows]

        return self._run(fn)

    def note_receipt_query(self, items: list[tuple[int, str]]) -> None:
        if items:
            self._run(lambda db: db.executemany(
                "UPDATE jobs SET last_error=? WHERE id=? AND state IN ('submitted','buffered')",
                [(err, jid) for jid, err in items]))

    def expire_due(self) -> list[int]:
        """Jobs past their validity: queued ones (not in flight) and ones whose receipt never came."""

        def fn(db: sqlite3.Connection) -> list[int]:
            now = time.time()
            rows = db.execute(
                "SELECT id FROM jobs WHERE (state='queued' AND expires_at<? AND (lease_until IS NULL"
                " OR lease_until<?)) OR (state IN ('submitted','buffered') AND expires_at<?) LIMIT 500",
                (now, now, now)).fetchall()
            ids = [r["id"] for r in rows]
            for jid in ids:
                self._set_final(db, jid, "expired", "validity period ended", now)
            return ids

        return self._run(fn)

    def due_events(self, limit: int) -> list[Event]:
        rows = self._read("SELECT id, job_id, kind, status, at, attempts FROM events WHERE next_at<=?"
                          " ORDER BY id LIMIT ?", (time.time(), limit))
        return [Event(r["id"], r["job_id"], r["kind"], r["status"], r["at"], r["attempts"]) for r in rows]

    def event_done(self, event_id: int) -> None:
        self._run(lambda db: db.execute("DELETE FROM events WHERE id=?", (event_id,)))

    def event_retry(self, event_id: int, error: str, delay: float) -> None:
        self._run(lambda db: db.execute(
            "UPDATE events SET attempts=attempts+1, last_error=?, next_at=? WHERE id=?",
            (error, time.time() + delay, event_id)))

    def due_outbox(self, limit: int) -> list[tuple[int, OutMail, int]]:
        """Ready-made mails (xml@ replies) due for hand-over: (id, mail, attempts so far)."""
        rows = self._read("SELECT id, rcpt, content, attempts FROM outbox WHERE next_at<=?"
                          " ORDER BY id LIMIT ?",
                          (time.time(), limit))
        return [(r["id"], OutMail(r["rcpt"], bytes(r["content"])), r["attempts"]) for r in rows]

    def outbox_done(self, mail_id: int) -> None:
        self._run(lambda db: db.execute("DELETE FROM outbox WHERE id=?", (mail_id,)))

    def outbox_retry(self, mail_id: int, error: str, delay: float) -> None:
        self._run(lambda db: db.execute(
            "UPDATE outbox SET attempts=attempts+1, last_error=?, next_at=? WHERE id=?",
            (error, time.time() + delay, mail_id)))

    # -- everyone --------------------------------------------------------------------------
    def _refs(self, ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            rows = self._read(f"SELECT job_id, ref FROM parts WHERE job_id IN ({','.join('?' * len(part))})"
                              " ORDER BY job_id, seq", tuple(part))
            for r in rows:
                out.setdefault(r["job_id"], []).append(r["ref"])
        return out

    def get(self, job_id: int) -> Job | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        if not rows:
            return None
        return _job(rows[0], self._refs([job_id]).get(job_id, []))

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs"
        params: tuple = ()
        if state:
            sql += " WHERE state=?"
            params = (state,)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = self._read(sql, params)
        refs = self._refs([r["id"] for r in rows])
        return [_job(r, refs.get(r["id"], [])) for r in rows]

    def find_by_trans_ref(self, account: str, refs: list[str]) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {r: [] for r in refs}
        for ref in refs:
            rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE account=? AND trans_ref=? ORDER BY id",
                              (account, ref))
            out[ref] = [_job(r) for r in rows]
        return out

    def parts_used(self, account: str) -> int:
        """SMS parts an account has spooled that did not fail (xml@ ShowCredits)."""
        rows = self._read("SELECT coalesce(sum(parts), 0) AS n FROM jobs WHERE account=?"
                          " AND state NOT IN ('failed','expired')", (account,))
        return int(rows[0]["n"])

    def counts_apart(self) -> dict[str, int]:
        """Jobs by state, on a read-only connection of its own: for the metrics thread, which must
        never hold the lock the daemon's own spool work takes."""
        try:
            db = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True, timeout=self.busy_timeout,
                                 check_same_thread=False)
            try:
                rows = db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            raise SpoolError(f"spool read failed: {e}") from None
        return {state: n for state, n in rows}

    # -- administrator's queue tools (QueueAdmin) ------------------------------------------
    @staticmethod
    def _rows_by_id(db: sqlite3.Connection, ids: list[int]) -> dict[int, sqlite3.Row]:
        out: dict[int, sqlite3.Row] = {}
        for i in range(0, len(ids), 5000):
            for r in db.execute("SELECT id, state, lease_until FROM jobs WHERE id IN"
                                " (SELECT value FROM json_each(?))", (json.dumps(ids[i:i + 5000]),)):
                out[r["id"]] = r
        return out

    def _change(self, job_ids: list[int] | None, fn) -> list[admin.Change]:
        """Decide and apply a change job by job in one transaction: fn(db, id, row, now) -> Change
        (row is None for an unknown id); job_ids None means every `queued` job."""

        def tx(db: sqlite3.Connection) -> list[admin.Change]:
            now = time.time()
            if job_ids is None:
                rows = {r["id"]: r for r in db.execute(
                    "SELECT id, state, lease_until FROM jobs WHERE state='queued' ORDER BY id")}
                ids = list(rows)
            else:
                ids = list(dict.fromkeys(job_ids))
                rows = self._rows_by_id(db, ids)
            return [fn(db, jid, rows.get(jid), now) for jid in ids]

        return self._run(tx)

    @staticmethod
    def _in_flight(row: sqlite3.Row, now: float) -> bool:
        return row["state"] == "queued" and row["lease_until"] is not None and row["lease_until"] >= now

    IN_FLIGHT = "is being submitted by a dispatcher right now; try again in a minute"

    def hold_jobs(self, job_ids: list[int] | None) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] != "queued":
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not queued")
            if self._in_flight(row, now):
                return admin.Change(jid, "queued", None, self.IN_FLIGHT)
            db.execute("UPDATE jobs SET state='held', lease_owner=NULL, lease_until=NULL WHERE id=?", (jid,))
            return admin.Change(jid, "queued", "held")

        return self._change(job_ids, fn)

    def release_held(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] != "held":
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not held")
            db.execute("UPDATE jobs SET state='queued', lease_owner=NULL, lease_until=NULL WHERE id=?",
                       (jid,))
            return admin.Change(jid, "held", "queued")

        changes = self._change(job_ids, fn)
        if any(c.changed for c in changes):
            self.wake()
        return changes

    def retry_jobs(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] not in ("failed", "expired"):
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not failed or expired")
            # The old parts go: a late receipt for an old message id must not finish the new try.
            db.execute("DELETE FROM parts WHERE job_id=?", (jid,))
            db.execute("UPDATE jobs SET state='queued', attempts=0, not_before=?, expires_at=?, deferred=0,"
                       " done_at=NULL, lease_owner=NULL, lease_until=NULL WHERE id=?",
                       (now, now + self.validity, jid))
            return admin.Change(jid, row["state"], "queued")

        changes = self._change(job_ids, fn)
        if any(c.changed for c in changes):
            self.wake()
        return changes

    def delete_jobs(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] == "submitted":
                return admin.Change(jid, "submitted", None,
                                    "is submitted (its receipt is pending); not deleted")
            if self._in_flight(row, now):
                return admin.Change(jid, "queued", None, self.IN_FLIGHT)
            self._delete(db, [jid])
            return admin.Change(jid, row["state"], "deleted")

        return self._change(job_ids, fn)

    @staticmethod
    def _delete(db: sqlite3.Connection, ids: list[int]) -> None:
        chunk = json.dumps(ids)
        for table, col in (("parts", "job_id"), ("events", "job_id"), ("jobs", "id")):
            db.execute(f"DELETE FROM {table} WHERE {col} IN (SELECT value FROM json_each(?))", (chunk,))

    def purge(self, before: float, states: tuple[str, ...] = FINAL_STATES, limit: int = 5000,
              ) -> list[tuple[int, str]]:
        """Retention (`queue purge`, and the dispatcher's housekeeping if it is ever given a
        retention period): up to `limit` final jobs finished before `before`, oldest first,
        removed with their parts and owed notifications in one transaction."""
        wanted = [s for s in states if s in FINAL_STATES]
        if not wanted:
            return []

        def fn(db: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = db.execute(
                f"SELECT id, state FROM jobs WHERE state IN ({','.join('?' * len(wanted))})"
                " AND coalesce(done_at, created_at)<? ORDER BY id LIMIT ?",
                (*wanted, before, limit)).fetchall()
            out = [(r["id"], r["state"]) for r in rows]
            if out:
                self._delete(db, [i for i, _ in out])
            return out

        return self._run(fn)

    def detail(self, job_id: int) -> admin.JobDetail | None:
        job = self.get(job_id)
        if job is None:
            return None
        parts = [admin.Part(r["seq"], r["ref"], r["state"]) for r in self._read(
            "SELECT seq, ref, state FROM parts WHERE job_id=? ORDER BY seq", (job_id,))]
        notes = [admin.Notification(r["id"], r["kind"], r["status"], r["at"], r["next_at"], r["attempts"],
                              r["last_error"]) for r in self._read(
            "SELECT id, kind, status, at, next_at, attempts, last_error FROM events WHERE job_id=?"
            " ORDER BY id", (job_id,))]
        return admin.JobDetail(job, parts, notes)

    def stats(self, day_start: float, month_start: float) -> admin.SpoolStats:
        states = dict.fromkeys(admin.STATES, 0)
        for r in self._read("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            states[r["state"]] = r["n"]
        accounts = {r["account"]: admin.AccountStats(int(r["today"]), int(r["month"])) for r in self._read(
            "SELECT account, sum(CASE WHEN submitted_at>=? THEN parts ELSE 0 END) AS today,"
            " sum(parts) AS month FROM jobs WHERE submitted_at>=? GROUP BY account",
            (day_start, month_start))}
        oldest = self._read("SELECT min(created_at) AS t FROM jobs WHERE state='queued'")[0]["t"]
        return admin.SpoolStats(states, accounts, oldest)
