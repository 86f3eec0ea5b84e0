"""Issue 2 acceptance: SMS mail decided inline, through a real Postfix, against the real milter.

Each test uses its own recipient numbers (bed.unique_number()) and finds its jobs with
gw.jobs(recipient=...), so no spool cleaning is needed between tests.
"""

from __future__ import annotations

import time

import bed
import pytest

ACME = "c4ca423@client.example"  # acme sender with its own originator +41760000000
PLAIN = "plain@client.example"  # acme sender without one (account default "SMS")
TM_SENDER = "ops@tm-client.example"  # tmco (telemessage, by domain)
ANYONE = "scripts@anywhere.example"  # textsms@ needs no authorized envelope sender
RELAY = "someone@relay.example"
TEXTSMS = "textsms@sms.example.com"


# --------------------------------------------------------------------------- helpers


def assert_reply(reply, code: int, xcode: str, *fragments: str) -> None:
    assert reply is not None, f"expected {code} {xcode}, got no reply (command not sent)"
    got_code, text = reply
    assert (got_code, text.split(" ", 1)[0]) == (code, xcode), f"expected {code} {xcode} ..., got {reply}"
    for frag in fragments:
        assert frag in text, f"{frag!r} not in reply {reply}"


def assert_data(r: dict, code: int = 250) -> None:
    """The final DATA reply was `code` (a clear message when MAIL or every RCPT was refused)."""
    assert r["data"] is not None and r["data"][0] == code, f"expected {code} after DATA, got {r}"


def rcpt_code(r: dict, addr: str) -> int | None:
    return r["rcpt"][addr][0] if addr in r["rcpt"] else None


def texts(result: dict) -> list[str]:
    out = [result["mail"][1]] if result["mail"] else []
    out += [t for _, t in result["rcpt"].values()]
    if result["data"]:
        out.append(result["data"][1])
    return out


def sms(number: str, domain: str = "sms.example.com") -> str:
    return f"{number}@{domain}"


def tm_dashed(number: str) -> str:
    """1781617dddd -> 1-781-617-dddd."""
    return f"{number[0]}-{number[1:4]}-{number[4:7]}-{number[7:]}"


def one_job(gw, e164: str) -> dict:
    jobs = gw.jobs(recipient=e164)
    assert len(jobs) == 1, f"expected exactly one job for {e164}, got {jobs}"
    return jobs[0]


def assert_job(job: dict, **want) -> None:
    base = {"device": "sms", "state": "queued"}
    base.update(want)
    got = {k: job.get(k) for k in base}
    assert got == base, f"job {job} differs: want {base}"


# --------------------------------------------------------------------------- RCPT-time refusals

RCPT_REFUSALS = [
    # (sender, recipient, code, xcode, fragment)
    (ACME, "+41791234567@sms.example.com", 550, "5.1.3", "write the number with 00 instead of +"),
    (ACME, "hello@sms.example.com", 550, "5.1.3", "is not an SMS address"),
    (ACME, "0099912345@sms.example.com", 550, "5.1.1", "is not a valid international phone number"),
    (TM_SENDER, "17816170000@Pager.tm.example.com", 550, "5.1.1", "unknown device"),
    (TM_SENDER, "17816170000@Fax.tm.example.com", 550, "5.3.3", "has no delivery channel"),
]


@pytest.mark.parametrize("sender,rcpt,code,xcode,fragment", RCPT_REFUSALS,
                         ids=["plus", "not-sms", "invalid-number", "pager", "fax"])
def test_rcpt_refused_only_that_recipient(gw, sender, rcpt, code, xcode, fragment):
    tm = sender == TM_SENDER
    num, e164 = bed.unique_number("telemessage" if tm else "aspsms")
    good = sms(num, "tm.example.com" if tm else "sms.example.com")
    r = gw.send(sender, [rcpt, good, RELAY], bed.make_message("", "other recipients pass"))
    assert_reply(r["rcpt"][rcpt], code, xcode, fragment)
    assert rcpt_code(r, good) == 250, r
    assert rcpt_code(r, RELAY) == 250, r
    assert_data(r)
    assert len(gw.jobs(recipient=e164)) == 1


