"""The send window of one SMPP bind: which parts go out next, what is in flight, what the
answers mean. No sockets, no threads: the bind calls it under its own lock.

A job is held as a `JobState` (its parts encoded once); its parts are queued in order and
numbered only when they are written (`take`). A throttled part (ESME_RTHROTTLED,
ESME_RMSGQFUL) waits in `retry` (in job/part order) and goes before new parts after a
pause; the bind's rate is cut (`ratelimit.Rate`). The window is adaptive (AIMD, as TCP's
congestion window): it starts at `window`, grows by `window` for every window's worth of
accepted submits up to `window_max`, and is halved (not below `window`) by ESME_RTHROTTLED /
ESME_RMSGQFUL.

Jobs to one number (a train from the claim, ADR 0003) go in order, with at most `depth` of
them on the wire at once: 1 at first and after every throttle or temporary error (then one
refusal cannot let a younger job of the number overtake it), growing by one per accepted
submit up to `pipeline_per_number` while the SMSC accepts, and only once it has refused
nothing for TRAIN_COOLDOWN seconds. A job that may not start yet
waits in `held` (per number, in order) and is moved to `freed` when its number has room.
Every job ends in exactly one
`SubmitResult`: all parts accepted, or the first reason it was not (temporary or not,
counting an attempt or not, and whether the SMSC may have it: `maybe_sent`).
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from dataclasses import dataclass, field

from ..model import SmppConfig
from ..spool.base import Job
from .pdus import (
    HEADER,
    SUBMIT_SM,
    TEMPORARY_STATUSES,
    THROTTLE_STATUSES,
    Part,
    job_parts,
    status_text,
    submit_sm_body,
)
from .provider import ResultCallback, SubmitResult
from .quietlog import QuietLog
from .ratelimit import Rate

log = logging.getLogger("sms_milter.dispatcher.smpp")

TIMEOUTS_BEFORE_RECONNECT = 3  # submit_sm in a row without an answer: the bind is dropped and made again
TRAIN_COOLDOWN = 10.0  # seconds after a refusal during which a bind keeps one job per number on the wire


@dataclass(eq=False)
class JobState:
    job: Job
    parts: list[Part]
    bodies: list[bytes]  # each part's submit_sm without the header
    refs: list[str | None]
    outstanding: int  # parts without a final answer (sent or not)
    error: str = ""
    temporary: bool = False
    count_attempt: bool = True
    maybe_sent: bool = False  # a part was accepted, or written and never answered
    started: bool = False  # a part was written: the job counts against its number's depth


@dataclass(order=True)
class _Retry:
    job_id: int
    index: int
    js: JobState = field(compare=False)


def encode_jobs(jobs: list[Job], on_result: ResultCallback) -> list[JobState]:
    """Each job's submit_sm bodies; a job that cannot be encoded fails at once."""
    ready: list[JobState] = []
    for job in jobs:
        try:
            parts = job_parts(job)
            bodies = [submit_sm_body(p) for p in parts]
        except Exception as e:  # noqa: BLE001 (a job we cannot encode must not stop the bind)
            on_result(SubmitResult(job.id, error=f"cannot encode the text: {e}"))
            continue
        if len(parts) != job.parts:
            log.warning("job %d: text encodes to %d part(s), spool says %d", job.id, len(parts), job.parts)
        ready.append(JobState(job, parts, bodies, [None] * len(parts), len(parts)))
    return ready


