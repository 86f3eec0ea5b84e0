"""`sms-milter spool migrate --from FILE.sqlite3`: copy an SQLite spool into the PostgreSQL one.

The SQLite file is read in one read transaction (a consistent snapshot; the milter and the
dispatcher may keep running on it) and everything is written in one PostgreSQL transaction:
jobs in every state with their parts, idempotency keys, owed notifications, xml@ reply mails,
orphan receipts, dedupe keys and the limit counters. A job keeps its id when that id is free
in PostgreSQL (logs and `queue show` still match), else it gets a new one. What was copied is
recorded per source file (`imported`), so running it again copies only what is new (jobs
copied before are not updated; stop the old daemons before the last run); the counters are
copied once per source file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..base import SpoolError
from ..files import files_from_json
from ..sqlite.files import path_of
from .core import Core
from .db import Conn, enc, enc_opt

JOB_FIELDS = ("state", "recipient", "originator", "text", "parts", "account", "device", "sender", "subject",
              "message_id", "notify", "queue_id", "trans_ref", "flash", "urls", "deferred", "created_at",
              "not_before", "expires_at", "attempts", "last_error", "lease_owner", "lease_until",
              "submitted_at", "done_at", "query_at", "provider", "channel", "language", "files")
TABLES = ("jobs", "parts", "messages", "events", "outbox", "orphan_receipts", "limit_slots", "limit_periods",
          "limit_dedupe")
TEXT_FIELDS = {"recipient", "originator", "text", "account", "device", "sender", "subject", "message_id",
               "queue_id", "last_error"}


@dataclass
class Copied:
    jobs: dict[str, int] = field(default_factory=dict)  # state -> jobs copied
    already: int = 0  # jobs copied by an earlier run
    renumbered: int = 0  # jobs whose id was taken in PostgreSQL
    parts: int = 0
    keys: int = 0
    events: int = 0
    outbox: int = 0
    orphans: int = 0
    dedupe: int = 0
    counters: str = "copied"

    def lines(self, source: str, target: str) -> list[str]:
        total = sum(self.jobs.values())
        states = ", ".join(f"{s} {n}" for s, n in sorted(self.jobs.items())) or "none"
        return [f"copied {source} into {target}:",
                f"  jobs: {total} ({states}); {self.already} already there from an earlier run;"
                f" {self.renumbered} got a new id (their id was taken)",
                f"  parts: {self.parts}, idempotency keys: {self.keys}, notifications owed: {self.events},"
                f" reply mails: {self.outbox}, orphan receipts: {self.orphans}, dedupe keys: {self.dedupe}",
                f"  limit counters: {self.counters}"]


def _rows(db: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
        return []
    return [dict(r) for r in db.execute(f"SELECT * FROM {table}")]  # noqa: S608 (our table names)


def read_sqlite(path: str) -> dict[str, list[dict[str, Any]]]:
    if not os.path.isfile(path):
        raise SpoolError(f"{path}: no such SQLite spool file")
    try:
        db = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN")  # one snapshot of a spool that may be in use
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name='jobs'").fetchone():
                raise SpoolError(f"{path}: not an sms-milter spool (no jobs table)")
            out = {t: _rows(db, t) for t in TABLES}
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.Error as e:
        raise SpoolError(f"{path}: cannot read it as an SQLite spool: {e}") from None
    return out


class MigrateSide(Core):
    def import_sqlite(self, path: str) -> Copied:
        """Copy the SQLite spool at `path` into this spool (see the module's doc)."""
        src = read_sqlite(path)
        source = os.path.realpath(path)
        return self._run(lambda c: self._import(c, source, src))

    def _import(self, c: Conn, source: str, src: dict[str, list[dict[str, Any]]]) -> Copied:
        out = Copied()
        c.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("import:" + source,))
        done = {r["old_id"]: r["new_id"] for r in c.execute(
            "SELECT old_id, new_id FROM imported WHERE source=%s AND kind='job'", (source,))}
        jobs = [r for r in src["jobs"] if r["id"] not in done]
        out.already = len(src["jobs"]) - len(jobs)
        taken = {r["id"] for r in c.execute("SELECT id FROM jobs WHERE id = ANY(%s)",
                                            ([r["id"] for r in jobs],))}
        idmap = dict(done)
        for r in jobs:
            vals = [_value(k, r) for k in JOB_FIELDS]
            cols = ", ".join(JOB_FIELDS)
            marks = ", ".join(["%s"] * len(JOB_FIELDS))
            if r["id"] in taken:
                row = c.execute(f"INSERT INTO jobs({cols}) VALUES ({marks}) RETURNING id", vals).fetchone()
                out.renumbered += 1
            else:
                row = c.execute(f"INSERT INTO jobs(id, {cols}) OVERRIDING SYSTEM VALUE VALUES (%s, {marks})"
                                " RETURNING id", [r["id"], *vals]).fetchone()
            assert row is not None
            idmap[r["id"]] = int(row["id"])
            out.jobs[r["state"]] = out.jobs.get(r["state"], 0) + 1
            c.execute("INSERT INTO imported(source, kind, old_id, new_id) VALUES (%s, 'job', %s, %s)",
                      (source, r["id"], idmap[r["id"]]))
        c.execute("SELECT setval(pg_get_serial_sequence('jobs', 'id'), greatest(1, (SELECT max(id)"
                  " FROM jobs)))")
        fresh = {r["id"] for r in jobs}
        _copy_files(c, source, jobs)
        for p in src["parts"]:
            if p["job_id"] in fresh:
                c.execute("INSERT INTO parts(job_id, seq, ref, state, wire_ref, provider) VALUES"
                          " (%s,%s,%s,%s,%s,%s)"
                          " ON CONFLICT DO NOTHING", (idmap[p["job_id"]], p["seq"], p["ref"], p["state"],
                                                      enc_opt(p.get("wire_ref")), p.get("provider") or ""))
                out.parts += 1
        for e in src["events"]:
            if e["job_id"] in fresh:
                c.execute("INSERT INTO events(job_id, kind, status, at, next_at, attempts, last_error)"
                          " VALUES"
                          " (%s,%s,%s,%s,%s,%s,%s)", (idmap[e["job_id"]], e["kind"], e["status"], e["at"],
                                                     e["next_at"], e["attempts"], enc(e["last_error"])))
                out.events += 1
        now = time.time()
        for m in src["messages"]:
            ids = [idmap.get(i) for i in json.loads(m["job_ids"])]
            if m["expires_at"] > now and None not in ids:
                cur = c.execute("INSERT INTO messages(key, job_ids, expires_at) VALUES (%s,%s,%s)"
                                " ON CONFLICT DO NOTHING", (m["key"], ids, m["expires_at"]))
                out.keys += cur.rowcount
        for d in src["limit_dedupe"]:
            if d["expires_at"] > now and d["job_id"] in idmap:
                cur = c.execute("INSERT INTO limit_dedupe(key, job_id, expires_at) VALUES (%s,%s,%s)"
                                " ON CONFLICT DO NOTHING", (d["key"], idmap[d["job_id"]], d["expires_at"]))
                out.dedupe += cur.rowcount
        out.outbox = self._once(c, source, "outbox", src["outbox"], lambda o: c.execute(
            "INSERT INTO outbox(rcpt, content, created_at, next_at, attempts, last_error) VALUES"
            " (%s,%s,%s,%s,%s,%s)",
            (enc(o["rcpt"]), bytes(o["content"]), o["created_at"], o["next_at"], o["attempts"],
             enc(o["last_error"]))))
        out.orphans = self._once(c, source, "orphan", src["orphan_receipts"], lambda o: c.execute(
            "INSERT INTO orphan_receipts(ref, part_state, error, at, source, provider) VALUES"
            " (%s,%s,%s,%s,%s,%s)",
            (o["ref"], o["part_state"], enc(o["error"]), o["at"], enc(o.get("source") or ""),
             o.get("provider") or "")))
        first = c.execute("INSERT INTO imports(source, at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                          (source, now)).rowcount
        if not first:
            out.counters = "already copied by an earlier run (not added twice)"
        else:
            for s in src["limit_slots"]:
                c.execute("INSERT INTO limit_slots(account, scope, width, slot, parts) VALUES"
                          " (%s,%s,%s,%s,%s)"
                          " ON CONFLICT (account, scope, width, slot) DO UPDATE"
                          " SET parts=limit_slots.parts+excluded.parts",
                          (s["account"], s["scope"], s["width"], s["slot"], s["parts"]))
            for p in src["limit_periods"]:
                c.execute("INSERT INTO limit_periods(account, period, parts) VALUES (%s,%s,%s)"
                          " ON CONFLICT (account, period) DO UPDATE SET"
                          " parts=limit_periods.parts+excluded.parts",
                          (p["account"], p["period"], p["parts"]))
            out.counters = (f"copied ({len(src['limit_slots'])} window slot(s), "
                            f"{len(src['limit_periods'])} day/month total(s))")
        if jobs:
            c.execute("SELECT pg_notify('sms_milter_work', '')")
        return out

    @staticmethod
    def _once(c: Conn, source: str, kind: str, rows: list[dict[str, Any]], insert: Any) -> int:
        seen = {r["old_id"] for r in c.execute("SELECT old_id FROM imported WHERE source=%s AND kind=%s",
                                               (source, kind))}
        n = 0
        for r in rows:
            if r["id"] not in seen:
                insert(r)
                c.execute("INSERT INTO imported(source, kind, old_id, new_id) VALUES (%s,%s,%s,0)",
                          (source, kind, r["id"]))
                n += 1
        return n


def _value(key: str, r: dict[str, Any]) -> Any:
    v = r.get(key)
    if key in ("flash", "deferred"):
        return bool(v)
    if key == "trans_ref":
        return enc_opt(v)
    if key in TEXT_FIELDS:
        return enc(v or "")
    if key == "urls":
        return v or "{}"
    if key in _DEFAULTS:  # a spool from before voice/fax (SQLite migration 4) has none of these
        return v or _DEFAULTS[key]
    return v


_DEFAULTS = {"channel": "sms", "language": "", "files": "[]"}


def _copy_files(c: Conn, source: str, jobs: list[dict[str, Any]]) -> None:
    """The voice/fax files of the copied jobs, from beside the SQLite file into file_blobs."""
    for sha in sorted({f.sha256 for r in jobs for f in files_from_json(r.get("files"))}):
        try:
            data = path_of(source, sha).read_bytes()
        except OSError as e:
            raise SpoolError(f"{path_of(source, sha)}: a job's file cannot be read: {e.strerror}") from None
        c.execute("INSERT INTO file_blobs(sha256, data) VALUES (%s,%s) ON CONFLICT DO NOTHING", (sha, data))
