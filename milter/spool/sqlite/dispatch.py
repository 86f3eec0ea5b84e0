"""The SQLite spool's dispatcher side: claims and leases, failures and expiry, receipt
queries, owed notifications and the outbox, housekeeping."""

from __future__ import annotations

import json
import sqlite3
import time

from ..base import (
    Event,
    Job,
    OutMail,
    OverduePart,
)
from ..lifecycle import train
from .schema import JOB_COLUMNS, job_from_row
from .store import Store


class DispatchSide(Store):
    def claim(self, owner: str, limit: int, lease_seconds: float, *, per_number: int = 1,
              channel: str | None = None) -> list[Job]:
        """Lease up to `limit` due jobs, oldest first, never one whose recipient has an older job
        still waiting (order per recipient). `per_number` 1: at most one in flight per recipient;
        more: each claimed head takes up to per_number - 1 consecutive jobs of its number along
        (`lifecycle.train`), for an owner that sends them in order on one connection. With
        `channel`, jobs of that channel only (a voice/fax backlog must not hold up SMS)."""

        def fn(db: sqlite3.Connection) -> list[Job]:
            now = time.time()
            # Only ready jobs (per-recipient heads) are looked at: the cost does not grow with
            # one recipient's backlog (jobs_ready; the triggers of MIGRATIONS[0] keep it).
            rows = db.execute(
                f"UPDATE jobs SET lease_owner=?, lease_until=?, attempts=attempts+1 WHERE id IN ("
                " SELECT id FROM jobs WHERE ready=1 AND state='queued' AND not_before<=?"
                "  AND (lease_until IS NULL OR lease_until<?) AND (? IS NULL OR channel=?)"
                " ORDER BY id LIMIT ?)"
                f" RETURNING {JOB_COLUMNS}",
                (owner, now + lease_seconds, now, now, channel, channel, limit),
            ).fetchall()
            heads = [job_from_row(r) for r in rows]
            if per_number > 1 and heads:
                heads += self._trains(db, heads, owner, now, lease_seconds, min(per_number - 1, limit),
                                      limit - len(heads), channel)
            return sorted(heads, key=lambda j: j.id)

        return self._run(fn)

    def _trains(self, db: sqlite3.Connection, heads: list[Job], owner: str, now: float, lease_seconds: float,
                per_head: int, budget: int, channel: str | None = None) -> list[Job]:
        """The followers of each claimed head of a number (jobs_recipient: one index range each)."""
        ids: list[int] = []
        seen: set[str] = set()
        for head in sorted(heads, key=lambda j: j.id):
            if len(ids) >= budget:
                break  # the claim's limit: the owner has no room for more
            if head.recipient in seen:
                continue  # a second ready job of one number (deferred): the first head's train has it
            seen.add(head.recipient)
            rows = db.execute(
                "SELECT id, deferred, not_before, lease_until FROM jobs WHERE recipient=? AND state='queued'"
                " AND id>? AND (? IS NULL OR channel=?) ORDER BY id LIMIT ?",
                (head.recipient, head.id, channel, channel, per_head + 1)).fetchall()
            per_head = min(per_head, budget - len(ids))
            ids += train(head.id, ((r[0], bool(r[1]), r[2], r[3]) for r in rows), now, per_head)
        taken = {j.id for j in heads}
        ids = [i for i in ids if i not in taken]
        if not ids:
            return []
        rows = db.execute(
            "UPDATE jobs SET lease_owner=?, lease_until=?, attempts=attempts+1 WHERE id IN"
            f" (SELECT value FROM json_each(?)) RETURNING {JOB_COLUMNS}",
            (owner, now + lease_seconds, json.dumps(ids))).fetchall()
        return [job_from_row(r) for r in rows]

    def release(self, job_ids: list[int], owner: str, delay: float, error: str = "",
                count_attempt: bool = False, pin: str = "") -> None:
        """Give leased jobs back to the queue, due after `delay` seconds (`pin`: see base)."""

        def fn(db: sqlite3.Connection) -> None:
            due = time.time() + delay
            db.executemany(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL, not_before=?,"
                " last_error=CASE WHEN ?='' THEN last_error ELSE ? END,"
                " provider=CASE WHEN ?='' THEN provider ELSE ? END,"
                " attempts=attempts-? WHERE id=? AND state='queued'",
                [(due, error, error, pin, pin, 0 if count_attempt else 1, jid) for jid in job_ids])

        self._run(fn)

    def fail(self, job_id: int, error: str, state: str = "failed") -> None:
        def fn(db: sqlite3.Connection) -> None:
            self._set_final(db, job_id, state, error, time.time())

        self._run(fn)

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

    def prune_message_keys(self, limit: int = 5000) -> int:
        """Delete up to `limit` expired idempotency keys (they no longer match anything); how many."""
        return self._run(lambda db: db.execute(
            "DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages WHERE expires_at<=? "
            "ORDER BY expires_at LIMIT ?)", (time.time(), limit)).rowcount)

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
