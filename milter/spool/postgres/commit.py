"""The milter's side of the PostgreSQL spool: group commits.

Every message that ended in one turn of the milter's event loop goes into one transaction
(one WAL flush with `synchronous_commit=on` for many SMTP sessions), with its idempotency
key, its xml@ reply mails and its limit counters; each session gets its 250 only after
that COMMIT returned. Several milters share one database: before reading keys and counters
the transaction takes advisory locks on the batch's keys, dedupe keys and accounts (sorted,
in one statement: no deadlock between milters), so a resend through another MX host is one
message and limits count exactly. The locks are waited for at most LOCK_WAIT: the event loop
is never stalled by another milter; try_commit then answers False and the loop retries.
At most one NOTIFY per batch wakes the dispatchers (NOTIFY serialises commits on a lock).
"""

from __future__ import annotations

import json
import time

import psycopg
from psycopg import errors as pgerr

from ..base import (
    SLOT_LONG,
    SLOT_RCPT,
    SLOT_SHORT,
    AccountUsage,
    AddRequest,
    AddResult,
    LimitPlan,
    LimitUsage,
    NewJob,
    OutMail,
    SpoolDataError,
    SpoolError,
)
from .core import CHANNEL, Core, log
from .db import Conn, enc, enc_opt

LOCK_WAIT_MS = 50  # a lock held by another milter's commit: give the loop back after this
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError, UnicodeError, ValueError, TypeError, OverflowError)


class _Isolate(Exception):
    """A message's values failed in a batch written without savepoints: write it again with them."""


def _key_ttl(key: str, default: float) -> float:
    head, sep, _ = key.partition(":")
    return float(head) if sep and head.isdigit() else default


