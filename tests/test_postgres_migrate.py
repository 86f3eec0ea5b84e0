"""`sms-milter spool migrate --from FILE.sqlite3` (issue 14): an SQLite spool with jobs in every
state, keys, owed notifications, reply mails, orphan receipts and limit counters is copied
into a private PostgreSQL database; a second run copies nothing twice; and `spool.url` in
check-config never shows the password."""

from __future__ import annotations

import json

import bed
import pytest
from sms_milter.spool.base import LimitPlan, NewJob, OutMail
from sms_milter.spool.sqlite import SqliteSpool

pytestmark = pytest.mark.postgres


def _job(n: int, **kw) -> NewJob:
    kw.setdefault("account", "acme")
    return NewJob(recipient=f"+4179123{n:04d}", originator="SMS", text=f"migrate {n}", parts=1, **kw)


def _sqlite_spool(path) -> dict[str, int]:
    s = SqliteSpool(path)
    ids = {}
    for i, name in enumerate(("queued", "held", "submitted", "delivered", "buffered", "failed", "expired")):
        r = s.add_message(f"key-{name}", [_job(i, sender="who@client.example", notify="ALWAYS")], 3600,
                          limits=LimitPlan(decide=lambda *a: None))
        ids[name] = r.job_ids[0]
    s.hold_jobs([ids["held"]])
    claimed = {j.id for j in s.claim("o", 10, 60)}
    assert claimed == {ids[n] for n in ids if n not in ("held",)}
    s.release([ids["queued"]], "o", 0.0)
    s.mark_submitted_many([(ids[n], [f"ref{n}"]) for n in ("submitted", "delivered", "buffered", "failed")])
    s.record_receipts([("refdelivered", "delivered", ""), ("refbuffered", "buffered", ""),
                       ("reffailed", "failed", "UNDELIV"), ("nobody", "delivered", "")])
    s.fail(ids["expired"], "validity period ended", state="expired")
    s.add_message("xml-key", [], 3600, mails=[OutMail("reply@client.example", b"Subject: r\r\n\r\nok\r\n")])
    s.close()
    return ids


def test_migrate_copies_every_state_once_and_keeps_ids(pg, tmp_path):
    src = tmp_path / "old.sqlite3"
    ids = _sqlite_spool(src)
    url = pg.new_database("mig")
    cfg = bed.write_config(tmp_path, bed.free_port(), 1, spool_url=url)
    r = bed.run_cli(cfg, "spool", "migrate", "--from", str(src))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "jobs: 7 (buffered 1, delivered 1, expired 1, failed 1, held 1, queued 1, submitted 1)" in out
    assert "parts: 4" in out and "idempotency keys: 8" in out and "orphan receipts: 1" in out
    assert "reply mails: 1" in out and "limit counters: copied" in out
    jobs = {j["id"]: j for j in bed.queue_list(cfg)}
    assert {n: jobs[i]["state"] for n, i in ids.items()} == {n: n for n in ids}  # same ids, same states
    assert jobs[ids["failed"]]["last_error"] == "UNDELIV"
    show = json.loads(bed.run_cli(cfg, "queue", "show", str(ids["delivered"]), "--json").stdout)
    assert [p["ref"] for p in show["parts_sent"]] == ["refdelivered"]
    assert {(n["kind"], n["status"]) for n in show["notifications"]} == {("mail", "delivered")}
    stats = json.loads(bed.run_cli(cfg, "stats", "--json").stdout)
    assert stats["total"] == 7
    # Idempotent: nothing copied twice, the counters not added again.
    again = bed.run_cli(cfg, "spool", "migrate", "--from", str(src))
    assert again.returncode == 0 and "jobs: 0 (none); 7 already there" in again.stdout
    assert "already copied by an earlier run" in again.stdout
    assert len(bed.queue_list(cfg)) == 7
    # A key copied over still dedupes a resend through the new spool; new jobs get new ids.
    from sms_milter.spool.postgres import PostgresSpool
    s = PostgresSpool(url)
    try:
        assert s.add_message("key-queued", [_job(99)], 60).duplicate
        assert s.add_jobs([_job(100)])[0] > max(ids.values())
        assert [(u.account, u.today) for u in s.account_usage()] == [("acme", 7)]
        assert s.orphan_count() == 1 and len(s.due_outbox(10)) == 1
    finally:
        s.close()


