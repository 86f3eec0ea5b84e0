"""A job's lifecycle as rules: values in, values out, no storage.

Every spool backend asks these functions what a change means and only stores the answer:

- `job_state`: a job's parts' states -> the job's state (a receipt for one part moves the job);
- `may_become`: whether a job in one state may move to another (final states are final);
- `owed_events`: which notifications (a mail to the sender, an xml@ URL callback) a job owes on
  reaching a state, under its Notify policy (`NOTIFY_STATES`);
- `schedule`: when a new job is due and until when it is valid (deferred delivery, validity);
- `receipt_rank` / `number_key` / `same_number`: which stored part a delivery receipt is for;
- `train`: which jobs of one number behind a claimed head go with it, in order (pipelining).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

STATES = ("queued", "held", "submitted", "delivered", "buffered", "failed", "expired")
FINAL_STATES = ("delivered", "failed", "expired")

# Which job states owe a notification mail to the envelope sender under each Notify policy
# (the X-Notify / xml@ Notify value; "" is the default).
NOTIFY_STATES: dict[str, tuple[str, ...]] = {
    "ALWAYS": ("delivered", "buffered", "failed", "expired"),
    "": ("delivered", "failed", "expired"),
    "FAILED": ("failed", "expired"),
    "NONE": (),
}


def is_final(state: str) -> bool:
    return state in FINAL_STATES


def job_state(current: str, parts: int, part_states: Iterable[str]) -> str:
    """The job's state once its parts are in `part_states` (the states of the parts the
    provider has taken, one per submitted part): one failed part fails the job, then one
    expired part expires it; every one of its `parts` delivered delivers it; a buffered part
    makes it `buffered`; otherwise it stays `current`."""
    states = list(part_states)
    if "failed" in states:
        return "failed"
    if "expired" in states:
        return "expired"
    if len(states) >= parts and all(s == "delivered" for s in states):
        return "delivered"
    if "buffered" in states:
        return "buffered"
    return current


def may_become(current: str | None, new: str) -> bool:
    """May a job in `current` (None: no such job) move to `new`? Not from a final state,
    and not to the state it is in (nothing changes, nothing is owed)."""
    return current is not None and current != new and current not in FINAL_STATES


def owed_events(state: str, notify: str, sender: str, urls: str | dict[str, str]) -> tuple[str, ...]:
    """The notification kinds a job owes on reaching `state`: "mail" (to `sender`, under the
    Notify policy `notify`; an unknown policy is the default) and "url" (an xml@ callback URL
    for that state; an expired job calls the `failed` URL). `urls` as stored (JSON) or parsed."""
    out: list[str] = []
    if sender and state in NOTIFY_STATES.get(notify, NOTIFY_STATES[""]):
        out.append("mail")
    if isinstance(urls, str):
        urls = json.loads(urls) if urls and urls != "{}" else {}
    if ("failed" if state == "expired" else state) in urls:
        out.append("url")
    return tuple(out)


def schedule(now: float, not_before: float | None, expires_at: float | None,
             validity: float) -> tuple[float, float, bool]:
    """A new job's (due time, validity end, deferred): due now unless it asks for later
    (deferred delivery); valid for `validity` seconds from when it is due unless it says."""
    due = not_before if not_before is not None else now
    expires = expires_at if expires_at is not None else max(now, due) + validity
    return due, expires, not_before is not None and not_before > now


def done_at(state: str, now: float) -> float | None:
    """When a job reaching `state` is finished: now for a final state, else not (None)."""
    return now if state in FINAL_STATES else None


# -- which part a delivery receipt is for ---------------------------------------------------
_NOT_DIGIT = re.compile(r"[^0-9]")


def number_key(addr: str) -> str:
    """A phone number as receipts and jobs are compared: its digits without leading zeros
    ('+41791234567', '0041791234567' and '41791234567' are one number); '' if none."""
    if addr.isdigit():  # the usual forms first: '41791234567' (a receipt), '+41791234567' (a job)
        return addr.lstrip("0")
    if addr[1:].isdigit() and addr[:1] == "+":
        return addr[1:].lstrip("0")
    return _NOT_DIGIT.sub("", addr).lstrip("0")


def same_number(a: str, b: str) -> bool:
    """Two number_key()s name one handset: equal, or one is the other written nationally
    (its last 7 or more digits)."""
    if a == b:
        return True
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return len(short) >= 7 and long.endswith(short)


def receipt_matches(source: str, recipient: str, provider: str, part_provider: str) -> bool:
    """May a receipt from handset `source` (a number_key, '' = it named none) sent by
    `provider` ('' = unknown) be for a part of a job to `recipient` (a number_key) stored for
    `part_provider`? Message ids are not unique: the number and the provider must agree too."""
    if source and not same_number(source, recipient):
        return False
    return not (provider and part_provider and provider != part_provider)


def receipt_rank(final: bool, form: int, submitted_at: float, job_id: int,
                 seq: int) -> tuple[bool, int, float, int, int]:
    """Order of the parts a receipt may be for (the smallest wins): a part not final yet
    before a final one, the id as given (`form` 0) before its other readings, the newest
    submit first, then the newest job, then the first part."""
    return (final, form, -submitted_at, -job_id, seq)


# Provider message ids as every backend stores and looks them up.
def normalize_ref(ref: str) -> str:
    """A provider message id as stored: lowercased, leading zeros dropped."""
    return ref.strip().lower().lstrip("0") or "0"


def refs_for_lookup(ref: str) -> list[str]:
    """Every stored form a receipt's id may match: SMSCs give the id in hex in one PDU and
    in decimal in another (either way round), so try the id as it is, its hex reading
    written in decimal, and its decimal reading written in hex."""
    r = normalize_ref(ref)
    forms = [r]
    try:
        forms.append(str(int(r, 16)))
    except ValueError:
        pass
    if r.isdigit():
        forms.append(format(int(r), "x"))
    return list(dict.fromkeys(forms))


def train(head_id: int, followers: Iterable[tuple[int, bool, float, float | None]], now: float,
          limit: int) -> list[int]:
    """The jobs that go with a claimed head job to the same owner, in order ("a train"): the
    queued jobs of the head's number after it, `followers` as (id, deferred, not_before,
    lease_until) in id order, at most `limit`. The train stops at the first job that may not
    go now and blocks the ones behind it (not due yet and not deferred, or leased elsewhere);
    a deferred job that is not due does not block and is left out."""
    out: list[int] = []
    for jid, deferred, not_before, lease_until in followers:
        if len(out) >= limit:
            break
        if jid <= head_id:
            continue
        leased = lease_until is not None and lease_until >= now
        if not_before > now and deferred and not leased:
            continue  # scheduled for later: it waits for its time, the others go on
        if leased or not_before > now:
            break
        out.append(jid)
    return out
