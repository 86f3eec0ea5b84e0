"""xml@: ASPSMS XML requests in, jobs and the XML reply mail out (pure: a real SQLite spool in tmp)."""

from __future__ import annotations

import calendar
import email
import ipaddress
import re
import resource
from pathlib import Path

import pytest
from sms_milter.model import Account, Config, Domain, NotifyConfig, SenderRule, XmlConfig
from sms_milter.policy.refusal import Refusal
from sms_milter.spool.base import NewJob
from sms_milter.spool.sqlite import SqliteSpool
from sms_milter.xmlapi.handler import XmlOutcome, handle
from spool_helpers import mark_submitted, record_receipt

NOW = calendar.timegm((2025, 3, 10, 12, 0, 0, 0, 0, 0))  # 10.03.2025 12:00:00 GMT
SENDER = "app@client.example"
ACME = Account(name="acme", userkey="ACME123", password="s3cret", originator="ACME",
               senders=(SenderRule(address="c4ca423@client.example", originator="+41760000000"),),
               max_parts=3)
CAPPED = Account(name="capped", userkey="CAP1", password="pw", credits=5)
NETS = Account(name="nets", userkey="NET1", password="pw", networks=(ipaddress.ip_network("192.0.2.0/24"),))
CFG = Config(domains={"sms.example.com": Domain("sms.example.com", "aspsms")},
             accounts={"acme": ACME, "capped": CAPPED, "nets": NETS},
             notify=NotifyConfig(sender="sms-gateway@example.com"),
             xml=XmlConfig(allowed_url_hosts=("hooks.client.example", "127.0.0.1")))


@pytest.fixture
def spool(tmp_path: Path):
    s = SqliteSpool(tmp_path / "spool.sqlite3")
    yield s
    s.close()


def mail(body: str | bytes, *, headers: str = "", ctype: str | None = "text/plain; charset=ISO-8859-1",
         cte: str = "8bit") -> bytes:
    b = body.encode("latin-1") if isinstance(body, str) else body
    head = (f"From: {SENDER}\r\nTo: xml@sms.example.com\r\nSubject: whatever\r\n"
            "Message-ID: <req-1@client.example>\r\n")
    if ctype:
        head += f"MIME-Version: 1.0\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n"
    return (head + headers + "\r\n").encode("ascii") + b


def request(action: str, body: str = "", userkey: str = "ACME123", password: str = "s3cret") -> str:
    cred = ""
    if userkey is not None:
        cred += f"<Userkey>{userkey}</Userkey>"
    if password is not None:
        cred += f"<Password>{password}</Password>"
    return (f'<?xml version="1.0" encoding="ISO-8859-1"?>\r\n<aspsms>\r\n{cred}\r\n{body}\r\n'
            f"<Action>{action}</Action>\r\n</aspsms>\r\n")


def send_body(*numbers: str, text: str = "Hello", extra: str = "", refs: bool = True) -> str:
    rcpts = "".join(
        f"<Recipient><PhoneNumber>{n}</PhoneNumber>"
        + (f"<TransRefNumber>ref{i}</TransRefNumber>" if refs else "") + "</Recipient>"
        for i, n in enumerate(numbers, 1))
    return f"{rcpts}<MessageData>{text}</MessageData>{extra}"


def run(spool, raw: bytes, sender: str = SENDER, ip: str | None = "198.51.100.7", cfg: Config = CFG,
        now: float = NOW) -> XmlOutcome:
    out = handle(raw, sender, ip, cfg, spool, "QID123", now)
    assert isinstance(out, XmlOutcome), out
    return out


def reply_xml(out: XmlOutcome) -> str:
    assert out.reply is not None
    msg = email.message_from_bytes(out.reply.content)
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode("ascii")  # the reply is pure ASCII


def value(xml: str, name: str) -> str | None:
    m = re.search(rf"<{name}>(.*?)</{name}>", xml, re.S)
    return m.group(1) if m else None


def code_of(out: XmlOutcome) -> int:
    v = value(reply_xml(out), "ErrorCode")
    assert v is not None
    return int(v)