def test_unauthorized_sender(gw):
    num, e164 = bed.unique_number()
    r = gw.send("stranger@evil.example", [sms(num), RELAY], bed.make_message("", "x"))
    assert_reply(r["rcpt"][sms(num)], 550, "5.7.1", "not authorized")
    assert rcpt_code(r, RELAY) == 250
    assert gw.jobs(recipient=e164) == []


def test_null_sender(gw):
    num, e164 = bed.unique_number()
    r = gw.send("", [sms(num)], bed.make_message("", "x"))
    assert_reply(r["rcpt"][sms(num)], 550, "5.7.1", "null sender")
    assert gw.jobs(recipient=e164) == []


def test_sender_outside_its_networks(gw):
    num, e164 = bed.unique_number()
    r = gw.send("net@client.example", [sms(num)], bed.make_message("", "x"))
    assert_reply(r["rcpt"][sms(num)], 550, "5.7.1", "is not allowed to send SMS")
    assert gw.jobs(recipient=e164) == []


def test_sender_inside_its_networks(gw):
    """XCLIENT (allowed from 127.0.0.0/8 in the bed) makes Postfix present 192.0.2.10 to the milter."""
    num, e164 = bed.unique_number()
    r = gw.send("net@client.example", [sms(num)], bed.make_message("", "from the right network"),
                xclient={"ADDR": "192.0.2.10", "NAME": "[UNAVAILABLE]"})
    assert rcpt_code(r, sms(num)) == 250, r
    assert_data(r)
    assert_job(one_job(gw, e164), account="netlimited", text="from the right network")


def test_telemessage_dashes_and_device_case(gw):
    n1, e1 = bed.unique_number("telemessage")
    n2, e2 = bed.unique_number("telemessage")
    r1 = tm_dashed(n1) + "@tm.example.com"
    r2 = n2 + "@sms.tm.example.com"
    r = gw.send(TM_SENDER, [r1, r2], bed.make_message("", "tm works"))
    assert rcpt_code(r, r1) == 250, r
    assert rcpt_code(r, r2) == 250, r
    assert_data(r)
    assert_job(one_job(gw, e1), account="tmco", text="tm works", parts=1)
    assert_job(one_job(gw, e2), account="tmco", text="tm works", parts=1)


# --------------------------------------------------------------------------- end-of-message refusals


def _eom(gw, sender, rcpt_number, raw, code, xcode, *fragments, style="aspsms"):
    domain = "tm.example.com" if style == "telemessage" else "sms.example.com"
    r = gw.send(sender, [sms(rcpt_number, domain), RELAY], raw)
    assert rcpt_code(r, sms(rcpt_number, domain)) == 250, r
    assert_reply(r["data"], code, xcode, *fragments)
    return r


def test_too_big(gw):
    num, e164 = bed.unique_number()
    body = ("a" * 75 + "\n") * 900  # 68400 bytes > max_message_bytes 65536
    _eom(gw, ACME, num, bed.make_message("", body), 552, "5.3.4")
    assert gw.jobs(recipient=e164) == []


def test_html_body(gw):
    num, e164 = bed.unique_number()
    _eom(gw, ACME, num, bed.make_message("", "<html><body>hi</body></html>", subtype="html"),
         550, "5.6.1", "HTML")
    assert gw.jobs(recipient=e164) == []


def test_multipart_alternative_with_html(gw):
    num, e164 = bed.unique_number()
    raw = bed.make_alternative("", "hi", "<p>hi</p>", sender=ACME, to=sms(num))
    _eom(gw, ACME, num, raw, 550, "5.6.1", "HTML")
    assert gw.jobs(recipient=e164) == []


def test_attachment(gw):
    num, e164 = bed.unique_number()
    raw = bed.make_attachment("", "see attached", b"%PDF-1.4\n%fake\n", sender=ACME, to=sms(num))
    _eom(gw, ACME, num, raw, 550, "5.6.1", "attachment")
    assert gw.jobs(recipient=e164) == []


def test_markup_in_plain_text(gw):
    num, e164 = bed.unique_number()
    _eom(gw, ACME, num, bed.make_message("", "this is <b>bold</b>"), 550, "5.6.1", "HTML markup")
    assert gw.jobs(recipient=e164) == []


