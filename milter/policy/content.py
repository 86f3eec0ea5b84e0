"""The SMS text of a mail: plain text only, decoded, checked for HTML and for ISO-8859-1."""

from __future__ import annotations

import email.policy
import email.utils
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser

from . import catalogue as replies
from .charsets import charset_codec, decode, decode_header, safe_text, unfold
from .escape import char_name
from .refusal import Refusal
from .transfer import Damage, base64_decode, qp_decode

__all__ = ["MessageText", "XmlMail", "charset_codec", "extract_text", "extract_xml", "latin1_problem",
           "render_template", "safe_text"]


@dataclass(frozen=True)
class MessageText:
    subject: str  # RFC 2047 decoded, unfolded, stripped
    body: str  # decoded text, LF line ends, trailing whitespace stripped
    message_id: str | None


_HTML_TAGS = (
    "html|head|body|title|meta|link|style|script|p|br|div|span|b|i|u|s|a|em|strong|font|center|small|big|"
    "table|thead|tbody|tfoot|tr|td|th|ul|ol|li|dl|dt|dd|img|h[1-6]|hr|pre|blockquote|code|sub|sup|form|"
    "input|button|iframe|label|section|article|header|footer|nav|o:p"
)
_ATTR = r"""\s+[A-Za-z_:][-A-Za-z0-9_:.]*\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>=`]+)"""
_MARKUP = re.compile(
    rf"<(?:{_HTML_TAGS})(?:{_ATTR})*\s*/?>"  # an opening tag, attributes only as name=value
    r"|</\s*[A-Za-z][A-Za-z0-9:]*\s*>"  # any closing tag
    r"|<!doctype\b|<!--",
    re.IGNORECASE,
)

def _raw_header(msg: Message, name: str) -> str | None:
    for key, value in msg.raw_items():
        if key.lower() == name:
            return str(value)
    return None


def _leaves(part: Message) -> Iterator[Message | Refusal]:
    ctype = part.get_content_type()
    if ctype.startswith("multipart/"):
        if not part.is_multipart():
            yield replies.MULTIPART_EMPTY(ctype=ctype)
            return
        if ctype not in ("multipart/mixed", "multipart/alternative"):
            yield replies.MULTIPART_OTHER(ctype=ctype)
            return
        for sub in part.get_payload():
            if isinstance(sub, Message):  # is_multipart(): always a Message
                yield from _leaves(sub)
        return
    yield part


def _transfer_decode(part: Message, where: str) -> bytes | Refusal:
    cte = (_raw_header(part, "content-transfer-encoding") or "7bit").strip().lower()
    if cte not in ("7bit", "8bit", "binary", "quoted-printable", "base64", ""):
        return replies.UNKNOWN_TRANSFER_ENCODING(cte=cte)
    if cte in ("base64", "quoted-printable"):  # strictly: damage is named, never garbled into an SMS
        payload = part.get_payload(decode=False)
        if not isinstance(payload, str):
            return replies.PART_UNREADABLE()
        encoded = payload.encode("utf-8", "surrogateescape")
        decoded = base64_decode(encoded) if cte == "base64" else qp_decode(encoded)
        if isinstance(decoded, Damage):
            return replies.DAMAGED_TRANSFER_ENCODING(where=where, encoding=cte, problem=decoded.problem,
                                                     line=decoded.line)
        return decoded
    data = part.get_payload(decode=True)  # the raw bytes for 7bit/8bit/binary
    if not isinstance(data, bytes):
        return replies.PART_UNREADABLE()
    return data


def _markup_problem(body: str) -> Refusal | None:
    m = _MARKUP.search(body)
    if m is None:
        return None
    tag = m.group()
    if tag.lower() in ("<!doctype", "<!--"):
        tag = "<!DOCTYPE" if tag.lower() == "<!doctype" else "<!--"
    elif len(tag) > 40:
        tag = tag[:36] + "...>"
    line = body.count("\n", 0, m.start()) + 1
    return replies.HTML_MARKUP(tag=tag, line=line)


# The common shape of SMS mail: one text/plain part, no transfer encoding, an ASCII header.
_SIMPLE_CTYPE = re.compile(rb'text/plain\s*(?:;\s*charset\s*=\s*"?([A-Za-z0-9._:+-]+)"?\s*)?;?\s*', re.I)
_HEADER_NAME = re.compile(rb"[!-9;-~]+")
_SIMPLE_CTE = (b"7bit", b"8bit", b"binary")
_WATCHED = (b"content-type", b"content-transfer-encoding", b"subject", b"message-id")