def send(spool, *numbers: str, **kw) -> XmlOutcome:
    extra = kw.pop("extra", "")
    text = kw.pop("text", "Hello")
    refs = kw.pop("refs", True)
    body = send_body(*numbers, text=text, extra=extra, refs=refs)
    return run(spool, mail(request("SendTextSMS", body, **kw)))


# -- SendTextSMS -------------------------------------------------------------------------------

def test_send_text_sms_ok(spool) -> None:
    out = send(spool, "0041791234567", "+41797654321")
    xml = reply_xml(out)
    assert value(xml, "ErrorCode") == "1"
    assert value(xml, "ErrorDescription") == "Ok"
    assert value(xml, "CreditsUsed") == "2"
    assert [j.recipient for j in out.jobs] == ["+41791234567", "+41797654321"]
    assert [j.trans_ref for j in out.jobs] == ["ref1", "ref2"]
    j = out.jobs[0]
    assert (j.account, j.originator, j.text, j.parts, j.notify) == ("acme", "ACME", "Hello", 1, "NONE")
    assert (j.sender, j.message_id, j.queue_id, j.flash, j.urls) == (
        SENDER, "<req-1@client.example>", "QID123", False, {})
    assert j.not_before is None and j.expires_at == NOW + 1440 * 60
    assert "SendTextSMS" in out.log and "ErrorCode=1" in out.log and "s3cret" not in out.log


def test_send_jobs_commit_with_reply(spool) -> None:
    out = send(spool, "0041791234567")
    res = spool.add_message("k1", out.jobs, 60, mails=[out.reply])
    assert len(res.job_ids) == 1
    assert spool.due_outbox(10)[0][1].rcpt == SENDER


def test_send_long_text_counts_parts(spool) -> None:
    out = send(spool, "0041791234567", "0041797654321", text="x" * 200)
    assert [j.parts for j in out.jobs] == [2, 2]
    assert value(reply_xml(out), "CreditsUsed") == "4"


def test_latin1_reference_roundtrip(spool) -> None:
    out = send(spool, "0041791234567", text="Gr&#252;&#223;e &#228; &#38; &#60;3 &#8364;")
    assert out.jobs[0].text == "Grüße ä & <3 €"


def test_raw_latin1_bytes_in_declared_latin1_document(spool) -> None:
    out = send(spool, "0041791234567", text="K\xe4se")
    assert out.jobs[0].text == "Käse"


def test_originator_given_and_numeric_authorized(spool) -> None:
    out = send(spool, "0041791234567", extra="<Originator>MyShop</Originator>")
    assert out.jobs[0].originator == "MyShop"
    out = send(spool, "0041791234567", extra="<Originator>0041760000000</Originator>")
    assert out.jobs[0].originator == "+41760000000"


def test_invalid_originator_10(spool) -> None:
    for orig in ("ThisIsWayTooLong", "+41 76 000 00 00 x", "0041790000001"):  # last: not authorized
        out = send(spool, "0041791234567", extra=f"<Originator>{orig}</Originator>")
        assert code_of(out) == 10, orig
        assert value(reply_xml(out), "ErrorDescription") == (
            "Invalid originator. A maximum of 11 characters is allowed for alphanumeric originators.")
        assert out.jobs == []


def test_missing_recipient_20(spool) -> None:
    out = run(spool, mail(request("SendTextSMS", "<MessageData>Hi</MessageData>")))
    assert code_of(out) == 20
    assert value(reply_xml(out), "ErrorDescription") == (
        "Missing a recipient. Please specify at least one recipient.")
    assert out.jobs == []


def test_invalid_phone_number_refuses_whole_request_20(spool) -> None:
    out = send(spool, "0041791234567", "12ab")
    assert code_of(out) == 20 and out.jobs == []
    assert "12ab" in (value(reply_xml(out), "ErrorDetail") or "")


def test_more_than_1000_recipients_20(spool) -> None:
    out = send(spool, *(["0041791234567"] * 1001), refs=False)
    assert code_of(out) == 20 and out.jobs == []
    out = send(spool, *(f"0041791{i:06d}" for i in range(1000)), refs=False)
    assert code_of(out) == 1 and len(out.jobs) == 1000
    out = send(spool, *(["0041791234567"] * 1000), refs=False)  # one number 1,000 times: one SMS
    assert code_of(out) == 1 and len(out.jobs) == 1
    assert value(reply_xml(out), "CreditsUsed") == "1"


