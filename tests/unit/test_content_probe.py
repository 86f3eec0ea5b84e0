"""Outside hostile probe, content items: damaged RFC 2047 words and transfer encodings, control
characters and binary data in the SMS text, and the originator echoed in a reply (pure functions)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sms_milter.policy.addresses import originator_problem
from sms_milter.policy.content import MessageText, control_problem, extract_text
from sms_milter.policy.escape import ascii_escape, char_name
from sms_milter.policy.refusal import Refusal
from sms_milter.policy.transfer import Damage, base64_decode, qp_decode


def mail(subject: bytes = b"hi", body: bytes = b"hello", cte: bytes | None = None,
         ctype: bytes = b"text/plain; charset=utf-8") -> bytes:
    head = [b"From: a@b.example", b"Subject: " + subject, b"MIME-Version: 1.0", b"Content-Type: " + ctype]
    if cte is not None:
        head.append(b"Content-Transfer-Encoding: " + cte)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def refused(raw: bytes) -> str:
    r = extract_text(raw)
    assert isinstance(r, Refusal), r
    assert (r.code, r.xcode) == ("550", "5.6.0"), r
    return r.text


# ------------------------------------------------------------------ item 4: damaged encodings

@pytest.mark.parametrize("subject, want", [
    (b"=?utf-8?B?###?=", "damaged base64 (B) encoded word (word 1: '#' is not a base64 character)"),
    (b"ok =?utf-8?B?aGk=?= =?utf-8?B?a?=",
     "damaged base64 (B) encoded word (word 2: the base64 data is cut short inside a character)"),
    (b"=?utf-8?B?aG=k?=", "damaged base64 (B) encoded word (word 1: '=' in the middle of the base64 data)"),
    (b"=?utf-8?Q?caf=ZZ?=", "damaged quoted-printable (Q) encoded word (word 1: '=ZZ' is not an escape of = "
                            "and two hex digits)"),
    (b"=?utf-8?Q?caf=E?=", "damaged quoted-printable (Q) encoded word (word 1: '=E' is not an escape"),
])
def test_damaged_encoded_word_names_the_encoding(subject: bytes, want: str) -> None:
    text = refused(mail(subject))
    assert text.startswith("The Subject holds a " + want), text


@pytest.mark.parametrize("subject, want", [
    (b"=?utf-8?B?aGVsbG8=?=", "hello"), (b"=?utf-8?B?aGVsbG8?=", "hello"),
    (b"=?utf-8?Q?caf=C3=A9_au_lait?=", "café au lait"), (b"=?utf-8?q?a=3d=3Fb?=", "a=?b")])
def test_good_encoded_words_still_decode(subject: bytes, want: str) -> None:
    r = extract_text(mail(subject))
    assert isinstance(r, MessageText) and r.subject == want, r


@pytest.mark.parametrize("cte, body, want", [
    (b"base64", b"aGVsbG8g\r\n###!\r\n",
     "The text part is not valid base64 ('#' is not a base64 character at line 2)"),
    (b"base64", b"aGVsbG8gd\r\n", "The text part is not valid base64 (the base64 data is cut short inside a "
                                  "character at line 1)"),
    (b"base64", b"aGk=aGk=\r\n", "The text part is not valid base64 ('=' in the middle of the base64 data at "
                                 "line 1)"),
    (b"base64", b"aGVsbG8\xc3\xa9\r\n", "The text part is not valid base64 (byte 0xC3 is not a base64 "
                                        "character at line 1)"),
    (b"quoted-printable", b"line one\r\ncaf=ZZ\r\n", "The text part is not valid quoted-printable ('=ZZ' is "
                                                     "not an escape of = and two hex digits at line 2)"),
    (b"quoted-printable", b"caf=E", "The text part is not valid quoted-printable ('=E' is not an escape of = "
                                    "and two hex digits at line 1)"),
])
def test_damaged_transfer_encoding_names_part_encoding_and_line(cte: bytes, body: bytes, want: str) -> None:
    assert refused(mail(body=body, cte=cte)).startswith(want)


@pytest.mark.parametrize("cte, body, want", [
    (b"base64", b"aGVsbG8gd29ybGQ=\r\n", "hello world"),
    (b"base64", b"aGVs\r\nbG8g\r\nd29y bGQ\r\n", "hello world"),
    (b"quoted-printable", b"caf=C3=A9 au =\r\nlait=20\r\n", "café au lait"),
    (b"quoted-printable", b"a=3db=3D  \r\n", "a=b="),
])
def test_good_transfer_encodings_still_decode(cte: bytes, body: bytes, want: str) -> None:
    r = extract_text(mail(body=body, cte=cte))
    assert isinstance(r, MessageText) and r.body == want, r


@given(st.binary(max_size=200))
def test_strict_base64_agrees_with_the_standard_decoder_on_valid_data(data: bytes) -> None:
    import base64
    encoded = base64.encodebytes(data)
    assert base64_decode(encoded) == data
    assert qp_decode(b"=" + encoded[:1].hex().upper().encode()) == encoded[:1]


@given(st.text(alphabet="aGVsbG8=+/ \r\n#", max_size=24).map(str.encode))
def test_base64_fast_path_agrees_with_the_walk(data: bytes) -> None:
    from sms_milter.policy.transfer import _base64_damage
    assert base64_decode(data) == _base64_damage(data)


@given(st.binary(max_size=80))
def test_strict_decoders_never_raise(data: bytes) -> None:
    assert isinstance(base64_decode(data), (bytes, Damage))
    assert isinstance(qp_decode(data), (bytes, Damage))
    assert isinstance(qp_decode(data, header=True), (bytes, Damage))


# ------------------------------------------------------------------ item 5: control characters

@pytest.mark.parametrize("body, code, name, line, column", [
    (b"ring\x07bell", 0x07, "BELL", 1, 5), (b"nul\x00here", 0x00, "NULL", 1, 4),
    (b"one\r\nd\x7fel", 0x7F, "DELETE", 2, 2), (b"esc \x1b[31m red", 0x1B, "ESCAPE", 1, 5),
    (b"form\x0cfeed", 0x0C, "FORM FEED", 1, 5), (b"vt\x0b", 0x0B, "LINE TABULATION", 1, 3),
])
def test_control_character_in_the_body(body: bytes, code: int, name: str, line: int, column: int) -> None:
    want = (f"Character U+{code:04X} ({name}) in the text part at line {line}, column {column} is a control "
            "character; remove it from the SMS text.")
    assert refused(mail(body=body)) == want


def test_control_character_in_the_subject_plain_and_encoded() -> None:
    for subject in (b"ring\x07", b"=?utf-8?Q?ring=07?="):
        assert refused(mail(subject)).startswith("Character U+0007 (BELL) in the Subject at line 1, column 5")


def test_control_character_reached_through_base64_and_qp() -> None:
    nul = refused(mail(body=b"YQBi\r\n", cte=b"base64"))
    assert nul.startswith("Character U+0000 (NULL) in the text part")
    soh = refused(mail(body=b"a=01b", cte=b"quoted-printable"))
    assert soh.startswith("Character U+0001 (START OF HEADING)")


def test_tab_lf_cr_are_text() -> None:
    r = extract_text(mail(body=b"a\tb\r\nc\rd\ne"))
    assert isinstance(r, MessageText) and r.body == "a\tb\nc\nd\ne", r


def test_binary_in_a_text_part_is_not_text() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    text = refused(mail(body=png, ctype=b"text/plain"))
    assert text == ("The text part holds bytes that are not text (U+0089, a C1 control code, at line 1: "
                    "binary data or a wrong charset); send the SMS text as plain text and declare its "
                    "charset.")


@given(st.text(max_size=40))
def test_control_problem_finds_every_control_character(s: str) -> None:
    bad = [c for c in s if (ord(c) < 0x20 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F]
    r = control_problem(s, "text part")
    assert (r is None) == (not bad)
    if r is not None:
        assert f"U+{ord(bad[0]):04X}" in r.text


# ------------------------------------------------------------------ item 6: the originator echoed

@pytest.mark.parametrize("value", ["Zürich", "a\r\nRCPT TO:<x>", "\x00\x07", "ab\udcff", "\u202eevil",
                                   "x" * 500])
def test_originator_echo_is_ascii_and_one_line(value: str) -> None:
    problem = originator_problem(value)
    assert problem is not None
    assert problem.isascii() and all(" " <= c <= "~" for c in problem), problem
    assert len(problem) < 300


def test_originator_escape_names_the_characters() -> None:
    assert ascii_escape("Zü\r\n") == ("Z<U+00FC LATIN SMALL LETTER U WITH DIAERESIS><U+000D CARRIAGE RETURN>"
                                      "<U+000A LINE FEED>")
    assert ascii_escape("abc", 2) == "ab..."
    assert char_name("\x7f") == "DELETE" and char_name("\x85") == "C1 CONTROL 0x85"