class Window:
    def __init__(self, cfg: SmppConfig, on_result: ResultCallback, quiet: QuietLog, label: str = ""):
        self.cfg = cfg
        self.size = cfg.window  # submits in flight at most now (AIMD between 1 and size_max)
        self.size_max = max(cfg.window, cfg.window_max)
        self.acked = 0  # submits accepted since the window last grew
        self.depth = 1  # jobs of one number on the wire at most now (1 .. depth_max)
        self.refused_at = float("-inf")  # when the SMSC last refused a submit (not a final error)
        self.depth_max = max(1, cfg.pipeline_per_number)
        self.running: dict[str, int] = {}  # number -> its started jobs not finished yet
        self.held: dict[str, deque[tuple[JobState, int]]] = {}  # parts waiting for their number's room
        self.freed: deque[tuple[JobState, int]] = deque()  # held parts whose number has room again
        self.on_result = on_result
        self.quiet = quiet
        self.label = label  # "" or " (provider x, bind 2 of 3)" for log lines
        self.where = f"SMSC {cfg.host}:{cfg.port}{label}"
        self.jobs: dict[int, JobState] = {}
        self.queue: deque[tuple[JobState, int]] = deque()
        self.retry: list[_Retry] = []
        self.inflight: dict[int, tuple[JobState, int]] = {}
        self.sent: deque[tuple[float, int]] = deque()  # (sent at, seq) of submits, oldest first
        self.seq = 0
        self.timeouts = 0  # submit_sm in a row that got no answer within submit_timeout
        self.pause_until = 0.0
        self.pause = 0.05
        self.rate = Rate(cfg.rate)
        self.stopping = False

    def next_seq(self) -> int:
        self.seq = self.seq % 0x7FFFFFFF + 1
        return self.seq

    @property
    def max_jobs(self) -> int:
        """Jobs held at most (in flight or queued): enough to keep the window full."""
        return max(2 * self.size, self.size + 64)

    def grow(self) -> None:
        """Additive increase: one accepted submit; a whole window accepted adds `window`."""
        self.acked += 1
        if self.acked >= self.size and self.size < self.size_max:
            self.acked = 0
            self.size = min(self.size_max, self.size + self.cfg.window)

    def shrink(self) -> None:
        """Multiplicative decrease on throttling: the window is halved, not below `window`
        (below that, the pause and the bind's rate cut slow it, as they did before)."""
        self.acked = 0
        self.size = max(min(self.cfg.window, self.size_max), self.size // 2)

    def capacity(self) -> int:
        limit = self.max_jobs
        if self.rate.cap is not None:
            limit = min(limit, max(self.size, int(self.rate.cap)))
        return max(0, limit - len(self.jobs))

    def add(self, js: JobState) -> None:
        self.jobs[js.job.id] = js
        self.queue.extend((js, i) for i in range(len(js.parts)))

    def waiting(self) -> bool:
        """Parts that could go as soon as the pause or the rate allows."""
        return bool(self.retry or self.freed or self.queue) and len(self.inflight) < self.size

    def _pop(self, src: int) -> None:
        if src == 0:
            heapq.heappop(self.retry)
        elif src == 1:
            self.freed.popleft()
        else:
            self.queue.popleft()

    def take(self, now: float) -> tuple[list[bytes], float]:
        """The submit_sm PDUs that may be written now (numbered, in order), and how long to
        wait when something is held back (a pause, the rate)."""
        out: list[bytes] = []
        wait = 1.0
        if now < self.pause_until:
            return out, self.pause_until - now
        while len(self.inflight) < self.size:
            if self.retry:
                src, js, idx = 0, self.retry[0].js, self.retry[0].index
            elif self.freed:
                src, (js, idx) = 1, self.freed[0]
            elif self.queue:
                src, (js, idx) = 2, self.queue[0]
            else:
                break
            if js.error:  # the job failed meanwhile: do not send its other parts
                self._pop(src)
                self._part_done(js)
                continue
            if not js.started:
                rc = js.job.recipient
                if rc in self.held or self.running.get(rc, 0) >= self.depth:
                    self._pop(src)  # behind its number's jobs on the wire (or held before it)
                    self.held.setdefault(rc, deque()).append((js, idx))
                    continue
            w = self.rate.wait_time(now)
            if w > 0:
                wait = w
                break
            self._pop(src)
            if not js.started:
                js.started = True
                rc = js.job.recipient
                self.running[rc] = self.running.get(rc, 0) + 1
            seq = self.next_seq()
            self.inflight[seq] = (js, idx)
            self.sent.append((now, seq))
            body = js.bodies[idx]
            out.append(HEADER.pack(16 + len(body), SUBMIT_SM, 0, seq) + body)
        return out, wait

    def expire(self, now: float) -> tuple[bool, float]:
        """Give up on submits unanswered for submit_timeout: their jobs go back to the queue
        with last_error saying so. Returns (drop the bind: TIMEOUTS_BEFORE_RECONNECT in a row,
        seconds until the oldest open submit times out)."""
        limit = self.cfg.submit_timeout
        sent = self.sent
        while sent and sent[0][1] not in self.inflight:
            sent.popleft()
        expired: list[int] = []
        while sent and now - sent[0][0] >= limit:
            seq = sent.popleft()[1]
            if seq in self.inflight:
                expired.append(seq)
            while sent and sent[0][1] not in self.inflight:
                sent.popleft()
        if expired:
            self.timeouts += len(expired)
            self.quiet.log(logging.WARNING, "submit-timeout",
                           "%s did not answer %d submit_sm within %.1fs (%d in a row): their job(s) go back "
                           "to the queue", self.where, len(expired), limit, self.timeouts)
            for seq in expired:
                js, _ = self.inflight.pop(seq)
                js.maybe_sent = True
                self.abort(js, f"no answer from the SMSC to submit_sm within {limit:g}s", temporary=True,
                           count_attempt=True)
                self.hold_train(js)
                self._part_done(js)
            self.drop_unsent()
            if self.timeouts >= TIMEOUTS_BEFORE_RECONNECT:
                return True, 0.0
        return False, (limit - (now - sent[0][0]) if sent else limit)

    def answer(self, seq: int, status: int, message_id: str, now: float) -> None:
        """One submit_sm_resp (or generic_nack to a submit)."""
        entry = self.inflight.pop(seq, None)
        if entry is None:
            log.warning("submit_sm_resp for unknown sequence %d (status 0x%X)", seq, status)
            return
        js, idx = entry
        self.timeouts = 0  # the SMSC answers
        if status == 0 and message_id:
            js.refs[idx] = message_id
            js.maybe_sent = True
            self.pause = 0.05
            self.grow()
            if self.depth < self.depth_max and now - self.refused_at >= TRAIN_COOLDOWN:
                self.depth += 1
            self._part_done(js)
            return
        if status in THROTTLE_STATUSES or status in TEMPORARY_STATUSES:
            # An SMSC that refuses: one job per number on the wire, until it has accepted
            # everything for TRAIN_COOLDOWN (a refusal mid-train could let younger jobs overtake).
            self.depth, self.refused_at = 1, now
        if status in THROTTLE_STATUSES and not js.error and not self.stopping:
            if self.rate.throttled(now):
                self.shrink()
                self.pause = min(self.pause * 2, 2.0)
                log.warning("SMSC throttling (%s): pausing %.2fs, rate now %.0f/s, window %d%s",
                            status_text(status), self.pause, self.rate.cap or 0, self.size, self.label)
            self.pause_until = max(self.pause_until, now + self.pause)
            heapq.heappush(self.retry, _Retry(js.job.id, idx, js))
            return
        if status == 0:
            status = 0xFF  # ROK without a message id: cannot be tracked
        throttled = status in THROTTLE_STATUSES
        self.abort(js, status_text(status), temporary=status in TEMPORARY_STATUSES or throttled,
                   count_attempt=not throttled)
        self.hold_train(js)
        self._part_done(js)

    def hold_train(self, js: JobState) -> None:
        """A job that goes back to the queue keeps its place: the younger jobs of its number
        that are not on the wire (queued, or waiting after a throttle) go back too, unsent, and
        the claim hands them out again only behind it (ADR 0003, trains)."""
        if not js.temporary:
            return  # a final failure: the next jobs of the number may go
        rcpt, jid = js.job.recipient, js.job.id
        behind = [o for o, _ in (*self.queue, *self._held_parts())
                  if o.job.id > jid and not o.error and o.job.recipient == rcpt]
        behind += [r.js for r in self.retry
                   if r.job_id > jid and not r.js.error and r.js.job.recipient == rcpt]
        if not behind:
            return
        for o in behind:
            self.abort(o, f"job {jid} to this number goes back to the queue: this one waits behind it")
        self.drop_unsent()

    def stop(self, reason: str) -> None:
        """Send nothing more: parts not written yet are given up (temporary, no attempt)."""
        self.stopping = True
        for js, _ in self.queue:
            self.abort(js, reason)
        for r in self.retry:
            self.abort(r.js, reason)
        for js, _ in self._held_parts():
            self.abort(js, reason)
        self.drop_unsent()

    def _held_parts(self) -> list[tuple[JobState, int]]:
        return [*self.freed, *(e for q in self.held.values() for e in q)]

    def lose(self, reason: str) -> int:
        """The connection is gone: every open job goes back (temporary, no attempt counted:
        the provider's failure, not the job's). A job with a part on the wire and no answer may
        have reached the SMSC (maybe_sent, and its error says so: the engine counts that an
        attempt). Returns how many jobs."""
        open_jobs = len(self.jobs)
        for js, _ in self.inflight.values():
            js.maybe_sent = True
            self.abort(js, f"connection lost before the SMSC answered, may have been sent: {reason}")
        for js in list(self.jobs.values()):
            self.abort(js, f"connection lost: {reason}")
        for js, _ in list(self.inflight.values()):
            self._part_done(js)
        self.inflight.clear()
        self.sent.clear()
        self.drop_unsent()
        return open_jobs

    def abort(self, js: JobState, error: str, temporary: bool = True, count_attempt: bool = False) -> None:
        if not js.error:
            js.error, js.temporary, js.count_attempt = error, temporary, count_attempt

    def drop_unsent(self) -> None:
        """Forget queued/retry parts of aborted jobs."""
        keep: deque[tuple[JobState, int]] = deque()
        for js, i in self.queue:
            if js.error:
                self._part_done(js)
            else:
                keep.append((js, i))
        self.queue = keep
        retry = []
        for r in self.retry:
            if r.js.error:
                self._part_done(r.js)
            else:
                retry.append(r)
        heapq.heapify(retry)
        self.retry = retry
        if self.held or self.freed:
            parts = self._held_parts()
            self.held, self.freed = {}, deque()
            for js, i in parts:  # in order: freed first, then each number's held parts
                if js.error:
                    self._part_done(js)
                else:
                    self.freed.append((js, i))  # take() holds again what may not go yet

    def _part_done(self, js: JobState) -> None:
        js.outstanding -= 1
        if js.outstanding > 0:
            return
        self.jobs.pop(js.job.id, None)
        if js.started:
            rc = js.job.recipient
            left = self.running.get(rc, 1) - 1
            if left > 0:
                self.running[rc] = left
            else:
                self.running.pop(rc, None)
            held = self.held.pop(rc, None)
            if held:
                self.freed.extend(held)
        if js.error:
            self.on_result(SubmitResult(js.job.id, error=js.error, temporary=js.temporary,
                                        count_attempt=js.count_attempt, maybe_sent=js.maybe_sent))
        else:
            self.on_result(SubmitResult(js.job.id, refs=tuple(r or "" for r in js.refs)))