@pytest.mark.parametrize("text", ["", "   ", "x" * (153 * 3 + 1)])
def test_invalid_message_data_11(spool, text: str) -> None:
    out = send(spool, "0041791234567", text=text)
    assert code_of(out) == 11
    assert value(reply_xml(out), "ErrorDescription") == "Invalid message date. Please verify the data."
    assert out.jobs == []


def test_message_data_missing_11(spool) -> None:
    body = "<Recipient><PhoneNumber>0041791234567</PhoneNumber></Recipient>"
    assert code_of(run(spool, mail(request("SendTextSMS", body)))) == 11


def test_deferred_delivery_time_sets_not_before(spool) -> None:
    # 10.03.2025 15:30:00 at GMT+1 (default TimeZone) = 14:30 GMT
    out = send(spool, "0041791234567", extra="<DeferredDeliveryTime>10032025153000</DeferredDeliveryTime>")
    at = calendar.timegm((2025, 3, 10, 14, 30, 0, 0, 0, 0))
    assert out.jobs[0].not_before == at
    assert out.jobs[0].expires_at == at + 1440 * 60
    out = send(spool, "0041791234567",
               extra="<DeferredDeliveryTime>10032025153000</DeferredDeliveryTime><TimeZone>-5</TimeZone>")
    assert out.jobs[0].not_before == calendar.timegm((2025, 3, 10, 20, 30, 0, 0, 0, 0))


def test_deferred_slightly_past_sends_now(spool) -> None:
    out = send(spool, "0041791234567", extra="<DeferredDeliveryTime>10032025120000</DeferredDeliveryTime>")
    assert code_of(out) == 1 and out.jobs[0].not_before is None


@pytest.mark.parametrize("extra", [
    "<DeferredDeliveryTime>31022025120000</DeferredDeliveryTime>",  # no 31 February
    "<DeferredDeliveryTime>2025-03-10 12:00</DeferredDeliveryTime>",
    "<DeferredDeliveryTime>01012020120000</DeferredDeliveryTime>",  # long past
    "<DeferredDeliveryTime>01012030120000</DeferredDeliveryTime>",  # years ahead
    "<DeferredDeliveryTime>11032025120000</DeferredDeliveryTime><TimeZone>CET</TimeZone>",
    "<LifeTime>one day</LifeTime>",
])
def test_invalid_deferred_delivery_time_22(spool, extra: str) -> None:
    out = send(spool, "0041791234567", extra=extra)
    assert code_of(out) == 22
    assert value(reply_xml(out), "ErrorDescription") == (
        "Invalid deferred delivery time. Please check the format.")
    assert out.jobs == []


@pytest.mark.parametrize(("lifetime", "minutes"), [("60", 60), ("1", 3), ("5000", 1440), ("", 1440)])
def test_lifetime_sets_expires_at(spool, lifetime: str, minutes: int) -> None:
    out = send(spool, "0041791234567", extra=f"<LifeTime>{lifetime}</LifeTime>")
    assert out.jobs[0].expires_at == NOW + minutes * 60


def test_flashing_sms(spool) -> None:
    assert send(spool, "0041791234567", extra="<FlashingSMS>1</FlashingSMS>").jobs[0].flash is True
    assert send(spool, "0041791234567", extra="<FlashingSMS>0</FlashingSMS>").jobs[0].flash is False


def test_notification_urls_allowed(spool) -> None:
    extra = ("<URLBufferedMessageNotification>https://hooks.client.example/b?ref=</URLBufferedMessageNotification>"
             "<URLDeliveryNotification>http://HOOKS.client.example:8080/d?x=1&#38;ref=</URLDeliveryNotification>"
             "<URLNonDeliveryNotification>http://127.0.0.1/f</URLNonDeliveryNotification>")
    out = send(spool, "0041791234567", extra=extra)
    assert out.jobs[0].urls == {"buffered": "https://hooks.client.example/b?ref=",
                                "delivered": "http://HOOKS.client.example:8080/d?x=1&ref=",
                                "failed": "http://127.0.0.1/f"}


