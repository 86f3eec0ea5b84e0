"""SMS addresses: originators, phone numbers, the target an SMS recipient address means.

Pure functions: values in, values out. What each address style accepts is in `styles/`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import phonenumbers

from ..model import Domain
from .escape import ascii_escape

_ALNUM_ORIGINATOR = re.compile(r"[A-Za-z0-9 ._-]{1,11}")
_PHONE_ORIGINATOR = re.compile(r"(?:\+|00)?([0-9]{3,15})")


def originator_problem(value: str) -> str | None:
    """None if `value` is a valid SMS originator, else a short message naming the problem."""
    if _PHONE_ORIGINATOR.fullmatch(value):
        return None
    if _ALNUM_ORIGINATOR.fullmatch(value) and any(c.isascii() and c.isalpha() for c in value):
        return None
    return (f"'{ascii_escape(value)}' is not a valid originator: use at most 11 letters/digits (at least "
            "one letter) or a phone number")


def normalize_originator(value: str) -> str:
    """Numeric originators to E.164 with '+'; alphanumeric ones unchanged."""
    m = _PHONE_ORIGINATOR.fullmatch(value)
    return f"+{m.group(1)}" if m else value


def originator_wire(orig: str) -> tuple[int, int, str]:
    """(TON, NPI, source_addr) for SMPP: numeric -> international (1, 1); alphanumeric -> (5, 0)."""
    m = _PHONE_ORIGINATOR.fullmatch(orig)
    if m:
        return 1, 1, m.group(1)
    return 5, 0, orig


@dataclass(frozen=True)
class SmsTarget:
    kind: str  # "number" | "textsms" | "xml"
    domain: Domain
    device: str = "sms"  # lowercase device name
    number: str | None = None  # E.164 with '+', for kind "number"


@functools.lru_cache(maxsize=16384)
def e164(digits: str) -> str | None:
    """International digits (no prefix) to E.164 if possible and valid, else None."""
    if not digits.isascii() or not digits.isdigit() or not 3 <= len(digits) <= 15:
        return None
    try:
        num = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return None
    if not (phonenumbers.is_possible_number(num) and phonenumbers.is_valid_number(num)):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def parse_number(text: str) -> str | None:
    """A number as written in a Subject (00..., +..., digits with dashes/spaces) -> E.164 or None."""
    s = re.sub(r"[\s\-./()]", "", text.strip())
    if s.startswith("+"):
        s = s[1:]
    elif s.startswith("00"):
        s = s[2:]
    return e164(s)
