"""The decision rules (abuse limits) decided before the 250, in their order: one list each.

At RCPT (a `<number>@` recipient) and at the end of the message (textsms@ and xml@, whose
account and numbers are known only then) the gateway asks `hits()` for one account: first the
rules about the account (`ACCOUNT_RULES`), then, number by number, the rules about a destination
(`NUMBER_RULES`). The first hit that is enforced is the reply (in monitor mode every hit is
logged and none refuses). A new rule is one function and one entry in one of the two lists.
The caps on counted SMS parts are decided later, inside the spool's commit (`limits.usage_hit`).
Pure: the circuit breaker's state comes in as a function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..model import Account
from . import limits
from .limits import Hit


@dataclass(slots=True)
class Ask:
    """What the rules look at, for one account at one decision point."""

    account: Account
    login: str | None  # the SMTP AUTH login, None when not authenticated
    recipients: int  # distinct (number, device) of the message for this account so far
    numbers: tuple[str, ...]  # the destinations (E.164) decided here
    breaker: Callable[[str], Hit | None]  # the circuit breaker's answer for a number
    auth: bool = True  # decide smtp_auth here (at the end of the message: for textsms@/xml@ only)
    where: str = ""  # for the account rules' log line ("recipient +41..." at RCPT)


def smtp_auth(ask: Ask) -> Hit | None:
    return limits.smtp_auth_hit(ask.account, ask.login) if ask.auth else None


def recipients_per_message(ask: Ask) -> Hit | None:
    return limits.recipients_hit(ask.account.limits, ask.recipients)


def destination(ask: Ask, number: str) -> Hit | None:
    """deny_prefixes, countries, number_types."""
    return limits.destination_hit(ask.account.limits, number)


def breaker(ask: Ask, number: str) -> Hit | None:
    return ask.breaker(number)


ACCOUNT_RULES: tuple[Callable[[Ask], Hit | None], ...] = (smtp_auth, recipients_per_message)
NUMBER_RULES: tuple[Callable[[Ask, str], Hit | None], ...] = (destination, breaker)


def hits(ask: Ask) -> Iterator[tuple[Hit | None, str]]:
    """(hit or None, what it is about) rule by rule, in order; lazily: a caller that stops at the
    first enforced hit decides no further rule."""
    for rule in ACCOUNT_RULES:
        yield rule(ask), ask.where
    for number in ask.numbers:
        for number_rule in NUMBER_RULES:
            yield number_rule(ask, number), f"recipient {number}"
