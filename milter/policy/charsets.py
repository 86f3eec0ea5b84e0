"""Text from mail bytes: charsets (only real text charsets), RFC 2047 encoded words, and text any
store can hold (`safe_text`). The lower layer of `content`; pure functions."""

from __future__ import annotations

import codecs
import re

from . import catalogue as replies
from .refusal import Refusal
from .transfer import Damage, base64_decode, qp_decode

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value).replace("\r", "").replace("\n", "")


# Codecs Python calls text encodings that are no mail charset: they transform text
# (punycode, idna, the escape codecs) or refuse everything (undefined).
_NOT_CHARSETS = frozenset({"punycode", "idna", "undefined", "unicode-escape", "raw-unicode-escape",
                           "charmap", "mbcs", "oem", "unicode-internal"})


_CHARSET_NAME = re.compile(r"[A-Za-z0-9!#$%&'+^_`{}~.:-]+")  # RFC 2978 mime-charset-chars


def _codec(charset: str) -> codecs.CodecInfo | None:
    """The codec of a real text charset named in mail, else None (rot13, base64, zlib, punycode...)."""
    if len(charset) > 64 or not _CHARSET_NAME.fullmatch(charset):
        return None
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", False) or info.name in _NOT_CHARSETS:
        return None
    return info


def charset_codec(charset: str) -> str | None:
    """The Python codec name for a MIME charset, or None if it is not a real text charset."""
    info = _codec(charset)
    return info.name if info is not None else None


def safe_text(s: str) -> str:
    """`s` as text any store can hold: 8-bit bytes kept as surrogate escapes by the email
    package become their characters (UTF-8, else ISO-8859-1); any other lone surrogate
    (say, from UTF-7) and NUL become U+FFFD."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = None
        if raw is not None:
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError:
                s = raw.decode("latin-1")
        else:
            s = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in s)
    return s.replace("\0", "\ufffd")


def _line_of(data: bytes, index: int) -> int:
    return data.count(b"\n", 0, index) + 1


def decode(data: bytes, charset: str | None, where: str) -> str | Refusal:
    """Bytes to text; `charset` None means undeclared (ASCII, else UTF-8, else ISO-8859-1)."""
    if charset is None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    info = _codec(charset)
    if info is None:
        name = safe_text(charset)
        name = name if len(name) <= 40 else name[:37] + "..."
        return replies.UNKNOWN_CHARSET(charset=name, where=where)
    try:
        return data.decode(info.name)
    except UnicodeDecodeError as e:
        at = min(e.start, len(data) - 1) if data else 0
        byte = f"byte 0x{data[at]:02X} at line {_line_of(data, at)}" if data else "no data"
        return replies.INVALID_TEXT_AT(where=where, charset=safe_text(charset), byte=byte)
    except (UnicodeError, ValueError, LookupError):  # a codec's own complaint: still bad text
        return replies.INVALID_TEXT(where=where, charset=safe_text(charset))


def _surrogate_bytes(s: str) -> bytes:
    """A str from BytesParser (8-bit bytes as surrogate escapes) back to its bytes."""
    return s.encode("utf-8", "surrogateescape")


def decode_header(value: str) -> str | Refusal:
    """RFC 2047 decoding; unencoded text follows the undeclared-charset rule."""
    out: list[str] = []
    pos = 0
    pending: tuple[str, bytearray] | None = None  # adjacent encoded words in one charset, joined as bytes
    words = 0

    def flush() -> Refusal | None:
        nonlocal pending
        if pending is not None:
            text = decode(bytes(pending[1]), pending[0], "Subject")
            pending = None
            if isinstance(text, Refusal):
                return text
            out.append(text)
        return None

    for m in _ENCODED_WORD.finditer(value):
        between = value[pos:m.start()]
        if between and not (pending is not None and between.isspace()):
            problem = flush()
            if problem:
                return problem
            text = decode(_surrogate_bytes(between), None, "Subject")
            assert isinstance(text, str)
            out.append(text)
        charset = m.group(1).split("*", 1)[0]
        data = m.group(3).encode("ascii", "surrogateescape")
        words += 1
        q = m.group(2) in "qQ"
        raw = qp_decode(data, header=True) if q else base64_decode(data)
        if isinstance(raw, Damage):
            return replies.DAMAGED_ENCODED_WORD(encoding="quoted-printable (Q)" if q else "base64 (B)",
                                                index=words, problem=raw.problem)
        if pending is not None and pending[0].lower() != charset.lower():
            problem = flush()
            if problem:
                return problem
        if pending is None:
            pending = (charset, bytearray())
        pending[1].extend(raw)
        pos = m.end()
    problem = flush()
    if problem:
        return problem
    rest = decode(_surrogate_bytes(value[pos:]), None, "Subject")
    assert isinstance(rest, str)
    out.append(rest)
    return "".join(out)
