"""SMS text encoding: GSM 03.38 (data_coding 0) or UCS-2 (data_coding 8), split into parts.

GSM-7 parts carry one septet value per byte (unpacked, as SMPP data_coding 0 does); UCS-2
parts carry UTF-16-BE. An ESC+extension pair and a UTF-16 surrogate pair are never split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ESC = 0x1B

# GSM 03.38 default alphabet, indexed by septet value; 0x1B (ESC) is not a character.
GSM7_BASIC_CHARS = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
GSM7_BASIC: dict[str, int] = {ch: i for i, ch in enumerate(GSM7_BASIC_CHARS) if i != ESC}
# Extension table: each costs two septets, ESC then this value.
GSM7_EXT: dict[str, int] = {
    "\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F,
    "[": 0x3C, "~": 0x3D, "]": 0x3E, "|": 0x40, "€": 0x65,
}

GSM7_SINGLE, GSM7_PART = 160, 153  # septets
UCS2_SINGLE, UCS2_PART = 70, 67  # UTF-16 code units


@dataclass(frozen=True)
class Encoded:
    data_coding: int  # 0 GSM-7, 8 UCS-2
    parts: tuple[bytes, ...]  # short_message of each part, without UDH
    udh_needed: bool


# Character classes for the common cases, matched in C rather than per character in Python.
# One search tells the fast paths (here and in dispatcher/pdus.py) which alphabet a text needs.
NOT_GSM7_BASIC = re.compile("[^" + re.escape("".join(GSM7_BASIC)) + "]")
NOT_GSM7 = re.compile("[^" + re.escape("".join(GSM7_BASIC) + "".join(GSM7_EXT)) + "]")
ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


def is_gsm7(text: str) -> bool:
    """True if every character is in the GSM 03.38 default alphabet or its extension table."""
    return NOT_GSM7.search(text) is None


def _gsm_cost(ch: str) -> int:
    return 1 if ch in GSM7_BASIC else 2


def _ucs2_cost(ch: str) -> int:
    return 2 if ord(ch) > 0xFFFF else 1


def _split(costs: list[int], single: int, part: int) -> list[tuple[int, int]]:
    """Character index ranges of the parts; a character (its whole cost) never straddles two parts."""
    if sum(costs) <= single:
        return [(0, len(costs))]
    ranges: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, c in enumerate(costs):
        if used + c > part:
            ranges.append((start, i))
            start, used = i, 0
        used += c
    ranges.append((start, len(costs)))
    return ranges


def _costs(text: str) -> tuple[bool, list[int]]:
    gsm = is_gsm7(text)
    return gsm, [(_gsm_cost if gsm else _ucs2_cost)(ch) for ch in text]


def count_parts(text: str) -> int:
    """Number of SMS parts `text` needs; equals len(encode(text).parts)."""
    n = len(text)
    # Every character costs the same (GSM-7 without extension characters, or UCS-2 inside
    # the BMP): parts split evenly, no pair to keep together. The milter's hot path.
    if NOT_GSM7_BASIC.search(text) is None:
        return 1 if n <= GSM7_SINGLE else -(-n // GSM7_PART)
    if NOT_GSM7.search(text) is not None and ASTRAL.search(text) is None:
        return 1 if n <= UCS2_SINGLE else -(-n // UCS2_PART)
    gsm, costs = _costs(text)
    single, part = (GSM7_SINGLE, GSM7_PART) if gsm else (UCS2_SINGLE, UCS2_PART)
    total = sum(costs)
    if total <= single:
        return 1
    count, used = 1, 0
    for c in costs:
        if used + c > part:
            count, used = count + 1, 0
        used += c
    return count


def _gsm_bytes(chars: Iterable[str]) -> bytes:
    out = bytearray()
    for ch in chars:
        code = GSM7_BASIC.get(ch)
        if code is None:
            out += bytes((ESC, GSM7_EXT[ch]))
        else:
            out.append(code)
    return bytes(out)


def encode(text: str) -> Encoded:
    """GSM-7 when every character fits, else UCS-2; split into concatenated parts when too long."""
    gsm, costs = _costs(text)
    if gsm:
        ranges = _split(costs, GSM7_SINGLE, GSM7_PART)
        parts = tuple(_gsm_bytes(text[a:b]) for a, b in ranges)
    else:
        ranges = _split(costs, UCS2_SINGLE, UCS2_PART)
        parts = tuple(text[a:b].encode("utf-16-be") for a, b in ranges)
    return Encoded(data_coding=0 if gsm else 8, parts=parts, udh_needed=len(parts) > 1)


def with_udh(part: bytes, ref: int, total: int, seq: int) -> bytes:
    """`part` behind the 6-octet concatenation UDH `05 00 03 ref total seq`."""
    return b"\x05\x00\x03" + bytes((ref & 0xFF, total, seq)) + part