def test_migrate_refuses_what_it_cannot_copy(pg, tmp_path):
    url = pg.new_database("mig")
    cfg = bed.write_config(tmp_path, bed.free_port(), 1, spool_url=url)
    r = bed.run_cli(cfg, "spool", "migrate", "--from", str(tmp_path / "missing.sqlite3"))
    assert r.returncode == 1 and "no such SQLite spool file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.sqlite3").write_bytes(b"not a database at all" * 100)
    r = bed.run_cli(cfg, "spool", "migrate", "--from", str(tmp_path / "junk.sqlite3"))
    assert r.returncode == 1 and "cannot read it as an SQLite spool" in r.stderr
    sq = bed.write_config(tmp_path / "sq", bed.free_port(), 1,
                          extra={"spool": {"path": str(tmp_path / "x.db")}})
    r = bed.run_cli(sq, "spool", "migrate", "--from", str(tmp_path / "junk.sqlite3"))
    assert r.returncode == 2 and "no spool.url" in r.stderr


def test_spool_url_in_check_config_never_shows_the_password(pg, tmp_path):
    url = pg.url(pg.new_database("cc").rsplit("/", 1)[1], password="Sekr3t-pw")
    cfg = bed.write_config(tmp_path, bed.free_port(), 1, spool_url=url)
    r = bed.run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    assert "Sekr3t-pw" not in r.stdout + r.stderr and "postgresql://sms:***@127.0.0.1" in r.stdout
    for bad, why in (("mysql://u@h/db", "must start with postgresql://"),
                     ("postgresql://u:Sekr3t-pw@h", "no database"),
                     ("postgresql://u:Sekr3t-pw@h:99999/db", "port")):
        cfg = bed.write_config(tmp_path / "b", bed.free_port(), 1, spool_url=bad)
        r = bed.run_cli(cfg, "check-config")
        assert r.returncode == 2 and "spool.url" in r.stderr and why in r.stderr, (bad, r.stderr)
        assert "Sekr3t-pw" not in r.stderr
    # A database that refuses the password: the daemons' error names no password either.
    wrong = f"postgresql://nosuchuser:Sekr3t-pw@127.0.0.1:{pg.port}/postgres"
    cfg = bed.write_config(tmp_path / "w", bed.free_port(), 1, spool_url=wrong)
    r = bed.run_cli(cfg, "queue", "list")
    assert r.returncode == 1 and "Sekr3t-pw" not in r.stderr and "nosuchuser" in r.stderr


def test_migrate_copies_voice_and_fax_jobs_with_their_files(pg, tmp_path):
    from sms_milter.spool.files import JobFile
    from sms_milter.spool.postgres import PostgresSpool

    src = tmp_path / "old.sqlite3"
    pdf = JobFile.of("application/pdf", "order.pdf", b"%PDF-1.4\n" + bytes(range(256)))
    s = SqliteSpool(src)
    jobs = [_job(1, device="fax", channel="fax", files=(pdf,)),
            _job(2, device="mobile", channel="voice", language="de")]
    (fax_id, voice_id) = s.add_message("k", jobs).job_ids
    s.close()
    url = pg.new_database("migfiles")
    cfg = bed.write_config(tmp_path, bed.free_port(), 1, spool_url=url)
    r = bed.run_cli(cfg, "spool", "migrate", "--from", str(src))
    assert r.returncode == 0, r.stderr
    p = PostgresSpool(url)
    try:
        fax, voice = p.get(fax_id), p.get(voice_id)
        stored = JobFile(pdf.sha256, "application/pdf", "order.pdf", pdf.size)
        assert (fax.channel, fax.files) == ("fax", (stored,))
        assert (voice.channel, voice.language) == ("voice", "de")
        assert p.file_data(pdf.sha256) == pdf.data
    finally:
        p.close()
