"""The dispatchers' side of the PostgreSQL spool: claims with leases, releases, expiry,
receipt queries, notification events and the outbox.

Several dispatchers (on several hosts) share the queue. A claim leases due jobs with
`FOR UPDATE SKIP LOCKED` (two dispatchers never wait for each other, nor take one job
twice) and keeps the order per recipient as the SQLite claim does: a job is taken only if
no older queued job of its recipient (not deferred) is still waiting, so at most one job per
recipient is in flight. Notification events and outbox mails are leased the same way
(next_at moved ahead while one dispatcher handles them): each is sent by one dispatcher.
"""

from __future__ import annotations

import time

from ..base import Event, Job, OutMail, OverduePart
from ..lifecycle import train
from .core import JOB_COLUMNS, PLAN_BY_INDEX, Core, job_of
from .db import Conn, dec, enc

CLAIMED = ", ".join("jobs." + name.strip() for name in JOB_COLUMNS.split(","))
WALK = 500  # queued jobs the claim looks at in id order before it looks per recipient
# A job is ready when no older job of its number waits (jobs_blocking) and none of its number is
# in flight (jobs_leased): with several milters, ids are handed out at INSERT, not at COMMIT, so an
# older id can become visible while a newer one of the same number is already being sent.
# OFFSET 0: each NOT EXISTS stays a per-row index probe, not an anti join.
_READY = ("j.state='queued' AND j.not_before<=%(now)s AND (j.lease_until IS NULL OR j.lease_until<%(now)s)"
          " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.recipient=j.recipient AND o.state='queued'"
          " AND NOT o.deferred AND o.id<j.id OFFSET 0)"
          " AND NOT EXISTS (SELECT 1 FROM jobs f WHERE f.recipient=j.recipient AND f.state='queued'"
          " AND f.lease_until IS NOT NULL AND f.lease_until>=%(now)s AND f.id<>j.id OFFSET 0)")
_LEASE = (" UPDATE jobs SET lease_owner=%(owner)s, lease_until=%(until)s, attempts=attempts+1 FROM pick"
          f" WHERE jobs.id=pick.id RETURNING {CLAIMED}")
# The candidates in a MATERIALIZED CTE: a LIMIT ... SKIP LOCKED subquery under IN may be run
# more than once by the plan and then yields more rows than LIMIT.
# Candidates as an id array (= ANY(ARRAY(...))): the plan looks up just those rows by key.
_CHANNEL = " AND (%(channel)s::text IS NULL OR j.channel = %(channel)s::text)"  # claim(channel=...)
CLAIM_WALK = (f"WITH pick AS MATERIALIZED (SELECT j.id FROM jobs j WHERE j.id = ANY(ARRAY(SELECT id FROM jobs"
              f" WHERE state='queued' ORDER BY id LIMIT {WALK})) AND {_READY}{_CHANNEL}"
              f" ORDER BY j.id LIMIT %(limit)s FOR UPDATE OF j SKIP LOCKED){_LEASE}")
CLAIM_HEADS = (
    "WITH RECURSIVE heads(recipient, id) AS ("
    " (SELECT recipient, id FROM jobs WHERE state='queued' AND NOT deferred ORDER BY recipient, id LIMIT 1)"
    " UNION ALL SELECT n.recipient, n.id FROM heads h, LATERAL (SELECT recipient, id FROM jobs"
    "  WHERE state='queued' AND NOT deferred AND recipient>h.recipient ORDER BY recipient, id LIMIT 1) n),"
    " cand AS (SELECT id FROM heads UNION ALL SELECT id FROM jobs WHERE state='queued' AND deferred"
    "  AND not_before<=%(now)s AND (lease_until IS NULL OR lease_until<%(now)s)),"
    " pick AS MATERIALIZED (SELECT j.id FROM jobs j WHERE j.id = ANY(ARRAY(SELECT id FROM cand))"
    f" AND {_READY}{_CHANNEL}"
    f" ORDER BY j.id LIMIT %(limit)s FOR UPDATE OF j SKIP LOCKED){_LEASE}")
EVENT_LEASE = 120.0  # seconds a dispatcher has to send a notification before another may


