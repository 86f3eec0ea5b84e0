"""The SQLite spool's readers (get, list, xml@ lookups, metrics) and the administrator's queue
tools (hold, release, retry, delete, purge, detail, stats)."""

from __future__ import annotations

import json
import sqlite3
import time
from urllib.parse import quote

from .. import base as admin
from ..admin import FILE_GRACE, FilesRemoved
from ..base import (
    FINAL_STATES,
    Job,
    SpoolError,
)
from . import files as stored_files
from .schema import JOB_COLUMNS, job_from_row
from .store import Store


class AdminSide(Store):
    # -- readers ----------------------------------------------------------------------------
    def _refs(self, ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            rows = self._read(f"SELECT job_id, ref FROM parts WHERE job_id IN ({','.join('?' * len(part))})"
                              " ORDER BY job_id, seq", tuple(part))
            for r in rows:
                out.setdefault(r["job_id"], []).append(r["ref"])
        return out

    def get(self, job_id: int) -> Job | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,))
        if not rows:
            return None
        return job_from_row(rows[0], self._refs([job_id]).get(job_id, []))

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs"
        params: tuple = ()
        if state:
            sql += " WHERE state=?"
            params = (state,)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = self._read(sql, params)
        refs = self._refs([r["id"] for r in rows])
        return [job_from_row(r, refs.get(r["id"], [])) for r in rows]

    def find_by_trans_ref(self, account: str, refs: list[str]) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {r: [] for r in refs}
        for ref in refs:
            rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE account=? AND trans_ref=? ORDER BY id",
                              (account, ref))
            out[ref] = [job_from_row(r) for r in rows]
        return out

    def parts_used(self, account: str) -> int:
        """SMS parts an account has spooled that did not fail (xml@ ShowCredits)."""
        rows = self._read("SELECT coalesce(sum(parts), 0) AS n FROM jobs WHERE account=?"
                          " AND state NOT IN ('failed','expired')", (account,))
        return int(rows[0]["n"])

    def _read_apart(self, sql: str) -> list[tuple]:
        """On a read-only connection of its own: for the metrics thread, which must never hold
        the lock the daemon's own spool work takes."""
        try:
            db = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True, timeout=self.busy_timeout,
                                 check_same_thread=False)
            try:
                return db.execute(sql).fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            raise SpoolError(f"spool read failed: {e}") from None

    def counts_apart(self) -> dict[str, int]:
        """Jobs by state (the metrics thread)."""
        return {state: n for state, n in self._read_apart("SELECT state, count(*) FROM jobs GROUP BY state")}

    def channel_counts_apart(self) -> dict[str, dict[str, int]]:
        """Jobs by channel and state (the metrics thread)."""
        out: dict[str, dict[str, int]] = {}
        for channel, state, n in self._read_apart(
                "SELECT channel, state, count(*) FROM jobs GROUP BY channel, state"):
            out.setdefault(channel, {})[state] = int(n)
        return out

    # -- administrator's queue tools (QueueAdmin) ------------------------------------------
    @staticmethod
    def _rows_by_id(db: sqlite3.Connection, ids: list[int]) -> dict[int, sqlite3.Row]:
        out: dict[int, sqlite3.Row] = {}
        for i in range(0, len(ids), 5000):
            for r in db.execute("SELECT id, state, lease_until FROM jobs WHERE id IN"
                                " (SELECT value FROM json_each(?))", (json.dumps(ids[i:i + 5000]),)):
                out[r["id"]] = r
        return out

    def _change(self, job_ids: list[int] | None, fn) -> list[admin.Change]:
        """Decide and apply a change job by job in one transaction: fn(db, id, row, now) -> Change
        (row is None for an unknown id); job_ids None means every `queued` job."""

        def tx(db: sqlite3.Connection) -> list[admin.Change]:
            now = time.time()
            if job_ids is None:
                rows = {r["id"]: r for r in db.execute(
                    "SELECT id, state, lease_until FROM jobs WHERE state='queued' ORDER BY id")}
                ids = list(rows)
            else:
                ids = list(dict.fromkeys(job_ids))
                rows = self._rows_by_id(db, ids)
            return [fn(db, jid, rows.get(jid), now) for jid in ids]

        return self._run(tx)

    @staticmethod
    def _in_flight(row: sqlite3.Row, now: float) -> bool:
        return row["state"] == "queued" and row["lease_until"] is not None and row["lease_until"] >= now

    IN_FLIGHT = "is being submitted by a dispatcher right now; try again in a minute"

    def hold_jobs(self, job_ids: list[int] | None) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] != "queued":
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not queued")
            if self._in_flight(row, now):
                return admin.Change(jid, "queued", None, self.IN_FLIGHT)
            db.execute("UPDATE jobs SET state='held', lease_owner=NULL, lease_until=NULL WHERE id=?", (jid,))
            return admin.Change(jid, "queued", "held")

        return self._change(job_ids, fn)

    def release_held(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] != "held":
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not held")
            db.execute("UPDATE jobs SET state='queued', lease_owner=NULL, lease_until=NULL WHERE id=?",
                       (jid,))
            return admin.Change(jid, "held", "queued")

        changes = self._change(job_ids, fn)
        if any(c.changed for c in changes):
            self.wake()
        return changes

    def retry_jobs(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] not in ("failed", "expired"):
                return admin.Change(jid, row["state"], None, f"is {row['state']}, not failed or expired")
            # The old parts go: a late receipt for an old message id must not finish the new try.
            db.execute("DELETE FROM parts WHERE job_id=?", (jid,))
            db.execute("UPDATE jobs SET state='queued', attempts=0, not_before=?, expires_at=?, deferred=0,"
                       " provider=NULL, done_at=NULL, lease_owner=NULL, lease_until=NULL WHERE id=?",
                       (now, now + self.validity, jid))
            return admin.Change(jid, row["state"], "queued")

        changes = self._change(job_ids, fn)
        if any(c.changed for c in changes):
            self.wake()
        return changes

    def delete_jobs(self, job_ids: list[int]) -> list[admin.Change]:
        def fn(db: sqlite3.Connection, jid: int, row: sqlite3.Row | None, now: float) -> admin.Change:
            if row is None:
                return admin.Change(jid, None, None, "no such job")
            if row["state"] == "submitted":
                return admin.Change(jid, "submitted", None,
                                    "is submitted (its receipt is pending); not deleted")
            if self._in_flight(row, now):
                return admin.Change(jid, "queued", None, self.IN_FLIGHT)
            gone.update(self._delete(db, [jid]))
            return admin.Change(jid, row["state"], "deleted")

        gone: set[str] = set()
        changes = self._change(job_ids, fn)
        self._drop_files(gone, 0)
        return changes

    @staticmethod
    def _delete(db: sqlite3.Connection, ids: list[int]) -> set[str]:
        """Remove these jobs; the hashes of the files they named."""
        chunk = json.dumps(ids)
        shas = {r[0] for r in db.execute(
            "SELECT DISTINCT json_extract(f.value, '$[0]') FROM jobs, json_each(jobs.files) AS f"
            " WHERE jobs.id IN (SELECT value FROM json_each(?)) AND jobs.files<>'[]'", (chunk,))}
        for table, col in (("parts", "job_id"), ("events", "job_id"), ("jobs", "id")):
            db.execute(f"DELETE FROM {table} WHERE {col} IN (SELECT value FROM json_each(?))", (chunk,))
        return shas

    def purge(self, before: float, states: tuple[str, ...] = FINAL_STATES, limit: int = 5000,
              ) -> list[tuple[int, str]]:
        """Retention (`queue purge`, and the dispatcher's housekeeping if it is ever given a
        retention period): up to `limit` final jobs finished before `before`, oldest first,
        removed with their parts and owed notifications in one transaction."""
        wanted = [s for s in states if s in FINAL_STATES]
        if not wanted:
            return []

        def fn(db: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = db.execute(
                f"SELECT id, state FROM jobs WHERE state IN ({','.join('?' * len(wanted))})"
                " AND coalesce(done_at, created_at)<? ORDER BY id LIMIT ?",
                (*wanted, before, limit)).fetchall()
            out = [(r["id"], r["state"]) for r in rows]
            if out:
                gone.update(self._delete(db, [i for i, _ in out]))
            return out

        gone: set[str] = set()
        purged = self._run(fn)
        self._drop_files(gone, 0)
        return purged

    # -- stored files (sqlite/files.py) -------------------------------------------------------
    @property
    def files_removed(self) -> FilesRemoved:
        if not hasattr(self, "_files_removed"):
            self._files_removed = FilesRemoved()
        return self._files_removed

    def _drop_files(self, shas: set[str] | None, grace: float) -> None:
        """Remove stored files no job names (None: every stored file) once the transaction that
        removed their jobs has committed, in a write transaction of its own that changes nothing:
        a milter's commit naming one of them cannot run in between (it stores its files again
        once it holds the lock)."""
        if shas is not None and not shas:
            return

        def fn(db: sqlite3.Connection) -> None:
            named = {r[0] for r in db.execute(
                "SELECT DISTINCT json_extract(f.value, '$[0]') FROM jobs, json_each(jobs.files) AS f"
                " WHERE jobs.files<>'[]'")}
            candidates = stored_files.stored(self.path) if shas is None else shas
            stored_files.remove(self.path, [s for s in candidates if s not in named], grace,
                                self.files_removed)

        self._run(fn)

    def sweep_files(self, grace: float = FILE_GRACE) -> FilesRemoved:
        before = FilesRemoved(self.files_removed.files, self.files_removed.bytes)
        self._drop_files(None, grace)
        return FilesRemoved(self.files_removed.files - before.files, self.files_removed.bytes - before.bytes)

    def detail(self, job_id: int) -> admin.JobDetail | None:
        job = self.get(job_id)
        if job is None:
            return None
        parts = [admin.Part(r["seq"], r["ref"], r["state"]) for r in self._read(
            "SELECT seq, ref, state FROM parts WHERE job_id=? ORDER BY seq", (job_id,))]
        notes = [admin.Notification(r["id"], r["kind"], r["status"], r["at"], r["next_at"], r["attempts"],
                              r["last_error"]) for r in self._read(
            "SELECT id, kind, status, at, next_at, attempts, last_error FROM events WHERE job_id=?"
            " ORDER BY id", (job_id,))]
        return admin.JobDetail(job, parts, notes)

    def stats(self, day_start: float, month_start: float) -> admin.SpoolStats:
        states = dict.fromkeys(admin.STATES, 0)
        for r in self._read("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            states[r["state"]] = r["n"]
        accounts = {r["account"]: admin.AccountStats(int(r["today"]), int(r["month"])) for r in self._read(
            "SELECT account, sum(CASE WHEN submitted_at>=? THEN parts ELSE 0 END) AS today,"
            " sum(parts) AS month FROM jobs WHERE submitted_at>=? GROUP BY account",
            (day_start, month_start))}
        oldest = self._read("SELECT min(created_at) AS t FROM jobs WHERE state='queued'")[0]["t"]
        channels: dict[str, dict[str, int]] = {}
        for r in self._read("SELECT channel, state, count(*) AS n FROM jobs GROUP BY channel, state"):
            channels.setdefault(r["channel"], {})[r["state"]] = int(r["n"])
        return admin.SpoolStats(states, accounts, oldest, channels)
