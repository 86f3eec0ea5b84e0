"""Delivery receipts on the PostgreSQL spool: parts stored with their message ids, receipts
applied to them, orphan receipts (a receipt that came before its part was stored).

Several dispatchers may store parts and receipts of one job at once: the jobs a batch of
receipts touches are locked (FOR UPDATE, in id order) before their parts are read, and a
part stored and an orphan receipt for it serialise on an advisory lock per message id, so
a receipt is never left an orphan beside its part. The matching rules are the SQLite
spool's (by id in any reading AND by handset number; stale ones change nothing).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from .. import lifecycle
from ..base import (
    FINAL_STATES,
    ORPHAN_MAX_AGE,
    AppliedOrphan,
    OrphanReceipt,
    ReceiptOutcome,
    Submitted,
    normalize_ref,
    refs_for_lookup,
)
from ..lifecycle import number_key
from .core import PLAN_BY_INDEX, Core, events_for
from .db import Conn, dec, enc


def _lock_refs(c: Conn, refs: Iterable[str]) -> None:
    names = sorted({"r:" + r for r in refs})
    if names:
        c.execute("SELECT count(pg_advisory_xact_lock(hashtextextended(n, 0)))"
                      " FROM unnest(%s::text[]) AS n", (names,))


class ReceiptSide(Core):
    def mark_submitted(self, job_id: int, owner: str, refs: list[str]) -> list[AppliedOrphan]:
        return self.mark_submitted_many([(job_id, refs)])

    def mark_submitted_many(self, items: list[Submitted]) -> list[AppliedOrphan]:
        if not items:
            return []
        def fn(c: Conn) -> list[AppliedOrphan]:
            c.execute(PLAN_BY_INDEX)
            return self._mark_submitted(c, items, time.time())

        return list(self._run(fn))

    def store_round(self, submitted: list[Submitted], receipts: list[tuple[str, ...]],
                    ) -> tuple[list[AppliedOrphan], list[ReceiptOutcome | None]]:
        if not submitted and not receipts:
            return [], []

        def fn(c: Conn) -> tuple[list[AppliedOrphan], list[ReceiptOutcome | None]]:
            now = time.time()
            c.execute(PLAN_BY_INDEX)
            applied = self._mark_submitted(c, submitted, now) if submitted else []
            return applied, (self._apply_receipts(c, receipts, now) if receipts else [])

        return self._run(fn)

    def _mark_submitted(self, c: Conn, items: list[Submitted], now: float) -> list[AppliedOrphan]:
        refs = [(it[0], i, normalize_ref(r), enc(r), it[2] if len(it) > 2 else "")
                for it in items for i, r in enumerate(it[1])]
        _lock_refs(c, {f for r in refs for f in refs_for_lookup(r[2])})
        # One statement each (arrays), not one per job: the dispatcher's hot path.
        by_provider: dict[str, list[int]] = {}
        for it in items:
            by_provider.setdefault(it[2] if len(it) > 2 else "", []).append(it[0])
        for provider, ids in sorted(by_provider.items()):
            c.execute("UPDATE jobs SET state='submitted', submitted_at=%s, lease_owner=NULL,"
                      " lease_until=NULL, last_error='', query_at=NULL, provider=nullif(%s, '')"
                      " WHERE id = ANY(%s) AND state='queued'", (now, provider, sorted(ids)))
        last = {(r[0], r[1]): r for r in refs}  # a job given twice: its last parts win
        cols = [list(col) for col in zip(*last.values(), strict=True)] if last else [[], [], [], [], []]
        c.execute("INSERT INTO parts(job_id, seq, ref, state, wire_ref, provider)"
                  " SELECT j, s, r, 'submitted', w, p FROM unnest(%s::bigint[], %s::int[], %s::text[],"
                  " %s::text[], %s::text[]) AS u(j, s, r, w, p)"
                  " ON CONFLICT (job_id, seq) DO UPDATE SET ref=excluded.ref, state='submitted',"
                  " wire_ref=excluded.wire_ref, provider=excluded.provider", cols)
        return self._apply_orphans(c, [r[2] for r in refs], now)

    def _apply_orphans(self, c: Conn, refs: list[str], now: float) -> list[AppliedOrphan]:
        forms = list({f for r in refs for f in refs_for_lookup(r)})
        rows = c.execute("SELECT id, ref, part_state, error, at, source, provider FROM orphan_receipts"
                         " WHERE ref = ANY(%s) ORDER BY id FOR UPDATE", (forms,)).fetchall()
        if not rows:
            return []
        outcomes = self._apply_receipts(
            c, [(r["ref"], r["part_state"], dec(r["error"]), dec(r["source"]), r["provider"]) for r in rows],
            now, keep_orphans=False)
        gone = [r["id"] for r, o in zip(rows, outcomes, strict=True) if o is not None]
        if gone:
            c.execute("DELETE FROM orphan_receipts WHERE id = ANY(%s)", (gone,))
        return [AppliedOrphan(OrphanReceipt(r["ref"], r["part_state"], dec(r["error"]), r["at"],
                                            dec(r["source"])), o)
                for r, o in zip(rows, outcomes, strict=True) if o is not None]

    def record_receipt(self, ref: str, part_state: str, error: str = "") -> ReceiptOutcome | None:
        return self.record_receipts([(ref, part_state, error)])[0]

    def record_receipts(self, items: list[tuple[str, ...]]) -> list[ReceiptOutcome | None]:
        if not items:
            return []
        def fn(c: Conn) -> list[ReceiptOutcome | None]:
            c.execute(PLAN_BY_INDEX)
            return self._apply_receipts(c, items, time.time())

        return list(self._run(fn))

    def _apply_receipts(self, c: Conn, items: list[tuple[str, ...]], now: float,
                        keep_orphans: bool = True) -> list[ReceiptOutcome | None]:
        """Apply receipts in order (the SQLite spool's rules; see its _apply_receipts)."""
        cands: dict[str, list[tuple[int, int, str]]] = {}  # ref -> (job id, seq, provider)
        # id -> [state, parts, {seq: state}, notify, sender, urls, number digits, submitted_at]
        jobs: dict[int, list[Any]] = {}

        def find(forms: Iterable[str]) -> None:
            wanted = [f for f in forms if f not in cands]
            for f in wanted:
                cands[f] = []
            if not wanted:
                return
            for r in c.execute("SELECT ref, job_id, seq, provider FROM parts WHERE ref = ANY(%s)", (wanted,)):
                cands[r["ref"]].append((r["job_id"], r["seq"], r["provider"]))
            ids = sorted({h[0] for f in wanted for h in cands[f]} - jobs.keys())
            if not ids:
                return
            for r in c.execute("SELECT id, state, parts, notify, sender, urls, recipient, submitted_at"
                               " FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,)):
                jobs[r["id"]] = [r["state"], r["parts"], {}, r["notify"], r["sender"], r["urls"],
                                 number_key(dec(r["recipient"])), r["submitted_at"] or 0.0]
            for r in c.execute("SELECT job_id, seq, state FROM parts WHERE job_id = ANY(%s)", (ids,)):
                if r["job_id"] in jobs:
                    jobs[r["job_id"]][2][r["seq"]] = r["state"]

        def usable(jid: int, part_provider: str, src: str, provider: str) -> list[Any] | None:
            j = jobs.get(jid)
            if j is None or not lifecycle.receipt_matches(src, j[6], provider, part_provider):
                return None
            return j

        lookups = [refs_for_lookup(normalize_ref(it[0])) for it in items]
        if keep_orphans:  # a part for one of these ids being stored right now is waited for
            _lock_refs(c, {forms[0] for forms in lookups})
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
        finals: dict[int, list[Any]] = {}
        events: list[tuple[int, str, str, float, float]] = []
        for item, forms in zip(items, lookups, strict=True):
            part_state, error = item[1], item[2]
            source = item[3] if len(item) > 3 else ""
            provider = item[4] if len(item) > 4 else ""
            src = number_key(source or "")
            best: tuple[Any, ...] | None = None
            for rank, form in enumerate(forms):
                for jid, seq, part_provider in cands.get(form, ()):
                    j = usable(jid, part_provider, src, provider)
                    if j is None:
                        continue
                    final = j[2].get(seq) in FINAL_STATES or j[0] in FINAL_STATES
                    key = lifecycle.receipt_rank(final, rank, j[7], jid, seq)
                    if best is None or key < best:
                        best = key
            if best is None:
                orphans.append((forms[0], part_state, enc(error), now, enc(source or ""), provider or ""))
                out.append(None)
                continue
            job_id, seq = -best[3], best[4]
            job = jobs[job_id]
            if best[0]:
                out.append(ReceiptOutcome(job_id, job[0], False, stale=True))
                continue
            job[2][seq] = touched[(job_id, seq)] = part_state
            new = lifecycle.job_state(job[0], job[1], job[2].values())
            if not lifecycle.may_become(job[0], new):
                out.append(ReceiptOutcome(job_id, job[0], False))
                continue
            job[0] = new
            f = finals.setdefault(job_id, [new, None, None])
            f[0] = new
            if error:
                f[1] = enc(error)
            f[2] = lifecycle.done_at(new, now) or f[2]
            owed = events_for(job_id, new, job[3], job[4], job[5], now)
            events += owed
            out.append(ReceiptOutcome(job_id, new, True, bool(owed)))
        if touched:  # one statement for all (arrays): the receipts of a round in a few round trips
            t = sorted(touched.items())
            c.execute("UPDATE parts SET state=u.st FROM unnest(%s::bigint[], %s::int[], %s::text[])"
                      " AS u(j, s, st) WHERE parts.job_id=u.j AND parts.seq=u.s",
                      ([k[0] for k, _ in t], [k[1] for k, _ in t], [st for _, st in t]))
        if finals:
            f = sorted(finals.items())
            c.execute("UPDATE jobs SET state=u.st, last_error=coalesce(u.err, jobs.last_error),"
                      " done_at=coalesce(u.done, jobs.done_at), lease_owner=NULL, lease_until=NULL"
                      " FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::float8[])"
                      " AS u(j, st, err, done)"
                      " WHERE jobs.id=u.j",
                      ([j for j, _ in f], [v[0] for _, v in f], [v[1] for _, v in f], [v[2] for _, v in f]))
        with c.cursor() as cur:
            if events:
                cur.executemany("INSERT INTO events(job_id, kind, status, at, next_at)"
                                " VALUES (%s,%s,%s,%s,%s)",
                                events)
            if orphans and keep_orphans:
                cur.executemany("INSERT INTO orphan_receipts(ref, part_state, error, at, source, provider)"
                                " VALUES (%s,%s,%s,%s,%s,%s)", orphans)
        return out

    def prune_orphans(self, max_age: float = ORPHAN_MAX_AGE, limit: int = 1000) -> list[OrphanReceipt]:
        def fn(c: Conn) -> list[OrphanReceipt]:
            rows = c.execute(
                "WITH pick AS MATERIALIZED (SELECT id FROM orphan_receipts WHERE at<%s"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                " DELETE FROM orphan_receipts o USING pick WHERE o.id=pick.id"
                " RETURNING o.id, o.ref, o.part_state, o.error, o.at, o.source",
                (time.time() - max_age, limit)).fetchall()
            rows.sort(key=lambda r: r["id"])
            return [OrphanReceipt(r["ref"], r["part_state"], dec(r["error"]), r["at"], dec(r["source"]))
                    for r in rows]

        return self._run(fn)

    def orphan_count(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM orphan_receipts")[0]["n"])
