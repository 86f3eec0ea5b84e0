"""The milter's side of the PostgreSQL spool: group commits.

Every message that ended in one turn of the milter's event loop goes into one transaction
(one WAL flush with `synchronous_commit=on` for many SMTP sessions), with its idempotency
key, its xml@ reply mails and its limit counters; each session gets its 250 only after
that COMMIT returned. Several milters share one database: before reading keys and counters
the transaction takes advisory locks on the batch's keys, dedupe keys and accounts (sorted,
in one statement: no deadlock between milters), so a resend through another MX host is one
message and limits count exactly. The locks are waited for at most LOCK_WAIT_MS: the event loop
is never stalled by another milter; try_commit then answers False and the loop retries.
At most one NOTIFY per batch wakes the dispatchers (NOTIFY serialises commits on a lock).
"""

from __future__ import annotations

import json
import time

import psycopg
from psycopg import errors as pgerr

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
from .core import CHANNEL, log
from .db import Conn, enc, enc_opt
from .limits import LimitSide, Tally, Usage

# A lock held by another milter's commit (or an operator's LOCK TABLE): give the loop back
# after this. Each try blocks the event loop this long and the loop retries every 2-50 ms, so
# with 50 ms an unrelated SMTP session waited ~0.2 s while the spool stayed locked (the
# locked-spool test of test_loop_hardening.py); 10 ms is a few commits' WAL flushes.
LOCK_WAIT_MS = 10
# Simple-protocol strings (one round trip each): the transaction's start, and its end with the wake-up.
BEGIN = f"BEGIN; SET LOCAL lock_timeout = {LOCK_WAIT_MS}"
NOTIFY_COMMIT = f"SELECT pg_notify('{CHANNEL}', ''); COMMIT"
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError, UnicodeError, ValueError, TypeError, OverflowError)


class _Isolate(Exception):
    """A message's values failed in a batch written without savepoints: write it again with them."""


