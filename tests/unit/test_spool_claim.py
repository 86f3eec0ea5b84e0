"""The claim (issue 9, item 16): its cost does not depend on one recipient's backlog, order
per recipient holds through every state change, and an old spool (user_version 0) migrates.

The cost is counted in SQLite VM steps (a progress handler), not in seconds: the count does
not depend on the machine's load, and the old claim (every queued job scanned) is
proportional to the backlog.
"""

from __future__ import annotations

import sqlite3
import time

from sms_milter.spool.base import NewJob
from sms_milter.spool.sqlite import MIGRATIONS, SCHEMA, SqliteSpool
from spool_helpers import add_jobs


def _job(recipient: str, text: str = "x", **kw) -> NewJob:
    return NewJob(recipient=recipient, originator="SMS", text=text, parts=1, account="acme", **kw)


def _steps(spool: SqliteSpool, fn) -> int:
    n = [0]

    def tick() -> int:
        n[0] += 1
        return 0

    with spool._lock:  # noqa: SLF001
        spool._db.set_progress_handler(tick, 10)  # noqa: SLF001
    try:
        fn()
    finally:
        with spool._lock:  # noqa: SLF001
            spool._db.set_progress_handler(None, 0)  # noqa: SLF001
    return n[0]


def _claim_steps(tmp_path, backlog: int) -> int:
    s = SqliteSpool(tmp_path / f"s{backlog}.sqlite3")
    try:
        add_jobs(s, [_job("+41790000000", f"storm {i}") for i in range(backlog)])
        add_jobs(s, [_job(f"+4179100{i:04d}") for i in range(20)])
        total = 0
        for r in range(5):
            jobs: list = []
            total += _steps(s, lambda: jobs.extend(s.claim(f"o{r}", 10, 60)))  # noqa: B023
            assert jobs
            s.mark_submitted_many([(j.id, [f"{j.id:x}"]) for j in jobs])
        return total
    finally:
        s.close()


def test_claim_cost_does_not_grow_with_one_recipients_backlog(tmp_path):
    small, large = _claim_steps(tmp_path, 100), _claim_steps(tmp_path, 10000)
    assert large < 2 * small, (small, large)  # the scan of every queued job: about 100x


def test_order_per_recipient_and_one_in_flight(spool_factory):
    s = spool_factory()
    a = add_jobs(s, [_job("+41791", f"a{i}") for i in range(4)])
    b = add_jobs(s, [_job("+41792", "b0")])
    assert [j.id for j in s.claim("o", 10, 60)] == [a[0], b[0]]
    assert s.claim("o", 10, 60) == []  # a[1] waits behind a[0] in flight
    s.release([a[0]], "o", 0.0)  # back to the queue: it is still the head
    assert [j.id for j in s.claim("o", 10, 60)] == [a[0]]
    s.mark_submitted_many([(a[0], ["1"])])
    assert [j.id for j in s.claim("o", 10, 60)] == [a[1]]
    s.fail(a[1], "permanent")
    assert [j.id for j in s.claim("o", 10, 60)] == [a[2]]
    # A retried old job goes before the newer ones again (not in flight yet: a[3]).
    s.mark_submitted_many([(a[2], ["2"])])
    assert [c.after for c in s.retry_jobs([a[1]])] == ["queued"]  # `queue retry`: failed -> queued
    assert [j.id for j in s.claim("o", 10, 60)] == [a[1]]
    s.release([a[1]], "o", 0.0)
    assert [c.after for c in s.delete_jobs([a[1]])] == ["deleted"]  # `queue delete` of a queued head
    assert [j.id for j in s.claim("o", 10, 60)] == [a[3]]
    s.close()


def test_deferred_jobs_do_not_block_and_wait_for_their_time(spool_factory):
    s = spool_factory()
    later = add_jobs(s, [_job("+41793", "later", not_before=time.time() + 3600)])
    now = add_jobs(s, [_job("+41793", "now")])
    assert [j.id for j in s.claim("o", 10, 60)] == now
    assert later  # still queued, not due
    s.close()


def test_old_spool_migrates_and_keeps_its_queue_order(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    now = time.time()
    for i, r in enumerate(["+41794", "+41794", "+41795", "+41794"]):
        db.execute("INSERT INTO jobs(recipient, originator, text, parts, account, created_at, not_before,"
                   " expires_at) VALUES (?,?,?,?,?,?,?,?)",
                   (r, "SMS", f"t{i}", 1, "acme", now, now, now + 3600))
    db.execute("INSERT INTO parts(job_id, seq, ref) VALUES (99, 0, 'abc')")
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    s = SqliteSpool(path)
    assert [tuple(r) for r in s._read("SELECT version FROM schema_version")] == [(len(MIGRATIONS),)]  # noqa: SLF001
    assert [j.text for j in s.claim("o", 10, 60)] == ["t0", "t2"]
    s.mark_submitted_many([(1, ["a"])])
    assert [j.text for j in s.claim("o", 10, 60)] == ["t1"]
    s.close()
    s = SqliteSpool(path)  # opening again migrates nothing twice
    assert [tuple(r) for r in s._read("SELECT version FROM schema_version")] == [(len(MIGRATIONS),)]  # noqa: SLF001
    s.close()


def _spool_at_version(path, version: int) -> None:
    """A spool as a release before schema_version left it: SCHEMA, MIGRATIONS[:version], the
    count in PRAGMA user_version, one queued job."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA)
    for migration in MIGRATIONS[:version]:
        for stmt in migration:
            db.execute(stmt)
    db.execute(f"PRAGMA user_version={version}")
    now = time.time()
    db.execute("INSERT INTO jobs(recipient, originator, text, parts, account, created_at, not_before,"
               " expires_at) VALUES (?,?,?,?,?,?,?,?)",
               ("+41796", "SMS", "old", 1, "acme", now, now, now + 3600))
    db.close()


def test_spool_versioned_by_user_version_gets_the_schema_version_table(tmp_path):
    for version in range(1, len(MIGRATIONS) + 1):
        path = tmp_path / f"v{version}.sqlite3"
        _spool_at_version(path, version)
        s = SqliteSpool(path)
        assert [tuple(r) for r in s._read("SELECT version FROM schema_version")] == [(len(MIGRATIONS),)]  # noqa: SLF001
        assert s._read("PRAGMA user_version")[0][0] == len(MIGRATIONS)  # noqa: SLF001 (older releases read it)
        assert [(j.text, j.state) for j in s.list_jobs()] == [("old", "queued")]
        assert [j.text for j in s.claim("o", 10, 60)] == ["old"]
        s.close()


def test_spool_newer_than_the_code_is_refused_with_a_clear_error(tmp_path):
    import pytest
    from sms_milter.spool.base import SpoolError
    path = tmp_path / "newer.sqlite3"
    SqliteSpool(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE schema_version SET version=?", (len(MIGRATIONS) + 1,))
    db.close()
    with pytest.raises(SpoolError) as e:
        SqliteSpool(path)
    assert str(e.value) == (f"spool {path} has schema version {len(MIGRATIONS) + 1}, newer than this"
                            f" sms-milter knows ({len(MIGRATIONS)}): it was written by a later release;"
                            " upgrade sms-milter")
    db = sqlite3.connect(path, isolation_level=None)  # refused, not changed
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS) + 1,)]
    db.close()
