"""Parse an ASPSMS XML request safely and read its fields.

Parsing uses defusedxml with DTDs forbidden: no entity expansion (billion laughs), no
external entities, nothing fetched. A document that is not well-formed, or that carries
a DTD, becomes a `ParserFailure` (the reply's ParserError* form) with line and column.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, ParseError, TreeBuilder

from defusedxml.common import DefusedXmlException, DTDForbidden, EntitiesForbidden
from defusedxml.ElementTree import DefusedXMLParser

from . import callback

MAX_RECIPIENTS = 1000
MAX_TRANS_REFS = 1000
MAX_TRANS_REF_LEN = 100
MAX_URL_LEN = 2000
LIFETIME_DEFAULT, LIFETIME_MIN, LIFETIME_MAX = 1440, 3, 1440  # minutes
TIMEZONE_DEFAULT = 1.0  # hours from GMT (ASPSMS is in Switzerland)
DEFERRED_PAST_GRACE = 24 * 3600.0  # an older DeferredDeliveryTime is refused; a newer past one sends now
DEFERRED_MAX_AHEAD = 366 * 86400.0

# Elements read once (the first occurrence counts); "UserKey" is a common misspelling.
SINGLE = ("Userkey", "Password", "AffiliateId", "Originator", "MessageData", "DeferredDeliveryTime",
          "TimeZone", "LifeTime", "FlashingSMS", "URLBufferedMessageNotification",
          "URLDeliveryNotification", "URLNonDeliveryNotification")
ALIASES = {"UserKey": "Userkey"}
# Parser error codes for what expat accepts but the gateway refuses.
PARSER_DTD_FORBIDDEN = 1001
PARSER_ENTITY_FORBIDDEN = 1002
PARSER_EXTERNAL_FORBIDDEN = 1003


@dataclass(frozen=True)
class RecipientSpec:
    phone: str
    trans_ref: str | None


@dataclass(frozen=True)
class XmlRequest:
    root: str
    actions: tuple[str, ...]
    fields: dict[str, str] = field(default_factory=dict)  # SINGLE elements (as given: not stripped)
    recipients: tuple[RecipientSpec, ...] = ()
    recipient_count: int = 0  # all <Recipient> elements, also beyond MAX_RECIPIENTS
    trans_refs: tuple[str, ...] = ()  # top-level <TransRefNumber> (inquiries), non-empty ones
    trans_ref_count: int = 0

    @property
    def action(self) -> str | None:
        return self.actions[0] if len(self.actions) == 1 else None

    def get(self, name: str) -> str:
        """The element's text with surrounding blanks removed ("" if absent)."""
        return self.fields.get(name, "").strip()


@dataclass(frozen=True)
class ParserFailure:
    code: int
    description: str
    line: int  # 1-based
    linepos: int  # 1-based column
    filepos: int  # 0-based byte offset
    src_text: str  # the neighbourhood of the error, password masked


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _text(el: Element) -> str:
    return "".join(el.itertext())


# Everything from <Password> to </Password> (or to the end of the line) is masked.
_PASSWORD_TEXT = re.compile(r"(<\s*Password\b[^>]*>).*?(?=<\s*/\s*Password|$)", re.IGNORECASE)


def _src_text(data: bytes, line: int, col: int) -> str:
    lines = data.split(b"\n")
    if not 1 <= line <= len(lines):
        return ""
    text = lines[line - 1].rstrip(b"\r").decode("latin-1")
    text = _PASSWORD_TEXT.sub(r"\1***", text)
    start = max(0, col - 60)
    snippet = text[start:start + 120]
    if "assword" in snippet and "***" not in snippet:  # a cut-off password element: say nothing
        return ""
    return snippet


def _failure(code: int, desc: str, data: bytes, line: int, col0: int, filepos: int,
             skipped: int) -> ParserFailure:
    return ParserFailure(code=code, description=desc, line=line + skipped, linepos=col0 + 1,
                         filepos=max(filepos, 0), src_text=_src_text(data, line, col0))