@pytest.mark.parametrize(("element", "url", "code"), [
    ("URLBufferedMessageNotification", "http://169.254.169.254/latest/meta-data", 17),
    ("URLDeliveryNotification", "http://localhost/d", 18),
    ("URLNonDeliveryNotification", "ftp://hooks.client.example/f", 19),
    ("URLDeliveryNotification", "http://hooks.client.example.evil.example/d", 18),
    ("URLDeliveryNotification", "http://user@evil.example/@hooks.client.example", 18),
    ("URLNonDeliveryNotification", "http://hooks.client.example:99999/", 19),
])
def test_notification_url_not_allowed(spool, element: str, url: str, code: int) -> None:
    out = send(spool, "0041791234567", extra=f"<{element}>{url}</{element}>")
    assert code_of(out) == code and out.jobs == []


def test_url_error_descriptions(spool) -> None:
    for element, desc in (
            ("URLBufferedMessageNotification", "Invalid URL buffered message notification string."),
            ("URLDeliveryNotification", "Invalid URL delivery notification string."),
            ("URLNonDeliveryNotification", "Invalid URL non delivery notification string.")):
        out = send(spool, "0041791234567", extra=f"<{element}>http://10.0.0.1/</{element}>")
        assert value(reply_xml(out), "ErrorDescription") == desc


def test_not_enough_credits_5(spool) -> None:
    kw = {"userkey": "CAP1", "password": "pw"}
    out = send(spool, "0041791234567", "0041797654321", text="x" * 200, **kw)  # 4 parts of 5
    assert code_of(out) == 1
    spool.add_message("k", out.jobs, 60)
    out = send(spool, "0041791234567", "0041797654321", **kw)  # 2 more: only 1 left
    assert code_of(out) == 5 and out.jobs == []
    assert value(reply_xml(out), "ErrorDescription") == (
        "Not enough credits available. Please recharge your account to proceed.")
    assert code_of(send(spool, "0041791234567", **kw)) == 1


# -- credentials and access --------------------------------------------------------------------

def test_invalid_userkey_8(spool) -> None:
    out = run(spool, mail(request("ShowCredits", userkey=None)))  # type: ignore[arg-type]
    assert code_of(out) == 8
    assert value(reply_xml(out), "ErrorDescription") == (
        "Invalid UserKey. Please check the spelling of the UserKey.")


def test_invalid_password_9(spool) -> None:
    out = run(spool, mail(request("ShowCredits", password="")))
    assert code_of(out) == 9
    assert value(reply_xml(out), "ErrorDescription") == "Invalid Password."


@pytest.mark.parametrize(("userkey", "password"), [("ACME123", "Wr0ngPw"), ("NOPE", "s3cret")])
def test_authorization_failed_3(spool, userkey: str, password: str) -> None:
    raw = mail(request("SendTextSMS", send_body("0041791234567"), userkey=userkey, password=password))
    out = run(spool, raw)
    assert code_of(out) == 3 and out.jobs == []
    assert value(reply_xml(out), "ErrorDescription") == "Authorization failed."
    assert password not in out.reply.content.decode("ascii") and password not in out.log  # type: ignore[union-attr]


def test_user_access_denied_25_for_client_network(spool) -> None:
    raw = mail(request("ShowCredits", userkey="NET1", password="pw"))
    out = run(spool, raw, ip="203.0.113.9")
    assert code_of(out) == 25
    assert value(reply_xml(out), "ErrorDescription") == "User access denied."
    assert code_of(run(spool, raw, ip="192.0.2.10")) == 1


@pytest.mark.parametrize("action", ["SendWAPPushSMS", "sendtextsms", "Nonsense<&>"])
def test_other_actions_25(spool, action: str) -> None:
    out = run(spool, mail(request(action.replace("<&>", "&#60;&#38;&#62;"))))
    assert code_of(out) == 25 and out.jobs == []
    assert out.reply is not None
    msg = email.message_from_bytes(out.reply.content)
    assert msg["Subject"] in (f"ASPSMS XML reply: {action}", "ASPSMS XML reply")


