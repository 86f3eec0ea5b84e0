from __future__ import annotations

import pytest
from sms_milter.policy.smstext import (
    ESC,
    GSM7_BASIC,
    GSM7_BASIC_CHARS,
    GSM7_EXT,
    Encoded,
    count_parts,
    encode,
    is_gsm7,
    with_udh,
)

# The reverse of the encoder, for these tests only (the gateway never decodes GSM-7).
EXT_CHARS = {v: k for k, v in GSM7_EXT.items()}


def decode_gsm7(data: bytes) -> str:
    """Unpacked GSM-7 septets (one per byte) to text; ESC selects the extension table."""
    out: list[str] = []
    i = 0
    while i < len(data):
        code = data[i] & 0x7F
        i += 1
        if code == ESC:
            if i >= len(data):
                break
            nxt = data[i] & 0x7F
            i += 1
            # An unknown extension code shows as the default-alphabet character (3GPP TS 23.038).
            out.append(EXT_CHARS.get(nxt) or GSM7_BASIC_CHARS[nxt] if nxt != ESC else " ")
        else:
            out.append(GSM7_BASIC_CHARS[code])
    return "".join(out)


def test_tables() -> None:
    assert len(GSM7_BASIC) == 127  # 128 codes minus ESC
    assert GSM7_BASIC["@"] == 0x00 and GSM7_BASIC["£"] == 0x01 and GSM7_BASIC["$"] == 0x02
    assert GSM7_BASIC["\n"] == 0x0A and GSM7_BASIC["\r"] == 0x0D and GSM7_BASIC["_"] == 0x11
    assert GSM7_BASIC["¤"] == 0x24 and GSM7_BASIC["¡"] == 0x40 and GSM7_BASIC["§"] == 0x5F
    assert GSM7_BASIC["¿"] == 0x60 and GSM7_BASIC["à"] == 0x7F and GSM7_BASIC["Ç"] == 0x09
    assert GSM7_EXT["€"] == 0x65 and GSM7_EXT["{"] == 0x28
    assert GSM7_EXT["|"] == 0x40 and GSM7_EXT["\f"] == 0x0A
    assert set(GSM7_EXT) == set("^{}\\[~]|€\f")


def test_is_gsm7() -> None:
    assert is_gsm7("Hello @ £5, ÄÖÜ äöü ß É é è [x] {y} €")
    assert is_gsm7("")
    assert not is_gsm7("á")
    assert not is_gsm7("ç")
    assert not is_gsm7("\t")
    assert not is_gsm7("😀")


def test_empty_is_one_part() -> None:
    assert encode("") == Encoded(data_coding=0, parts=(b"",), udh_needed=False)
    assert count_parts("") == 1


def test_gsm_bytes_unpacked() -> None:
    e = encode("A@€")
    assert e == Encoded(data_coding=0, parts=(b"\x41\x00\x1b\x65",), udh_needed=False)
    assert decode_gsm7(e.parts[0]) == "A@€"


def test_gsm_160_161() -> None:
    assert count_parts("a" * 160) == 1
    e = encode("a" * 160)
    assert len(e.parts) == 1 and len(e.parts[0]) == 160 and not e.udh_needed
    e = encode("a" * 161)
    assert [len(p) for p in e.parts] == [153, 8] and e.udh_needed and e.data_coding == 0
    assert count_parts("a" * 161) == 2
    assert count_parts("a" * 306) == 2
    assert count_parts("a" * 307) == 3


def test_euro_counts_two() -> None:
    assert count_parts("€" * 80) == 1
    assert count_parts("€" * 80 + "a") == 2
    assert count_parts("a" * 159 + "€") == 2


def test_esc_pair_never_split() -> None:
    text = "a" * 152 + "€" + "b" * 10  # the pair would occupy septets 153 and 154
    e = encode(text)
    assert [len(p) for p in e.parts] == [152, 12]
    assert e.parts[1][:2] == b"\x1b\x65"
    assert "".join(decode_gsm7(p) for p in e.parts) == text
    assert count_parts(text) == 2


def test_ucs2_70_71() -> None:
    e = encode("á" * 70)
    assert e.data_coding == 8 and len(e.parts) == 1 and e.parts[0] == "á".encode("utf-16-be") * 70
    e = encode("á" * 71)
    assert [len(p) for p in e.parts] == [134, 8] and e.udh_needed
    assert count_parts("á" * 71) == 2


def test_one_latin1_letter_forces_ucs2() -> None:
    e = encode("Hello á")
    assert e.data_coding == 8 and e.parts == ("Hello á".encode("utf-16-be"),)


def test_surrogate_pair_never_split() -> None:
    text = "x" * 66 + "😀" + "y" * 5  # the pair would occupy units 67 and 68
    e = encode(text)
    assert [len(p) for p in e.parts] == [132, 14]
    assert e.parts[1][:4] == "😀".encode("utf-16-be")
    assert b"".join(e.parts).decode("utf-16-be") == text
    assert count_parts(text) == 2
    assert count_parts("😀" * 35) == 1
    assert count_parts("😀" * 35 + "x") == 2


@pytest.mark.parametrize("text", ["", "a", "a" * 500, "€" * 200, "á" * 300, "😀" * 100 + "a", "x€" * 120])
def test_count_parts_matches_encode(text: str) -> None:
    assert count_parts(text) == len(encode(text).parts)


def test_with_udh() -> None:
    assert with_udh(b"ab", 0x1FF, 3, 2) == b"\x05\x00\x03\xff\x03\x02ab"


def test_decode_gsm7() -> None:
    assert decode_gsm7(bytes([0x00, 0x01, 0x1B, 0x14, 0x1B, 0x28, 0x41])) == "@£^{A"
    assert decode_gsm7(bytes([0x1B, 0x41])) == "A"  # unknown extension: default character
    assert decode_gsm7(bytes([0x41, 0x1B])) == "A"  # trailing ESC dropped
