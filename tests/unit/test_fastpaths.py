"""The milter's fast paths must give exactly the answers of the general code they shortcut."""

from __future__ import annotations

import random

import pytest
from sms_milter.policy import content, smstext
from sms_milter.policy.content import _extract_full, _extract_simple, extract_text

GSM_BASIC = "".join(smstext.GSM7_BASIC)
ALPHABETS = [GSM_BASIC, GSM_BASIC + "€[]{}", "abc Жé", "ab😀c", "xyz"]


def _slow_count(text: str) -> int:
    return len(smstext.encode(text).parts)


@pytest.mark.parametrize("n", [0, 1, 70, 71, 134, 135, 160, 161, 306, 307, 459, 460, 1000])
@pytest.mark.parametrize("alphabet", ALPHABETS)
def test_count_parts_equals_encode_at_boundaries(n: int, alphabet: str) -> None:
    rnd = random.Random(n * 7 + len(alphabet))
    text = "".join(rnd.choice(alphabet) for _ in range(n))
    assert smstext.count_parts(text) == _slow_count(text)


def test_count_parts_equals_encode_random() -> None:
    rnd = random.Random(1)
    for _ in range(2000):
        alphabet = rnd.choice(ALPHABETS)
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 700)))
        assert smstext.count_parts(text) == _slow_count(text), text


SIMPLE = [
    b"Subject: Hello\r\nMessage-ID: <a@b>\r\n\r\nplain body\r\n",
    b"Subject: Hello\r\n\r\n",
    b"From: x\r\nSubject:  spaced  \r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset=\"iso-8859-1\"\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe\r\nline 2\r\n\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset=x-nope\r\n\r\nhi\r\n",
    b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbad \xff byte\r\n",
    b"Subject: x\r\nContent-Type: TEXT/PLAIN\r\n\r\n<b>markup</b>\r\n",
    b"Subject: folded\r\n subject line\r\nContent-Type: text/plain;\r\n charset=us-ascii\r\n\r\nok\r\n",
    b"Subject: x\r\n\r\nundeclared latin \xe9t\xe9\r\n",
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nencoded subject\r\n",
    b"Subject: x\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n",
    b"Subject: x\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n",
    b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nhi\r\n--b--\r\n",
    b"Subject: a\r\nSubject: b\r\n\r\ntwo subjects\r\n",
    b"Message-ID:\r\nSubject: x\r\n\r\nempty message id\r\n",
]


@pytest.mark.parametrize("raw", SIMPLE)
def test_simple_path_agrees_with_the_email_package(raw: bytes) -> None:
    fast = _extract_simple(raw)
    full = _extract_full(raw)
    if fast is not None:
        assert fast == full
    assert extract_text(raw) == full


def test_simple_path_is_taken_for_plain_mail() -> None:
    assert isinstance(_extract_simple(SIMPLE[0]), content.MessageText)
    assert _extract_simple(SIMPLE[9]) is None  # encoded word: full parser
    assert _extract_simple(SIMPLE[11]) is None  # base64: full parser


def test_latin1_problem_position() -> None:
    r = content.latin1_problem("ab\ncd\nxyЖ", "body")
    assert r is not None and "U+0416" in r.text and "line 3, column 3" in r.text
    assert content.latin1_problem("é" * 500, "body") is None
