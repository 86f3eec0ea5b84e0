"""Transfer encodings decoded strictly: base64 and quoted-printable of a MIME part, and the B and
Q encodings of RFC 2047 words. Damage is named (what, and on which line), never decoded into a
silently garbled text. Pure functions: bytes in, bytes or a `Damage` out."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_QP_ESCAPE = re.compile(rb"=(?:[0-9A-Fa-f]{2}|\Z)")


@dataclass(frozen=True)
class Damage:
    problem: str  # "'#' is not a base64 character"
    line: int  # 1-based line of the encoded data


def show_byte(b: int) -> str:
    """A byte as a reply may carry it: printable ASCII quoted, anything else as 0xNN."""
    return f"'{chr(b)}'" if 0x21 <= b <= 0x7E else f"byte 0x{b:02X}"


_B64_CLEAN = re.compile(rb"[A-Za-z0-9+/]*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def base64_decode(data: bytes) -> bytes | Damage:
    """RFC 2045 base64: line breaks and blanks ignored; any other character outside the alphabet,
    '=' before the end, or data ending inside a character is damage. Missing padding is tolerated."""
    packed = data.translate(None, b" \t\r\n")
    size = len(packed) % 4
    if _B64_CLEAN.fullmatch(packed) and (size == 0 or (size != 1 and not packed.endswith(b"="))):  # C speed
        return base64.b64decode(packed + b"=" * (-len(packed) % 4))
    return _base64_damage(data)


def _base64_damage(data: bytes) -> bytes | Damage:
    """The byte-by-byte walk that names the damage and its line."""
    chars = bytearray()
    pad = 0
    for lineno, line in enumerate(data.split(b"\n"), 1):
        for b in line:
            if b in b" \t\r":
                continue
            if b == 0x3D:  # '='
                pad += 1
                if pad > 2:
                    return Damage("more than two '=' at the end of the base64 data", lineno)
                continue
            if b not in _B64:
                return Damage(f"{show_byte(b)} is not a base64 character", lineno)
            if pad:
                return Damage("'=' in the middle of the base64 data", lineno)
            chars.append(b)
    last = max(1, data.rstrip(b"\r\n \t").count(b"\n") + 1)
    if len(chars) % 4 == 1 or (pad and (len(chars) + pad) % 4):
        return Damage("the base64 data is cut short inside a character", last)
    try:
        return base64.b64decode(bytes(chars) + b"=" * (-len(chars) % 4), validate=True)
    except (binascii.Error, ValueError):  # defensive: checked above
        return Damage("not decodable as base64", last)


def qp_decode(data: bytes, header: bool = False) -> bytes | Damage:
    """Quoted-printable (RFC 2045; `header`: the Q encoding of RFC 2047, '_' a space): every '='
    starts a two-hex-digit escape or (bodies only) a soft line break."""
    for lineno, line in enumerate(data.split(b"\n"), 1):
        line = line.rstrip(b"\r").rstrip(b" \t")
        at = line.find(b"=")
        while at >= 0:
            m = _QP_ESCAPE.match(line, at)
            if m is None or (header and m.end() - at == 1):
                seq = line[at:at + 3]
                shown = "".join(chr(b) if 0x21 <= b <= 0x7E else f"\\x{b:02X}" for b in seq)
                return Damage(f"'{shown}' is not an escape of = and two hex digits", lineno)
            at = line.find(b"=", m.end())
    return binascii.a2b_qp(data, header=header)
