"""The SQLite spool's schema: the base tables (version 0) and the ordered migrations, and
how a jobs row becomes a Job."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from ..base import (
    Job,
    SpoolError,
)
from ..files import files_from_json

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
-- Claim takes due jobs oldest first: scan the queued ones in id order.
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
"""


# Ordered schema migrations: MIGRATIONS[i] takes a spool from schema_version i to i+1 (SCHEMA
# above is version 0 and stays as it is; see migrate()). Each runs in one BEGIN IMMEDIATE
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
    # 2: the limit counters (abuse control), until now created by the base schema on every open
    # (IF NOT EXISTS: a spool that has them keeps them). Parts committed per account (scope '')
    # and per account and destination number (scope = the number) in time slots of `width`
    # seconds, summed over a window at commit time: a check reads at most a few hundred rows,
    # never the jobs; pruned after a day. Calendar periods (UTC), 'YYYY-MM' and 'YYYY-MM-DD':
    # the month cap and `stats`. Identical SMS (account, number, device, text) committed
    # recently: a resend is one SMS. The circuit breaker reads the jobs finished within its
    # window (jobs_done). jobs_due, an index on not_before, made claim scan every finished job
    # too: replaced by jobs_queued (it was dropped by the base schema on every open).
    (
        "DROP INDEX IF EXISTS jobs_due",
        "CREATE TABLE IF NOT EXISTS limit_slots (account TEXT NOT NULL, scope TEXT NOT NULL, width "
        "INTEGER NOT NULL, slot INTEGER NOT NULL, parts INTEGER NOT NULL, PRIMARY KEY (account, "
        "scope, width, slot)) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS limit_periods (account TEXT NOT NULL, period TEXT NOT NULL, parts "
        "INTEGER NOT NULL, PRIMARY KEY (account, period)) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS limit_dedupe (key TEXT PRIMARY KEY, job_id INTEGER NOT NULL, "
        "expires_at REAL NOT NULL) WITHOUT ROWID",
        "CREATE INDEX IF NOT EXISTS jobs_done ON jobs(done_at) WHERE done_at IS NOT NULL",
    ),
    # 3: the provider that took a job (routing over several providers): NULL until it is
    # submitted (and for jobs submitted before this).
    ("ALTER TABLE jobs ADD COLUMN provider TEXT",),
    # 4: expiry finds queued jobs past their validity by index (issue 16: with 1,000,000 jobs
    # queued, its scan of every job, every 2 s, was a third of the dispatcher's busy time; with
    # 200,000 queued: 408 ms -> 0.1 ms a look). PostgreSQL has had jobs_queued_expiry from the start.
    ("CREATE INDEX IF NOT EXISTS jobs_queued_expiry ON jobs(expires_at) WHERE state='queued'",),
    # 5: voice and fax (issue 15): the job's channel, its TTS language and its files (JSON list of
    # {sha256, content_type, name, size}; the content is in `<spool>.files/`, sqlite/files.py).
    ("ALTER TABLE jobs ADD COLUMN channel TEXT NOT NULL DEFAULT 'sms'",
     "ALTER TABLE jobs ADD COLUMN language TEXT NOT NULL DEFAULT ''",
     "ALTER TABLE jobs ADD COLUMN files TEXT NOT NULL DEFAULT '[]'"),
)

JOB_COLUMNS = (
    "id, state, recipient, originator, text, parts, account, device, sender, subject, message_id, "
    "notify, queue_id, trans_ref, flash, urls, created_at, not_before, expires_at, attempts, "
    "last_error, submitted_at, done_at, provider, channel, language, files"
)


def _stored_version(db: sqlite3.Connection) -> int | None:
    """The number in schema_version; None for a spool from before the table (its number is
    `PRAGMA user_version`, read once by migrate())."""
    there = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    if db.execute(there).fetchone() is None:
        return None
    row = db.execute("SELECT version FROM schema_version").fetchone()
    return None if row is None else int(row[0])


def _refuse_newer(db: sqlite3.Connection, version: int) -> None:
    if version > len(MIGRATIONS):
        path = db.execute("PRAGMA database_list").fetchone()[2]
        raise SpoolError(f"spool {path} has schema version {version}, newer than this sms-milter knows"
                         f" ({len(MIGRATIONS)}): it was written by a later release; upgrade sms-milter")


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to len(MIGRATIONS), one version per transaction, in order.
    `schema_version` holds one row, the number of MIGRATIONS applied (as on PostgreSQL); a
    spool from before that table counted them in `PRAGMA user_version`, which is copied into
    the table once. A spool newer than this code is refused (SpoolError)."""
    while True:
        version = _stored_version(db)
        if version is not None:
            _refuse_newer(db, version)
            if version == len(MIGRATIONS):
                return
        db.execute("BEGIN IMMEDIATE")  # busy: raised as it is (the caller may retry later)
        try:
            version = _stored_version(db)  # another process may have run it
            if version is None:
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))
            _refuse_newer(db, version)
            if version < len(MIGRATIONS):
                for stmt in MIGRATIONS[version]:
                    db.execute(stmt)
                db.execute("UPDATE schema_version SET version=?", (version + 1,))
                # kept equal, for a release from before schema_version opening this spool
                db.execute(f"PRAGMA user_version={version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def job_from_row(row: sqlite3.Row, refs: Iterable[str] = ()) -> Job:
    return Job(
        id=row["id"], state=row["state"], recipient=row["recipient"], originator=row["originator"],
        text=row["text"], parts=row["parts"], account=row["account"], device=row["device"],
        sender=row["sender"], subject=row["subject"], message_id=row["message_id"],
        notify=row["notify"], queue_id=row["queue_id"], trans_ref=row["trans_ref"],
        flash=bool(row["flash"]), urls=json.loads(row["urls"]) if row["urls"] not in ("{}", "", None) else {},
        created_at=row["created_at"],
        not_before=row["not_before"], expires_at=row["expires_at"], attempts=row["attempts"],
        last_error=row["last_error"], submitted_at=row["submitted_at"], done_at=row["done_at"],
        provider_refs=tuple(refs), provider=row["provider"] or "",
        channel=row["channel"], language=row["language"], files=files_from_json(row["files"]),
    )