def test_missing_or_double_action_25(spool) -> None:
    no_action = request("X").replace("<Action>X</Action>", "")
    assert code_of(run(spool, mail(no_action))) == 25
    two = request("ShowCredits", "<Action>ShowCredits</Action>")
    assert code_of(run(spool, mail(two))) == 25


def test_wrong_root_25(spool) -> None:
    out = run(spool, mail("<request><Userkey>ACME123</Userkey><Action>ShowCredits</Action></request>"))
    assert code_of(out) == 25


# -- ShowCredits, CheckOriginatorAuthorization -------------------------------------------------

def test_show_credits_unlimited(spool) -> None:
    out = run(spool, mail(request("ShowCredits")))
    xml = reply_xml(out)
    assert value(xml, "ErrorCode") == "1" and value(xml, "Credits") == "unlimited"


def test_show_credits_counts_spooled_parts(spool) -> None:
    raw = mail(request("ShowCredits", userkey="CAP1", password="pw"))
    assert value(reply_xml(run(spool, raw)), "Credits") == "5"
    spool.add_message("k", [NewJob(recipient="+41791234567", originator="X", text="t", parts=2,
                                   account="capped")], 60)
    assert value(reply_xml(run(spool, raw)), "Credits") == "3"


@pytest.mark.parametrize(("orig", "code"), [
    ("MyShop", 31), ("ACME", 31), ("+41760000000", 31), ("0041760000000", 31),
    ("0041790000001", 30), ("ThisIsWayTooLong", 10), ("", 10),
])
def test_check_originator_authorization(spool, orig: str, code: int) -> None:
    out = run(spool, mail(request("CheckOriginatorAuthorization", f"<Originator>{orig}</Originator>")))
    assert code_of(out) == code
    desc = {31: "Originator already authorized", 30: "Originator Not Authorized."}
    if code in desc:
        assert value(reply_xml(out), "ErrorDescription") == desc[code]


# -- InquireDeliveryNotifications --------------------------------------------------------------

def test_inquire_missing_trans_ref_23(spool) -> None:
    out = run(spool, mail(request("InquireDeliveryNotifications", "<TransRefNumber> </TransRefNumber>")))
    assert code_of(out) == 23
    assert value(reply_xml(out), "ErrorDescription") == "Missing transaction reference number."


def test_inquire_reports_states(spool) -> None:
    sent = send(spool, "0041791234567", "0041797654321", "0041790000002")
    ids = spool.add_message("k", sent.jobs, 60).job_ids
    spool.fail(ids[1], "receipt stat:UNDELIV err:206")
    mark_submitted(spool, ids[2], "x", ["abc"])
    record_receipt(spool, "abc", "delivered")
    body = "".join(f"<TransRefNumber>{r}</TransRefNumber>" for r in ("ref1", "ref2", "ref3", "unknown"))
    out = run(spool, mail(request("InquireDeliveryNotifications", body)))
    xml = reply_xml(out)
    assert value(xml, "ErrorCode") == "1"
    notes = re.findall(r"<DeliveryNotification>(.*?)</DeliveryNotification>", xml, re.S)
    assert len(notes) == 3  # the unknown reference is left out
    got = {value(n, "TransRefNumber"): (value(n, "DeliveryStatus"), value(n, "ReasonCode")) for n in notes}
    assert got == {"ref1": ("-1", "000"), "ref2": ("2", "206"), "ref3": ("0", "000")}
    for n in notes:
        assert re.fullmatch(r"\d{14}", value(n, "SubmissionDate") or "")
    assert value(notes[0], "NotificationDate") is None  # still queued
    assert re.fullmatch(r"\d{14}", value(notes[2], "NotificationDate") or "")


def test_inquire_dates_use_timezone(spool) -> None:
    sent = send(spool, "0041791234567")
    spool.add_message("k", sent.jobs, 60)
    job = spool.list_jobs()[0]
    import time
    expect = time.strftime("%d%m%Y%H%M%S", time.gmtime(int(job.created_at) + 3600))
    out = run(spool, mail(request("InquireDeliveryNotifications", "<TransRefNumber>ref1</TransRefNumber>")))
    assert value(reply_xml(out), "SubmissionDate") == expect


