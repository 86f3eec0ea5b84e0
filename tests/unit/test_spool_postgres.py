"""What only the PostgreSQL spool has (issue 14): the schema version table, wake-ups by
LISTEN/NOTIFY (one per commit batch), claims by several processes at once (SKIP LOCKED),
a commit that never waits long for another milter's locks, reconnecting after a reset."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from pathlib import Path

import pytest
from sms_milter.spool.base import AddRequest, NewJob

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.postgres


@pytest.fixture
def url():
    from conftest import pg_cluster
    return pg_cluster().new_database("u")


def _open(url: str, **kw):
    from sms_milter.spool.postgres import PostgresSpool
    return PostgresSpool(url, **kw)


def _job(recipient: str, text: str = "x") -> NewJob:
    return NewJob(recipient=recipient, originator="SMS", text=text, parts=1, account="acme")


def test_schema_version_table_and_migrations_run_once(url):
    from sms_milter.spool.postgres.schema import MIGRATIONS
    spools = []
    threads = [threading.Thread(target=lambda: spools.append(_open(url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(spools) == 4  # four processes' worth of opens at once: no error, one migration
    rows = spools[0]._read("SELECT version FROM schema_version")  # noqa: SLF001
    assert rows == [{"version": len(MIGRATIONS)}]
    for s in spools:
        s.close()


def test_a_database_newer_than_the_code_is_refused_with_a_clear_error(url):
    from sms_milter.spool.base import SpoolError
    from sms_milter.spool.postgres.schema import MIGRATIONS
    s = _open(url)
    s._run(lambda c: c.execute("UPDATE schema_version SET version=%s", (len(MIGRATIONS) + 1,)))  # noqa: SLF001
    s.close()
    with pytest.raises(SpoolError) as e:
        _open(url, create=False)
    assert str(e.value) == (f"the spool database has schema version {len(MIGRATIONS) + 1}, newer than this"
                            f" sms-milter knows ({len(MIGRATIONS)}): it was written by a later release;"
                            " upgrade sms-milter")


def test_a_commit_batch_wakes_a_waiting_dispatcher_with_one_notify(url):
    milter, disp = _open(url), _open(url)
    disp.wait_for_work(0.01)  # LISTEN now
    got: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        disp.wait_for_work(30)
        got.append(time.monotonic() - t0)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    batch = [AddRequest(None, [_job(f"+4179{i:07d}")], 0, []) for i in range(50)]
    assert milter.try_commit(batch)
    t.join(30)
    assert got and got[0] < 10  # woken by the commit, not by the 30 s timeout
    listen = disp._listen  # noqa: SLF001
    assert listen is not None and list(listen.notifies(timeout=0.5, stop_after=1)) == []  # one, not 50
    milter.close()
    disp.close()


def _claimer(url: str, name: str, out) -> None:
    s = _open(url)
    mine = []
    idle = 0
    while idle < 20:
        jobs = s.claim(name, 7, 60)
        if not jobs:
            idle += 1
            time.sleep(0.02)
            continue
        idle = 0
        s.mark_submitted_many([(j.id, [f"r{j.id}"]) for j in jobs])
        mine += [(j.id, j.recipient, time.time()) for j in jobs]
    s.close()
    out.put(mine)


def test_three_processes_claim_every_job_once_in_order_per_recipient(url):
    s = _open(url)
    ids = s.add_jobs([_job(f"+41790{i % 25:05d}", f"t{i}") for i in range(600)])
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, f"p{k}", out)) for k in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [c for part in got for c in part]
    assert sorted(i for i, _, _ in claimed) == sorted(ids)  # each job exactly once
    # One in flight per recipient, in id order: a number's next job is claimed only after the
    # previous one was marked submitted, so their submitted_at (set by the spool) ascend in id order.
    by_rcpt: dict[str, list[tuple[float, int]]] = {}
    for j in s.list_jobs():
        by_rcpt.setdefault(j.recipient, []).append((j.submitted_at or 0.0, j.id))
    for r, seq in by_rcpt.items():
        assert [i for _, i in sorted(seq)] == sorted(i for _, i in seq), r
    s.close()


def test_try_commit_gives_the_loop_back_while_another_milter_holds_the_key(url):
    a, b = _open(url), _open(url)
    import psycopg
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("SELECT pg_advisory_xact_lock(hashtextextended('k:same-key', 0))")
        req = AddRequest("same-key", [_job("+41791")], 60, [])
        t0 = time.monotonic()
        assert a.try_commit([req]) is False and req.result is None and req.error is None
        assert time.monotonic() - t0 < 2
        other.execute("ROLLBACK")
    assert a.try_commit([req]) and not req.result.duplicate
    assert b.add_message("same-key", [_job("+41791")], 60).duplicate  # the other milter sees the key
    a.close()
    b.close()


def test_reconnects_after_the_connection_is_reset(url):
    from conftest import pg_cluster
    s = _open(url)
    s.add_jobs([_job("+41792")])
    pg_cluster().kill_backends(url.rsplit("/", 1)[1])
    assert len(s.list_jobs()) == 1  # a dead idle connection is replaced before use
    req = AddRequest(None, [_job("+41793")], 0, [])
    pg_cluster().kill_backends(url.rsplit("/", 1)[1])
    s.commit_now([req])  # a connection dead before BEGIN is replaced: no needless 451
    assert req.result is not None and req.error is None
    assert len(s.claim("o", 10, 60)) == 2
    s.close()


def test_an_older_job_committed_late_waits_for_the_one_in_flight(url):
    """Two milters: ids are handed out at INSERT, so an older id may commit after a newer one of
    the same number was claimed; it must wait until that one is submitted (one in flight)."""
    import psycopg
    s = _open(url)
    with psycopg.connect(url, autocommit=True) as late:
        late.execute("BEGIN")
        late.execute("INSERT INTO jobs(recipient, originator, text, parts, account, created_at, not_before,"
                     " expires_at) VALUES ('+41794', 'SMS', 'older', 1, 'acme', 0, 0, 1e12)")
        newer = s.add_message(None, [_job("+41794", "newer")], 0).job_ids[0]
        assert [j.text for j in s.claim("a", 10, 60)] == ["newer"]
        late.execute("COMMIT")
    assert s.claim("b", 10, 60) == []  # "newer" is in flight to the same number
    s.mark_submitted_many([(newer, ["n1"])])
    assert [j.text for j in s.claim("b", 10, 60)] == ["older"]
    s.close()
