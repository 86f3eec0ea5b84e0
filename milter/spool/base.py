"""The spool's interface: what the milter, the dispatcher and the CLI may ask of a queue.

SQLite implements it today (`sqlite.SqliteSpool`); a PostgreSQL spool shared by several
hosts implements the same methods later. Nothing outside `spool/` knows SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

# A job's parts accepted by the provider: (job_id, message ids one per part[, provider name]).
SubmittedItem = tuple[int, list[str]] | tuple[int, list[str], str]

STATES = ("queued", "held", "submitted", "delivered", "buffered", "failed", "expired")
FINAL_STATES = ("delivered", "failed", "expired")
# `held`: set by `queue hold`, cleared by `queue release`; the dispatcher claims `queued` only.


class SpoolError(Exception):
    """The spool cannot take or give work right now (locked, unwritable, gone)."""


class SpoolDataError(SpoolError):
    """One message's data cannot be stored (the spool itself is fine): a 5xx for that
    message alone; `what` names the value (never the value itself)."""

    def __init__(self, what: str):
        super().__init__(f"{what} cannot be stored")
        self.what = what


@dataclass(frozen=True)
class NewJob:
    """One SMS to one recipient, as the milter (or xml@) decided it."""

    recipient: str  # E.164 with '+'
    originator: str  # E.164 with '+' or an alphanumeric sender id
    text: str
    parts: int
    account: str
    device: str = "sms"
    sender: str = ""  # envelope sender: notifications go here ('' = null sender, none)
    subject: str = ""  # original Subject without credentials
    message_id: str = ""
    notify: str = ""  # "", ALWAYS, NONE, FAILED
    queue_id: str = ""  # the MTA's queue id, for logs
    not_before: float | None = None  # deferred delivery (epoch seconds)
    expires_at: float | None = None  # validity end; default now + provider validity
    trans_ref: str | None = None  # xml@ TransRefNumber
    flash: bool = False  # class-0 SMS
    urls: dict[str, str] = field(default_factory=dict)  # xml@: state -> callback URL


@dataclass(frozen=True)
class Job(NewJob):
    id: int = 0
    state: str = "queued"
    created_at: float = 0.0
    attempts: int = 0
    last_error: str = ""
    submitted_at: float | None = None
    done_at: float | None = None
    provider_refs: tuple[str, ...] = ()

    def public(self) -> dict:
        """The fields `queue list --json` promises (and a few more)."""
        d = asdict(self)
        d["provider_refs"] = list(self.provider_refs)
        return d


@dataclass(frozen=True)
class OutMail:
    """A ready-made mail (an xml@ reply) committed with the jobs and handed over later."""

    rcpt: str
    content: bytes  # the whole RFC 5322 message


@dataclass(frozen=True)
class AddResult:
    job_ids: tuple[int, ...]
    duplicate: bool  # True: the same message was spooled before; nothing new was added
    refused: object = None  # a limit refused it inside the transaction (LimitPlan.decide's answer)


# -- limits (abuse control): counters the commit checks and updates in its own transaction ----------
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


class AddRequest:
    """One message's commit: what to write, then its result or error."""

    __slots__ = ("key", "jobs", "mails", "key_ttl", "result", "error", "context", "deadline", "limits")

    def __init__(self, key: str | None, jobs: list[NewJob], key_ttl: float, mails: list[OutMail],
                 context: object = None, limits: LimitPlan | None = None):
        self.key = key
        self.jobs = jobs
        self.mails = mails
        self.key_ttl = key_ttl
        self.result: AddResult | None = None
        self.error: SpoolError | None = None
        self.context = context  # the caller's (the milter's session)
        self.deadline = 0.0  # monotonic: not committed after this (the caller answered 451)
        self.limits = limits  # abuse control: checked and counted in the commit (w7-limits)


@dataclass(frozen=True)
class Event:
    """A status change that owes the outside world a notification (mail or URL call)."""

    id: int
    job_id: int
    kind: str  # "mail" | "url"
    status: str  # the job state that caused it: delivered, buffered, failed, expired
    at: float
    attempts: int


@dataclass(frozen=True)
class ReceiptOutcome:
    job_id: int
    state: str  # job state after the receipt
    changed: bool
    notify: bool = False  # the change owes a notification (an event was queued)
    stale: bool = False  # its id (and number) matched only parts already final: not applied