def _extract_simple(raw: bytes) -> MessageText | Refusal | None:
    """extract_text for the plain shape without the email package (about 10x cheaper);
    None sends anything else to the full parser, so both give the same answer."""
    sep = raw.find(b"\r\n\r\n")
    if sep < 0:
        return None
    fields: dict[bytes, bytes] = {}
    name = b""
    for line in raw[:sep].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not name:
                return None
            if name in fields:
                fields[name] += line
            continue
        key, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(key):
            return None
        name = key.lower()
        if name in _WATCHED:
            if name in fields:
                return None  # the same header twice: let the full parser decide
            fields[name] = value.lstrip(b" \t")
    ctype = fields.get(b"content-type")
    m = _SIMPLE_CTYPE.fullmatch(ctype) if ctype is not None else None
    if ctype is not None and m is None:
        return None
    if fields.get(b"content-transfer-encoding", b"7bit").strip().lower() not in _SIMPLE_CTE:
        return None
    subject_b = fields.get(b"subject", b"")
    mid_b = fields.get(b"message-id")
    if not subject_b.isascii() or b"=?" in subject_b or (mid_b is not None and not mid_b.isascii()):
        return None
    charset = m.group(1).decode() if m is not None and m.group(1) else None
    message_id = mid_b.decode().strip() or None if mid_b is not None else None
    return _plain_text(raw[sep + 4:], charset, subject_b.decode(), message_id)


def extract_text(raw: bytes) -> MessageText | Refusal:
    """Subject, body and Message-ID of a plain-text mail, or the Refusal that says what to fix."""
    simple = _extract_simple(raw)
    return simple if simple is not None else _extract_full(raw)


def _extract_full(raw: bytes) -> MessageText | Refusal:
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
        return _extract(msg)
    except Exception:  # a parser bug on hostile input must become an answer, not a crash
        return replies.MIME_UNPARSABLE()


def _subject_and_id(msg: Message) -> tuple[str, str | None] | Refusal:
    """The decoded Subject ("" when absent) and the Message-ID (None when absent or empty)."""
    subject_raw = _raw_header(msg, "subject")
    subject = decode_header(unfold(subject_raw)) if subject_raw is not None else ""
    if isinstance(subject, Refusal):
        return subject
    mid = _raw_header(msg, "message-id")
    return subject, unfold(mid).strip() or None if mid is not None else None


def _extract(msg: Message) -> MessageText | Refusal:
    head = _subject_and_id(msg)
    if isinstance(head, Refusal):
        return head
    subject, message_id = head
    found = _the_part(msg, ("text/plain",), _SMS_TEXT)
    if isinstance(found, Refusal):
        return found
    part, data, charset = found
    return _plain_text(data, charset, subject, message_id)


_SMS_TEXT = "the SMS text"


def _param(part: Message, name: str) -> str | None:
    """A Content-Type parameter as text, RFC 2231 forms (`format*=us-ascii''flowed`) included."""
    value = part.get_param(name)
    if value is None:
        return None
    if isinstance(value, tuple):
        value = email.utils.collapse_rfc2231_value(value)
    return safe_text(str(value)).strip() or None


def _the_part(msg: Message, types: tuple[str, ...], what: str
              ) -> tuple[Message, bytes, str | None] | Refusal:
    """The one MIME part carrying `what` (a type in `types`), transfer encoding and
    format=flowed undone, with its declared charset: the MIME rules of every path."""
    texts: list[Message] = []
    others: list[str] = []
    for leaf in _leaves(msg):
        if isinstance(leaf, Refusal):
            return leaf
        ctype = leaf.get_content_type()
        if ctype == "text/html":
            return replies.HTML_PART(what=what)
        if ctype in types:
            texts.append(leaf)
        else:
            others.append(ctype)
    if others:
        ctype = safe_text(others[0])[:60]
        if what == _SMS_TEXT:
            return replies.SMS_ATTACHMENT(ctype=ctype)
        return replies.XML_ATTACHMENT(ctype=ctype, what=what)
    if len(texts) != 1:
        if not texts:
            return replies.NO_TEXT_PART(what=what)
        return replies.MANY_TEXT_PARTS(count=len(texts), what=what)
    part = texts[0]
    data = _transfer_decode(part, "text part" if what == _SMS_TEXT else "XML request")
    if isinstance(data, Refusal):
        return data
    if part.get_content_type() == "text/plain" and (_param(part, "format") or "").lower() == "flowed":
        data = _unflow(data, (_param(part, "delsp") or "").lower() == "yes")
    return part, data, _param(part, "charset")


def _unflow(text: bytes, delsp: bool) -> bytes:
    """Undo RFC 3676 format=flowed: a line ending in a space continues on the next line."""
    out: list[bytes] = []
    pending = b""
    for line in text.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b" "):
            line = line[1:]  # space-stuffing
        if line.endswith(b" ") and line != b"-- ":
            pending += line[:-1] if delsp else line
            continue
        out.append(pending + line)
        pending = b""
    if pending:
        out.append(pending)
    return b"\r\n".join(out)


# ------------------------------------------------------------------ xml@: the same MIME rules

