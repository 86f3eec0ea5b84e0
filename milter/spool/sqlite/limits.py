"""The SQLite spool's limit counters (abuse control), checked and counted inside the commit
transaction, and what `stats` and the circuit breaker read of them."""

from __future__ import annotations

import json
import sqlite3
import time

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
)
from .store import Store


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


class LimitSide(Store):
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
