"""What the administrator's queue tools (`sms-milter queue show/hold/...`, `stats`) get back
from a spool: values only (the `QueueAdmin` interface is in `base`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Job

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
    channels: dict[str, dict[str, int]] = field(default_factory=dict)  # channel -> state -> jobs


FILE_GRACE = 3600.0  # seconds: an unreferenced stored file younger than this is left to a later sweep


@dataclass
class FilesRemoved:
    """Stored voice/fax files removed because no job names them any more (`queue purge/delete`)."""

    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size
