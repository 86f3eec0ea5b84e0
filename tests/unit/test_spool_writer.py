"""The milter's side of the SQLite spool: grouped commits, idempotency, a failing writer."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from sms_milter.spool.base import AddRequest, NewJob, SpoolError
from sms_milter.spool.sqlite import SqliteSpool


def job(n: int) -> NewJob:
    return NewJob(recipient=f"+4179123{n:04d}", originator="SMS", text=f"text {n}", parts=1, account="acme")


def test_concurrent_sessions_share_commits_and_keep_their_own_jobs(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    got: dict[int, tuple[int, ...]] = {}

    def session(i: int) -> None:
        for k in range(10):
            n = i * 100 + k
            got[n] = spool.add_message(f"key-{n}", [job(n), job(n + 5000)], key_ttl=60).job_ids

    threads = [threading.Thread(target=session, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for pair in got.values() for i in pair]
    assert len(got) == 200 and len(set(ids)) == 400
    for n, pair in got.items():  # each message's jobs are its own
        assert [spool.get(i).text for i in pair] == [f"text {n}", f"text {n + 5000}"]


def test_same_key_adds_nothing_within_its_ttl(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    first = spool.add_message("k", [job(1)], key_ttl=60)
    again = spool.add_message("k", [job(1)], key_ttl=60)
    assert (again.job_ids, again.duplicate, first.duplicate) == (first.job_ids, True, False)
    assert len(spool.list_jobs()) == 1
    short = spool.add_message("short", [job(2)], key_ttl=0.0)
    time.sleep(0.01)
    assert spool.add_message("short", [job(2)], key_ttl=0.0).job_ids != short.job_ids  # expired


def test_one_commit_for_many_messages_dedupes_within_it_and_against_the_spool(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    before = spool.add_message("old", [job(1)], key_ttl=60)
    batch = [AddRequest(k, [job(n)], 60.0, []) for n, k in enumerate(["a", "old", "a", None, None], 2)]
    spool.commit_now(batch)
    a, old, a_again, anon1, anon2 = (r.result for r in batch)
    assert (old.job_ids, old.duplicate) == (before.job_ids, True)
    assert (a_again.job_ids, a_again.duplicate, a.duplicate) == (a.job_ids, True, False)
    assert not anon1.duplicate and not anon2.duplicate and anon1.job_ids != anon2.job_ids
    assert len(spool.list_jobs()) == 4  # old, a and the two without a key


def test_expired_keys_are_pruned_a_batch_at_a_time(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    for n in range(5):
        spool.add_message(f"gone-{n}", [job(n)], key_ttl=0.0)
    kept = spool.add_message("kept", [job(9)], key_ttl=60)
    time.sleep(0.01)
    assert spool.prune_message_keys(limit=3) == 3
    assert spool.prune_message_keys(limit=3) == 2
    assert spool.prune_message_keys(limit=3) == 0
    assert spool.add_message("kept", [job(9)], key_ttl=60).job_ids == kept.job_ids  # still known
    assert len(spool.list_jobs()) == 6  # pruning keys never touches jobs


def test_a_writer_that_cannot_open_the_spool_answers_at_once_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.db"
    spool = SqliteSpool(path, busy_timeout=1)
    shutil.rmtree(tmp_path / "sub")
    (tmp_path / "sub").write_text("not a directory any more")
    for key in ("a", "b"):
        started = time.monotonic()
        with pytest.raises(SpoolError, match="cannot open spool"):
            spool.add_message(key, [job(1)], key_ttl=60)
        assert time.monotonic() - started < 2  # not after the whole timeout
    (tmp_path / "sub").unlink()
    SqliteSpool(path).close()  # the directory and schema are back
    assert not spool.add_message("c", [job(1)], key_ttl=60).duplicate


def test_a_locked_spool_times_out_without_writing(tmp_path: Path) -> None:
    import sqlite3

    spool = SqliteSpool(tmp_path / "s.db", busy_timeout=0.5)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(SpoolError):
        spool.add_message("k", [job(1)], key_ttl=60)
    other.execute("ROLLBACK")
    assert spool.list_jobs() == []
    assert spool.add_message("k", [job(1)], key_ttl=60).duplicate is False