def test_inquire_only_own_account(spool) -> None:
    sent = send(spool, "0041791234567")
    spool.add_message("k", sent.jobs, 60)
    out = run(spool, mail(request("InquireDeliveryNotifications", "<TransRefNumber>ref1</TransRefNumber>",
                                  userkey="CAP1", password="pw")))
    assert "DeliveryNotification" not in reply_xml(out)


def test_reply_non_latin1_uses_references(spool) -> None:
    sent = run(spool, mail(request("SendTextSMS", "<Recipient><PhoneNumber>0041791234567</PhoneNumber>"
                                   "<TransRefNumber>&#937;-&#228;</TransRefNumber></Recipient>"
                                   "<MessageData>x</MessageData>")))
    spool.add_message("k", sent.jobs, 60)
    inquiry = request("InquireDeliveryNotifications", "<TransRefNumber>&#937;-&#228;</TransRefNumber>")
    out = run(spool, mail(inquiry))
    assert out.reply is not None
    assert b"<TransRefNumber>&#937;-&#228;</TransRefNumber>" in out.reply.content
    assert max(out.reply.content) < 128


# -- parser errors and hostile documents -------------------------------------------------------

def test_not_well_formed_gets_parser_error_form(spool) -> None:
    doc = ('<?xml version="1.0" encoding="ISO-8859-1"?>\r\n<aspsms>\r\n  <Userkey>ACME123</Userkey>\r\n'
           "  <Password>s3cret</Passwort>\r\n</aspsms>")
    out = run(spool, mail(doc))
    xml = reply_xml(out)
    assert value(xml, "ErrorCode") is None
    assert value(xml, "ParserErrorLine") == "4"
    assert value(xml, "ParserErrorLinePos") == "21"  # expat points at the name in </Passwort>, 1-based
    assert value(xml, "ParserErrorDescription") == "mismatched tag"
    assert value(xml, "ParserErrorCode") and value(xml, "ParserErrorFilePos")
    assert "s3cret" not in out.reply.content.decode("ascii")  # type: ignore[union-attr]
    assert "s3cret" not in out.log and "parser error" in out.log
    assert out.jobs == []


def test_leading_blank_lines_keep_line_numbers(spool) -> None:
    out = run(spool, mail("\r\n\r\n<aspsms><Userkey>&bad;</Userkey></aspsms>"))
    assert value(reply_xml(out), "ParserErrorLine") == "3"


def test_entity_bomb_is_refused_without_expansion(spool) -> None:
    lol = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">'
                                      for i in range(1, 10)]
    doc = ('<?xml version="1.0"?>\n<!DOCTYPE aspsms [\n' + "\n".join(lol) + "\n]>\n"
           "<aspsms><Userkey>ACME123</Userkey><Password>s3cret</Password>"
           "<Recipient><PhoneNumber>0041791234567</PhoneNumber></Recipient>"
           "<MessageData>&lol9;</MessageData><Action>SendTextSMS</Action></aspsms>")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run(spool, mail(doc))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    xml = reply_xml(out)
    assert out.jobs == []
    assert value(xml, "ParserErrorCode") == "1001"
    assert "DTD" in (value(xml, "ParserErrorDescription") or "")
    assert value(xml, "ParserErrorLine") == "2"


