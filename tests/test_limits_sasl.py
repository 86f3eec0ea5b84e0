"""`smtp_auth` (limits): an account bound to SMTP AUTH logins, with a real Postfix doing SASL
(Cyrus SASL, sasldb written by saslpasswd2 from sasl2-bin) and smtplib logging in. Postfix hands
the login to the milter as {auth_authen} with the MAIL command (milter_mail_macros).
"""

from __future__ import annotations

import shutil
import subprocess

import bed
import pytest

pytestmark = pytest.mark.bed

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
EXTRA = {"accounts": {"bound": {"senders": [{"address": "bound@client.example"}], "smtp_auth": ["alice"],
                                "userkey": "BOUND1", "password": "b0und"}}}


@pytest.fixture(scope="module")
def sasl_gw(tmp_path_factory, sink, notify_sink):
    if shutil.which("saslpasswd2") is None:
        pytest.fail("saslpasswd2 is missing: apt-get install -y sasl2-bin libsasl2-modules (demo/setup does)",
                    pytrace=False)
    base = tmp_path_factory.mktemp("sasl")
    port = bed.free_port()
    cfg = bed.write_config(base, port, notify_sink.port, extra=EXTRA)
    milter = bed.Milter(cfg, base / "milter.log")
    pf = bed.Postfix(None, sink.port, f"inet:127.0.0.1:{port}")
    # Debian's Postfix reads Cyrus SASL's smtpd.conf from $config_directory/sasl (its patch
    # 07_sasl_config), other builds from cyrus_sasl_config_path: the same directory serves both.
    sasl = pf.confdir / "sasl"
    sasl.mkdir(parents=True)
    db = sasl / "sasldb2"
    for user, password in USERS.items():
        subprocess.run(["saslpasswd2", "-f", str(db), "-p", "-c", "-u", "mx.bed.example", user],
                       input=password, text=True, check=True, capture_output=True, timeout=30)
    shutil.chown(db, "postfix", "postfix")
    db.chmod(0o640)
    (sasl / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                     f"mech_list: PLAIN LOGIN\nsasldb_path: {db}\n")
    pf.extra_main.update({
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": str(sasl),
        "smtpd_sasl_local_domain": "mx.bed.example",
        "smtpd_sasl_security_options": "noanonymous",
        "smtpd_tls_auth_only": "no",
        # what README's main.cf snippet shows (Postfix's default already has it)
        "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                              "{mail_mailer}",
    })
    milter.start()
    try:
        pf.start()
    except Exception:
        milter.stop()
        raise
    yield pf, milter, cfg
    pf.stop()
    milter.stop()


def send(pf: bed.Postfix, login: str | None, rcpt: str, body: str, subject: str = "") -> dict:
    with bed.SmtpSession(pf.port) as s:
        if login is not None:
            code, _ = s.smtp.login(login, USERS[login])
            assert code == 235
        return s.send("bound@client.example", [rcpt], bed.make_message(subject, body))


def test_the_bound_login_passes_another_or_none_is_refused(sasl_gw):
    pf, milter, cfg = sasl_gw
    token = bed.unique()
    number, e164 = bed.unique_number()
    rcpt = f"{number}@sms.example.com"
    ok = send(pf, "alice", rcpt, f"{token} alice")
    assert ok["rcpt"][rcpt][0] == 250 and ok["data"][0] == 250, ok
    for login in ("bob", None):
        r = send(pf, login, rcpt, f"{token} {login}")
        code, text = r["rcpt"][rcpt]
        assert code == 550 and text.startswith("5.7.1") and "smtp_auth" in text, r
        assert "bob" not in text and "bound@client.example" not in text
    jobs = [j for j in bed.queue_list(cfg) if token in j["text"]]
    assert [(j["recipient"], j["account"]) for j in jobs] == [(e164, "bound")]
    assert milter.log().count("limit smtp_auth refused") >= 2


def test_textsms_account_bound_to_a_login(sasl_gw):
    pf, _milter, cfg = sasl_gw
    token = bed.unique()
    number, _ = bed.unique_number()
    subject = f"U=BOUND1 P=b0und R={number}"
    refused = send(pf, None, "textsms@sms.example.com", f"{token} none", subject)
    assert refused["data"][0] == 550 and refused["data"][1].startswith("5.7.1")
    assert "smtp_auth" in refused["data"][1]
    assert "b0und" not in refused["data"][1]
    assert send(pf, "alice", "textsms@sms.example.com", f"{token} alice", subject)["data"][0] == 250
    assert len([j for j in bed.queue_list(cfg) if token in j["text"]]) == 1
