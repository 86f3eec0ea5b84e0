"""The SQLite spool's receipt side: parts stored as submitted, delivery receipts matched to
them (lifecycle decides which part and what the job becomes), orphan receipts."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable

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
from .store import Store


class ReceiptSide(Store):
    def mark_submitted_many(self, items: list[Submitted]) -> list[AppliedOrphan]:
        """mark_submitted for many jobs in one transaction (the dispatcher's hot path): the jobs
        become `submitted`, their parts get their message ids, and every orphan receipt for one
        of those ids (it came before this) is applied and deleted, all in this transaction."""
        if not items:
            return []
        return self._run(lambda db: self._mark_submitted(db, items, time.time()))

    def store_round(self, submitted: list[Submitted], receipts: list[tuple[str, ...]],
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

    def _mark_submitted(self, db: sqlite3.Connection, items: list[Submitted],
                        now: float) -> list[AppliedOrphan]:
        db.executemany(
            "UPDATE jobs SET state='submitted', submitted_at=?, lease_owner=NULL, lease_until=NULL,"
            " last_error='', query_at=NULL, provider=nullif(?, '') WHERE id=? AND state='queued'",
            [(now, it[2] if len(it) > 2 else "", it[0]) for it in items])
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
            if j is None or not lifecycle.receipt_matches(src, j[6], provider, part_provider):
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
                    key = lifecycle.receipt_rank(final, rank, j[7], jid, seq)
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
            new = lifecycle.job_state(job[0], job[1], job[2].values())
            if not lifecycle.may_become(job[0], new):
                out.append(ReceiptOutcome(job_id, job[0], False))
                continue
            # What _set_final does, for the whole batch at once (written below).
            job[0] = new
            f = finals.setdefault(job_id, [new, None, None])
            f[0] = new
            if error:
                f[1] = error
            f[2] = lifecycle.done_at(new, now) or f[2]
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