def test_non_latin1_refused_for_aspsms(gw):
    num, e164 = bed.unique_number()
    r = _eom(gw, ACME, num, bed.make_message("", "Hello \u0416 there", charset="utf-8"),
             550, "5.6.0", "ISO-8859-1")
    text = r["data"][1]
    assert "\u0416" in text or "U+0416" in text.upper(), f"reply does not name the character: {text}"
    assert gw.jobs(recipient=e164) == []


def test_non_latin1_accepted_for_telemessage(gw):
    num, e164 = bed.unique_number("telemessage")
    r = gw.send(TM_SENDER, [sms(num, "tm.example.com")], bed.make_message("", "Hello \u0416 there"))
    assert_data(r)
    job = one_job(gw, e164)
    assert "\u0416" in job["text"], job


def test_too_many_parts_aspsms(gw):
    num, e164 = bed.unique_number()
    r = _eom(gw, ACME, num, bed.make_message("", "\n".join(["a" * 100] * 10)), 552,
             "5.3.4")  # 1009 characters: 7 parts of 153 > 6
    assert "7" in r["data"][1] and "6" in r["data"][1], r
    assert gw.jobs(recipient=e164) == []


def test_too_many_parts_telemessage(gw):
    num, e164 = bed.unique_number("telemessage")
    r = _eom(gw, TM_SENDER, num, bed.make_message(None, "\n".join(["a" * 100] * 5)), 552, "5.3.4",
             style="telemessage")  # 504 characters: 4 parts > 3
    assert "4" in r["data"][1] and "3" in r["data"][1], r
    assert gw.jobs(recipient=e164) == []


TEXTSMS_REFUSALS = [
    ("R={n}", 550, "5.5.4", "Userkey"),
    ("U=ACME123 P=wrongpass R={n}", 550, "5.7.8", "Userkey or Password"),
    ("U=ACME123 P=s3cret R={n} Foo=1", 550, "5.5.4", "Foo"),
]


@pytest.mark.parametrize("subject,code,xcode,fragment", TEXTSMS_REFUSALS,
                         ids=["no-userkey", "wrong-password", "unknown-keyword"])
def test_textsms_subject_refused(gw, subject, code, xcode, fragment):
    num, e164 = bed.unique_number()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(subject.format(n=num), "hello"))
    assert rcpt_code(r, TEXTSMS) == 250, r
    assert_reply(r["data"], code, xcode, fragment)
    for t in texts(r):
        assert "s3cret" not in t and "wrongpass" not in t, f"password echoed: {t}"
    assert gw.jobs(recipient=e164) == []


# --------------------------------------------------------------------------- acceptances


def test_sender_default_originator(gw):
    num, e164 = bed.unique_number()
    r = gw.send(ACME, [sms(num)], bed.make_message("", "sender default"))
    assert rcpt_code(r, sms(num)) == 250, r
    assert_data(r)
    assert_job(one_job(gw, e164), originator="+41760000000", text="sender default", parts=1, account="acme")


def test_subject_originator(gw):
    num, e164 = bed.unique_number()
    r = gw.send(ACME, [sms(num)], bed.make_message("Originator=Acme", "subject originator"))
    assert_data(r)
    assert_job(one_job(gw, e164), originator="Acme", text="subject originator", parts=1, account="acme")


def test_account_default_originator(gw):
    num, e164 = bed.unique_number()
    r = gw.send(PLAIN, [sms(num)], bed.make_message(None, "account default"))
    assert_data(r)
    assert_job(one_job(gw, e164), originator="SMS", text="account default", parts=1, account="acme")


def test_textsms_two_recipients(gw):
    n1, e1 = bed.unique_number()
    n2, e2 = bed.unique_number()
    subject = f"U=ACME123, P=s3cret; R={n1} r={n2} O=Shop"
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(subject, "via textsms"))
    assert_data(r)
    for e in (e1, e2):
        assert_job(one_job(gw, e), originator="Shop", text="via textsms", parts=1, account="acme")


