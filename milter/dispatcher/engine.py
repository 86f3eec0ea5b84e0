"""The dispatcher engine: spool <-> provider.

One thread owns every spool write of the dispatch path and batches them: claim (with a
lease) as many due jobs as the provider wants, hand them over, then per round one
transaction (`store_round`) that marks submitted every job whose parts were all accepted
and records the receipts that came in, then releases/failures. A receipt is acknowledged
to the SMSC only after it is stored. One whose message id is not (yet) in the spool (it
came before its submit response was stored, however late that is) is stored too, as an
orphan, in the same transaction; storing the part with that id applies it, in that
transaction.
Orphans that matched nothing for ORPHAN_MAX_AGE are pruned and logged once. Leases of jobs
in flight are renewed; a killed dispatcher's jobs come back when its leases run out and are
sent again (at-least-once). Jobs whose receipt never comes expire at their validity end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from ..model import Config
from ..spool.base import (
    ORPHAN_MAX_AGE,
    AppliedOrphan,
    DispatchSpool,
    Job,
    ReceiptOutcome,
    SpoolError,
    SubmittedItem,
)
from .provider import Provider, QueryAnswer, Receipt, SubmitResult
from .quietlog import QuietLog

log = logging.getLogger("sms_milter.dispatcher")

CLAIM_MAX = 500  # jobs per claim transaction
KEYS_PRUNED_AT_ONCE = 5000  # expired idempotency keys deleted in one transaction
PRUNE_EVERY = 300.0  # seconds between looks for old orphan receipts and expired idempotency keys


class Engine:
    def __init__(self, spool: DispatchSpool, provider: Provider, cfg: Config, owner: str,
                 on_events: Callable[[], None] = lambda: None, lease_seconds: float = 45.0,
                 orphan_max_age: float = ORPHAN_MAX_AGE):
        self.spool = spool
        self.provider = provider
        self.cfg = cfg
        self.owner = owner
        self.on_events = on_events
        # Called from the loop at least once a second (systemd watchdog, SIGHUP reload).
        self.tick: Callable[[], None] = lambda: None
        self.lease_seconds = lease_seconds
        self.orphan_max_age = orphan_max_age
        self._kick = threading.Event()
        self._results: deque[SubmitResult] = deque()
        self._receipts: deque[Receipt] = deque()
        self._answers: deque[QueryAnswer] = deque()  # query_sm answers for receipts that did not come
        self._jobs: dict[int, Job] = {}  # leased and handed to the provider
        self.stats = {"submitted": 0, "receipts": 0, "failed": 0, "released": 0, "orphans": 0}
        self.quiet = QuietLog()

    # -- callbacks from the provider's threads (must be quick) ----------------------------
    # Append first, then wake the loop unless it is awake already: the loop clears the flag
    # before it empties the queues, so nothing appended before the check is left behind.
    def _on_result(self, r: SubmitResult) -> None:
        self._results.append(r)
        if not self._kick.is_set():
            self._kick.set()

    def _on_receipt(self, r: Receipt) -> None:
        self._receipts.append(r)
        if not self._kick.is_set():
            self._kick.set()

    def _on_answer(self, a: QueryAnswer) -> None:
        self._answers.append(a)
        if not self._kick.is_set():
            self._kick.set()

    def _wake(self) -> None:
        if not self._kick.is_set():
            self._kick.set()

    def kick(self) -> None:
        self._kick.set()

    # -- main loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.provider.start(self._on_result, self._on_receipt, self._wake)
        waker = threading.Thread(target=self._wake_loop, args=(stop,), name="spool-wake", daemon=True)
        waker.start()
        def watch_stop() -> None:
            stop.wait()
            self._kick.set()

        watch = threading.Thread(target=watch_stop, name="stop-watch", daemon=True)
        watch.start()
        next_expire = 0.0
        next_prune = 0.0
        next_renew = time.monotonic() + self.lease_seconds / 3
        receipt_timeout = self.cfg.smpp.receipt_timeout
        next_query = time.monotonic() + min(receipt_timeout, 60.0)
        while not stop.is_set():
            self._kick.wait(1.0)
            self._kick.clear()
            self.tick()
            try:
                self._process()
                now = time.monotonic()
                if now >= next_expire:
                    self._expire()
                    next_expire = now + 2.0
                if now >= next_renew:
                    self._renew()
                    next_renew = now + self.lease_seconds / 3
                if now >= next_prune:
                    next_prune = now + (1.0 if self._prune() else PRUNE_EVERY)
                if now >= next_query:
                    more = self._query_overdue()
                    next_query = now + (0.5 if more else max(0.5, min(60.0, receipt_timeout / 4)))
                self._claim()
            except SpoolError as e:
                log.error("spool: %s; retrying", e)
                stop.wait(0.5)
        self._shutdown()

    def _query_overdue(self) -> bool:
        """Ask the provider about parts whose receipt has not come within receipt_timeout
        (SMPP query_sm); True if there may be more due now."""
        if not self.provider.ready():
            return False
        timeout = self.cfg.smpp.receipt_timeout
        now = time.time()
        parts = self.spool.receipts_overdue(now - timeout, 100, now + timeout)
        if parts:
            log.info("%d part(s) of %d job(s) without a receipt after %gs: asking the SMSC (query_sm)",
                     len(parts), len({p.job_id for p in parts}), timeout)
            self.provider.query(parts, self._on_answer)
        return len(parts) >= 100

    def _answers_in(self) -> None:
        """query_sm answers: a final state is applied like a receipt (same matching, same
        notifications); anything else is left as it is and shown as the job's last_error."""
        notes: list[tuple[int, str]] = []
        timeout = self.cfg.smpp.receipt_timeout
        while self._answers:
            a = self._answers.popleft()
            if a.state in ("delivered", "failed", "expired"):
                log.info("job %d: no receipt for %s after %gs; the SMSC says %s", a.job_id, a.ref, timeout,
                         a.detail)
                self._receipts.append(Receipt(a.ref, a.state, a.detail, None, a.recipient, a.provider))
            else:
                why = f"no delivery receipt after {timeout:g}s; asked the SMSC: {a.detail}"
                log.warning("job %d: %s (left as it is)", a.job_id, why)
                notes.append((a.job_id, why))
        if notes:
            self.spool.note_receipt_query(notes)

    def _wake_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.spool.wait_for_work(1.0)
            except OSError:
                stop.wait(1.0)
            self._kick.set()
        self._kick.set()

    def _shutdown(self) -> None:
        log.info("stopping: waiting for the SMSC's answers to %d job(s) in flight", len(self._jobs))
        self.provider.drain(5.0)
        self._safe_process()
        self.provider.close(1.0)
        self._safe_process()
        if self._jobs:  # should not happen: the provider reports every job it was given
            self._release(list(self._jobs), 0.0, "dispatcher stopped", False)

    def _safe_process(self) -> None:
        for _ in range(20):
            try:
                self._process(final=True)
                return
            except SpoolError as e:
                log.error("spool: %s; retrying", e)
                time.sleep(0.25)

    # -- steps -------------------------------------------------------------------------------
    def _claim(self) -> None:
        room = self.provider.capacity() if self.provider.ready() else 0
        if room <= 0:
            return
        # A provider that sends one number's jobs in order on one connection (SMPP) takes
        # trains of them (ADR 0003); any other gets one job per number at a time.
        per_number = getattr(self.provider, "pipeline_per_number", 1)
        # Several channels (channels.router): each claims its own jobs as it has room, so a
        # voice/fax backlog never holds up SMS (and the reverse); trains are SMS only.
        by_channel = getattr(self.provider, "capacity_by_channel", None)
        if by_channel is not None:
            asks = {ch: min(n, CLAIM_MAX) for ch, n in by_channel().items() if n > 0}
            limit = sum(asks.values())
            jobs = [j for ch, n in asks.items() for j in self.spool.claim(
                self.owner, n, self.lease_seconds, per_number=per_number if ch == "sms" else 1, channel=ch)]
        else:
            limit = min(room, CLAIM_MAX)
            jobs = self.spool.claim(self.owner, limit, self.lease_seconds, per_number=per_number)
        if not jobs:
            return
        now = time.time()
        live = []
        # A provider that serves other devices than SMS (channels.router) says which.
        accepts = getattr(self.provider, "accepts", None)
        for job in jobs:
            if not (accepts(job.device) if accepts is not None else job.device == "sms"):
                self.spool.fail(job.id, f"no delivery channel for device {job.device!r}")
                log.warning("job %d to %s failed: no delivery channel for device %r", job.id, job.recipient,
                            job.device)
                self.on_events()
            elif job.expires_at is not None and job.expires_at < now:
                self.spool.fail(job.id, "validity period ended", state="expired")
                log.info("job %d to %s expired before it could be sent", job.id, job.recipient)
                self.on_events()
            else:
                live.append(job)
                self._jobs[job.id] = job
        if live:
            self.provider.submit(live)
        if len(jobs) == limit:
            self._kick.set()  # there may be more

    def _process(self, final: bool = False) -> None:
        # Receipts counted before the results are taken: their submit responses (if they came
        # first, as they should) are among those results and are stored first, so the receipts
        # find their parts. One that does not (it came before its submit response) is kept in
        # the spool as an orphan and applied when its part is stored: nothing is lost either way.
        if self._answers:
            self._answers_in()
        n_receipts = len(self._receipts)
        results = []
        while self._results:
            results.append(self._results.popleft())
        if final:
            n_receipts = len(self._receipts)
        receipts = [self._receipts.popleft() for _ in range(n_receipts)]
        ok = [r for r in results if r.ok]
        # One transaction for the round: jobs submitted, then receipts (one commit, one fsync).
        try:
            name = self.provider.name
            applied, outcomes = self.spool.store_round(
                [SubmittedItem(r.job_id, list(r.refs), r.provider or name) for r in ok],
                [(r.ref, r.state, "" if r.state == "delivered" else r.error, r.source, r.provider or name)
                 for r in receipts])
        except SpoolError:
            self._results.extendleft(reversed(results))
            self._receipts.extendleft(reversed(receipts))
            raise
        # Committed: now log, and acknowledge the receipts.
        if ok:
            self._submitted(ok, applied)
        if receipts:
            self._receipts_stored(receipts, outcomes)
        bad = [r for r in results if not r.ok]
        if bad:
            try:
                self._apply_failures(bad)
            except SpoolError:
                self._results.extendleft(reversed(bad))
                raise
        if self._receipts or self._results:
            self._kick.set()

    def _submitted(self, ok: list[SubmitResult], applied: list[AppliedOrphan]) -> None:
        jobs = self._jobs
        for r in ok:
            job = jobs.pop(r.job_id, None)
            log.info("job %d submitted to %s: %d part(s), message id(s) %s", r.job_id,
                     job.recipient if job else "?", len(r.refs), ",".join(r.refs))
        self.stats["submitted"] += len(ok)
        if applied:
            self._log_applied(applied)

    def _apply_failures(self, results: list[SubmitResult]) -> None:
        releases: dict[tuple[float, str, bool, str], list[int]] = {}
        for r in results:
            job = self._jobs.get(r.job_id)
            if r.temporary:
                attempts = job.attempts if job else 1
                # A job the provider may have (a submit never answered: a flapping SMSC) counts an
                # attempt, so its backoff grows, and is pinned to that provider in the spool (kept
                # across a restart: never sent by two providers).
                counted = r.count_attempt or r.maybe_sent
                delay = r.retry_in if r.retry_in is not None else \
                    self._backoff(attempts) if counted else 0.0
                pin = (r.provider or self.provider.name) if r.maybe_sent else ""
                releases.setdefault((delay, r.error, counted, pin), []).append(r.job_id)
            else:
                self.spool.fail(r.job_id, r.error)
                self._jobs.pop(r.job_id, None)
                self.stats["failed"] += 1
                log.warning("job %d to %s failed: %s", r.job_id, job.recipient if job else "?", r.error)
                self.on_events()
        for (delay, error, counted, pin), ids in releases.items():
            self._release(ids, delay, error, counted, pin)
            # One line per cause, not per job (a connection lost with a full window is one event).
            shown = ",".join(map(str, ids[:10])) + (f",... ({len(ids)} jobs)" if len(ids) > 10 else "")
            self.quiet.log(logging.INFO, f"not sent:{error}", "job %s not sent (%s): back to the queue%s",
                           shown, error, f", retry in {delay:.1f}s" if delay else "")

    def _log_applied(self, applied: list[AppliedOrphan]) -> None:
        notify = False
        for a in applied:
            o, rc = a.outcome, a.receipt
            self.stats["receipts"] += 1
            notify = notify or o.notify
            log.log(logging.INFO if o.changed else logging.DEBUG,
                    "job %d receipt for %s (came %.3fs before its message id was stored): %s (%s); "
                    "job %s %s", o.job_id, rc.ref, max(0.0, time.time() - rc.at), rc.part_state, rc.error,
                    "is now" if o.changed else "stays", o.state)
        if notify:
            self.on_events()

    def _release(self, ids: list[int], delay: float, error: str, counted: bool, pin: str = "") -> None:
        self.spool.release(ids, self.owner, delay, error, count_attempt=counted, pin=pin)
        for jid in ids:
            self._jobs.pop(jid, None)
        self.stats["released"] += len(ids)

    def _backoff(self, attempts: int) -> float:
        s = self.cfg.smpp
        return min(s.reconnect_min * 2 ** max(attempts - 1, 0), max(10 * s.reconnect_max, 60.0))

    def _receipts_stored(self, receipts: list[Receipt], outcomes: list[ReceiptOutcome | None]) -> None:
        """Receipts are stored (matched, or kept as orphans): log them, acknowledge them all."""
        notify = False
        orphans = 0
        for r, o in zip(receipts, outcomes, strict=True):
            if o is None:
                orphans += 1
                log.debug("receipt for %s (%s): no part has that message id yet; kept", r.ref, r.error)
            elif o.stale:
                log.info("receipt for %s from %s (%s) matches only a finished part (job %d, %s): logged, "
                         "not applied", r.ref, r.source or "?", r.error or r.state, o.job_id, o.state)
            elif o.changed:
                notify = notify or o.notify
                log.info("job %d receipt for %s: %s (%s); job is now %s", o.job_id, r.ref, r.state,
                         r.error, o.state)
            else:  # a part of a longer message, or an intermediate state: the job's line comes later
                log.debug("job %d receipt for %s: %s (%s); job stays %s", o.job_id, r.ref, r.state,
                          r.error, o.state)
        self.stats["receipts"] += len(receipts) - orphans
        if orphans:
            self.stats["orphans"] += orphans
            log.info("%d receipt(s) for message ids not stored yet: kept in the spool until their "
                     "submit is stored", orphans)
        self.provider.ack_receipts(receipts)
        if notify:  # a notification is owed: the notifier looks now rather than at its next poll
            self.on_events()

    def _prune(self) -> bool:
        """Drop orphan receipts too old to match anything (logging each once) and expired
        idempotency keys; True if more may remain."""
        gone = self.spool.prune_orphans(self.orphan_max_age)
        now = time.time()
        for o in gone:
            log.warning("receipt for unknown message id %s (%s %s) matched no job in %.1f h: dropped",
                        o.ref, o.part_state, o.error, (now - o.at) / 3600)
        keys = self.spool.prune_message_keys(KEYS_PRUNED_AT_ONCE)
        return len(gone) >= 1000 or keys >= KEYS_PRUNED_AT_ONCE

    def _expire(self) -> None:
        ids = self.spool.expire_due()
        for jid in ids:
            log.info("job %d expired (validity period ended)", jid)
        if ids:
            self.on_events()

    def _renew(self) -> None:
        if not self._jobs:
            return
        ids = list(self._jobs)
        kept = set(self.spool.renew_leases(ids, self.owner, self.lease_seconds))
        for jid in ids:
            if jid not in kept and jid in self._jobs:
                log.warning("job %d: lease lost (taken over or finished elsewhere)", jid)
