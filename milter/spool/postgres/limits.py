"""Limit counters in the milter's commit transaction on PostgreSQL (the SQLite spool's rules).

Each account's usage is read once per transaction (under the account's advisory lock taken
by the commit, so two milters count exactly), kept up to date in memory as the batch's
messages are decided, and the batch's counts are written with one statement per table at
the end of the batch (`Tally`), not per message.
"""

from __future__ import annotations

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
from .core import Core
from .db import Conn


def key_ttl(key: str, default: float) -> float:
    """A dedupe key may carry its own lifetime: `<seconds>:<hash>`."""
    head, sep, _ = key.partition(":")
    return float(head) if sep and head.isdigit() else default


class Tally:
    """Counts decided in this transaction and not written yet."""

    __slots__ = ("slots", "periods", "dedupe")

    def __init__(self) -> None:
        self.slots: dict[tuple[str, str, int, int], int] = {}
        self.periods: dict[tuple[str, str], int] = {}
        self.dedupe: dict[str, tuple[int, float]] = {}  # key -> (job id, expires_at)

    def rcpt_slots(self, account: str, number: str) -> dict[int, int]:
        return {k[3]: n for k, n in self.slots.items() if k[0] == account and k[1] == number}


class Usage:
    """One account's counters as read in this transaction, plus what it counted since."""

    __slots__ = ("account", "short", "long", "month", "recipients")

    def __init__(self, account: str):
        self.account = account
        self.short: dict[int, int] = {}
        self.long: dict[int, int] = {}
        self.month = 0
        self.recipients: dict[str, dict[int, int]] = {}

    def fetch(self, c: Conn, numbers: list[str], now: float, tally: Tally) -> None:
        """Read the per-number slots of `numbers` not read yet (and add the unwritten counts)."""
        if not numbers:
            return
        for n in numbers:
            self.recipients[n] = tally.rcpt_slots(self.account, n)
        for r in c.execute("SELECT scope, slot, parts FROM limit_slots WHERE account=%s AND width=%s"
                           " AND slot>%s AND scope = ANY(%s)",
                           (self.account, SLOT_RCPT, now - 3600 - SLOT_RCPT, numbers)):
            d = self.recipients[r["scope"]]
            d[r["slot"]] = d.get(r["slot"], 0) + r["parts"]

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