class DispatchSide(Core):
    def claim(self, owner: str, limit: int, lease_seconds: float, *, per_number: int = 1,
              channel: str | None = None) -> list[Job]:
        """Lease up to `limit` due jobs, oldest first, never one whose recipient has an older job
        still waiting. `per_number` 1: at most one in flight per recipient; more: each claimed
        head takes up to per_number - 1 consecutive jobs of its number along (`lifecycle.train`),
        for an owner that sends them in order on one connection. With `channel`, that channel's
        jobs only (a voice/fax backlog must not hold up SMS).

        First the oldest WALK (500) queued jobs are looked at (the usual case: enough ready ones
        among them); if that does not fill the claim, the candidates are the per-recipient heads
        (a loose index scan of jobs_blocking: one probe per number with queued jobs) and the
        due deferred jobs, so one number's backlog of 200,000 jobs is not walked on every claim."""

        def fn(c: Conn) -> list[Job]:
            now = time.time()
            # Plans that do not depend on table statistics (index walks, parametrised probes).
            c.execute(PLAN_BY_INDEX)
            args = {"now": now, "limit": limit, "owner": owner, "until": now + lease_seconds,
                    "channel": channel}
            rows = c.execute(CLAIM_WALK, args).fetchall()
            if len(rows) < limit:
                rows += c.execute(CLAIM_HEADS, {**args, "limit": limit - len(rows)}).fetchall()
            jobs = [job_of(r) for r in rows]
            if per_number > 1 and jobs:
                jobs += self._trains(c, jobs, args, min(per_number - 1, limit), limit - len(jobs))
            return sorted(jobs, key=lambda j: j.id)

        return list(self._run(fn))

    def _trains(self, c: Conn, heads: list[Job], args: dict, per_head: int, budget: int) -> list[Job]:
        """The followers of each claimed head (locked FOR UPDATE by this claim, so no other
        dispatcher can claim that number now: its other jobs are not ready while it waits)."""
        ids: list[int] = []
        seen: set[str] = set()
        for head in sorted(heads, key=lambda j: j.id):
            if len(ids) >= budget:
                break  # the claim's limit: the owner has no room for more
            if head.recipient in seen:
                continue
            seen.add(head.recipient)
            rows = c.execute(
                "SELECT id, deferred, not_before, lease_until FROM jobs WHERE recipient=%s AND state='queued'"
                " AND id>%s AND (%s::text IS NULL OR channel=%s::text) ORDER BY id LIMIT %s",
                (enc(head.recipient), head.id, args["channel"], args["channel"], per_head + 1)).fetchall()
            per_head = min(per_head, budget - len(ids))
            found = ((r["id"], bool(r["deferred"]), r["not_before"], r["lease_until"]) for r in rows)
            ids += train(head.id, found, args["now"], per_head)
        taken = {j.id for j in heads}
        ids = [i for i in ids if i not in taken]
        if not ids:
            return []
        rows = c.execute(
            "UPDATE jobs SET lease_owner=%(owner)s, lease_until=%(until)s, attempts=attempts+1"
            f" WHERE id = ANY(%(ids)s) AND state='queued' RETURNING {JOB_COLUMNS}",
            {**args, "ids": ids}).fetchall()
        return [job_of(r) for r in rows]

    def release(self, job_ids: list[int], owner: str, delay: float, error: str = "",
                count_attempt: bool = False, pin: str = "") -> None:
        if not job_ids:
            return

        def fn(c: Conn) -> None:
            c.execute(
                "UPDATE jobs SET lease_owner=NULL, lease_until=NULL, not_before=%s,"
                " last_error=CASE WHEN %s='' THEN last_error ELSE %s END,"
                " provider=CASE WHEN %s='' THEN provider ELSE %s END,"
                " attempts=attempts-%s WHERE id = ANY(%s) AND state='queued'",
                (time.time() + delay, error, enc(error), pin, pin, 0 if count_attempt else 1,
                 sorted(job_ids)))
            c.execute("SELECT pg_notify('sms_milter_work', '')")

        self._run(fn)

    def fail(self, job_id: int, error: str, state: str = "failed") -> None:
        self._run(lambda c: self._set_final(c, job_id, state, error, time.time()))

    def renew_leases(self, job_ids: list[int], owner: str, lease_seconds: float) -> list[int]:
        if not job_ids:
            return []
        rows = self._run(lambda c: c.execute(
            "UPDATE jobs SET lease_until=%s WHERE id = ANY(%s) AND lease_owner=%s AND state='queued'"
            " RETURNING id", (time.time() + lease_seconds, sorted(job_ids), owner)).fetchall())
        return sorted(int(r["id"]) for r in rows)

    def receipts_overdue(self, submitted_before: float, limit: int, next_query: float) -> list[OverduePart]:
        def fn(c: Conn) -> list[OverduePart]:
            jobs = c.execute(
                "WITH pick AS MATERIALIZED (SELECT id FROM jobs"
                " WHERE state IN ('submitted','buffered') AND submitted_at<%s AND coalesce(query_at, 0)<=%s"
                " ORDER BY submitted_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE jobs SET query_at=%s FROM pick WHERE jobs.id=pick.id"
                " RETURNING jobs.id, jobs.recipient, jobs.originator",
                (submitted_before, time.time(), limit, next_query)).fetchall()
            if not jobs:
                return []
            by_id = {r["id"]: r for r in jobs}
            rows = c.execute(
                "SELECT job_id, seq, coalesce(wire_ref, ref) AS ref, provider FROM parts"
                " WHERE job_id = ANY(%s) AND state NOT IN ('delivered','failed','expired')"
                " ORDER BY job_id, seq",
                (list(by_id),)).fetchall()
            return [OverduePart(r["job_id"], r["seq"], dec(r["ref"]), dec(by_id[r["job_id"]]["recipient"]),
                                dec(by_id[r["job_id"]]["originator"]), r["provider"]) for r in rows]

        return list(self._run(fn))

    def note_receipt_query(self, items: list[tuple[int, str]]) -> None:
        if items:
            def fn(c: Conn) -> None:
                with c.cursor() as cur:
                    cur.executemany("UPDATE jobs SET last_error=%s WHERE id=%s"
                                    " AND state IN ('submitted','buffered')",
                                    [(enc(err), jid) for jid, err in sorted(items)])

            self._run(fn)

    def expire_due(self) -> list[int]:
        """Jobs past their validity: queued ones (not in flight) and ones whose receipt never came."""

        def fn(c: Conn) -> list[int]:
            now = time.time()
            rows = c.execute(
                "SELECT id FROM jobs WHERE (state='queued' AND expires_at<%s AND (lease_until IS NULL"
                " OR lease_until<%s)) OR (state IN ('submitted','buffered') AND expires_at<%s)"
                " ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED", (now, now, now)).fetchall()
            ids = [int(r["id"]) for r in rows]
            for jid in ids:
                self._set_final(c, jid, "expired", "validity period ended", now)
            return ids

        return list(self._run(fn))

    # -- notifications: leased to one dispatcher at a time ---------------------------------
    def due_events(self, limit: int) -> list[Event]:
        def fn(c: Conn) -> list[Event]:
            now = time.time()
            rows = c.execute(
                "WITH pick AS MATERIALIZED (SELECT id FROM events WHERE next_at<=%s"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE events e SET next_at=%s FROM pick WHERE e.id=pick.id"
                " RETURNING e.id, e.job_id, e.kind, e.status, e.at, e.attempts",
                (now, limit, now + EVENT_LEASE)).fetchall()
            return sorted((Event(r["id"], r["job_id"], r["kind"], r["status"], r["at"], r["attempts"])
                           for r in rows), key=lambda e: e.id)

        return list(self._run(fn))

    def event_done(self, event_id: int) -> None:
        self._run(lambda c: c.execute("DELETE FROM events WHERE id=%s", (event_id,)))

    def event_retry(self, event_id: int, error: str, delay: float) -> None:
        self._run(lambda c: c.execute(
            "UPDATE events SET attempts=attempts+1, last_error=%s, next_at=%s WHERE id=%s",
            (enc(error), time.time() + delay, event_id)))

    def due_outbox(self, limit: int) -> list[tuple[int, OutMail, int]]:
        def fn(c: Conn) -> list[tuple[int, OutMail, int]]:
            now = time.time()
            rows = c.execute(
                "WITH pick AS MATERIALIZED (SELECT id FROM outbox WHERE next_at<=%s"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " UPDATE outbox o SET next_at=%s FROM pick WHERE o.id=pick.id"
                " RETURNING o.id, o.rcpt, o.content, o.attempts",
                (now, limit, now + EVENT_LEASE)).fetchall()
            out = [(r["id"], OutMail(dec(r["rcpt"]), bytes(r["content"])), r["attempts"]) for r in rows]
            return sorted(out, key=lambda t: t[0])

        return list(self._run(fn))

    def outbox_done(self, mail_id: int) -> None:
        self._run(lambda c: c.execute("DELETE FROM outbox WHERE id=%s", (mail_id,)))

    def outbox_retry(self, mail_id: int, error: str, delay: float) -> None:
        self._run(lambda c: c.execute(
            "UPDATE outbox SET attempts=attempts+1, last_error=%s, next_at=%s WHERE id=%s",
            (enc(error), time.time() + delay, mail_id)))

    def prune_message_keys(self, limit: int = 5000) -> int:
        return int(self._run(lambda c: c.execute(
            "WITH pick AS MATERIALIZED (SELECT key FROM messages WHERE expires_at<=%s"
            " ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED)"
            " DELETE FROM messages m USING pick WHERE m.key=pick.key", (time.time(), limit)).rowcount))

    def finished_by_prefix(self, since: float, digits: int) -> dict[str, tuple[int, int]]:
        rows = self._read("SELECT substr(recipient, 1, %s) AS p, count(*) AS n,"
                          " sum(CASE WHEN state IN ('failed','expired') THEN 1 ELSE 0 END) AS bad FROM jobs"
                          " WHERE done_at IS NOT NULL AND done_at>=%s GROUP BY p", (digits + 1, since))
        return {r["p"]: (int(r["n"]), int(r["bad"])) for r in rows}
