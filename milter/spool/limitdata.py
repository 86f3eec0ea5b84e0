"""Limits (abuse control) as the spool sees them: the usage counters' slot widths, what one
account has committed (`LimitUsage`), what a commit must check and count (`LimitPlan`), and the
per-account figures `stats` shows. Values only; re-exported by `base`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Slot widths of the usage counters: 10 s slots for the minute and hour windows, 1 h slots for the
# day window, 60 s slots per destination number (per_recipient_per_hour).
SLOT_SHORT = 10
SLOT_LONG = 3600
SLOT_RCPT = 60


@dataclass(frozen=True)
class LimitUsage:
    """What one account has committed so far, as the counters tell it at `now` (values only)."""

    now: float
    short: tuple[tuple[int, int], ...] = ()  # (slot start, parts) of SLOT_SHORT slots, last hour, ascending
    long: tuple[tuple[int, int], ...] = ()  # (slot start, parts) of SLOT_LONG slots, last day, ascending
    month: int = 0  # parts this calendar month (UTC)
    recipients: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # number -> SLOT_RCPT


@dataclass
class LimitPlan:
    """What the commit must do about limits for one message, inside its transaction.

    `dedupe_keys` (parallel to the request's jobs, "" = none) drop a job whose identical SMS was
    committed within `dedupe_ttl` (a key `<seconds>:...` carries its own lifetime); then, per
    account of the remaining jobs, `decide(account, usage, parts, parts_by_recipient)` answers
    None (commit and count) or a refusal object
    (nothing of the message is written; AddResult.refused carries it)."""

    decide: Callable[[str, LimitUsage, int, dict[str, int]], object | None] | None = None
    dedupe_keys: tuple[str, ...] = ()
    dedupe_ttl: float = 0.0


@dataclass(frozen=True)
class AccountUsage:
    """Parts an account committed today and this calendar month (UTC), for `stats`."""

    account: str
    today: int
    month: int