def test_textsms_hashed_password(gw):
    assert "password_hash" in gw.config.read_text(), \
        "sms_milter.policy.auth.hash_password is missing: the bed could not write a password_hash"
    num, e164 = bed.unique_number()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(f"Userkey=HASH1 Password=h4shed Recipient={num}",
                                                     "hashed ok"))
    assert_data(r)
    assert_job(one_job(gw, e164), text="hashed ok", account="hashed")


@pytest.mark.parametrize("cte", ["quoted-printable", "base64"])
def test_latin1_transfer_encodings(gw, cte):
    num, e164 = bed.unique_number()
    raw = bed.make_message("", "Gr\u00fc\u00dfe", charset="iso-8859-1", cte=cte)
    r = gw.send(ACME, [sms(num)], raw)
    assert_data(r)
    assert_job(one_job(gw, e164), text="Gr\u00fc\u00dfe", account="acme")


def test_telemessage_template(gw):
    num, e164 = bed.unique_number("telemessage")
    r = gw.send(TM_SENDER, [sms(num, "tm.example.com")], bed.make_message("Alert", "disk full"))
    assert_data(r)
    assert_job(one_job(gw, e164), text="Alert,disk full", account="tmco", parts=1)


def test_telemessage_template_empty_subject(gw):
    num, e164 = bed.unique_number("telemessage")
    r = gw.send(TM_SENDER, [sms(num, "tm.example.com")], bed.make_message("", "disk full"))
    assert_data(r)
    assert_job(one_job(gw, e164), text="disk full", account="tmco", parts=1)


# --------------------------------------------------------------------------- Postfix interplay


def test_mixed_recipients_relay_only_the_mail_one(gw):
    num, e164 = bed.unique_number()
    token = bed.unique("mixed")
    r = gw.send(ACME, [sms(num), RELAY], bed.make_message(token, "mixed"))
    assert_data(r)
    assert len(gw.jobs(recipient=e164)) == 1
    got = gw.sink.wait_for(lambda m: m.subject == token)
    assert [m.rcpt_tos for m in got] == [[RELAY]]


def test_sms_only_mail_is_not_relayed(gw):
    num, e164 = bed.unique_number()
    token = bed.unique("smsonly")
    r = gw.send(ACME, [sms(num)], bed.make_message(token, "sms only"))
    assert_data(r)
    assert len(gw.jobs(recipient=e164)) == 1
    marker = bed.unique("marker")
    r = gw.send(ACME, [RELAY], bed.make_message(marker, "marker"))
    assert_data(r)
    gw.sink.wait_for(lambda m: m.subject == marker)
    assert gw.sink.matching(lambda m: m.subject == token) == []


def test_unix_socket_milter(tmp_path, sink, notify_sink):
    """The milter on a unix socket (the cheaper transport when Postfix runs on the same host):
    SMS recipient spooled and removed, the mail recipient relayed; the socket is gone after
    SIGTERM. The socket is 0660: Postfix gets in through its group, as `usermod -aG` gives it."""
    import grp
    import os
    import shutil
    import tempfile
    from pathlib import Path

    rundir = Path(tempfile.mkdtemp(prefix="sms-milter-run-"))  # pytest's tmp is 0700: smtpd can't reach it
    os.chmod(rundir, 0o755)
    path = rundir / "milter.sock"
    config = bed.write_config(tmp_path, 1, notify_sink.port, extra={"milter": {"socket": f"unix:{path}"}})
    milter = bed.Milter(config, tmp_path / "milter.log").start()
    postfix = None
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        os.chown(path, -1, grp.getgrnam("postfix").gr_gid)
        postfix = bed.Postfix(None, sink.port, f"unix:{path}").start()
        num, e164 = bed.unique_number()
        token = bed.unique("unixsock")
        msg = bed.make_message(token, "over a unix socket")
        r = bed.smtp_send(postfix.port, ACME, [sms(num), RELAY], msg)
        assert_data(r)
        (job,) = [j for j in bed.queue_list(config) if j["recipient"] == e164]
        assert job["text"] == "over a unix socket"
        got = sink.wait_for(lambda m: m.subject == token)
        assert [m.rcpt_tos for m in got] == [[RELAY]]
    finally:
        if postfix is not None:
            postfix.stop()
        assert milter.stop() == 0
    assert not path.exists()
    shutil.rmtree(rundir)


