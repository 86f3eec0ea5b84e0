from __future__ import annotations

import pytest
from sms_milter.policy.content import MessageText, extract_text, latin1_problem, render_template
from sms_milter.policy.refusal import Refusal


def mail(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode("ascii") + b"\r\n" + body


def test_plain_no_content_type() -> None:
    raw = mail("From: a@b.example\nSubject: Server down\nMessage-ID: <1@b.example>\n",
               b"Disk full on db1.\r\n\r\n  \r\n")
    assert extract_text(raw) == MessageText(subject="Server down", body="Disk full on db1.",
                                            message_id="<1@b.example>")


def test_folded_encoded_subject_and_qp_latin1() -> None:
    raw = mail("Subject: =?ISO-8859-1?Q?Gr=FC=DFe?=\n =?UTF-8?B?YXVzIFrDvHJpY2g=?=\n"
               "MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
               "Content-Transfer-Encoding: quoted-printable\n",
               b"Caf=E9 au lait=\r\n ok\r\nline2\r\n")
    r = extract_text(raw)
    assert r == MessageText(subject="Grüßeaus Zürich", body="Café au lait ok\nline2", message_id=None)


def test_encoded_word_split_multibyte() -> None:
    raw = mail("Subject: =?UTF-8?Q?a=C3?= =?UTF-8?Q?=A9b?= plain\n", b"x")
    r = extract_text(raw)
    assert isinstance(r, MessageText) and r.subject == "aéb plain"


def test_base64_utf8() -> None:
    raw = mail("Subject: hi\nContent-Type: text/plain; charset=\"UTF-8\"\n"
               "Content-Transfer-Encoding: base64\n",
               b"0J/RgNC40LLQtdGC\r\n")
    r = extract_text(raw)
    assert isinstance(r, MessageText) and r.body == "Привет"


def test_undeclared_8bit() -> None:
    r = extract_text(mail("Subject: x\n", "Grüße".encode()))
    assert isinstance(r, MessageText) and r.body == "Grüße"
    r = extract_text(mail("Subject: x\n", "Grüße".encode("latin-1")))
    assert isinstance(r, MessageText) and r.body == "Grüße"


def test_raw_8bit_subject() -> None:
    raw = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody"
    r = extract_text(raw)
    assert isinstance(r, MessageText) and r.subject == "Grüße"


def test_unknown_charset() -> None:
    raw = mail("Content-Type: text/plain; charset=x-foo\n", b"hi")
    assert extract_text(raw) == Refusal("550", "5.6.0", "Unknown charset 'x-foo' in the text part; use "
                                                        "ISO-8859-1 or UTF-8.")
    r = extract_text(mail("Subject: =?x-foo?Q?hi?=\n", b"hi"))
    assert r == Refusal("550", "5.6.0", "Unknown charset 'x-foo' in the Subject; use ISO-8859-1 or UTF-8.")


def test_invalid_bytes_for_charset() -> None:
    raw = mail("Content-Type: text/plain; charset=utf-8\n", b"ok\r\nbad \xe9 byte")
    r = extract_text(raw)
    assert isinstance(r, Refusal) and (r.code, r.xcode) == ("550", "5.6.0")
    assert "utf-8" in r.text and "0xE9" in r.text and "line 2" in r.text


def test_unknown_transfer_encoding() -> None:
    raw = mail("Content-Type: text/plain\nContent-Transfer-Encoding: x-uuencode\n", b"hi")
    r = extract_text(raw)
    assert isinstance(r, Refusal) and r.xcode == "5.6.0" and "x-uuencode" in r.text


def multipart(ctype: str, *parts: tuple[str, bytes]) -> bytes:
    out = [f"Subject: s\nMIME-Version: 1.0\nContent-Type: {ctype}; boundary=\"BB\"\n".replace("\n", "\r\n")
           .encode() + b"\r\n"]
    for headers, body in parts:
        out.append(b"--BB\r\n" + headers.replace("\n", "\r\n").encode() + b"\r\n" + body + b"\r\n")
    out.append(b"--BB--\r\n")
    return b"".join(out)


def test_multipart_single_text_accepted() -> None:
    raw = multipart("multipart/mixed", ("Content-Type: text/plain; charset=utf-8\n", b"hello"))
    assert extract_text(raw) == MessageText(subject="s", body="hello", message_id=None)


def test_html_part_refused() -> None:
    raw = multipart("multipart/alternative", ("Content-Type: text/plain\n", b"hello"),
                    ("Content-Type: text/html\n", b"<p>hello</p>"))
    assert extract_text(raw) == Refusal("550", "5.6.1", "The message contains an HTML part; send the SMS "
                                                        "text as plain text only (text/plain).")
    r = extract_text(mail("Content-Type: text/html\n", b"<p>x</p>"))
    assert isinstance(r, Refusal) and "HTML part" in r.text


def test_attachment_refused() -> None:
    raw = multipart("multipart/mixed", ("Content-Type: text/plain\n", b"hello"),
                    ("Content-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\n",
                     b"%PDF"))
    assert extract_text(raw) == Refusal(
        "550", "5.6.1",
        "The message contains an attachment (application/pdf); SMS mail must be plain text only.")


def test_two_text_parts_refused() -> None:
    raw = multipart("multipart/mixed", ("Content-Type: text/plain\n", b"a"),
                    ("Content-Type: text/plain\n", b"b"))
    r = extract_text(raw)
    assert isinstance(r, Refusal) and r.xcode == "5.6.1" and "2 text parts" in r.text


@pytest.mark.parametrize("body,tag,line", [
    (b"hello\r\nthis is <b>bold</b>", "<b>", 2),
    (b"<!DOCTYPE html>\r\n<html>", "<!DOCTYPE", 1),
    (b"x\r\ny\r\n<a href=\"http://x\">link</a>", "<a href=\"http://x\">", 3),
    (b"line<br/>", "<br/>", 1),
    (b"see </div>", "</div>", 1),
    (b"<span class=x>t", "<span class=x>", 1),
])
def test_markup_in_text(body: bytes, tag: str, line: int) -> None:
    assert extract_text(mail("Subject: s\n", body)) == Refusal(
        "550", "5.6.1", f"The text contains HTML markup ({tag} at line {line}); send plain text only.")


@pytest.mark.parametrize("body", [b"a < b and c > d", b"see <https://x.example/a?b=c>",
                                  b"mail <joe@example.com>", b"<b@example.com> wrote", b"x<y",
                                  b"<bold text>"])
def test_angle_brackets_are_not_markup(body: bytes) -> None:
    r = extract_text(mail("Subject: s\n", body))
    assert isinstance(r, MessageText)


def test_garbage_never_crashes() -> None:
    for raw in (b"", b"\x00\xff\xfe", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
                b"Subject: =?utf-8?B?####?=\r\n\r\nx", b"Content-Type: text/plain; charset=\"\r\n\r\nx"):
        assert isinstance(extract_text(raw), (MessageText, Refusal))


def test_latin1_problem() -> None:
    assert latin1_problem("Grüße\nCafé", "text") is None
    assert latin1_problem("ok\nab€c", "text") == Refusal(
        "550", "5.6.0", "Character U+20AC (EURO SIGN) in the text at line 2, column 3 cannot be written in "
                        "ISO-8859-1; this SMS domain accepts ISO-8859-1 text only.")


@pytest.mark.parametrize("template,subject,body,expected", [
    ("{subject},{body}", "Server down", "db1", "Server down,db1"),
    ("{subject},{body}", "", "db1", "db1"),
    ("{subject}: {body}", "", "db1", "db1"),
    ("{subject} - {body}", "", "db1", "db1"),
    ("{subject},{body}", "Server down", "", "Server down"),
    ("{body}", "ignored", " text \n", "text"),
    ("Alert {subject}; {body}", "", "x", "Alert x"),
])
def test_render_template(template: str, subject: str, body: str, expected: str) -> None:
    assert render_template(template, subject, body) == expected
