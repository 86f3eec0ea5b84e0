"""Stored voice/fax files go with their jobs (issue 15 leftovers), on both backends: `delete_jobs`
and `purge` remove the files no remaining job names, `sweep_files` the unreferenced ones older
than its grace period, and a milter commit reusing a file a purge removes meanwhile still
commits a job whose file exists."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from sms_milter.spool.base import NewJob
from sms_milter.spool.files import JobFile
from sms_milter.spool.sqlite import SqliteSpool
from spool_helpers import add_jobs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PDF = JobFile.of("application/pdf", "doc.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 40)
WAV = JobFile.of("audio/wav", "r.wav", b"RIFF....WAVE" * 10)


def _fax(recipient: str, f: JobFile = PDF) -> NewJob:
    return NewJob(recipient=recipient, originator="SMS", text="cover", parts=1, account="acme",
                  device="fax", channel="fax", files=(f,))


def _has(spool, sha: str) -> bool:
    try:
        spool.file_data(sha)
        return True
    except KeyError:
        return False


def _finish(spool, ids: list[int]) -> None:
    """Claim, submit and deliver these jobs (purge takes final jobs only)."""
    claimed = spool.claim("o", 100, 60)
    assert {j.id for j in claimed} >= set(ids)
    spool.mark_submitted_many([(jid, [f"{jid:x}"], "smpp") for jid in ids])
    spool.record_receipts([(f"{jid:x}", "delivered", "") for jid in ids])
    assert {spool.get(i).state for i in ids} == {"delivered"}


def test_delete_removes_a_file_only_with_the_last_job_naming_it(spool_factory):
    s = spool_factory()
    a, b = add_jobs(s, [_fax("+41441234567"), _fax("+41441234568")])
    (c,) = add_jobs(s, [_fax("+41441234569", WAV)])
    assert [ch.after for ch in s.delete_jobs([a])] == ["deleted"]
    assert _has(s, PDF.sha256) and s.files_removed.files == 0  # job b still names it
    assert [ch.after for ch in s.delete_jobs([b])] == ["deleted"]
    assert not _has(s, PDF.sha256) and _has(s, WAV.sha256)
    assert (s.files_removed.files, s.files_removed.bytes) == (1, PDF.size)
    assert s.get(c).files[0].sha256 == WAV.sha256
    (d,) = add_jobs(s, [_fax("+41441234570")])  # the same document again: stored anew
    assert s.file_data(PDF.sha256) == PDF.data and s.get(d) is not None


def test_purge_removes_the_files_of_purged_jobs(spool_factory):
    s = spool_factory()
    ids = add_jobs(s, [_fax("+41441234567"), _fax("+41441234568", WAV)])
    (queued,) = add_jobs(s, [_fax("+41441234569", WAV)])
    _finish(s, ids)
    assert s.get(queued).state == "queued"  # claimed but not submitted: not final
    assert sorted(jid for jid, _ in s.purge(time.time() + 60)) == ids
    assert not _has(s, PDF.sha256) and _has(s, WAV.sha256)  # WAV: the queued job names it
    assert (s.files_removed.files, s.files_removed.bytes) == (1, PDF.size)


def _orphan(s, f: JobFile, age: float) -> None:
    """A stored file no job names, `age` seconds old (a crash between the file and the commit)."""
    if isinstance(s, SqliteSpool):
        from sms_milter.spool.sqlite import files

        files.store(s.path, [f])
        t = time.time() - age
        os.utime(files.path_of(s.path, f.sha256), (t, t))
    else:
        s._run(lambda c: c.execute("INSERT INTO file_blobs(sha256, data) VALUES (%s,%s)", (f.sha256, f.data)))


def test_sweep_removes_unreferenced_files_past_the_grace_period(spool_factory):
    s = spool_factory()
    (kept,) = add_jobs(s, [_fax("+41441234567", WAV)])
    _orphan(s, PDF, 7200)
    assert _has(s, PDF.sha256)
    got = s.sweep_files(3600)
    assert (got.files, got.bytes) == (1, PDF.size)
    assert not _has(s, PDF.sha256) and _has(s, WAV.sha256)
    assert s.sweep_files(0).files == 0  # WAV is named by a job, whatever its age


def test_sqlite_sweep_leaves_young_orphans_and_stale_temporaries(tmp_path):
    from sms_milter.spool.sqlite import files

    s = SqliteSpool(tmp_path / "s.sqlite3")
    try:
        _orphan(s, PDF, 10)  # written for a commit that may still come
        tmp = files.path_of(s.path, WAV.sha256).with_name(f"{WAV.sha256}.99.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"half")
        os.utime(tmp, (time.time() - 7200,) * 2)
        assert s.sweep_files(3600).files == 0
        assert _has(s, PDF.sha256) and not tmp.exists()
    finally:
        s.close()


def test_a_commit_reusing_a_file_removed_meanwhile_stores_it_again(spool_factory):
    """The race a purge has with the milter: the milter finds the file (it was stored before)
    and waits for the write lock, which the purge holds while it removes that file; the job the
    milter then commits must find its file."""
    from bed import wait_until

    s = spool_factory()
    (old,) = add_jobs(s, [_fax("+41441234567")])
    if isinstance(s, SqliteSpool):
        import sqlite3

        from sms_milter.spool.sqlite import files

        stored = files.path_of(s.path, PDF.sha256)
        os.utime(stored, (time.time() - 7200,) * 2)
        lock = sqlite3.connect(s.path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the purge's transaction

        def waiting() -> bool:  # the commit touched the file it found, then waits for the lock
            return stored.stat().st_mtime > time.time() - 60

        def remove() -> None:
            stored.unlink()
            lock.execute("COMMIT")
    else:
        import psycopg

        lock = psycopg.connect(s.url, autocommit=True)
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE file_blobs IN SHARE ROW EXCLUSIVE MODE")
        watch = psycopg.connect(s.url, autocommit=True)

        def waiting() -> bool:  # the commit's INSERT INTO file_blobs waits for the lock
            row = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type='Lock'"
                                " AND query LIKE 'INSERT INTO file_blobs%%'").fetchone()
            return bool(row and row[0])

        def remove() -> None:
            lock.execute("DELETE FROM file_blobs WHERE sha256=%s", (PDF.sha256,))
            lock.execute("COMMIT")
            watch.close()
    out: list[int] = []
    t = threading.Thread(target=lambda: out.extend(add_jobs(s, [_fax("+41441234568")])))
    t.start()
    wait_until(waiting, 20, "the commit waiting for the purge's lock")
    remove()
    t.join(30)
    lock.close()
    assert not t.is_alive() and len(out) == 1
    assert s.get(out[0]) is not None and s.file_data(PDF.sha256) == PDF.data
    assert old != out[0]


def test_sqlite_commit_stores_its_files_again_once_it_holds_the_lock(tmp_path, monkeypatch):
    """SQLite: a purge that runs between the milter storing (touching) a file and its BEGIN
    IMMEDIATE removes it; the commit checks again under the lock and writes it anew."""
    from sms_milter.spool.sqlite import commit, files

    s = SqliteSpool(tmp_path / "s.sqlite3")
    try:
        add_jobs(s, [_fax("+41441234567")])
        real = commit.store_files
        calls: list[int] = []

        def store_then_purged(path: str, fs) -> None:
            real(path, fs)
            calls.append(1)
            if len(calls) == 1:  # a purge removing the file right after the milter touched it
                files.path_of(path, PDF.sha256).unlink()

        monkeypatch.setattr(commit, "store_files", store_then_purged)
        (jid,) = add_jobs(s, [_fax("+41441234568")])
        assert len(calls) == 2 and s.get(jid) is not None
        assert s.file_data(PDF.sha256) == PDF.data
    finally:
        s.close()