@dataclass(frozen=True)
class OrphanReceipt:
    """A receipt stored while no part had its message id (it came before its submit response
    was stored, or it belongs to nothing we sent)."""

    ref: str  # normalized
    part_state: str
    error: str
    at: float  # when it was stored
    source: str = ""  # the receipt's source_addr (the handset number), '' if it gave none


@dataclass(frozen=True)
class AppliedOrphan:
    """An orphan receipt applied when its part's message id was stored."""

    receipt: OrphanReceipt
    outcome: ReceiptOutcome


@dataclass(frozen=True)
class OverduePart:
    """A submitted part whose receipt has not come within receipt_timeout: to ask the SMSC."""

    job_id: int
    seq: int
    ref: str  # the message id as the SMSC wrote it in the submit_sm_resp
    recipient: str  # E.164 with '+'
    originator: str  # as in the job (the submit's source address)
    provider: str = ""  # the provider that took the part ("" in spools from before providers had names)


class Spool(Protocol):
    validity: float  # seconds a new or retried job stays valid (provider.smpp.validity; a reload sets it)

    # -- milter side -------------------------------------------------------------------
    def add_message(self, key: str | None, jobs: list[NewJob], key_ttl: float,
                    mails: list[OutMail] | None = None, limits: LimitPlan | None = None) -> AddResult:
        """Commit all jobs (and mails) of one message durably in one transaction, or raise SpoolError.

        `key` identifies the message: a second call with the same key within `key_ttl`
        seconds adds nothing and returns the first call's job ids with duplicate=True.
        A lock held by someone else is waited for at most the spool's busy timeout
        (milter.spool_timeout).
        """

    def commit_now(self, batch: list[AddRequest]) -> None:
        """Commit several messages in one transaction; each request gets its result, or all
        get the same SpoolError. Messages already spooled under their key add nothing."""

    def try_commit(self, batch: list[AddRequest]) -> bool:
        """commit_now without ever waiting for a lock: False (nothing written, no request
        answered) if another process holds the spool's write lock; True once every request
        has its result or error. One message whose data cannot be stored gets a
        SpoolDataError and the others still commit."""

    def wake(self) -> None:
        """Tell any waiting dispatcher that new work is there (best effort)."""

    # -- dispatcher side ---------------------------------------------------------------
    def wait_for_work(self, timeout: float) -> None: ...

    def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]: ...

    def mark_submitted(self, job_id: int, owner: str, refs: list[str]) -> list[AppliedOrphan]:
        """Record a job's parts as submitted with their message ids and, in the same
        transaction, apply every stored orphan receipt for one of those ids."""

    def mark_submitted_many(self, items: list[SubmittedItem]) -> list[AppliedOrphan]:
        """mark_submitted for many (job_id, refs) in one transaction."""

    def release(self, job_ids: list[int], owner: str, delay: float, error: str = "",
                count_attempt: bool = False) -> None: ...

    def fail(self, job_id: int, error: str, state: str = "failed") -> None: ...

    def store_round(self, submitted: list[SubmittedItem], receipts: list[tuple[str, ...]],
                    ) -> tuple[list[AppliedOrphan], list[ReceiptOutcome | None]]:
        """mark_submitted_many(submitted) then record_receipts(receipts) in one transaction."""

    def record_receipt(self, ref: str, part_state: str, error: str = "") -> ReceiptOutcome | None:
        """Apply a receipt durably. None: no part has that id (yet); the receipt is then stored
        as an orphan, durably too, and applied when mark_submitted* stores that id."""

    def record_receipts(self, items: list[tuple[str, ...]]) -> list[ReceiptOutcome | None]:
        """record_receipt for many (ref, part_state, error[, source]), in order, in one transaction.
        A receipt matches a part by message id and, if it names one, the handset number
        (source_addr); one matching only final parts is `stale` and not applied."""

    def prune_orphans(self, max_age: float, limit: int = 1000) -> list[OrphanReceipt]:
        """Delete (and return) orphan receipts older than max_age seconds: they matched nothing."""

    def prune_message_keys(self, limit: int = 5000) -> int:
        """Delete up to `limit` expired idempotency keys; how many. (The lookup ignores expired
        keys anyway: this only gives the space back.)"""

    def renew_leases(self, job_ids: list[int], owner: str, lease_seconds: float) -> list[int]: ...

    def receipts_overdue(self, submitted_before: float, limit: int, next_query: float) -> list[OverduePart]:
        """The open parts of jobs without a final receipt (`submitted`, `buffered`) submitted
        before `submitted_before` that are due
        to be asked about (query_sm); they are not due again before `next_query`."""

    def note_receipt_query(self, items: list[tuple[int, str]]) -> None:
        """Set last_error of jobs still waiting for their receipt: (job_id, what the SMSC said)."""

    def expire_due(self) -> list[int]: ...

    def due_events(self, limit: int) -> list[Event]: ...

    def event_done(self, event_id: int) -> None: ...

    def event_retry(self, event_id: int, error: str, delay: float) -> None: ...

    def due_outbox(self, limit: int) -> list[tuple[int, OutMail, int]]: ...

    def outbox_done(self, mail_id: int) -> None: ...

    def outbox_retry(self, mail_id: int, error: str, delay: float) -> None: ...

    # -- everyone ----------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None: ...

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]: ...

    def find_by_trans_ref(self, account: str, refs: list[str]) -> dict[str, list[Job]]: ...

    def parts_used(self, account: str) -> int: ...

    def account_usage(self, now: float | None = None) -> list[AccountUsage]:
        """Per account: parts committed today and this calendar month (UTC), from the limit counters."""

    def finished_by_prefix(self, since: float, digits: int) -> dict[str, tuple[int, int]]:
        """Jobs that reached a final state since `since`, by destination prefix ('+' and `digits`
        digits): prefix -> (finished, failed or expired). The circuit breaker's input."""

    def close(self) -> None: ...


