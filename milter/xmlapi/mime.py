"""The XML request inside an xml@ mail: one plain part, transfer encoding undone.

Mail that is not an XML request at all (HTML, attachments, several parts, no body) is
refused inline; everything else goes on to the XML parser, even if it is not XML.
"""

from __future__ import annotations

import codecs
import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

from ..policy.refusal import Refusal

XML_TYPES = ("text/plain", "text/xml", "application/xml")
_MSGID = re.compile(r"<[^<>\s\x00-\x1f\x7f]{1,250}>")
_HTML_START = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*(?:<!doctype\s+html|<html[\s>])", re.IGNORECASE)


@dataclass(frozen=True)
class XmlMail:
    body: bytes  # the request document as bytes (transfer encoding undone, format=flowed joined)
    charset: str | None  # the part's MIME charset, if it names a known codec
    message_id: str  # the request's Message-ID ("" if none or malformed)
    auto_replied: bool  # Auto-Submitted: auto-replied (never answer an autoresponder)


def _refuse(what: str) -> Refusal:
    return Refusal("550", "5.6.1", f"Mail to xml@ must carry the XML request as its only, plain-text "
                                   f"part (text/plain or text/xml); {what}.")


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


def _charset(part: Message) -> str | None:
    cs = part.get_content_charset()
    if not cs:
        return None
    try:
        return codecs.lookup(cs).name
    except LookupError:
        return None


def extract(raw_message: bytes) -> XmlMail | Refusal:
    msg = email.message_from_bytes(raw_message, policy=email.policy.compat32)
    leaves = [p for p in msg.walk() if not p.is_multipart()]
    if any(p.get_content_type() == "text/html" for p in leaves):
        return _refuse("HTML is not accepted, send the XML as plain text")
    if len(leaves) != 1:
        return _refuse(f"this message has {len(leaves)} parts (attachments are not accepted)")
    part = leaves[0]
    ctype = part.get_content_type()
    disposition = (part.get("Content-Disposition") or "").strip().lower()
    if part.get_filename() or disposition.startswith("attachment"):
        return _refuse("the XML arrived as an attachment")
    # A part without Content-Type is text/plain; compat32 reports that too.
    if ctype not in XML_TYPES:
        return _refuse(f"{ctype} is not accepted")
    payload = part.get_payload(decode=True)
    body = payload if isinstance(payload, bytes) else b""
    if ctype == "text/plain" and (part.get_param("format") or "").lower() == "flowed":
        body = _unflow(body, (part.get_param("delsp") or "").lower() == "yes")
    if not body.strip():
        return _refuse("this message has no body")
    if _HTML_START.match(body):
        return _refuse("HTML is not accepted, send the XML as plain text")
    mid = (msg.get("Message-ID") or "").strip()
    m = _MSGID.search(mid)
    auto = (msg.get("Auto-Submitted") or "").strip().lower().startswith("auto-replied")
    return XmlMail(body=body, charset=_charset(part), message_id=m.group(0) if m else "", auto_replied=auto)
