"""Issue 9 item 6: no password, credential-looking value or authorized sender address in a
reply, the milter log or Postfix's maillog; the spool is not readable by others whatever
the umask; read-only commands do not create a spool.
"""

from __future__ import annotations

import os
import stat

import bed
import pytest
from test_inline import ACME, ANYONE, TEXTSMS, assert_data, sms, texts

pytestmark = pytest.mark.bed

SUBJECTS = [
    "U=ACME123 Password:{pw} R={n}",
    "U=ACME123 P:{pw} R={n}",
    "U=ACME123 Password {pw} R={n}",
    "U=ACME123 {pw} R={n}",
    "U=ACME123 P={pw},{pw} R={n}",
    "U=ACME123 P={pw} R={pw}",
    "U=ACME123 P={pw} N={pw} R={n}",
    "U=ACME123 P={pw} {pw}=1 R={n}",
    "Userkey:ACME123 P={pw} R={n}",
    "U=ACME123 Password=\t{pw} R={n} zz",
]


@pytest.mark.parametrize("subject", SUBJECTS)
def test_textsms_refusal_echoes_no_credential(gw, subject):
    pw = "Pw" + bed.unique("s")  # unique: found in the logs only if this test leaked it
    num, e164 = bed.unique_number()
    since = gw.postfix.log_offset()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(subject.format(pw=pw, n=num), "hello"))
    assert r["data"] is not None and r["data"][0] in (550, 554), r
    for t in texts(r):
        assert pw not in t and "ACME123" not in t, f"credential echoed: {t}"
    gw.postfix.wait_log(r"milter-reject: END-OF-MESSAGE", since=since)
    assert pw not in gw.postfix.log() and "ACME123" not in gw.postfix.log()[since:]
    assert pw not in gw.milter.log()
    assert gw.jobs(recipient=e164) == []


def test_accepted_textsms_logs_no_credential(gw):
    num, e164 = bed.unique_number()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(f"U=ACME123 P=s3cret R={num}", "hello"))
    assert_data(r, 250)
    assert len(gw.jobs(recipient=e164)) == 1
    assert "s3cret" not in gw.milter.log() and "s3cret" not in gw.postfix.log()


def test_authorized_sender_address_not_in_milter_log(gw):
    num, _ = bed.unique_number()
    assert_data(gw.send(ACME, [sms(num)], bed.make_message("", "hello")), 250)
    r = gw.send(ACME, [sms(num)], bed.make_message("", "<b>html</b>"))
    assert r["data"][0] == 550
    for t in texts(r):
        assert ACME not in t
    assert ACME not in gw.milter.log()


def test_spool_and_wal_not_readable_by_others_whatever_the_umask(tmp_path):
    if bed.on_postgres():
        pytest.skip("the modes of the SQLite spool file and its -wal/-shm files (PostgreSQL: the "
                    "database's own files, not ours)")
    cfg = bed.write_config(tmp_path, bed.free_port(), bed.free_port(),
                           spool_path=tmp_path / "new" / "spool.db")
    old = os.umask(0)
    try:
        m = bed.Milter(cfg, tmp_path / "milter.log").start()
    finally:
        os.umask(old)
    try:
        bed.wait_until(lambda: (tmp_path / "new" / "spool.db-wal").exists(), 10, "the WAL file")
        for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
            mode = stat.S_IMODE((tmp_path / "new" / name).stat().st_mode)
            assert mode & 0o037 == 0, f"{name} is {oct(mode)}"
    finally:
        m.stop()


def test_queue_list_on_missing_spool_creates_nothing(tmp_path):
    missing = tmp_path / "no" / "such" / "spool.sqlite3"
    cfg = bed.write_config(tmp_path, bed.free_port(), bed.free_port(), spool_path=missing)
    url = bed.spool_url_for(missing)  # PostgreSQL: an empty database, the spool is not there yet
    for args in (("queue", "list"), ("queue", "list", "--json")):
        r = bed.run_cli(cfg, *args)
        assert r.returncode == 1, r
        named = str(missing) if url is None else url.rsplit("/", 1)[1]
        assert "does not exist" in r.stderr and named in r.stderr and r.stderr.count("\n") == 1, r
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "no").exists()
    if url is not None:
        assert bed.spool_sql(missing, "SELECT to_regclass('jobs') IS NULL"
                                      " AND to_regclass('schema_version') IS NULL")