def test_external_entity_is_refused(spool, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    doc = (f'<?xml version="1.0"?>\n<!DOCTYPE aspsms [<!ENTITY x SYSTEM "file://{secret}">]>\n'
           "<aspsms><MessageData>&x;</MessageData></aspsms>")
    out = run(spool, mail(doc))
    assert out.jobs == [] and b"TOPSECRET" not in out.reply.content  # type: ignore[union-attr]
    assert value(reply_xml(out), "ParserErrorCode") == "1001"


def test_undeclared_entity_is_a_parser_error(spool) -> None:
    out = run(spool, mail(request("SendTextSMS", send_body("0041791234567", text="&nbsp;"))))
    assert value(reply_xml(out), "ParserErrorDescription") == "undefined entity"


# -- the mail around it ------------------------------------------------------------------------

def test_reply_mail_headers(spool) -> None:
    out = run(spool, mail(request("ShowCredits")))
    assert out.reply is not None and out.reply.rcpt == SENDER
    msg = email.message_from_bytes(out.reply.content)
    assert msg["From"] == "<sms-gateway@example.com>"
    assert msg["To"] == f"<{SENDER}>"
    assert msg["Subject"] == "ASPSMS XML reply: ShowCredits"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<req-1@client.example>" == msg["References"]
    assert msg["Message-ID"] and msg["Message-ID"] != "<req-1@client.example>" and msg["Date"]
    assert msg.get_content_type() == "text/xml" and msg.get_content_charset() == "iso-8859-1"
    assert reply_xml(out).startswith('<?xml version="1.0" encoding="ISO-8859-1"?>')
    assert b"\r\n\r\n" in out.reply.content and b"\n" not in out.reply.content.replace(b"\r\n", b"")


def test_null_sender_gets_no_reply_but_jobs(spool) -> None:
    out = run(spool, mail(request("SendTextSMS", send_body("0041791234567"))), sender="")
    assert out.reply is None and len(out.jobs) == 1 and out.jobs[0].sender == ""


def test_no_reply_to_autoresponder_or_self(spool) -> None:
    raw = mail(request("ShowCredits"), headers="Auto-Submitted: auto-replied\r\n")
    assert run(spool, raw).reply is None
    assert run(spool, mail(request("ShowCredits")), sender="sms-gateway@example.com").reply is None


def test_base64_and_qp_bodies(spool) -> None:
    import base64
    import quopri
    doc = request("SendTextSMS", send_body("0041791234567", text="K\xe4se")).encode("latin-1")
    for cte, enc in (("base64", base64.encodebytes(doc)), ("quoted-printable", quopri.encodestring(doc))):
        out = run(spool, mail(enc, ctype="text/xml; charset=ISO-8859-1", cte=cte))
        assert code_of(out) == 1 and out.jobs[0].text == "Käse", cte


def test_no_content_type_and_application_xml(spool) -> None:
    doc = request("ShowCredits")
    assert code_of(run(spool, mail(doc, ctype=None))) == 1
    assert code_of(run(spool, mail(doc, ctype="application/xml"))) == 1


def test_format_flowed_is_joined(spool) -> None:
    doc = request("SendTextSMS", send_body("0041791234567", text="a long line \r\nwrapped"))
    out = run(spool, mail(doc, ctype="text/plain; charset=ISO-8859-1; format=flowed"))
    assert out.jobs[0].text == "a long line wrapped"


def test_utf8_charset_without_declaration(spool) -> None:
    doc = ("<aspsms><Userkey>ACME123</Userkey><Password>s3cret</Password>"
           "<Recipient><PhoneNumber>0041791234567</PhoneNumber></Recipient>"
           "<MessageData>Käse</MessageData><Action>SendTextSMS</Action></aspsms>").encode()
    out = run(spool, mail(doc, ctype="text/plain; charset=utf-8"))
    assert out.jobs[0].text == "Käse"


def _multipart(*parts: tuple[str, str]) -> bytes:
    body = "".join(f"--B\r\nContent-Type: {ct}\r\n\r\n{content}\r\n" for ct, content in parts) + "--B--\r\n"
    return mail(body, ctype='multipart/mixed; boundary="B"')


@pytest.mark.parametrize("raw", [
    mail("<html><body><p>hi</p></body></html>", ctype="text/html"),
    _multipart(("text/plain", request("ShowCredits")), ("text/html", "<p>x</p>")),
    _multipart(("text/plain", request("ShowCredits")), ("application/pdf", "JVBERi0=")),
    mail("   \r\n"),
    mail("JVBERi0=", ctype="application/octet-stream"),
    mail("<!DOCTYPE html><html><body>x</body></html>"),
])
def test_not_an_xml_request_is_refused(spool, raw: bytes) -> None:
    out = handle(raw, SENDER, None, CFG, spool, "Q", NOW)
    assert isinstance(out, Refusal)
    assert (out.code, out.xcode) == ("550", "5.6.1")


def test_single_part_multipart_is_accepted(spool) -> None:
    out = run(spool, _multipart(("text/xml", request("ShowCredits"))))
    assert code_of(out) == 1