def test_rejected_message_then_valid_one_in_same_session(gw):
    """python-libmilter's double reply would make Postfix answer the next MAIL FROM with it."""
    n1, _ = bed.unique_number()
    n2, e2 = bed.unique_number()
    with gw.session() as s:
        r1 = s.send(ACME, [sms(n1)], bed.make_message("", "<p>x</p>", subtype="html"))
        r2 = s.send(ACME, [sms(n2)], bed.make_message("", "second is fine"))
    assert_reply(r1["data"], 550, "5.6.1", "HTML")
    assert r2["mail"][0] == 250, r2
    assert rcpt_code(r2, sms(n2)) == 250, r2
    assert_data(r2)
    assert_job(one_job(gw, e2), text="second is fine")


def test_rejected_rcpt_then_more_commands_in_same_session(gw):
    n1, e1 = bed.unique_number()
    n2, e2 = bed.unique_number()
    with gw.session() as s:
        r1 = s.send(ACME, ["+41791234567@sms.example.com", sms(n1)], bed.make_message("", "first"))
        r2 = s.send(ACME, [sms(n2)], bed.make_message("", "second"))
    assert_reply(r1["rcpt"]["+41791234567@sms.example.com"], 550, "5.1.3")
    assert rcpt_code(r1, sms(n1)) == 250, r1
    assert_data(r1)
    assert r2["mail"][0] == 250 and rcpt_code(r2, sms(n2)) == 250, r2
    assert_data(r2)
    assert_job(one_job(gw, e1), text="first")
    assert_job(one_job(gw, e2), text="second")


def test_same_message_id_twice_gives_one_set_of_jobs(gw):
    num, e164 = bed.unique_number()
    raw = bed.make_message("", "only once")
    for _ in range(2):
        r = gw.send(ACME, [sms(num)], raw)
        assert_data(r)
    assert len(gw.jobs(recipient=e164)) == 1


def _ensure_spool_exists(gw) -> None:
    if gw.spool_url:
        return  # PostgreSQL: the milter created the schema when it started
    if not gw.spool_path.exists():
        num, _ = bed.unique_number()
        assert_data(gw.send(ACME, [sms(num)], bed.make_message("", "create spool")))
    assert gw.spool_path.exists(), f"no spool file at {gw.spool_path}"


def test_spool_locked_tempfails_then_recovers(gw):
    _ensure_spool_exists(gw)
    num, e164 = bed.unique_number()
    raw = bed.make_message("", "after the lock")
    with gw.spool_locked():
        t0 = time.monotonic()
        r = gw.send(ACME, [sms(num)], raw)
        elapsed = time.monotonic() - t0
        assert_reply(r["data"], 451, "4.3.0")
        assert elapsed < 8, f"tempfail took {elapsed:.1f}s (spool_timeout is 1 s)"
    assert gw.jobs(recipient=e164) == []
    r = gw.send(ACME, [sms(num)], raw)
    assert_data(r)
    assert len(gw.jobs(recipient=e164)) == 1


def test_kill9_after_250_loses_nothing(gw):
    num, e164 = bed.unique_number()
    r = gw.send(ACME, [sms(num)], bed.make_message("", "survive kill -9"))
    assert_data(r)
    gw.milter.kill9()
    try:
        assert_job(one_job(gw, e164), text="survive kill -9")
    finally:
        gw.ensure_milter()


def test_sigterm_exits_zero_quickly(gw):
    t0 = time.monotonic()
    rc = gw.milter.stop(timeout=10)
    elapsed = time.monotonic() - t0
    try:
        assert rc == 0, f"sms-milter exited {rc} on SIGTERM"
        assert elapsed < 5, f"sms-milter took {elapsed:.1f}s to exit on SIGTERM"
    finally:
        gw.ensure_milter()
    num, e164 = bed.unique_number()
    r = gw.send(ACME, [sms(num)], bed.make_message("", "after restart"))
    assert_data(r)