class CommitSide(LimitSide):
    _notify = False  # the batch being committed added work: NOTIFY with its COMMIT
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
                    c.execute(BEGIN, prepare=False)
                except psycopg.Error as e:
                    # Nothing was sent yet: a connection found dead (the server restarted, a
                    # failover) is replaced once before the messages get their 451.
                    self.db.drop()
                    try:
                        c = self.db.conn()
                        c.execute(BEGIN, prepare=False)
                    except (psycopg.Error, SpoolError):
                        self.db.drop()
                        return _fail_all(batch, self.db.error("spool unavailable", e))
                try:
                    results = self._insert_batch(c, batch, isolate)
                    # the NOTIFY (at most one per batch) travels with the COMMIT: one round trip
                    c.execute(NOTIFY_COMMIT if self._notify else "COMMIT", prepare=False)
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
        """Decide each message (keys, limits) in order, then write the batch with a few statements:
        all jobs in one INSERT, the keys, mails and counters in one pipelined round each. With
        `isolate` (a message's values failed), each message is written at once in a savepoint."""
        now = self.clock()
        usage: dict[str, Usage] = {}
        tally = Tally()
        self._lock_batch(c, batch)
        keys = list({r.key for r in batch if r.key is not None})
        known: dict[str, AddResult] = {}
        if keys:
            for row in c.execute("SELECT key, job_ids FROM messages WHERE expires_at>%s AND key = ANY(%s)",
                                 (now, keys)):
                known[row["key"]] = AddResult(tuple(int(i) for i in row["job_ids"]), True)
        out: list[AddResult | SpoolError | None] = []
        todo: list[tuple[int, AddRequest, list[NewJob], list[str]]] = []  # written below (not isolate)
        pending: dict[str, int] = {}  # key -> index in out of the message that writes it
        placeholder = 0
        for r in batch:
            if r.key is not None and r.key in known:
                out.append(known[r.key])
                continue
            if r.key is not None and r.key in pending:
                out.append(None)  # the same message twice in this batch: answered with the first's ids
                todo.append((len(out) - 1, r, [], []))
                continue
            jobs, dedupe_keys = r.jobs, list[str]()
            if r.limits is not None:
                stop, jobs, dedupe_keys = self._limits_check(c, r, r.limits, now, usage, tally)
                if stop is not None:
                    out.append(stop)
                    continue
            if not isolate:
                if r.limits is not None:  # counted now (in memory) so the next message sees it;
                    # its jobs' ids are placeholders (-1, -2, ...) until the INSERT below
                    marks = tuple(range(-placeholder - 1, -placeholder - 1 - len(jobs), -1))
                    placeholder += len(jobs)
                    self._limits_note(jobs, marks, dedupe_keys, r.limits, now, usage, tally)
                out.append(None)
                todo.append((len(out) - 1, r, jobs, dedupe_keys))
                if r.key is not None:
                    pending[r.key] = len(out) - 1
                continue
            c.execute("SAVEPOINT msg")
            try:
                ids = self._insert_jobs(c, jobs, now)
                self._write_extras(c, [(r, ids)], now)
                if r.limits is not None:
                    self._limits_note(jobs, ids, dedupe_keys, r.limits, now, usage, tally)
                    self._limits_write(c, tally, now)
            except _DATA_ERRORS as e:
                c.execute("ROLLBACK TO SAVEPOINT msg")
                c.execute("RELEASE SAVEPOINT msg")
                self.tally_clear(tally)
                out.append(SpoolDataError(unstorable(r, e)))
                continue
            c.execute("RELEASE SAVEPOINT msg")
            if r.key is not None:
                known[r.key] = AddResult(ids, True)
            out.append(AddResult(ids, False))
        if todo:
            try:
                self._write_batch(c, todo, out, pending, now, tally)
            except _DATA_ERRORS as e:
                raise _Isolate() from e
        # delivered at COMMIT, once per batch
        self._notify = any(isinstance(o, AddResult) and not o.duplicate and o.refused is None for o in out)
        return [o if o is not None else SpoolError("not written") for o in out]

    def _write_batch(self, c: Conn, todo: list[tuple[int, AddRequest, list[NewJob], list[str]]],
                     out: list[AddResult | SpoolError | None], pending: dict[str, int], now: float,
                     tally: Tally) -> None:
        firsts = [(i, r, jobs, dk) for i, r, jobs, dk in todo if r.key is None or pending.get(r.key) == i]
        all_ids = self._insert_jobs(c, [j for _, _, jobs, _ in firsts for j in jobs], now)
        at = 0
        written: list[tuple[AddRequest, tuple[int, ...]]] = []
        for i, r, jobs, _ in firsts:
            ids = all_ids[at:at + len(jobs)]
            at += len(jobs)
            out[i] = AddResult(ids, False)
            written.append((r, ids))
        # The placeholder ids of the jobs counted by limits (-1, -2, ... in order) -> their ids.
        noted = [jid for (_, r, _, _), (_, ids) in zip(firsts, written, strict=True) if r.limits is not None
                 for jid in ids]
        real = {-(n + 1): jid for n, jid in enumerate(noted)}
        for k, (jid, exp) in list(tally.dedupe.items()):
            tally.dedupe[k] = (real.get(jid, jid), exp)
        for i, o in enumerate(out):
            if isinstance(o, AddResult) and any(x < 0 for x in o.job_ids):  # a dedupe hit on this batch
                out[i] = AddResult(tuple(dict.fromkeys(real.get(x, x) for x in o.job_ids)), o.duplicate,
                                   o.refused)
        for i, r, _, _ in todo:
            if out[i] is None and r.key is not None:  # the repeat of a message of this batch
                first = out[pending[r.key]]
                assert isinstance(first, AddResult)
                out[i] = AddResult(first.job_ids, True)
        self._write_extras(c, written, now)
        self._limits_write(c, tally, now)

    @staticmethod
    def _write_extras(c: Conn, written: list[tuple[AddRequest, tuple[int, ...]]], now: float) -> None:
        """The messages' idempotency keys and reply mails (one pipelined round each)."""
        with c.cursor() as cur:
            mails = [(enc(m.rcpt), m.content, now, now) for r, _ in written for m in r.mails]
            if mails:
                cur.executemany("INSERT INTO outbox(rcpt, content, created_at, next_at) VALUES (%s,%s,%s,%s)",
                                mails)
            msgs = [(r.key, list(ids), now + r.key_ttl) for r, ids in written if r.key is not None]
            if msgs:
                cur.executemany("INSERT INTO messages(key, job_ids, expires_at) VALUES (%s,%s,%s)"
                                " ON CONFLICT (key) DO UPDATE SET job_ids=excluded.job_ids,"
                                " expires_at=excluded.expires_at", msgs)

    def _insert_jobs(self, c: Conn, jobs: list[NewJob], now: float) -> tuple[int, ...]:
        rows = []
        for j in jobs:
            not_before = j.not_before if j.not_before is not None else now
            expires = j.expires_at if j.expires_at is not None else max(now, not_before) + self.validity
            rows.append((enc(j.recipient), enc(j.originator), enc(j.text), j.parts, enc(j.account),
                         enc(j.device), enc(j.sender), enc(j.subject), enc(j.message_id), enc(j.notify),
                         enc(j.queue_id), enc_opt(j.trans_ref), bool(j.flash),
                         json.dumps(j.urls) if j.urls else "{}",
                         bool(j.not_before is not None and j.not_before > now), now, not_before, expires,
                         j.channel, j.language, files_to_json(j.files)))
        if not rows:
            return ()
        blobs = {f.sha256: f.data for j in jobs for f in j.files if f.data is not None}
        if blobs:  # voice/fax files: in the same transaction as the jobs that name them
            with c.cursor() as cur:
                cur.executemany("INSERT INTO file_blobs(sha256, data) VALUES (%s,%s) ON CONFLICT DO NOTHING",
                                list(blobs.items()))
        cols = ("recipient, originator, text, parts, account, device, sender, subject, message_id, notify,"
                " queue_id, trans_ref, flash, urls, deferred, created_at, not_before, expires_at, channel,"
                " language, files")
        if len(rows) == 1:
            row = c.execute(f"INSERT INTO jobs({cols}) VALUES ({','.join(['%s'] * 21)}) RETURNING id",
                            rows[0]).fetchone()
            assert row is not None
            return (int(row["id"]),)
        # Several jobs: one statement; ids in the order given (WITH ORDINALITY keeps it).
        arrays = [list(col) for col in zip(*rows, strict=True)]
        types = ("text", "text", "text", "int", "text", "text", "text", "text", "text", "text", "text",
                 "text", "bool", "text", "bool", "float8", "float8", "float8", "text", "text", "text")
        unn = ", ".join(f"%s::{t}[]" for t in types)
        got = c.execute(f"INSERT INTO jobs({cols}) SELECT {cols} FROM unnest({unn}) WITH ORDINALITY"
                        f" AS u({cols}, n) ORDER BY n RETURNING id", arrays).fetchall()
        return tuple(sorted(int(r["id"]) for r in got))

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
