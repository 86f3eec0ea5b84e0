"""The spool's interface: what the milter, the dispatcher and the CLI may ask of a queue.

`sqlite.SqliteSpool` and `postgres.PostgresSpool` implement it; nothing outside `spool/` knows SQL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol

from .admin import FILE_GRACE as FILE_GRACE
from .admin import AccountStats as AccountStats
from .admin import Change as Change
from .admin import FilesRemoved as FilesRemoved
from .admin import JobDetail as JobDetail
from .admin import Notification as Notification
from .admin import Part as Part
from .admin import SpoolStats as SpoolStats
from .files import FileStore, JobFile
from .lifecycle import FINAL_STATES as FINAL_STATES  # the states are the lifecycle's
from .lifecycle import STATES as STATES
from .lifecycle import normalize_ref as normalize_ref
from .lifecycle import refs_for_lookup as refs_for_lookup
from .limitdata import SLOT_LONG as SLOT_LONG
from .limitdata import SLOT_RCPT as SLOT_RCPT
from .limitdata import SLOT_SHORT as SLOT_SHORT
from .limitdata import AccountUsage as AccountUsage
from .limitdata import LimitPlan as LimitPlan
from .limitdata import LimitUsage as LimitUsage


class SubmittedItem(NamedTuple):
    """A job whose parts a provider accepted: their message ids (one per part, in order) and
    the provider's name (recorded on the job and its parts; receipts match per provider)."""

    job_id: int
    refs: list[str]
    provider: str = ""


# What mark_submitted_many / store_round take: a SubmittedItem, or the plain tuple it is.
Submitted = SubmittedItem | tuple[int, list[str]] | tuple[int, list[str], str]
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
    channel: str = "sms"  # sms | voice | fax (policy/devices.py: the device's channel)
    language: str = ""  # voice: text-to-speech language ("" = the channel's default)
    files: tuple[JobFile, ...] = ()  # voice recording / fax documents (spool/files.py)


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
    provider: str = ""  # the provider that took it ('' until submitted, or unknown)

    def public(self) -> dict:
        """The fields `queue list --json` promises (and a few more)."""
        d = asdict(self)
        d["provider_refs"] = list(self.provider_refs)
        d["files"] = [{k: v for k, v in f.items() if k != "data"} for f in d["files"]]
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


ORPHAN_MAX_AGE = 3 * 86400.0  # an unmatched receipt older than this matched nothing: pruned


# -- the interface, split by who uses it ----------------------------------------------------
# A backend implements all of `Spool`; each caller types against the part it uses. The rules
# (which state a receipt leads to, which notifications are owed) are `lifecycle`'s: a
# backend asks it and stores the answer.


class ReadSpool(Protocol):
    """Readers: xml@ (credits, TransRefNumber lookups), the CLI, metrics."""

    def get(self, job_id: int) -> Job | None: ...

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]: ...

    def find_by_trans_ref(self, account: str, refs: list[str]) -> dict[str, list[Job]]: ...

    def parts_used(self, account: str) -> int:
        """SMS parts an account has spooled that did not fail (xml@ ShowCredits)."""

    def account_usage(self, now: float | None = None) -> list[AccountUsage]:
        """Per account: parts committed today and this calendar month (UTC), from the limit counters."""

    def counts_apart(self) -> dict[str, int]:
        """Jobs by state, read without ever taking (or waiting for) the lock the daemon's own
        spool work takes: for the metrics thread."""

    def channel_counts_apart(self) -> dict[str, dict[str, int]]:
        """Jobs by channel (sms, voice, fax) and state (channel -> state -> jobs, only what is
        there), read like `counts_apart`: for the metrics thread."""

    def close(self) -> None: ...


class CommitSpool(Protocol):
    """The milter (and xml@, the pipe transport): commit messages' jobs, read the breaker's input."""

    validity: float  # seconds a new or retried job stays valid (provider.smpp.validity; a reload sets it)

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

    def finished_by_prefix(self, since: float, digits: int) -> dict[str, tuple[int, int]]:
        """Jobs that reached a final state since `since`, by destination prefix ('+' and `digits`
        digits): prefix -> (finished, failed or expired). The circuit breaker's input."""

    def close(self) -> None: ...


class MilterSpool(CommitSpool, ReadSpool, Protocol):
    """The milter's gateway: it commits, and xml@ reads (credits, TransRefNumber lookups)."""


class DispatchSpool(FileStore, Protocol):
    """The dispatcher: claims, submits, receipts, leases, expiry, notifications, housekeeping."""

    validity: float

    def wait_for_work(self, timeout: float) -> None: ...

    def claim(self, owner: str, limit: int, lease_seconds: float, *, per_number: int = 1,
              channel: str | None = None) -> list[Job]:
        """Lease due jobs in order per recipient: one per number, or trains of up to per_number
        (a head and the jobs behind it); with `channel`, that channel's jobs only."""

    def mark_submitted_many(self, items: list[Submitted]) -> list[AppliedOrphan]:
        """Record jobs' parts as submitted with their message ids (and the provider that took
        them) and, in the same transaction, apply every stored orphan receipt for one of those ids."""

    def release(self, job_ids: list[int], owner: str, delay: float, error: str = "",
                count_attempt: bool = False, pin: str = "") -> None:
        """Give leased jobs back to the queue, due after `delay`; `pin`: the provider that may
        have them (a submit never answered), kept in the job's provider field so that a
        restarted dispatcher sends them through that provider only."""

    def fail(self, job_id: int, error: str, state: str = "failed") -> None: ...

    def store_round(self, submitted: list[Submitted], receipts: list[tuple[str, ...]],
                    ) -> tuple[list[AppliedOrphan], list[ReceiptOutcome | None]]:
        """mark_submitted_many(submitted) then record_receipts(receipts) in one transaction."""

    def record_receipts(self, items: list[tuple[str, ...]]) -> list[ReceiptOutcome | None]:
        """Apply receipts (ref, part_state, error[, source[, provider]]), in order, in one
        transaction. A receipt matches a part by message id and, if it names one, the handset
        number (source_addr); one matching only final parts is `stale` and not applied; one
        matching no part (yet) is stored as an orphan, durably too, and applied when
        mark_submitted_many stores that id (None in the answer)."""

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

    def get(self, job_id: int) -> Job | None:
        """The job a notification is about."""

    def close(self) -> None: ...


class QueueAdmin(ReadSpool, Protocol):
    """The administrator's queue tools (`sms-milter queue ...`, `stats`): reads, and changes by hand."""

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

    def sweep_files(self, grace: float = FILE_GRACE) -> FilesRemoved:
        """Remove stored files no job names that are older than `grace` seconds (left by a crash,
        or by a milter commit rolled back after its files were written); what it removed."""

    # Stored files removed by this spool object so far: by delete_jobs and purge (the files of
    # the jobs they removed that no other job names) and by sweep_files.
    @property
    def files_removed(self) -> FilesRemoved: ...

    def stats(self, day_start: float, month_start: float) -> SpoolStats: ...


class Spool(CommitSpool, DispatchSpool, QueueAdmin, Protocol):
    """Everything a backend implements (what `open_spool` returns)."""

    path: str  # where the spool is, for logs (a file; a URL never with its password)
