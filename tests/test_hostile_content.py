"""Issue 9 (items 1, 2, 11): hostile headers, charsets and MIME through a real Postfix.

Every malformed mail ends in a decision of its own (250 with the value made safe, or a 5xx
naming what is wrong), never a 4xx, and its innocent neighbours are accepted beside it.
"""

from __future__ import annotations

import threading

import bed
import pytest
from test_inline import ACME, TEXTSMS, assert_data, sms

pytestmark = pytest.mark.bed


def raw_mail(headers: list[bytes], body: bytes = b"hello") -> bytes:
    return b"\r\n".join(headers) + b"\r\n\r\n" + body + b"\r\n"


def plain_headers(to: str, *extra: bytes) -> list[bytes]:
    return [b"From: <" + ACME.encode() + b">", b"To: <" + to.encode() + b">",
            b"Message-ID: <" + bed.unique("m").encode() + b"@client.bed.example>", *extra]


# --------------------------------------------------------------------------- item 1

POISON_HEADERS = [
    # (description, headers that replace/extend the defaults)
    ("8-bit Message-ID", [b"Message-ID: <ab\xd6cd@x>"]),
    ("8-bit Message-ID, invalid UTF-8", [b"Message-ID: <\xff\xfe\xc3(@x>"]),
    ("8-bit Subject", [b"Subject: Gr\xfc\xdfe \xff"]),
    ("8-bit From", [b"From: J\xf6rg <" + ACME.encode() + b">"]),
    ("8-bit unknown header", [b"X-Weird: \x80\x81\xfe\xff"]),
    ("encoded word in a lone surrogate charset", [b"Subject: =?utf-7?Q?+2AA-?="]),
]


def _poison(num: str, extra: list[bytes], mid: bool) -> bytes:
    names = {h.split(b":", 1)[0].lower() for h in extra}
    base = [h for h in plain_headers(sms(num)) if h.split(b":", 1)[0].lower() not in names]
    return raw_mail(base + extra, b"poison body")


