"""Abuse controls: the rules of INTERFACE.md "Limits", as pure functions (values in, decision out).

Nothing here reads a clock, a socket or the spool: the caller passes `now` and what the spool's
counters say (`LimitUsage`). Every function answers None (pass) or a `Hit`: the rule's name (as
in the configuration, for the one log line per refusal) and the SMTP reply.

Reply classes: a destination refused by rule, a missing/foreign SMTP AUTH login: 550 5.7.1;
too many recipients: 550 5.5.3; a rolling window (minute, hour, day, per recipient per hour) or
an open circuit breaker: 451 4.7.1 with when it frees up; the calendar month (or a message
larger than a cap can ever allow): 552 5.2.2.
"""

from __future__ import annotations

import calendar
import functools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import phonenumbers

from ..model import NUMBER_TYPES, Account, BreakerConfig, Limits
from ..spool.base import SLOT_LONG, SLOT_RCPT, SLOT_SHORT, AccountUsage, LimitUsage
from . import catalogue as replies
from .refusal import Refusal

MINUTE, HOUR, DAY = 60, 3600, 86400
_TYPE_NAMES = {v: k for k, v in NUMBER_TYPES.items() if k != "personal_number"}


@dataclass(frozen=True)
class Hit:
    """A rule that refuses (or, in monitor mode, would refuse)."""

    rule: str  # the configuration key: countries, deny_prefixes, parts_per_hour, smtp_auth, ...
    refusal: Refusal


def _when(t: float, now: float) -> str:
    """`2026-12-01 04:12:30 UTC (in 35 min)`: an absolute time and how far away it is."""
    wait = max(0, int(t - now + 0.999))
    if wait < 120:
        rel = f"{wait} s"
    elif wait < 7200:
        rel = f"{(wait + 59) // 60} min"
    elif wait < 172800:
        rel = f"{(wait + 3599) // 3600} h"
    else:
        rel = f"{(wait + 86399) // 86400} days"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t))} UTC (in {rel})"


# -- destinations (decided at RCPT for <number>@, at end of message for textsms@ and xml@) --------
@functools.lru_cache(maxsize=16384)
def number_facts(number: str) -> tuple[str, str]:
    """(ISO 3166 region or '??', phonenumbers type name) of an E.164 number."""
    try:
        n = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return "??", "unknown"
    region = phonenumbers.region_code_for_number(n) or "??"
    return region, _TYPE_NAMES.get(phonenumbers.number_type(n), "unknown")


def destination_hit(limits: Limits, number: str) -> Hit | None:
    """deny_prefixes, countries, number_types for one E.164 number."""
    for prefix in limits.deny_prefixes:
        if number.startswith(prefix):
            return Hit("deny_prefixes", replies.DENIED_PREFIX(number=number, prefix=prefix))
    region, kind = number_facts(number)
    if limits.countries is not None and region not in limits.countries:
        return Hit("countries", replies.DENIED_COUNTRY(number=number, region=region,
                                                       allowed=", ".join(limits.countries)))
    allowed = {NUMBER_TYPES[t] for t in limits.number_types}
    if NUMBER_TYPES[kind] not in allowed:
        return Hit("number_types", replies.DENIED_NUMBER_TYPE(number=number, kind=kind))
    return None


def recipients_hit(limits: Limits, count: int) -> Hit | None:
    """More distinct SMS recipients in one message than recipients_per_message."""
    if count > limits.recipients_per_message:
        return Hit("recipients_per_message", replies.TOO_MANY_RECIPIENTS(limit=limits.recipients_per_message))
    return None


def login_bound(login: str, bound: Iterable[str]) -> bool:
    """Is the SMTP AUTH login one of `bound`? Exact (case-sensitive, as SASL compares), or, for an
    entry without a realm, the login's part before its '@realm' (Cyrus SASL reports alice@realm)."""
    user = login.rpartition("@")[0] if "@" in login else login
    return any(login == b or ("@" not in b and user == b) for b in bound)


def smtp_auth_hit(account: Account, login: str | None) -> Hit | None:
    """An account bound to SMTP AUTH logins is used without one of them."""
    if account.smtp_auth is None:
        return None
    if not login:
        return Hit("smtp_auth", replies.AUTH_REQUIRED())
    if not login_bound(login, account.smtp_auth):
        return Hit("smtp_auth", replies.AUTH_NOT_BOUND())
    return None


# -- velocity and spend caps (decided inside the spool's commit transaction) ---------------------
def _in_window(slots: Iterable[tuple[int, int]], width: int, window: int,
               now: float) -> list[tuple[int, int]]:
    """The slots that (may) hold parts committed within `window` seconds before `now`. A slot
    counts until its *end* leaves the window: never less than the true count."""
    start = now - window
    return [(s, p) for s, p in slots if s + width > start]


