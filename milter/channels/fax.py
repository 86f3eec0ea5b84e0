"""The fax channel as a dispatcher Provider: each job becomes one HylaFAX job.

`fax-send` thread: render the job (its text as the first page(s), then its documents) to one
G3 TIFF (`faxdoc.render`), submit it with `sendfax` and report the SubmitResult with the ref
`hylafax:<job id>`. HylaFAX then dials, retries and gives up by its own rules (`max_tries`,
`max_dials`, `kill_after`). `fax-poll` thread: every `poll` seconds `faxstat` lists the queues
and each followed job's state becomes a receipt: done -> `delivered`, failed/removed -> `failed`
(with HylaFAX's status text), a failed try that HylaFAX will retry -> `buffered` (once per try
or new status text).

Content that cannot be rendered fails the job with the reason; HylaFAX unreachable or a tool
missing is temporary. Jobs submitted before a restart are no longer followed by the poller: the
engine's overdue-receipt query (`query`) asks HylaFAX about them.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..dispatcher.provider import QueryAnswer, Receipt, ReceiptCallback, ResultCallback, SubmitResult
from ..model import FaxConfig
from ..spool.base import Job, OverduePart
from . import faxdoc
from .hylafax import FaxJob, HylaFaxClient
from .tools import Attachment, ChannelError

log = logging.getLogger("sms_milter.channels.fax")

AttachmentsFor = Callable[[Job], list[Attachment]]
REF_PREFIX = "hylafax:"


@dataclass
class _Followed:
    job_id: int
    recipient: str
    ref: str
    pages: int
    tries: int = 0
    status: str = ""  # HylaFAX's status text last reported as `buffered`


class FaxProvider:
    name = "fax"

    def __init__(self, cfg: FaxConfig, attachments: AttachmentsFor | None = None):
        self.cfg = cfg
        self.client = HylaFaxClient(cfg.server)
        self.attachments = attachments or (lambda job: [])
        self._on_result: ResultCallback = lambda r: None
        self._on_receipt: ReceiptCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Job] = deque()
        self._busy = 0  # jobs being rendered/submitted right now
        self._followed: dict[str, _Followed] = {}  # HylaFAX job id -> ours
        self._closing = False
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.submitted: dict[int, tuple[str, int]] = {}  # our job id -> (HylaFAX job id, pages)

    # -- Provider protocol -------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_receipt, self._on_change = on_result, on_receipt, on_change
        Path(self.cfg.work_dir).mkdir(parents=True, exist_ok=True)
        for name, fn in (("fax-send", self._send_loop), ("fax-poll", self._poll_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        on_change()

    def ready(self) -> bool:
        return not self._closing

    def capacity(self) -> int:
        if self._closing:
            return 0
        with self._lock:
            return max(0, self.cfg.jobs - len(self._queue) - self._busy - len(self._followed))

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            if not self._closing:
                self._queue.extend(jobs)
                self._wake.notify_all()
                return
        for job in jobs:
            self._on_result(SubmitResult(job.id, error="fax channel stopping", temporary=True,
                                         count_attempt=False))

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        """Nothing to acknowledge: HylaFAX keeps the job's state in its done queue."""

    def drain(self, timeout: float) -> None:
        self._stop_sending(timeout)

    def close(self, timeout: float) -> None:
        self._stop_sending(timeout)
        self._stopped.set()
        with self._lock:
            self._wake.notify_all()
        for t in self._threads:
            t.join(5.0)
        self.client.close()

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        """What HylaFAX says about faxes whose final state did not come (e.g. sent before a restart)."""
        try:
            jobs = self.client.jobs()
        except ChannelError as e:
            for p in parts:
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", f"HylaFAX not asked: {e}"))
            return
        for p in parts:
            j = jobs.get(p.ref.removeprefix(REF_PREFIX))
            if j is None:
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", "HylaFAX has no such job"))
            else:
                state = j.final or ("buffered" if j.tries else "")
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, state, j.status or _state_word(j)))

    # -- sending ----------------------------------------------------------------------------------
    def _stop_sending(self, timeout: float) -> None:
        with self._lock:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        for job in left:
            self._on_result(SubmitResult(job.id, error="fax channel stopping", temporary=True,
                                         count_attempt=False))
        with self._lock:
            self._wake.wait_for(lambda: self._busy == 0, timeout)

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: bool(self._queue) or self._closing)
                if self._closing:
                    return
                job = self._queue.popleft()
                self._busy += 1
            try:
                self._on_result(self._send(job))
            finally:
                with self._lock:
                    self._busy -= 1
                    self._wake.notify_all()
                self._on_change()

    def _send(self, job: Job) -> SubmitResult:
        work = Path(self.cfg.work_dir) / f"job{job.id}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            image = faxdoc.render(job.text, self.attachments(job), work / "fax.tif", self.cfg.max_pages,
                                  self.cfg.max_bytes)
            number = self.cfg.dial_prefix + job.recipient.lstrip("+")
            jobid = self.client.submit(image.path, number, f"sms-milter:{job.id}", self.cfg.max_tries,
                                       self.cfg.max_dials, self.cfg.kill_after)
        except ChannelError as e:
            log.warning("job %d: fax to %s not queued: %s", job.id, job.recipient, e)
            return SubmitResult(job.id, error=str(e), temporary=e.temporary)
        except Exception as e:  # never lose the job's one result
            log.exception("job %d: fax rendering failed unexpectedly", job.id)
            return SubmitResult(job.id, error=f"fax channel error: {type(e).__name__}", temporary=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # sendfax has copied the document to hfaxd
        ref = REF_PREFIX + jobid
        with self._lock:
            self._followed[jobid] = _Followed(job.id, job.recipient, ref, image.pages)
            self._wake.notify_all()
        self.submitted[job.id] = (jobid, image.pages)
        log.info("job %d: fax to %s queued as HylaFAX job %s, %d page(s)", job.id, job.recipient, jobid,
                 image.pages)
        return SubmitResult(job.id, refs=(ref,))

    # -- following ----------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                self._wake.wait_for(lambda: self._stopped.is_set(), self.cfg.poll)
                followed = dict(self._followed)
            if self._stopped.is_set():
                return
            if followed:
                try:
                    self.poll_once(followed)
                except ChannelError as e:
                    log.warning("fax: cannot follow %d job(s): %s", len(followed), e)

    def poll_once(self, followed: dict[str, _Followed] | None = None) -> None:
        if followed is None:
            with self._lock:
                followed = dict(self._followed)
        jobs = self.client.jobs()
        done = []
        for jobid, f in followed.items():
            j = jobs.get(jobid)
            if j is None:
                continue
            if j.final:
                self._on_receipt(Receipt(ref=f.ref, state=j.final, error=j.status if j.final != "delivered"
                                         else "", source=f.recipient))
                log.info("job %d: HylaFAX job %s %s (%d of %d page(s) sent)%s", f.job_id, jobid,
                         _state_word(j), j.pages_sent, j.pages, f": {j.status}" if j.status else "")
                done.append(jobid)
            elif j.status and (j.tries > f.tries or j.status != f.status):
                f.tries, f.status = j.tries, j.status
                self._on_receipt(Receipt(ref=f.ref, state="buffered", error=j.status, source=f.recipient))
        if done:
            with self._lock:
                for jobid in done:
                    self._followed.pop(jobid, None)
            self._on_change()


def _state_word(j: FaxJob) -> str:
    return {"P": "pending", "S": "sleeping", "B": "blocked", "W": "waiting", "R": "running",
            "T": "suspended", "D": "done", "F": "failed"}.get(j.state, "undefined")
