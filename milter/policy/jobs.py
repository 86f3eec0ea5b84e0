"""The one way a message becomes SMS jobs: values in, `NewJob`s (or the `Refusal`) out.
(The values are NamedTuples: immutable and cheap to make, several per message.)

Every path (`<number>@` of each address style, textsms@) states what the message says for one
account as a `Draft`; `prepare` runs the one sequence of checks on it (ISO-8859-1 where the
style asks for it, the originator, the part count and the text) and `build` makes one job per
destination. xml@ builds its jobs from the XML request (`xmlapi/handler.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ..model import Account
from ..spool.base import JobFile, NewJob
from . import catalogue as replies
from .addresses import normalize_originator, originator_problem
from .content import latin1_problem
from .refusal import Refusal
from .smstext import count_parts


class Envelope(NamedTuple):
    """What every job of one message shares."""

    sender: str
    message_id: str
    queue_id: str


class Draft(NamedTuple):
    """What a message says for one account, before the checks: the same for each destination."""

    text: str
    originator: str  # as given (Subject, sender rule or account): checked by `prepare`
    notify: str
    subject: str  # stored with the job (credentials removed)
    latin1_only: bool  # the address style takes ISO-8859-1 text only


class Prepared(NamedTuple):
    """A Draft that passed the checks: ready to become one job per destination."""

    account: str
    text: str
    originator: str  # normalised (E.164 with '+' or alphanumeric)
    notify: str
    subject: str
    parts: int


def prepare(draft: Draft, account: Account) -> Prepared | Refusal:
    """The checks every SMS job passes, in this order (the first problem is the reply)."""
    if draft.latin1_only:
        problem = latin1_problem(draft.text, "body")
        if problem is not None:
            return problem
    bad = originator_problem(draft.originator)
    if bad:
        return replies.BAD_ORIGINATOR(problem=bad)
    if not draft.text.strip():
        return replies.NO_TEXT()
    parts = count_parts(draft.text)
    if parts > account.max_parts:
        return replies.TOO_MANY_PARTS(parts=parts, max_parts=account.max_parts)
    return Prepared(account=account.name, text=draft.text, originator=normalize_originator(draft.originator),
                    notify=draft.notify, subject=draft.subject, parts=parts)


def prepare_call(draft: Draft, account: Account) -> Prepared | Refusal:
    """The checks of a voice or fax job before its own (policy/channelcheck.py): the originator.
    No SMS part count: the job is one call or one fax (`parts` 1, for the limits)."""
    bad = originator_problem(draft.originator)
    if bad:
        return replies.BAD_ORIGINATOR(problem=bad)
    return Prepared(account=account.name, text=draft.text, originator=normalize_originator(draft.originator),
                    notify=draft.notify, subject=draft.subject, parts=1)


def build(prepared: Prepared, numbers: Iterable[str], device: str, envelope: Envelope, channel: str = "sms",
          language: str = "", files: tuple[JobFile, ...] = ()) -> list[NewJob]:
    """One job per destination number (E.164), in the given order."""
    p, e = prepared, envelope
    return [NewJob(recipient=n, originator=p.originator, text=p.text, parts=p.parts, account=p.account,
                   device=device, sender=e.sender, subject=p.subject, message_id=e.message_id,
                   notify=p.notify, queue_id=e.queue_id, channel=channel, language=language, files=files)
            for n in numbers]