# -- the administrator's queue tools (`sms-milter queue show/hold/...`, `stats`) --------
@dataclass(frozen=True)
class Change:
    """What an administrator's queue command did to one job (or why it did nothing)."""

    job_id: int
    before: str | None  # the job's state before; None: no such job
    after: str | None  # its state after ("deleted" when removed); None: left unchanged
    reason: str = ""  # why it was left unchanged

    @property
    def changed(self) -> bool:
        return self.after is not None


@dataclass(frozen=True)
class Part:
    seq: int  # 0-based
    ref: str  # the provider's message id (normalized)
    state: str  # submitted, delivered, buffered, failed, expired


@dataclass(frozen=True)
class Notification:
    """A notification (mail or URL callback) a job still owes: sent ones are not kept."""

    id: int
    kind: str  # "mail" | "url"
    status: str  # the job state that caused it
    at: float
    next_at: float
    attempts: int
    last_error: str


@dataclass(frozen=True)
class JobDetail:
    job: Job
    parts: list[Part]
    notifications: list[Notification]


@dataclass
class AccountStats:
    """Per account: SMS parts handed to the provider (by submit time, UTC calendar).
    A dict per account in `stats --json`, so more figures (caps) can sit beside these."""

    parts_today: int = 0
    parts_month: int = 0


@dataclass
class SpoolStats:
    states: dict[str, int]  # every state in STATES, 0 included
    accounts: dict[str, AccountStats]
    oldest_queued_at: float | None  # created_at of the oldest `queued` job


class QueueAdmin(Protocol):
    """What the CLI's queue tools and `stats` ask of a spool (besides get / list_jobs)."""

    def detail(self, job_id: int) -> JobDetail | None: ...

    def hold_jobs(self, job_ids: list[int] | None) -> list[Change]:
        """`queued` -> `held`; None: every queued job. A job being submitted right now (leased
        by a dispatcher) is left unchanged, with the reason."""

    def release_held(self, job_ids: list[int]) -> list[Change]:
        """`held` -> `queued`."""

    def retry_jobs(self, job_ids: list[int]) -> list[Change]:
        """`failed` / `expired` -> `queued`, due now: attempts reset, validity renewed, the old
        parts (and their message ids) forgotten."""

    def delete_jobs(self, job_ids: list[int]) -> list[Change]:
        """Remove jobs that are not `submitted` (nor being submitted now), with their parts and
        owed notifications."""

    def purge(self, before: float, states: tuple[str, ...] = FINAL_STATES, limit: int = 5000,
              ) -> list[tuple[int, str]]:
        """Retention: remove up to `limit` final jobs finished before `before` (epoch seconds),
        with their parts and owed notifications, in one transaction; (id, state) of each.
        Never a job in a state that is not final, whatever `states` says."""

    def stats(self, day_start: float, month_start: float) -> SpoolStats: ...


ORPHAN_MAX_AGE = 3 * 86400.0  # an unmatched receipt older than this matched nothing: pruned


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
