"""Outside hostile probe, content items, through a real Postfix (tests/bed.py) and the milter:
damaged encodings, control characters and binary data get a 550 5.6.0 naming what is wrong (and
no job); the originator echoed in a reply is ASCII-escaped; a mail with another originator or
Notify policy under the same Message-ID is not a duplicate."""

from __future__ import annotations

import base64

import bed
import pytest
from test_inline import ACME, TEXTSMS, assert_data, sms

pytestmark = pytest.mark.bed


def raw_mail(num: str, subject: bytes, body: bytes, *extra: bytes, mid: bytes | None = None) -> bytes:
    mid = mid or b"<" + bed.unique("c").encode() + b"@client.bed.example>"
    head = [b"From: <" + ACME.encode() + b">", b"To: <" + sms(num).encode() + b">", b"Message-ID: " + mid,
            b"Subject: " + subject, b"MIME-Version: 1.0", *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body + b"\r\n"


def refused(gw, num: str, e164: str, raw: bytes) -> str:
    r = gw.send(ACME, [sms(num)], raw)
    assert r["data"] is not None, r
    code, text = r["data"]
    assert code == 550, r
    assert gw.jobs(recipient=e164) == []
    return text.decode() if isinstance(text, bytes) else text


TEXT_PLAIN = b"Content-Type: text/plain; charset=utf-8"
CASES = [
    ("damaged B word", b"=?utf-8?B?###?=", b"hello", [],
     "5.6.0 The Subject holds a damaged base64 (B) encoded word (word 1: '#' is not a base64 character)"),
    ("damaged Q word", b"=?utf-8?Q?caf=ZZ?=", b"hello", [],
     "5.6.0 The Subject holds a damaged quoted-printable (Q) encoded word (word 1: '=ZZ' is not an escape"),
    ("damaged base64 body", b"hi", b"aGVsbG8g\r\n!!!!", [TEXT_PLAIN, b"Content-Transfer-Encoding: base64"],
     "5.6.0 The text part is not valid base64 ('!' is not a base64 character at line 2)"),
    ("cut-short base64 body", b"hi", b"aGVsbG8gd", [TEXT_PLAIN, b"Content-Transfer-Encoding: base64"],
     "5.6.0 The text part is not valid base64 (the base64 data is cut short inside a character at line 1)"),
    ("damaged qp body", b"hi", b"caf=ZZ", [TEXT_PLAIN, b"Content-Transfer-Encoding: quoted-printable"],
     "5.6.0 The text part is not valid quoted-printable ('=ZZ' is not an escape of = and two hex digits at "
     "line 1)"),
    ("bell in body", b"hi", b"ring\x07bell", [TEXT_PLAIN],
     "5.6.0 Character U+0007 (BELL) in the text part at line 1, column 5 is a control character"),
    ("escape in body", b"hi", b"one\r\n\x1b[31mred", [TEXT_PLAIN],
     "5.6.0 Character U+001B (ESCAPE) in the text part at line 2, column 1 is a control character"),
    ("DEL in subject", b"de\x7fl", b"hello", [TEXT_PLAIN],
     "5.6.0 Character U+007F (DELETE) in the Subject at line 1, column 3 is a control character"),
    ("NUL through base64", b"hi", b"YQBi", [TEXT_PLAIN, b"Content-Transfer-Encoding: base64"],
     "5.6.0 Character U+0000 (NULL) in the text part at line 1, column 2 is a control character"),
    ("binary in a text part", b"hi", b"\x89PNG\r\n\x1a\n", [b"Content-Type: text/plain"],
     "5.6.0 The text part holds bytes that are not text (U+0089, a C1 control code, at line 1"),
]


@pytest.mark.parametrize("what, subject, body, extra, want", CASES, ids=[c[0] for c in CASES])
def test_content_refusal_names_what_is_wrong(gw, what, subject, body, extra, want):
    num, e164 = bed.unique_number()
    text = refused(gw, num, e164, raw_mail(num, subject, body, *extra))
    assert want in text, f"{what}: {text}"
    assert "Traceback" not in text and "internal" not in text.lower()


def test_good_encodings_still_pass_beside_them(gw):
    num, e164 = bed.unique_number()
    raw = raw_mail(num, b"=?utf-8?B?R3LDvMOfZQ==?=", b"aGVsbG8gd29ybGQ=",
                   TEXT_PLAIN, b"Content-Transfer-Encoding: base64")
    assert_data(gw.send(ACME, [sms(num)], raw), 250)
    jobs = gw.jobs(recipient=e164)
    assert [j["text"] for j in jobs] == ["hello world"], jobs  # aspsms: the body is the text


@pytest.mark.parametrize("originator, shown", [
    ("Z\xfcrich-Shop-Extra", "Z<U+00FC LATIN SMALL LETTER U WITH DIAERESIS>rich-Shop-Extra"),
    ("\u202eevil", "<U+202E RIGHT-TO-LEFT OVERRIDE>evil"),
])
def test_originator_in_a_reply_is_ascii_escaped(gw, originator, shown):
    num, e164 = bed.unique_number()
    subject = b"=?utf-8?B?" + base64.b64encode(f"Originator={originator}".encode()) + b"?="
    r = gw.send(ACME, [sms(num)], raw_mail(num, subject, b"hello", TEXT_PLAIN))
    code, text = r["data"]
    text = text.decode() if isinstance(text, bytes) else text
    assert code == 550, r
    assert f"5.5.4 Originator '{shown}' is not a valid originator" in text, text
    assert text.isascii()
    assert gw.jobs(recipient=e164) == []


@pytest.mark.parametrize("first, second", [
    ("Originator=AliceCo", "Originator=BobCo"),
    ("Originator=AliceCo Notify=NONE", "Originator=AliceCo Notify=ALWAYS"),
])
def test_same_message_id_other_originator_or_notify_is_not_a_duplicate(gw, first, second):
    num, e164 = bed.unique_number()
    mid = b"<" + bed.unique("d").encode() + b"@client.bed.example>"
    for subject in (first, second, second):  # the last one: a true resend, deduplicated
        raw = raw_mail(num, subject.encode(), b"same text", TEXT_PLAIN, mid=mid)
        assert_data(gw.send(ACME, [sms(num)], raw), 250)
    jobs = gw.jobs(recipient=e164)
    assert len(jobs) == 2, jobs
    assert {j["text"] for j in jobs} == {"same text"}
    if "Notify" not in first:
        assert sorted(j["originator"] for j in jobs) == ["AliceCo", "BobCo"]


def test_textsms_with_a_control_character_echoes_no_credential(gw):
    num, e164 = bed.unique_number()
    subject = f"U=ACME123 P=s3cret R={num}".encode()
    raw = (b"From: <" + ACME.encode() + b">\r\nTo: <" + TEXTSMS.encode() + b">\r\nSubject: " + subject +
           b"\r\n\r\nhello\x07\r\n")
    r = gw.send(ACME, [TEXTSMS], raw)
    code, text = r["data"]
    text = text.decode() if isinstance(text, bytes) else text
    assert code == 550 and "U+0007 (BELL) in the text part" in text, r
    assert "s3cret" not in text and "ACME123" not in text
