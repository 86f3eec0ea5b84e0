"""The provider seam: what the dispatcher engine needs from an SMS provider.

Providers are built from the configuration by `providers.build_provider` (one entry per
kind); `router.Router` is a Provider over several of them (routes, failover). A provider
takes whole jobs, reports one `SubmitResult` per job (all of its parts accepted, or why
not) and hands in delivery receipts, which the engine acknowledges with `ack_receipts`
only after they are stored durably.

Callbacks come from the provider's own threads; they must be quick (the engine queues them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..spool.base import Job, OverduePart


@dataclass(frozen=True)
class SubmitResult:
    job_id: int
    refs: tuple[str, ...] = ()  # provider message ids, one per part, when accepted
    error: str = ""  # why not ("" = accepted)
    temporary: bool = False  # True: try again later (the job goes back to the queue)
    count_attempt: bool = True  # False: the failure was not the job's (connection lost, stop)
    # The provider may have (some of) the job: a part was accepted, or written and never
    # answered. A retry must go to the same provider (never two providers for one job).
    maybe_sent: bool = False
    provider: str = ""  # the name of the provider that answered ("" = the engine's provider's name)
    # Not handed to the provider at all: it is not bound/connected (metrics: result unavailable).
    unavailable: bool = False
    retry_in: float | None = None  # when temporary: seconds until the retry (None: the engine's backoff)

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class Receipt:
    ref: str  # the provider's message id of one part, as the provider wrote it
    state: str  # part state: delivered | buffered | failed | expired
    error: str  # provider's status text for logs and last_error ("" when delivered)
    token: Any = None  # what ack_receipts needs to acknowledge it (None: nothing to acknowledge)
    source: str = ""  # the receipt's source address: the handset number ("" if unknown)
    provider: str = ""  # the provider it came from ("" = the engine's provider's name)


@dataclass(frozen=True)
class QueryAnswer:
    """What the provider said when asked about a part whose receipt did not come (query_sm)."""

    job_id: int
    ref: str
    recipient: str
    state: str  # part state as a receipt gives it (delivered | buffered | failed | expired), "" = unknown
    detail: str  # for logs and last_error: the state word, or why the provider could not tell
    provider: str = ""  # the provider that answered ("" = the engine's provider's name)


ResultCallback = Callable[[SubmitResult], None]
ReceiptCallback = Callable[[Receipt], None]


class Provider(Protocol):
    """A channel to an SMS provider."""

    name: str

    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        """Start connecting in the background; `on_change` is called when readiness or capacity changes."""

    def ready(self) -> bool:
        """True when submits can go out now."""

    def capacity(self) -> int:
        """How many more jobs the provider wants handed to it right now."""

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs for sending (returns at once); each job later gets exactly one SubmitResult."""

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        """Ask about parts whose receipt did not come within receipt_timeout (SMPP query_sm); each
        part gets one QueryAnswer, state "" when the provider cannot tell (or cannot ask)."""

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        """Acknowledge receipts the engine has stored (or given up on)."""

    def drain(self, timeout: float) -> None:
        """Stop sending new jobs (those not yet on the wire are reported as temporary failures)
        and wait up to `timeout` for the answers to what is in flight."""

    def close(self, timeout: float) -> None:
        """Stop sending, wait up to `timeout` for answers to what is in flight, report every job
        still open as a temporary failure (count_attempt=False), disconnect cleanly."""
