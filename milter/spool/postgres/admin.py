"""Reading the PostgreSQL spool and the administrator's queue tools (QueueAdmin), stats and
retention, with the SQLite spool's semantics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import admin
from ..admin import FILE_GRACE, FilesRemoved
from ..base import FINAL_STATES, STATES, Job
from .core import JOB_COLUMNS, Core, job_of
from .db import Conn, dec, enc

IN_FLIGHT = "is being submitted by a dispatcher right now; try again in a minute"
Row = dict[str, Any]


class AdminSide(Core):
    def _refs(self, ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        if ids:
            for r in self._read("SELECT job_id, ref FROM parts WHERE job_id = ANY(%s) ORDER BY job_id, seq",
                                (ids,)):
                out.setdefault(r["job_id"], []).append(r["ref"])
        return out

    def get(self, job_id: int) -> Job | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=%s", (job_id,))
        if not rows:
            return None
        return job_of(rows[0], self._refs([job_id]).get(job_id, []))

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs"
        params: tuple[Any, ...] = ()
        if state:
            sql += " WHERE state=%s"
            params = (state,)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = self._read(sql, params)
        refs = self._refs([r["id"] for r in rows])
        return [job_of(r, refs.get(r["id"], [])) for r in rows]

    def find_by_trans_ref(self, account: str, refs: list[str]) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {r: [] for r in refs}
        for ref in refs:
            rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE account=%s AND trans_ref=%s ORDER BY id",
                              (enc(account), enc(ref)))
            out[ref] = [job_of(r) for r in rows]
        return out

    def parts_used(self, account: str) -> int:
        rows = self._read("SELECT coalesce(sum(parts), 0) AS n FROM jobs WHERE account=%s"
                          " AND state NOT IN ('failed','expired')", (enc(account),))
        return int(rows[0]["n"])

    # -- queue tools ---------------------------------------------------------------------
    def _change(self, job_ids: list[int] | None,
                fn: Callable[[Conn, int, Row | None, float], admin.Change]) -> list[admin.Change]:
        """Decide and apply a change job by job in one transaction (the rows locked first)."""

        def tx(c: Conn) -> list[admin.Change]:
            now = time.time()
            if job_ids is None:
                rows = {r["id"]: r for r in c.execute(
                    "SELECT id, state, lease_until FROM jobs WHERE state='queued' ORDER BY id FOR UPDATE")}
                ids = list(rows)
            else:
                ids = list(dict.fromkeys(job_ids))
                rows = {r["id"]: r for r in c.execute(
                    "SELECT id, state, lease_until FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                    (sorted(ids),))}
            return [fn(c, jid, rows.get(jid), now) for jid in ids]

        return list(self._run(tx))

    @staticmethod
    def _in_flight(row: Row, now: float) -> bool:
        return row["state"] == "queued" and row["lease_until"] is not None and row["lease_until"] >= now

    def hold_jobs(self, job_ids: list[int] | None) -> list[admin.Change]:
        def fn(c: Conn, jid: int, row: Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] != "queued":
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not queued")
            if self._in_flight(row, now):
                return admin.Change(jid, "queued", None, IN_FLIGHT)
            c.execute("UPDATE jobs SET state='held', lease_owner=NULL, lease_until=NULL WHERE id=%s", (jid,))
            return admin.Change(jid, "queued", "held")

        return self._change(job_ids, fn)

    def release_held(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(c: Conn, jid: int, row: Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] != "held":
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not held")
            c.execute("UPDATE jobs SET state='queued', lease_owner=NULL, lease_until=NULL WHERE id=%s",
                      (jid,))
            return admin.Change(jid, "held", "queued")

        changes = self._change(job_ids, fn)
        if any(ch.changed for ch in changes):
            self.wake()
        return changes

    def retry_jobs(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(c: Conn, jid: int, row: Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] not in ("failed", "expired"):
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not failed or expired")
            c.execute("DELETE FROM parts WHERE job_id=%s", (jid,))
            c.execute("UPDATE jobs SET state='queued', attempts=0, not_before=%s, expires_at=%s,"
                      " deferred=false, provider=NULL, done_at=NULL, lease_owner=NULL, lease_until=NULL"
                      " WHERE id=%s",
                      (now, now + self.validity, jid))
            return admin.Change(jid, row["state"], "queued")

        changes = self._change(job_ids, fn)
        if any(ch.changed for ch in changes):
            self.wake()
        return changes

    def delete_jobs(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(c: Conn, jid: int, row: Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] == "submitted":
                return admin.Change(jid, "submitted", None,
                                    "is submitted (its receipt is pending); not deleted")
            if self._in_flight(row, now):
                return admin.Change(jid, "queued", None, IN_FLIGHT)
            self._delete(c, [jid], self.files_removed)
            return admin.Change(jid, row["state"], "deleted")

        return self._change(job_ids, fn)

    @staticmethod
    def _delete(c: Conn, ids: list[int], removed: FilesRemoved) -> None:
        """Remove these jobs, and the stored files they named that no other job names."""
        shas = [r["sha"] for r in c.execute(
            "SELECT DISTINCT f->>0 AS sha FROM jobs, jsonb_array_elements(jobs.files::jsonb) AS f"
            " WHERE jobs.id = ANY(%s) AND jobs.files<>'[]'", (ids,))]
        for table, col in (("parts", "job_id"), ("events", "job_id"), ("jobs", "id")):
            c.execute(f"DELETE FROM {table} WHERE {col} = ANY(%s)", (ids,))
        if shas:
            AdminSide._drop_blobs(c, shas, removed)

    @staticmethod
    def _drop_blobs(c: Conn, shas: list[str] | None, removed: FilesRemoved) -> None:
        """Delete the blobs (None: every blob) no job names, in the caller's transaction. The lock
        waits for the milter transactions inserting blobs to commit, and makes new ones wait for
        this one: the jobs read next are every job that can name a blob (a milter that finds its
        blob deleted inserts it again, ON CONFLICT DO NOTHING)."""
        c.execute("LOCK TABLE file_blobs IN SHARE ROW EXCLUSIVE MODE")
        named = [r["sha"] for r in c.execute(
            "SELECT DISTINCT f->>0 AS sha FROM jobs, jsonb_array_elements(jobs.files::jsonb) AS f"
            " WHERE jobs.files<>'[]'")]
        if shas is None:
            rows = c.execute("DELETE FROM file_blobs WHERE NOT (sha256 = ANY(%s))"
                             " RETURNING octet_length(data) AS n", (named,)).fetchall()
        else:
            rows = c.execute("DELETE FROM file_blobs WHERE sha256 = ANY(%s) AND NOT (sha256 = ANY(%s))"
                             " RETURNING octet_length(data) AS n", (shas, named)).fetchall()
        for r in rows:
            removed.add(int(r["n"]))

    @property
    def files_removed(self) -> FilesRemoved:
        if not hasattr(self, "_files_removed"):
            self._files_removed = FilesRemoved()
        return self._files_removed

    def sweep_files(self, grace: float = FILE_GRACE) -> FilesRemoved:
        """Every blob no job names (blobs are written in their jobs' transaction: none is ever
        waiting for a commit, so `grace` does not apply here)."""
        out = FilesRemoved()
        self._run(lambda c: self._drop_blobs(c, None, out))
        self.files_removed.files += out.files
        self.files_removed.bytes += out.bytes
        return out

    def purge(self, before: float, states: tuple[str, ...] = FINAL_STATES, limit: int = 5000,
              ) -> list[tuple[int, str]]:
        wanted = [s for s in states if s in FINAL_STATES]
        if not wanted:
            return []

        def fn(c: Conn) -> list[tuple[int, str]]:
            rows = c.execute(
                "SELECT id, state FROM jobs WHERE state = ANY(%s) AND coalesce(done_at, created_at)<%s"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (wanted, before, limit)).fetchall()
            out = [(int(r["id"]), r["state"]) for r in rows]
            got.files = got.bytes = 0  # counted again if the transaction is run again
            if out:
                self._delete(c, [i for i, _ in out], got)
            return out

        got = FilesRemoved()
        purged = list(self._run(fn))
        self.files_removed.files += got.files
        self.files_removed.bytes += got.bytes
        return purged

    def detail(self, job_id: int) -> admin.JobDetail | None:
        job = self.get(job_id)
        if job is None:
            return None
        parts = [admin.Part(r["seq"], r["ref"], r["state"]) for r in self._read(
            "SELECT seq, ref, state FROM parts WHERE job_id=%s ORDER BY seq", (job_id,))]
        notes = [admin.Notification(r["id"], r["kind"], r["status"], r["at"], r["next_at"], r["attempts"],
                                    dec(r["last_error"])) for r in self._read(
            "SELECT id, kind, status, at, next_at, attempts, last_error FROM events WHERE job_id=%s"
            " ORDER BY id", (job_id,))]
        return admin.JobDetail(job, parts, notes)

    def stats(self, day_start: float, month_start: float) -> admin.SpoolStats:
        states = dict.fromkeys(STATES, 0)
        for r in self._read("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            states[r["state"]] = int(r["n"])
        accounts = {dec(r["account"]): admin.AccountStats(int(r["today"]), int(r["month"]))
                    for r in self._read(
            "SELECT account, sum(CASE WHEN submitted_at>=%s THEN parts ELSE 0 END) AS today,"
            " sum(parts) AS month FROM jobs WHERE submitted_at>=%s GROUP BY account",
            (day_start, month_start))}
        oldest = self._read("SELECT min(created_at) AS t FROM jobs WHERE state='queued'")[0]["t"]
        channels: dict[str, dict[str, int]] = {}
        for r in self._read("SELECT channel, state, count(*) AS n FROM jobs GROUP BY channel, state"):
            channels.setdefault(r["channel"], {})[r["state"]] = int(r["n"])
        return admin.SpoolStats(states, accounts, oldest, channels)