class _Usage:
    """One account's counters as read in this commit transaction, kept up to date with what it counts."""

    __slots__ = ("account", "short", "long", "month", "recipients")

    def __init__(self, account: str):
        self.account = account
        self.short: dict[int, int] = {}
        self.long: dict[int, int] = {}
        self.month = 0
        self.recipients: dict[str, dict[int, int]] = {}

    def fetch(self, c: Conn, numbers: list[str], now: float) -> None:
        if not numbers:
            return
        for n in numbers:
            self.recipients[n] = {}
        for r in c.execute("SELECT scope, slot, parts FROM limit_slots WHERE account=%s AND width=%s"
                           " AND slot>%s AND scope = ANY(%s)",
                           (self.account, SLOT_RCPT, now - 3600 - SLOT_RCPT, numbers)):
            self.recipients[r["scope"]][r["slot"]] = r["parts"]

    def add(self, number: str, parts: int, now: float) -> None:
        for d, width in ((self.short, SLOT_SHORT), (self.long, SLOT_LONG)):
            k = int(now // width) * width
            d[k] = d.get(k, 0) + parts
        self.month += parts
        rd = self.recipients.get(number)
        if rd is not None:
            k = int(now // SLOT_RCPT) * SLOT_RCPT
            rd[k] = rd.get(k, 0) + parts

    def view(self, now: float) -> LimitUsage:
        return LimitUsage(now=now, short=tuple(sorted(self.short.items())),
                          long=tuple(sorted(self.long.items())), month=self.month,
                          recipients={n: tuple(sorted(v.items())) for n, v in self.recipients.items()})


class CommitSide(Core):
    def add_message(self, key: str | None, jobs: list[NewJob], key_ttl: float = 0.0,
                    mails: list[OutMail] | None = None, limits: LimitPlan | None = None) -> AddResult:
        req = AddRequest(key, jobs, key_ttl, mails or [], limits=limits)
        self.commit_now([req])
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def commit_now(self, batch: list[AddRequest]) -> None:
        """Commit in the calling thread, waiting for other milters' locks at most the busy timeout."""
        give_up = time.monotonic() + self.busy_timeout
        pause = 0.002
        while not self.try_commit(batch):
            if time.monotonic() >= give_up:
                err = SpoolError(f"spool {self.path}: locks stayed held by another milter for "
                                 f"{self.busy_timeout:g} s")
                for r in batch:
                    r.error = err
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def try_commit(self, batch: list[AddRequest]) -> bool:
        """One transaction for these messages; False at once (nothing written) if another
        milter holds a lock this batch needs. A broken or unreachable database fails every
        request with SpoolError (451): never a 250 without a COMMIT that returned."""
        with self.db.lock:
            try:
                c = self.db.conn()
            except SpoolError as e:
                return _fail_all(batch, e)
            results: list[AddResult | SpoolError] = []
            for isolate in (False, True):
                try:
                    c.execute("BEGIN")
                except psycopg.Error as e:
                    # Nothing was sent yet: a connection found dead (the server restarted, a
                    # failover) is replaced once before the messages get their 451.
                    self.db.drop()
                    try:
                        c = self.db.conn()
                        c.execute("BEGIN")
                    except (psycopg.Error, SpoolError):
                        self.db.drop()
                        return _fail_all(batch, self.db.error("spool unavailable", e))
                try:
                    c.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
                    results = self._insert_batch(c, batch, isolate)
                    c.execute("COMMIT")
                    break
                except Exception as e:
                    self.db.rollback(c)
                    if isinstance(e, _Isolate):
                        continue
                    if isinstance(e, pgerr.LockNotAvailable | pgerr.DeadlockDetected):
                        return False
                    if isinstance(e, SpoolError):
                        return _fail_all(batch, e)
                    if isinstance(e, psycopg.Error):
                        log.error("spool commit failed: %s", self.db.scrub(str(e).strip()))
                        return _fail_all(batch, self.db.error("spool write failed", e))
                    raise
        for r, res in zip(batch, results, strict=True):
            if isinstance(res, SpoolError):
                r.error = res
            else:
                r.result = res
        return True

    def _lock_batch(self, c: Conn, batch: list[AddRequest]) -> None:
        """Advisory locks on what two milters' commits may both touch: idempotency keys, dedupe
        keys and accounts with limits (held until COMMIT)."""
        names: set[str] = set()
        for r in batch:
            if r.key is not None:
                names.add("k:" + r.key)
            if r.limits is not None:
                names.update("d:" + k for k in r.limits.dedupe_keys if k)
                if r.limits.decide is not None:
                    names.update("a:" + j.account for j in r.jobs)
        if names:
            # in the order of the names (sorted here): every milter locks in one order
            c.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(n, 0)))"
                      " FROM unnest(%s::text[]) AS n",
                      (sorted(names),))

    def _insert_batch(self, c: Conn, batch: list[AddRequest], isolate: bool) -> list[AddResult | SpoolError]:
        now = self.clock()
        usage: dict[str, _Usage] = {}
        self._lock_batch(c, batch)
        keys = list({r.key for r in batch if r.key is not None})
        known: dict[str, AddResult] = {}
        if keys:
            for row in c.execute("SELECT key, job_ids FROM messages WHERE expires_at>%s AND key = ANY(%s)",
                                 (now, keys)):
                known[row["key"]] = AddResult(tuple(int(i) for i in row["job_ids"]), True)
        out: list[AddResult | SpoolError] = []
        added = False
        for r in batch:
            if r.key is not None and r.key in known:
                out.append(known[r.key])
                continue
            jobs, dedupe_keys = r.jobs, list[str]()
            if r.limits is not None:
                stop, jobs, dedupe_keys = self._limits_check(c, r, r.limits, now, usage)
                if stop is not None:
                    out.append(stop)
                    continue
            if isolate:
                c.execute("SAVEPOINT msg")
            try:
                ids = self._insert_jobs(c, jobs, now)
                if r.mails:
                    with c.cursor() as cur:
                        cur.executemany("INSERT INTO outbox(rcpt, content, created_at, next_at)"
                                        " VALUES (%s,%s,%s,%s)",
                                        [(enc(m.rcpt), m.content, now, now) for m in r.mails])
                if r.key is not None:
                    c.execute("INSERT INTO messages(key, job_ids, expires_at) VALUES (%s,%s,%s)"
                              " ON CONFLICT (key) DO UPDATE SET job_ids=excluded.job_ids,"
                              " expires_at=excluded.expires_at", (r.key, list(ids), now + r.key_ttl))
                if r.limits is not None:
                    self._limits_count(c, jobs, ids, dedupe_keys, r.limits, now, usage)
            except _DATA_ERRORS as e:
                if not isolate:
                    raise _Isolate() from e
                c.execute("ROLLBACK TO SAVEPOINT msg")
                c.execute("RELEASE SAVEPOINT msg")
                out.append(SpoolDataError(_unstorable(r, e)))
                continue
            if isolate:
                c.execute("RELEASE SAVEPOINT msg")
            added = added or bool(ids) or bool(r.mails)
            if r.key is not None:
                known[r.key] = AddResult(ids, True)
            out.append(AddResult(ids, False))
        if added:
            c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))  # delivered at COMMIT, once per batch
        return out

    def _insert_jobs(self, c: Conn, jobs: list[NewJob], now: float) -> tuple[int, ...]:
        rows = []
        for j in jobs:
            not_before = j.not_before if j.not_before is not None else now
            expires = j.expires_at if j.expires_at is not None else max(now, not_before) + self.validity
            rows.append((enc(j.recipient), enc(j.originator), enc(j.text), j.parts, enc(j.account),
                         enc(j.device), enc(j.sender), enc(j.subject), enc(j.message_id), enc(j.notify),
                         enc(j.queue_id), enc_opt(j.trans_ref), bool(j.flash),
                         json.dumps(j.urls) if j.urls else "{}",
                         bool(j.not_before is not None and j.not_before > now), now, not_before, expires))
        if not rows:
            return ()
        cols = ("recipient, originator, text, parts, account, device, sender, subject, message_id, notify,"
                " queue_id, trans_ref, flash, urls, deferred, created_at, not_before, expires_at")
        if len(rows) == 1:
            row = c.execute(f"INSERT INTO jobs({cols}) VALUES ({','.join(['%s'] * 18)}) RETURNING id",
                            rows[0]).fetchone()
            assert row is not None
            return (int(row["id"]),)
        # Several jobs: one statement; ids in the order given (WITH ORDINALITY keeps it).
        arrays = [list(col) for col in zip(*rows, strict=True)]
        types = ("text", "text", "text", "int", "text", "text", "text", "text", "text", "text", "text",
                 "text", "bool", "text", "bool", "float8", "float8", "float8")
        unn = ", ".join(f"%s::{t}[]" for t in types)
        got = c.execute(f"INSERT INTO jobs({cols}) SELECT {cols} FROM unnest({unn}) WITH ORDINALITY"
                        f" AS u({cols}, n) ORDER BY n RETURNING id", arrays).fetchall()
        return tuple(sorted(int(r["id"]) for r in got))

    # -- limits ---------------------------------------------------------------------------
    def _limits_check(self, c: Conn, r: AddRequest, plan: LimitPlan, now: float, cache: dict[str, _Usage],
                      ) -> tuple[AddResult | None, list[NewJob], list[str]]:
        jobs = r.jobs
        keys = list(plan.dedupe_keys)
        if keys and len(keys) == len(jobs):
            wanted = [k for k in keys if k]
            seen: dict[str, int] = {}
            if wanted:
                for row in c.execute("SELECT key, job_id FROM limit_dedupe WHERE expires_at>%s"
                                     " AND key = ANY(%s)", (now, wanted)):
                    seen[row["key"]] = int(row["job_id"])
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
                usage = cache.get(account)
                if usage is None:
                    usage = cache[account] = self._limit_usage(c, account, now)
                usage.fetch(c, [n for n in per if n not in usage.recipients], now)
                refused = plan.decide(account, usage.view(now), parts, per)
                if refused is not None:
                    return AddResult((), False, refused=refused), [], []
        return None, jobs, keys

    @staticmethod
    def _limit_usage(c: Conn, account: str, now: float) -> _Usage:
        q = ("SELECT slot, parts FROM limit_slots WHERE account=%s AND scope='' AND width=%s AND slot>%s"
             " ORDER BY slot")
        u = _Usage(account)
        for d, width, span in ((u.short, SLOT_SHORT, 3600), (u.long, SLOT_LONG, 86400)):
            d.update((r["slot"], r["parts"]) for r in c.execute(q, (account, width, now - span - width)))
        row = c.execute("SELECT parts FROM limit_periods WHERE account=%s AND period=%s",
                        (account, time.strftime("%Y-%m", time.gmtime(now)))).fetchone()
        u.month = int(row["parts"]) if row else 0
        return u

    def _limits_count(self, c: Conn, jobs: list[NewJob], ids: tuple[int, ...], keys: list[str],
                      plan: LimitPlan, now: float, cache: dict[str, _Usage]) -> None:
        slots: dict[tuple[str, str, int, int], int] = {}
        periods: dict[tuple[str, str], int] = {}
        gm = time.gmtime(now)
        month, day = time.strftime("%Y-%m", gm), time.strftime("%Y-%m-%d", gm)
        for j in jobs:
            cached = cache.get(j.account)
            if cached is not None:
                cached.add(j.recipient, j.parts, now)
            for k in ((j.account, "", SLOT_SHORT, int(now // SLOT_SHORT) * SLOT_SHORT),
                      (j.account, "", SLOT_LONG, int(now // SLOT_LONG) * SLOT_LONG),
                      (j.account, j.recipient, SLOT_RCPT, int(now // SLOT_RCPT) * SLOT_RCPT)):
                slots[k] = slots.get(k, 0) + j.parts
            for k2 in ((j.account, month), (j.account, day)):
                periods[k2] = periods.get(k2, 0) + j.parts
        with c.cursor() as cur:
            cur.executemany("INSERT INTO limit_slots(account, scope, width, slot, parts)"
                            " VALUES (%s,%s,%s,%s,%s)"
                            " ON CONFLICT (account, scope, width, slot) DO UPDATE"
                            " SET parts=limit_slots.parts+excluded.parts",
                            [(*k, p) for k, p in sorted(slots.items())])
            cur.executemany("INSERT INTO limit_periods(account, period, parts) VALUES (%s,%s,%s)"
                            " ON CONFLICT (account, period) DO UPDATE"
                            " SET parts=limit_periods.parts+excluded.parts",
                            [(*k, p) for k, p in sorted(periods.items())])
            if keys:
                cur.executemany("INSERT INTO limit_dedupe(key, job_id, expires_at) VALUES (%s,%s,%s)"
                                " ON CONFLICT (key) DO UPDATE SET job_id=excluded.job_id,"
                                " expires_at=excluded.expires_at",
                                [(k, i, now + _key_ttl(k, plan.dedupe_ttl))
                                 for k, i in zip(keys, ids, strict=True) if k])
        if now - self._limits_pruned_at > 60:
            self._limits_pruned_at = now
            c.execute("DELETE FROM limit_slots WHERE slot<%s", (now - 86400 - 2 * SLOT_LONG,))
            c.execute("DELETE FROM limit_dedupe WHERE expires_at<%s", (now,))

    def account_usage(self, now: float | None = None) -> list[AccountUsage]:
        gm = time.gmtime(time.time() if now is None else now)
        month, day = time.strftime("%Y-%m", gm), time.strftime("%Y-%m-%d", gm)
        rows = self._read("SELECT account, sum(CASE WHEN period=%s THEN parts ELSE 0 END) AS today,"
                          " sum(CASE WHEN period=%s THEN parts ELSE 0 END) AS month FROM limit_periods"
                          " WHERE period IN (%s, %s) GROUP BY account ORDER BY account",
                          (day, month, day, month))
        return [AccountUsage(r["account"], int(r["today"]), int(r["month"])) for r in rows]

    def add_jobs(self, jobs: list[NewJob]) -> list[int]:
        """Direct insert without grouping (tests, benchmarks, tools)."""
        now = time.time()

        def fn(c: Conn) -> list[int]:
            ids = list(self._insert_jobs(c, jobs, now))
            c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            return ids

        return self._run(fn)


def _fail_all(batch: list[AddRequest], err: SpoolError) -> bool:
    for r in batch:
        r.error = err
    return True


_FIELD_NAMES = {"message_id": "the Message-ID header", "subject": "the Subject header",
                "sender": "the envelope sender", "text": "the SMS text", "originator": "the originator",
                "queue_id": "the queue id", "recipient": "the recipient", "account": "the account name",
                "trans_ref": "the TransRefNumber", "device": "the device"}


def _unstorable(r: AddRequest, e: BaseException) -> str:
    """Name the value of this request the database refused (never the value itself)."""
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