@pytest.mark.parametrize("what,extra", POISON_HEADERS, ids=[p[0] for p in POISON_HEADERS])
def test_poison_header_gets_a_decision_and_neighbours_pass(gw, what, extra):
    """The poison mail and ten innocent ones, sent at once on their own connections: every
    innocent one 250 with its job; the poison one a decision (never 4xx), jobs iff 250."""
    poison_num, poison_e164 = bed.unique_number()
    innocents = [bed.unique_number() for _ in range(10)]
    results: dict[str, dict] = {}

    def send(key: str, num: str, raw: bytes) -> None:
        results[key] = gw.send(ACME, [sms(num)], raw)

    threads = [threading.Thread(target=send, args=("poison", poison_num, _poison(poison_num, extra, True)))]
    for num, _ in innocents:
        threads.append(threading.Thread(target=send, args=(num, num, bed.make_message("", "innocent",
                                                                                      sender=ACME,
                                                                                      to=sms(num)))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for num, e164 in innocents:
        assert_data(results[num], 250)
        assert len(gw.jobs(recipient=e164)) == 1
    code, text = results["poison"]["data"]
    assert code in (250, 550, 552, 554), f"{what}: expected a decision, got {code} {text}"
    assert "internal error" not in text and "unavailable" not in text
    jobs = gw.jobs(recipient=poison_e164)
    assert len(jobs) == (1 if code == 250 else 0), jobs
    if code == 250:
        assert jobs[0]["text"] == "poison body"


def test_eight_bit_message_id_still_deduplicates(gw):
    """The 8-bit Message-ID is the idempotency key: the same mail sent twice is one job."""
    num, e164 = bed.unique_number()
    raw = _poison(num, [b"Message-ID: <" + bed.unique("p").encode() + b"\xd6@x>"], True)
    assert_data(gw.send(ACME, [sms(num)], raw), 250)
    assert_data(gw.send(ACME, [sms(num)], raw), 250)
    assert len(gw.jobs(recipient=e164)) == 1


def test_a_nul_in_a_message_id_does_not_make_distinct_mails_one(gw):
    """A NUL inside a header value is kept (made safe), not cut there: two mails whose
    Message-IDs differ only after the NUL are two mails, not a resend of one."""
    num, e164 = bed.unique_number()
    token = bed.unique("n").encode()
    for tail, body in ((b"one", b"first text"), (b"two", b"second text")):
        raw = _poison(num, [b"Message-ID: <" + token + b"\x00" + tail + b"@x>"], True).replace(
            b"poison body", body)
        assert_data(gw.send(ACME, [sms(num)], raw), 250)
    assert sorted(j["text"] for j in gw.jobs(recipient=e164)) == ["first text", "second text"]


# --------------------------------------------------------------------------- item 2

NOT_CHARSETS = ["punycode", "undefined", "rot13", "rot_13", "base64", "hex", "zlib", "idna", "uu", "quopri",
                "bz2", "unicode_escape", "raw_unicode_escape", "charmap", "x-no-such"]


@pytest.mark.parametrize("charset", NOT_CHARSETS)
def test_codec_that_is_no_charset_is_unknown_charset(gw, charset):
    num, e164 = bed.unique_number()
    raw = raw_mail(plain_headers(sms(num), b"MIME-Version: 1.0",
                                 b"Content-Type: text/plain; charset=" + charset.encode()), b"abc")
    r = gw.send(ACME, [sms(num)], raw)
    assert r["data"][0] == 550, r
    assert r["data"][1].startswith(f"5.6.0 Unknown charset '{charset}'"), r
    assert gw.jobs(recipient=e164) == []


@pytest.mark.parametrize("charset", ["punycode", "undefined", "rot13", "zlib", "idna"])
def test_codec_that_is_no_charset_in_subject_encoded_word(gw, charset):
    num, e164 = bed.unique_number()
    raw = raw_mail(plain_headers(sms(num), b"Subject: =?" + charset.encode() + b"?Q?abc?="), b"abc")
    r = gw.send(ACME, [sms(num)], raw)
    assert r["data"][0] == 550 and r["data"][1].startswith(f"5.6.0 Unknown charset '{charset}'"), r
    assert gw.jobs(recipient=e164) == []


@pytest.mark.parametrize("charset", ["punycode", "undefined", "rot13"])
def test_codec_that_is_no_charset_for_textsms_and_xml(gw, charset):
    num, e164 = bed.unique_number()
    ct = b"Content-Type: text/plain; charset=" + charset.encode()
    raw = raw_mail(plain_headers(TEXTSMS, b"Subject: U=ACME123 P=s3cret R=" + num.encode(),
                                 b"MIME-Version: 1.0", ct), b"abc")
    r = gw.send("someone@anywhere.example", [TEXTSMS], raw)
    assert r["data"][0] == 550 and r["data"][1].startswith(f"5.6.0 Unknown charset '{charset}'"), r
    raw = raw_mail(plain_headers("xml@sms.example.com", b"MIME-Version: 1.0", ct), b"<aspsms/>")
    r = gw.send("someone@anywhere.example", ["xml@sms.example.com"], raw)
    assert r["data"][0] == 550 and r["data"][1].startswith(f"5.6.0 Unknown charset '{charset}'"), r
    assert gw.jobs(recipient=e164) == []


def test_real_charsets_still_decode(gw):
    for charset, body in (("windows-1252", "caf\u00e9"), ("koi8-r", "caf"), ("utf-16", "hallo"),
                          ("us-ascii", "plain")):
        num, e164 = bed.unique_number()
        raw = raw_mail(plain_headers(sms(num), b"MIME-Version: 1.0",
                                     b"Content-Type: text/plain; charset=" + charset.encode(),
                                     b"Content-Transfer-Encoding: base64"),
                       __import__("base64").b64encode(body.encode(charset)))
        r = gw.send(ACME, [sms(num)], raw)
        assert_data(r, 250)
        assert gw.jobs(recipient=e164)[0]["text"] == body


# --------------------------------------------------------------------------- item 11

RFC2231_CTYPE = b"Content-Type: text/plain; charset*=us-ascii''iso-8859-1; format*=us-ascii''flowed"


def test_rfc2231_parameters_for_number_at(gw):
    num, e164 = bed.unique_number()
    raw = raw_mail(plain_headers(sms(num), b"MIME-Version: 1.0", RFC2231_CTYPE,
                                 b"Content-Transfer-Encoding: 8bit"), b"Gr\xfc\xdfe, a long \r\nline")
    assert_data(gw.send(ACME, [sms(num)], raw), 250)
    assert gw.jobs(recipient=e164)[0]["text"] == "Grüße, a long line"


def test_rfc2231_parameters_for_xml_at(gw):
    num, e164 = bed.unique_number()
    doc = ("<?xml version=\"1.0\"?><aspsms><Userkey>ACME123</Userkey><Password>s3cret</Password>"
           f"<Recipient><PhoneNumber>{num}</PhoneNumber></Recipient>"
           "<MessageData>K\xe4se flowed \r\ntext</MessageData><Action>SendTextSMS</Action></aspsms>")
    raw = raw_mail(plain_headers("xml@sms.example.com", b"MIME-Version: 1.0", RFC2231_CTYPE,
                                 b"Content-Transfer-Encoding: 8bit"), doc.encode("latin-1"))
    r = gw.send("someone@anywhere.example", ["xml@sms.example.com"], raw)
    assert_data(r, 250)
    jobs = gw.jobs(recipient=e164)
    assert [j["text"] for j in jobs] == ["Käse flowed text"], jobs


@pytest.mark.parametrize("kind", ["textsms", "xml"])
def test_eight_bit_headers_for_textsms_and_xml(gw, kind):
    num, e164 = bed.unique_number()
    poison = [b"Message-ID: <" + bed.unique("p").encode() + b"\xd6\xff@x>", b"X-Junk: \x80\xfe",
              b"From: J\xf6rg <a@b.example>"]
    if kind == "textsms":
        rcpt = TEXTSMS
        raw = raw_mail([b"Subject: U=ACME123 P=s3cret R=" + num.encode() + b" \xd6", *poison], b"poison text")
        want_text = "poison text"
    else:
        rcpt = "xml@sms.example.com"
        doc = ("<aspsms><Userkey>ACME123</Userkey><Password>s3cret</Password>"
               f"<Recipient><PhoneNumber>{num}</PhoneNumber></Recipient>"
               "<MessageData>poison xml</MessageData><Action>SendTextSMS</Action></aspsms>")
        raw = raw_mail([b"Subject: \xd6\xd6", *poison, b"Content-Type: text/xml"], doc.encode())
        want_text = "poison xml"
    r = gw.send("someone@anywhere.example", [rcpt], raw)
    code, text = r["data"]
    assert code in (250, 550), r
    jobs = gw.jobs(recipient=e164)
    if code == 250:
        assert [j["text"] for j in jobs] == [want_text]
    else:
        assert jobs == [] and "internal error" not in text


def test_xml_from_a_utf8_sender_is_decided(gw):
    """SMTPUTF8 sender: the request is executed; no reply mail (its address cannot go into a
    7-bit header), never a 451."""
    num, e164 = bed.unique_number()
    doc = ("<aspsms><Userkey>ACME123</Userkey><Password>s3cret</Password>"
           f"<Recipient><PhoneNumber>{num}</PhoneNumber></Recipient>"
           "<MessageData>utf8 sender</MessageData><Action>SendTextSMS</Action></aspsms>")
    raw = raw_mail(plain_headers("xml@sms.example.com", b"Content-Type: text/xml"), doc.encode())
    r = gw.send("j\u00f6rg@anywhere.example", ["xml@sms.example.com"], raw, mail_options=["SMTPUTF8"])
    assert r["mail"][0] == 250, r
    assert_data(r, 250)
    assert [j["text"] for j in gw.jobs(recipient=e164)] == ["utf8 sender"]