def parse_request(data: bytes, encoding: str | None = None) -> XmlRequest | ParserFailure:
    """The request in `data`, or why it is not a well-formed, DTD-free XML document.

    `encoding` (the MIME charset) applies only when the document does not declare one.
    """
    stripped = data.lstrip(b" \t\r\n")
    skipped = data[: len(data) - len(stripped)].count(b"\n")
    data = stripped
    head = data[:200]
    declared = head.startswith(b"<?xml") and b"encoding" in head.split(b"?>", 1)[0]
    parser = DefusedXMLParser(target=TreeBuilder(), encoding=None if declared else encoding,
                              forbid_dtd=True, forbid_entities=True, forbid_external=True)
    expat = parser.parser
    try:
        parser.feed(data)
        root = parser.close()
    except ParseError as e:
        line, col = e.position
        code = getattr(e, "code", 0) or 0
        msg = str(e).split(":", 1)[0]
        return _failure(code, msg, data, line, col, expat.ErrorByteIndex, skipped)
    except DefusedXmlException as e:
        if isinstance(e, DTDForbidden):
            code, desc = PARSER_DTD_FORBIDDEN, "DTD (<!DOCTYPE>) is not allowed"
        elif isinstance(e, EntitiesForbidden):
            code, desc = PARSER_ENTITY_FORBIDDEN, "entity declarations are not allowed"
        else:
            code, desc = PARSER_EXTERNAL_FORBIDDEN, "external entities are not allowed"
        return _failure(code, desc, data, expat.CurrentLineNumber, expat.CurrentColumnNumber,
                        expat.CurrentByteIndex, skipped)
    except (ValueError, LookupError):  # an encoding expat cannot read (multi-byte, say UTF-7)
        return _failure(18, "unknown encoding", data, expat.CurrentLineNumber, expat.CurrentColumnNumber,
                        expat.CurrentByteIndex, skipped)
    return _read(root)


def _read(root: Element) -> XmlRequest:
    actions: list[str] = []
    fields: dict[str, str] = {}
    recipients: list[RecipientSpec] = []
    refs: list[str] = []
    n_rcpt = n_refs = 0
    for child in root:
        name = _local(child.tag)
        name = ALIASES.get(name, name)
        if name == "Action":
            actions.append(_text(child).strip())
        elif name in SINGLE:
            fields.setdefault(name, _text(child))
        elif name == "Recipient":
            n_rcpt += 1
            if n_rcpt > MAX_RECIPIENTS:
                continue
            phone, ref = "", None
            for sub in child:
                sname = _local(sub.tag)
                if sname == "PhoneNumber" and not phone:
                    phone = _text(sub).strip()
                elif sname == "TransRefNumber" and ref is None:
                    ref = _text(sub).strip() or None
            recipients.append(RecipientSpec(phone=phone, trans_ref=ref))
        elif name == "TransRefNumber":
            value = _text(child).strip()
            if value:
                n_refs += 1
                if n_refs <= MAX_TRANS_REFS:
                    refs.append(value)
    return XmlRequest(root=_local(root.tag), actions=tuple(actions), fields=fields,
                      recipients=tuple(recipients), recipient_count=n_rcpt, trans_refs=tuple(refs),
                      trans_ref_count=n_refs)


# -- field values ----------------------------------------------------------------------

_TZ = re.compile(r"([+-]?)(\d{1,2})(?:[.:](\d{1,2}))?")


def parse_timezone(value: str) -> float | None:
    """`TimeZone` (hours from GMT: "+1", "-5", "5.5", "+5:30") -> hours, or None if invalid."""
    if not value:
        return TIMEZONE_DEFAULT
    m = _TZ.fullmatch(value)
    if not m:
        return None
    hours = int(m.group(2))
    frac = m.group(3)
    if frac is not None:
        # "5:30" is minutes, "5.5" a decimal fraction
        hours_f = hours + (int(frac) / 60 if ":" in value else float("0." + frac))
    else:
        hours_f = float(hours)
    sign = -1.0 if m.group(1) == "-" else 1.0
    if hours_f > 14:
        return None
    return sign * hours_f


def parse_aspsms_time(value: str, tz_hours: float) -> float | None:
    """`ddmmyyyyhhmmss` in zone GMT+tz_hours -> epoch seconds, or None if malformed."""
    if not re.fullmatch(r"\d{14}", value):
        return None
    d, mo, y, h, mi, s = (int(value[0:2]), int(value[2:4]), int(value[4:8]), int(value[8:10]),
                          int(value[10:12]), int(value[12:14]))
    if not (1 <= mo <= 12 and 1970 <= y <= 9999 and h < 24 and mi < 60 and s < 60):
        return None
    if not 1 <= d <= calendar.monthrange(y, mo)[1]:
        return None
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - tz_hours * 3600


def format_aspsms_time(epoch: float, tz_hours: float) -> str:
    """Epoch seconds -> `ddmmyyyyhhmmss` in zone GMT+tz_hours."""
    t = time.gmtime(int(epoch + tz_hours * 3600))
    return time.strftime("%d%m%Y%H%M%S", t)


def parse_lifetime(value: str) -> int | None:
    """`LifeTime` in minutes, clamped to 3-1440; default 1440; None if not a whole number."""
    if not value:
        return LIFETIME_DEFAULT
    if not re.fullmatch(r"\+?\d{1,9}", value):
        return None
    return min(max(int(value), LIFETIME_MIN), LIFETIME_MAX)


def parse_flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def url_problem(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """None if `url` may be called back, else why not (the parser the HTTP call uses too)."""
    return callback.url_problem(url, allowed_hosts)
