"""Address styles: what an SMS domain's addresses look like and what a message to them means.

A domain's `style:` names one entry of `STYLES` (the configuration validates it against this
registry). A style is one module behind the `Style` protocol: it parses the local part (and the
device labels in front of the domain, where it takes them) into an `SmsTarget`, says in a reply
what its domains accept, whether senders may be authorized by their domain, whether the text
must fit ISO-8859-1, and drafts the SMS of a `<number>@` message (`jobs.Draft`). A new style is
a module here and one entry in `STYLES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

from ...model import Account, Domain, SenderRule
from .. import catalogue as replies
from ..addresses import SmsTarget
from ..content import MessageText
from ..jobs import Draft
from ..refusal import Refusal
from . import aspsms, telemessage


class Style(Protocol):
    name: str
    device_labels: bool  # may labels in front of the domain name a device (x@Fax.tm.example.com)?
    sender_domains: bool  # may a `senders: - domain:` rule authorize a sender for <number>@?
    latin1_only: bool  # must the SMS text fit ISO-8859-1?

    def usage(self, domain: str) -> str:
        """What the domain's addresses look like, for a reply ("use ...")."""
        ...

    def target(self, address: str, local: str, label: str | None, domain: Domain) -> SmsTarget | Refusal:
        """The recipient `local@[label.]domain` as a target, or the refusal naming what is wrong."""
        ...

    def draft(self, mt: MessageText, account: Account, rule: SenderRule | None) -> Draft:
        """The SMS of a <number>@ message for an authorized sender (`rule`) of `account`."""
        ...


STYLES: Mapping[str, Style] = MappingProxyType({s.name: s for s in (aspsms.STYLE, telemessage.STYLE)})


def style_of(domain: Domain) -> Style:
    return STYLES[domain.style]


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
    style = STYLES[domain.style]
    if not local:
        return replies.NO_LOCAL_PART(address=address, usage=style.usage(domain.name))
    label: str | None = None
    if prefix:
        wrote = dom_part.strip().rstrip(".")
        label = wrote[:len(wrote) - len(domain.name)].rstrip(".")  # the labels as written
        if not style.device_labels or "." in prefix:
            return replies.NOT_SMS_DOMAIN(address=address, host=host, usage=style.usage(domain.name))
    return style.target(address, local, label, domain)
