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


def test_concurrent_sessions_share_commits_and_keep_their_own_jobs(spool_factory) -> None:
    spool = spool_factory()
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


def test_same_key_adds_nothing_within_its_ttl(spool_factory) -> None:
    spool = spool_factory()
    first = spool.add_message("k", [job(1)], key_ttl=60)
    again = spool.add_message("k", [job(1)], key_ttl=60)
    assert (again.job_ids, again.duplicate, first.duplicate) == (first.job_ids, True, False)
    assert len(spool.list_jobs()) == 1
    short = spool.add_message("short", [job(2)], key_ttl=0.0)
    time.sleep(0.01)
    assert spool.add_message("short", [job(2)], key_ttl=0.0).job_ids != short.job_ids  # expired


def test_one_commit_for_many_messages_dedupes_within_it_and_against_the_spool(spool_factory) -> None:
    spool = spool_factory()
    before = spool.add_message("old", [job(1)], key_ttl=60)
    batch = [AddRequest(k, [job(n)], 60.0, []) for n, k in enumerate(["a", "old", "a", None, None], 2)]
    spool.commit_now(batch)
    a, old, a_again, anon1, anon2 = (r.result for r in batch)
    assert (old.job_ids, old.duplicate) == (before.job_ids, True)
    assert (a_again.job_ids, a_again.duplicate, a.duplicate) == (a.job_ids, True, False)
    assert not anon1.duplicate and not anon2.duplicate and anon1.job_ids != anon2.job_ids
    assert len(spool.list_jobs()) == 4  # old, a and the two without a key


def test_expired_keys_are_pruned_a_batch_at_a_time(spool_factory) -> None:
    spool = spool_factory()
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


# --- issue 9: one message's failure stays its own; never wait; a spool moved under us


def test_a_message_whose_values_cannot_be_stored_fails_alone(spool_factory) -> None:
    """Item 1: a value SQLite refuses (a lone surrogate from an 8-bit header) inside a group
    commit refuses that message only, naming the header; its neighbours commit."""
    from dataclasses import replace

    from sms_milter.spool.base import SpoolDataError

    spool = spool_factory()
    bad = replace(job(7), message_id="<ab\udcd6cd@x>")
    batch = [AddRequest(f"k{n}", [job(n), job(n + 100)], 60.0, []) for n in range(5)]
    batch.insert(2, AddRequest("bad", [job(6), bad], 60.0, []))
    assert spool.try_commit(batch) is True
    assert isinstance(batch[2].error, SpoolDataError)
    assert "Message-ID" in batch[2].error.what and "\udcd6" not in str(batch[2].error)
    good = [r for i, r in enumerate(batch) if i != 2]
    assert all(r.error is None and r.result is not None and not r.result.duplicate for r in good)
    texts = sorted(j.text for j in spool.list_jobs())
    assert texts == sorted(f"text {n}" for k in range(5) for n in (k, k + 100))  # none of "bad"'s
    again = AddRequest("bad", [job(6)], 60.0, [])  # its key was not recorded either
    spool.commit_now([again])
    assert again.result is not None and not again.result.duplicate


def test_try_commit_never_waits_for_a_lock(tmp_path: Path) -> None:
    """Item 10: another process holding the write lock makes try_commit return False at once
    (nothing written); after the release the same batch commits."""
    import sqlite3

    spool = SqliteSpool(tmp_path / "s.db", busy_timeout=5)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    batch = [AddRequest("k", [job(1)], 60.0, [])]
    started = time.monotonic()
    for _ in range(3):
        assert spool.try_commit(batch) is False
    assert time.monotonic() - started < 0.5  # not the 5 s busy timeout
    assert batch[0].result is None and batch[0].error is None
    other.execute("ROLLBACK")
    assert spool.try_commit(batch) is True and batch[0].result is not None


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_spool_file_deleted_or_replaced_is_detected_before_a_commit(tmp_path: Path, how: str) -> None:
    """Item 7: never a 250 into a deleted inode: the commit after the file went away fails
    (451 for the milter), nothing is created at the path; once a spool is back at the path
    the next commit reopens it and writes there."""
    import sqlite3

    path = tmp_path / "s.db"
    spool = SqliteSpool(path)
    spool.add_message("first", [job(1)], key_ttl=60)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    if how == "replaced":
        SqliteSpool(path).close()  # a fresh (or restored) spool at the same path
    with pytest.raises(SpoolError, match=f"was {how}"):
        spool.add_message("second", [job(2)], key_ttl=60)
    if how == "deleted":
        with pytest.raises(SpoolError, match="does not exist"):
            spool.add_message("second", [job(2)], key_ttl=60)
        assert not path.exists()  # not silently recreated
        SqliteSpool(path).close()  # the operator restores a spool
    assert not spool.add_message("second", [job(2)], key_ttl=60).duplicate
    rows = sqlite3.connect(path).execute("SELECT text FROM jobs").fetchall()
    assert rows == [("text 2",)]  # in the file at the path, not in the deleted inode
