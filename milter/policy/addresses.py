"""SMS addresses: originators, recipient e-mail addresses, phone numbers.

Pure functions: values in, values (or a `Refusal`) out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import phonenumbers

from ..model import CHANNEL_DEVICES, DEVICES, Domain
from .refusal import Refusal

_ALNUM_ORIGINATOR = re.compile(r"[A-Za-z0-9 ._-]{1,11}")
_PHONE_ORIGINATOR = re.compile(r"(?:\+|00)?([0-9]{3,15})")
_TM_NUMBER = re.compile(r"[0-9](?:-?[0-9])*")
_DEVICE_LABELS = {"sms": "SMS", "business": "Business", "mobile": "Mobile", "home": "Home", "fax": "Fax"}


def originator_problem(value: str) -> str | None:
    """None if `value` is a valid SMS originator, else a short message naming the problem."""
    if _PHONE_ORIGINATOR.fullmatch(value):
        return None
    if _ALNUM_ORIGINATOR.fullmatch(value) and any(c.isascii() and c.isalpha() for c in value):
        return None
    return (f"'{value}' is not a valid originator: use at most 11 letters/digits (at least one letter) "
            "or a phone number")


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
def _e164(digits: str) -> str | None:
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
    return _e164(s)


def _invalid_number(address: str, digits: str) -> Refusal:
    return Refusal("550", "5.1.1",
                   f"Recipient {address}: {digits} is not a valid international phone number.")


def _sms_domain(host: str, domains: Mapping[str, Domain]) -> tuple[Domain, str] | None:
    """The configured SMS domain that `host` is or ends in (the longest), with the labels
    in front of it ('' for the domain itself); one dictionary look-up per label."""
    rest = host
    while rest:
        domain = domains.get(rest)
        if domain is not None:
            return domain, host[:len(host) - len(rest)].rstrip(".")
        _, dot, rest = rest.partition(".")
        if not dot:
            return None
    return None


def classify_recipient(address: str, domains: Mapping[str, Domain]) -> SmsTarget | Refusal | None:
    """What an envelope recipient means: an SMS target, a refusal, or None (not an SMS address).

    Any address whose domain is, or ends in, a configured SMS domain (in any case, with
    trailing dots) is an SMS address: it is valid or refused here, never passed on as mail.
    """
    local, at, dom_part = address.strip().rpartition("@")
    if not at:
        return None
    host = dom_part.strip().lower().rstrip(".")
    found = _sms_domain(host, domains) if host else None
    if found is None:
        return None
    domain, prefix = found
    if not local:
        return Refusal("550", "5.1.3", f"Recipient {address} has no local part; use "
                                       f"{_usage(domain)}.")
    label: str | None = None
    if prefix:
        wrote = dom_part.strip().rstrip(".")
        label = wrote[:len(wrote) - len(domain.name)].rstrip(".")  # the labels as written
        if domain.style != "telemessage" or "." in prefix:
            return Refusal("550", "5.1.2", f"Recipient {address}: {host} is not an SMS domain of this "
                                           f"gateway; use {_usage(domain)}.")
    if domain.style == "telemessage":
        return _telemessage(address, local, label, domain)
    return _aspsms(address, local, domain)


def _usage(domain: Domain) -> str:
    if domain.style == "telemessage":
        return f"<international number>@[<Device>.]{domain.name}"
    return f"00<international number>@{domain.name}, textsms@{domain.name} or xml@{domain.name}"


def _aspsms(address: str, local: str, domain: Domain) -> SmsTarget | Refusal:
    lower = local.lower()
    if lower in ("textsms", "xml"):
        return SmsTarget(kind=lower, domain=domain)
    if re.fullmatch(r"\+[0-9]+", local):
        suggested = "00" + local[1:]
        return Refusal("550", "5.1.3", f"Recipient {address}: write the number with 00 instead of + "
                                       f"({suggested}@{domain.name}).")
    m = re.fullmatch(r"00([0-9]+)", local)
    if m:
        number = _e164(m.group(1))
        if number is None:
            return _invalid_number(address, m.group(1))
        return SmsTarget(kind="number", domain=domain, number=number)
    return Refusal("550", "5.1.3", f"Recipient {address} is not an SMS address of {domain.name}: use "
                                   f"00<international number>@{domain.name}, textsms@{domain.name} "
                                   f"or xml@{domain.name}.")


def _telemessage(address: str, local: str, label: str | None, domain: Domain) -> SmsTarget | Refusal:
    device = "sms" if label is None else label.lower()
    if device not in DEVICES:
        return Refusal("550", "5.1.1", f"Recipient {address}: unknown device '{label}'; use SMS, Business, "
                                       "Mobile, Home or Fax, or no device for SMS.")
    if not _TM_NUMBER.fullmatch(local):
        return Refusal("550", "5.1.3", f"Recipient {address} is not an SMS address of {domain.name}: use "
                                       f"<international number>@[<Device>.]{domain.name} with digits and "
                                       f"dashes only and no + (e.g. 1-781-6170000@{domain.name}).")
    digits = local.replace("-", "")
    if digits.startswith("00"):
        digits = digits[2:]
    number = _e164(digits)
    if number is None:
        return _invalid_number(address, digits)
    if device not in CHANNEL_DEVICES:
        return Refusal("550", "5.3.3", f"Recipient {address}: the {_DEVICE_LABELS[device]} device has no "
                                       f"delivery channel on this gateway; send to {local}@SMS.{domain.name} "
                                       "instead.")
    return SmsTarget(kind="number", domain=domain, device=device, number=number)