def _window_hit(rule: str, what: str, cap: int | None, slots: Iterable[tuple[int, int]], width: int,
                window: int, parts: int, now: float, whom: str = "this account") -> Hit | None:
    if cap is None:
        return None
    inside = _in_window(slots, width, window, now)
    used = sum(p for _, p in inside)
    if used + parts <= cap:
        return None
    if parts > cap:
        return Hit(rule, replies.OVER_CAP(parts=parts, whom=whom, rule=rule, cap=cap, what=what))
    freed = 0
    frees_at = now + window
    for s, p in inside:
        freed += p
        if used - freed + parts <= cap:
            frees_at = s + width + window
            break
    return Hit(rule, replies.WINDOW_FULL(rule=rule, cap=cap, what=what, whom=whom, when=_when(frees_at, now)))


def next_month(now: float) -> float:
    t = time.gmtime(now)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((y, m, 1, 0, 0, 0, 0, 0, 0)))


def usage_hit(limits: Limits, usage: LimitUsage, parts: int, by_recipient: Mapping[str, int]) -> Hit | None:
    """The caps for one account committing `parts` more (by destination: `by_recipient`)."""
    now = usage.now
    if limits.parts_per_month is not None and usage.month + parts > limits.parts_per_month:
        return Hit("parts_per_month", replies.MONTH_FULL(cap=limits.parts_per_month,
                                                         when=_when(next_month(now), now)))
    for hit in (
        _window_hit("parts_per_minute", "per minute", limits.parts_per_minute, usage.short, SLOT_SHORT,
                    MINUTE, parts, now),
        _window_hit("parts_per_hour", "per hour", limits.parts_per_hour, usage.short, SLOT_SHORT, HOUR,
                    parts, now),
        _window_hit("parts_per_day", "per 24 hours", limits.parts_per_day, usage.long, SLOT_LONG, DAY,
                    parts, now),
    ):
        if hit is not None:
            return hit
    if limits.per_recipient_per_hour is not None:
        for number, n in by_recipient.items():
            hit = _window_hit("per_recipient_per_hour", "per hour to one number",
                              limits.per_recipient_per_hour,
                              usage.recipients.get(number, ()), SLOT_RCPT, HOUR, n, now, whom=number)
            if hit is not None:
                return hit
    return None


# -- the circuit breaker on failing destinations ---------------------------------------------------
@dataclass(frozen=True)
class BreakerState:
    """Open breakers: prefix -> (open until, finished, failed), and when each last closed."""

    open: Mapping[str, tuple[float, int, int]]
    closed_at: Mapping[str, float]

    def since(self, prefix: str, default: float) -> float:
        return max(default, self.closed_at.get(prefix, 0.0))


EMPTY_BREAKER = BreakerState({}, {})


def breaker_expire(state: BreakerState, now: float) -> BreakerState:
    """Close the breakers whose cool-down is over (failures before that count no more)."""
    if all(v[0] > now for v in state.open.values()):
        return state
    closed = dict(state.closed_at)
    closed.update({p: v[0] for p, v in state.open.items() if v[0] <= now})
    return BreakerState({p: v for p, v in state.open.items() if v[0] > now}, closed)


def breaker_update(cfg: BreakerConfig, state: BreakerState, stats: Mapping[str, tuple[int, int]],
                   now: float) -> tuple[BreakerState, list[str]]:
    """The breaker after new statistics (prefix -> (finished, failed) since `state.since(prefix)`);
    and the prefixes that tripped now (to log and count)."""
    state = breaker_expire(state, now)
    opened, closed = dict(state.open), dict(state.closed_at)
    tripped = []
    for prefix, (finished, failed) in stats.items():
        if prefix in opened or finished < cfg.min_jobs or failed < cfg.failure_rate * finished:
            continue
        opened[prefix] = (now + cfg.cooldown, finished, failed)
        tripped.append(prefix)
    return BreakerState(opened, closed), tripped


def breaker_hit(state: BreakerState, number: str, now: float) -> Hit | None:
    for prefix, (until, finished, failed) in state.open.items():
        if number.startswith(prefix) and until > now:
            return Hit("breaker", replies.BREAKER_OPEN(prefix=prefix, failed=failed, finished=finished,
                                                       when=_when(until, now)))
    return None


# -- visibility: `sms-milter stats` ----------------------------------------------------------------
def usage_report(accounts: Mapping[str, Account], usage: Iterable[AccountUsage]) -> list[dict]:
    """Per account (configured or seen in the counters): parts today and this calendar month (UTC)
    against its caps (None: no cap). For `sms-milter stats` (spool.account_usage() gives `usage`)."""
    seen = {u.account: u for u in usage}
    out = []
    for name in sorted(set(accounts) | set(seen)):
        u = seen.get(name)
        acc = accounts.get(name)
        lim = acc.limits if acc is not None else None
        out.append({"account": name, "parts_today": u.today if u else 0, "parts_month": u.month if u else 0,
                    "parts_per_day": lim.parts_per_day if lim else None,
                    "parts_per_month": lim.parts_per_month if lim else None,
                    "mode": lim.mode if lim else None})
    return out