class LimitSide(Core):
    def _limits_check(self, c: Conn, r: AddRequest, plan: LimitPlan, now: float, cache: dict[str, Usage],
                      tally: Tally) -> tuple[AddResult | None, list[NewJob], list[str]]:
        """Drop jobs identical to one committed within plan.dedupe_ttl, then ask plan.decide per
        account: (result instead of committing or None, the jobs to write, their dedupe keys)."""
        jobs = r.jobs
        keys = list(plan.dedupe_keys)
        if keys and len(keys) == len(jobs):
            wanted = [k for k in keys if k]
            seen = {k: v[0] for k, v in tally.dedupe.items() if k in wanted}
            if wanted:
                for row in c.execute("SELECT key, job_id FROM limit_dedupe WHERE expires_at>%s"
                                     " AND key = ANY(%s)", (now, wanted)):
                    seen.setdefault(row["key"], int(row["job_id"]))
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
                    usage = cache[account] = self._limit_usage(c, account, now, tally)
                usage.fetch(c, [n for n in per if n not in usage.recipients], now, tally)
                refused = plan.decide(account, usage.view(now), parts, per)
                if refused is not None:
                    return AddResult((), False, refused=refused), [], []
        return None, jobs, keys

    @staticmethod
    def _limit_usage(c: Conn, account: str, now: float, tally: Tally) -> Usage:
        q = ("SELECT slot, parts FROM limit_slots WHERE account=%s AND scope='' AND width=%s AND slot>%s"
             " ORDER BY slot")
        u = Usage(account)
        for d, width, span in ((u.short, SLOT_SHORT, 3600), (u.long, SLOT_LONG, 86400)):
            d.update((r["slot"], r["parts"]) for r in c.execute(q, (account, width, now - span - width)))
            for k, n in tally.slots.items():  # counted earlier in this batch, not written yet
                if k[0] == account and k[1] == "" and k[2] == width:
                    d[k[3]] = d.get(k[3], 0) + n
        month = time.strftime("%Y-%m", time.gmtime(now))
        row = c.execute("SELECT parts FROM limit_periods WHERE account=%s AND period=%s",
                        (account, month)).fetchone()
        u.month = (int(row["parts"]) if row else 0) + tally.periods.get((account, month), 0)
        return u

    @staticmethod
    def _limits_note(jobs: list[NewJob], ids: tuple[int, ...], keys: list[str], plan: LimitPlan, now: float,
                     cache: dict[str, Usage], tally: Tally) -> None:
        """Count the committed jobs (in memory: the usage of this batch, and the tally to write)."""
        gm = time.gmtime(now)
        month, day = time.strftime("%Y-%m", gm), time.strftime("%Y-%m-%d", gm)
        for j in jobs:
            cached = cache.get(j.account)
            if cached is not None:
                cached.add(j.recipient, j.parts, now)
            for k in ((j.account, "", SLOT_SHORT, int(now // SLOT_SHORT) * SLOT_SHORT),
                      (j.account, "", SLOT_LONG, int(now // SLOT_LONG) * SLOT_LONG),
                      (j.account, j.recipient, SLOT_RCPT, int(now // SLOT_RCPT) * SLOT_RCPT)):
                tally.slots[k] = tally.slots.get(k, 0) + j.parts
            for k2 in ((j.account, month), (j.account, day)):
                tally.periods[k2] = tally.periods.get(k2, 0) + j.parts
        for dk, i in zip(keys, ids, strict=True) if keys else ():
            if dk:
                tally.dedupe[dk] = (i, now + key_ttl(dk, plan.dedupe_ttl))

    @staticmethod
    def tally_clear(tally: Tally) -> None:
        tally.slots.clear()
        tally.periods.clear()
        tally.dedupe.clear()

    def _limits_write(self, c: Conn, tally: Tally, now: float) -> None:
        """Write the tally (one statement per table) and clear it."""
        with c.cursor() as cur:
            if tally.slots:
                cur.executemany("INSERT INTO limit_slots(account, scope, width, slot, parts)"
                                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (account, scope, width, slot) DO UPDATE"
                                " SET parts=limit_slots.parts+excluded.parts",
                                [(*k, p) for k, p in sorted(tally.slots.items())])
            if tally.periods:
                cur.executemany("INSERT INTO limit_periods(account, period, parts) VALUES (%s,%s,%s)"
                                " ON CONFLICT (account, period) DO UPDATE"
                                " SET parts=limit_periods.parts+excluded.parts",
                                [(*k, p) for k, p in sorted(tally.periods.items())])
            if tally.dedupe:
                cur.executemany("INSERT INTO limit_dedupe(key, job_id, expires_at) VALUES (%s,%s,%s)"
                                " ON CONFLICT (key) DO UPDATE SET job_id=excluded.job_id,"
                                " expires_at=excluded.expires_at",
                                [(k, i, e) for k, (i, e) in sorted(tally.dedupe.items())])
        if (tally.slots or tally.dedupe) and now - self._limits_pruned_at > 60:
            self._limits_pruned_at = now
            c.execute("DELETE FROM limit_slots WHERE slot<%s", (now - 86400 - 2 * SLOT_LONG,))
            c.execute("DELETE FROM limit_dedupe WHERE expires_at<%s", (now,))
        self.tally_clear(tally)

    def account_usage(self, now: float | None = None) -> list[AccountUsage]:
        gm = time.gmtime(time.time() if now is None else now)
        month, day = time.strftime("%Y-%m", gm), time.strftime("%Y-%m-%d", gm)
        rows = self._read("SELECT account, sum(CASE WHEN period=%s THEN parts ELSE 0 END) AS today,"
                          " sum(CASE WHEN period=%s THEN parts ELSE 0 END) AS month FROM limit_periods"
                          " WHERE period IN (%s, %s) GROUP BY account ORDER BY account",
                          (day, month, day, month))
        return [AccountUsage(r["account"], int(r["today"]), int(r["month"])) for r in rows]