XML_TYPES = ("text/plain", "text/xml", "application/xml")
_MSGID = re.compile(r"<[!-;=?-~]{1,250}>")  # printable ASCII only: it goes into the reply's In-Reply-To
_HTML_START = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*(?:<!doctype\s+html|<html[\s>])", re.IGNORECASE)


@dataclass(frozen=True)
class XmlMail:
    body: bytes  # the request document as bytes (transfer encoding undone, format=flowed joined)
    charset: str | None  # the part's MIME charset as a Python codec name, if declared
    message_id: str  # the request's Message-ID ("" if none or malformed)
    auto_replied: bool  # Auto-Submitted: auto-replied (never answer an autoresponder)


def _xml_refusal(what: str) -> Refusal:
    return replies.XML_NOT_REQUEST(what=what)


def extract_xml(raw: bytes) -> XmlMail | Refusal:
    """The XML request of an xml@ mail, read by the same MIME rules as SMS text, or a Refusal."""
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
        found = _the_part(msg, XML_TYPES, "the XML request")
    except Exception:  # a parser bug on hostile input must become an answer, not a crash
        return replies.XML_MIME_UNPARSABLE()
    if isinstance(found, Refusal):
        return found
    part, body, charset = found
    disposition = (_raw_header(part, "content-disposition") or "").strip().lower()
    if _param_filename(part) or disposition.startswith("attachment"):
        return _xml_refusal("the XML arrived as an attachment")
    codec = None
    if charset is not None:
        codec = charset_codec(charset)
        if codec is None:
            return replies.UNKNOWN_CHARSET(charset=charset[:40], where="XML request")
    if not body.strip():
        return _xml_refusal("this message has no body")
    if _HTML_START.match(body):
        return _xml_refusal("HTML is not accepted, send the XML as plain text")
    mid = safe_text(unfold(_raw_header(msg, "message-id") or "")).strip()
    m = _MSGID.search(mid)
    auto = safe_text(_raw_header(msg, "auto-submitted") or "").strip().lower().startswith("auto-replied")
    return XmlMail(body=body, charset=codec, message_id=m.group(0) if m else "", auto_replied=auto)


def _param_filename(part: Message) -> bool:
    try:
        return bool(part.get_filename())
    except Exception:  # a malformed Content-Disposition: no usable file name
        return False


def _plain_text(data: bytes, charset: str | None, subject: str, message_id: str | None
                ) -> MessageText | Refusal:
    """The decoded text part, line ends normalised, refused if it holds markup."""
    body = decode(data, charset, "text part")
    if isinstance(body, Refusal):
        return body
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    problem = control_problem(subject, "Subject") or control_problem(body, "text part")  # before rstrip
    if problem:
        return problem
    body = safe_text(body.rstrip())
    problem = _markup_problem(body)
    if problem:
        return problem
    return MessageText(subject=safe_text(subject.strip()), body=body,
                       message_id=safe_text(message_id) if message_id is not None else None)


def latin1_problem(text: str, where: str) -> Refusal | None:
    """A Refusal naming the first character of `text` that ISO-8859-1 cannot hold, else None."""
    try:
        text.encode("latin-1")
        return None
    except UnicodeEncodeError as e:
        at = e.start
    ch = text[at]
    lineno = text.count("\n", 0, at) + 1
    col = at - text.rfind("\n", 0, at)
    name = unicodedata.name(ch, "unnamed character")
    return replies.NOT_LATIN1(code=ord(ch), name=name, where=where, line=lineno, column=col)


# C0 controls but TAB, LF and CR; DEL; and the C1 range (binary data or a wrong charset).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def control_problem(text: str, where: str) -> Refusal | None:
    """A Refusal naming the first control character of `text` (CONTROL_CHARACTER for C0 but TAB,
    LF, CR, for DEL and NUL; NOT_TEXT for a C1 code), else None."""
    m = _CONTROL.search(text)
    if m is None:
        return None
    at, ch = m.start(), m.group()
    line = text.count("\n", 0, at) + 1
    if ch > "\x7f":
        return replies.NOT_TEXT(where=where, code=ord(ch), line=line)
    column = at - text.rfind("\n", 0, at)
    return replies.CONTROL_CHARACTER(code=ord(ch), name=char_name(ch), where=where, line=line,
                                     column=column)


_SUBJECT_FIELD = re.compile(r"(?<!\{)(\{subject(?:[!:][^{}]*)?\})[,;:\- \t]*")
_BODY_FIELD = re.compile(r"[,;:\- \t]*(\{body(?:[!:][^{}]*)?\})(?!\})")


def render_template(template: str, subject: str, body: str) -> str:
    """The SMS text from an account template; separators next to an empty subject (or body) are dropped."""
    if not subject:
        template = _SUBJECT_FIELD.sub(r"\1", template)
    if not body:
        template = _BODY_FIELD.sub(r"\1", template)
    return template.format(subject=subject, body=body).strip()
