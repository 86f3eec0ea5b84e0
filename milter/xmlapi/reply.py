"""Build the XML reply and the mail that carries it back to the requester.

The document is declared ISO-8859-1 and written in pure ASCII: characters 38, 60, 62
and everything above 127 are numeric character references (as ASPSMS clients write
their requests), so the mail body is 7bit and survives any relay unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.utils import formatdate, make_msgid

from .request import ParserFailure

# An element: (name, text) or (name, [child elements]).
Node = tuple[str, "str | Sequence[Node]"]

MAX_TEXT = 500  # characters of any one value echoed into a reply


def escape(text: str) -> str:
    """XML character data in ASCII: &, <, >, and non-ASCII as &#N;; unusable characters as '?'."""
    out: list[str] = []
    for ch in text[:MAX_TEXT]:
        o = ord(ch)
        if o in (38, 60, 62) or o > 126:
            out.append("?" if 0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF) else f"&#{o};")
        elif o < 32 and ch not in "\t\n\r":
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def _render(nodes: Sequence[Node], indent: str) -> list[str]:
    lines: list[str] = []
    for name, value in nodes:
        if isinstance(value, str):
            lines.append(f"{indent}<{name}>{escape(value)}</{name}>")
        else:
            lines.append(f"{indent}<{name}>")
            lines.extend(_render(value, indent + "  "))
            lines.append(f"{indent}</{name}>")
    return lines


def document(nodes: Sequence[Node]) -> bytes:
    lines = ['<?xml version="1.0" encoding="ISO-8859-1"?>', "<aspsms>"]
    lines.extend(_render(nodes, "  "))
    lines.append("</aspsms>")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def parser_error_nodes(f: ParserFailure) -> list[Node]:
    return [
        ("ParserErrorCode", str(f.code)),
        ("ParserErrorDescription", f.description),
        ("ParserErrorFilePos", str(f.filepos)),
        ("ParserErrorLine", str(f.line)),
        ("ParserErrorLinePos", str(f.linepos)),
        ("ParserErrorSrcText", f.src_text),
    ]


_SAFE_ACTION = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_ADDR_UNSAFE = re.compile(r"[\s<>\x00-\x1f\x7f]")


def subject_for(action: str | None) -> str:
    if action and _SAFE_ACTION.fullmatch(action):
        return f"ASPSMS XML reply: {action}"
    return "ASPSMS XML reply"


def mail(xml: bytes, *, sender: str, rcpt: str, action: str | None, in_reply_to: str, now: float) -> bytes:
    """The whole reply message (RFC 5322, CRLF) for envelope recipient `rcpt`."""
    domain = sender.rpartition("@")[2] or "localhost"
    headers = [
        f"From: <{sender}>",
        f"To: <{_ADDR_UNSAFE.sub('', rcpt)}>",
        f"Subject: {subject_for(action)}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {make_msgid('aspsms-xml', domain=domain)}",
    ]
    if in_reply_to:
        headers += [f"In-Reply-To: {in_reply_to}", f"References: {in_reply_to}"]
    headers += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: text/xml; charset=ISO-8859-1",
        "Content-Transfer-Encoding: 7bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + xml
