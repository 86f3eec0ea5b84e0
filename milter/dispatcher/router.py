"""Routes and failover: a Provider over several providers.

A job goes to the first route that matches its recipient (E.164 prefix) and account; the
route's providers are tried in order, and the first one that is up takes it. A provider is
down while it is not bound/connected (`ready()` false) and, after `down_after` temporary
errors in a row (an error status or a submit left unanswered), for `cooldown` seconds;
after the cool-down it gets one job at a time until one is accepted (then all its traffic),
and one more temporary error sends it back to the cool-down (meanwhile the next provider
of the route takes the other jobs). When the first provider is up again, traffic returns
to it.

A job is never sent by two providers. A provider's temporary failure is handed to the
engine only when it is final for that provider (an error answer, or never written), and
the job is then routed again from the queue. A job that one provider may have (a part was
accepted, or written and never answered) is "sticky": it goes back to that provider only,
and waits while the provider is down. The trade: such a job is late rather than possibly
sent twice by two providers (at-least-once still holds with its own provider, ADR 0004).
The engine also keeps that provider in the job's spool row (its pin) when it gives the job
back, and a job claimed with a pin is sticky here too: the pin survives a restart.

Jobs the router cannot hand over at once (the chosen provider has no room) wait here; a
job waiting HOLD seconds for a provider that is down goes back to the queue with a
last_error that says which providers are down (retried RETRY seconds later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..model import ProviderSpec, Route
from ..spool.base import Job, OverduePart
from .provider import Provider, QueryAnswer, Receipt, ReceiptCallback, ResultCallback, SubmitResult

log = logging.getLogger("sms_milter.dispatcher.router")

HOLD = 5.0  # seconds a job waits here for a provider that is down before it goes back to the queue
RETRY = 5.0  # seconds until such a job is claimed again


def _named(on_answer: Callable[[QueryAnswer], None], name: str) -> Callable[[QueryAnswer], None]:
    return lambda a: on_answer(replace(a, provider=name))


@dataclass(eq=False)
class Member:
    name: str
    provider: Provider
    spec: ProviderSpec
    errors: int = 0  # temporary errors in a row
    down_until: float = 0.0  # skipped until then (monotonic) after down_after errors in a row
    probing: bool = False  # after a cool-down: one job at a time until one is accepted
    handed: set[int] = field(default_factory=set)  # job ids it has and has not answered yet

    def usable(self, now: float, up: bool) -> bool:
        """Routes may use it now (`up`: its provider is ready)."""
        if now < self.down_until:
            return False
        if self.errors >= self.spec.down_after:  # cool-down over: one job to try it (a probe)
            self.errors = self.spec.down_after - 1
            self.probing = True
        return up

    def room(self, room: int) -> int:
        """How many more jobs it may take: while probing, one at a time until one succeeds."""
        return min(room, 1 - len(self.handed)) if self.probing else room

    def state(self, now: float, up: bool) -> str:
        if now < self.down_until:
            return f"{self.name}: {self.spec.down_after} temporary errors in a row, skipped for " \
                   f"{self.down_until - now:.0f}s more"
        return f"{self.name}: {'up' if up else 'not connected'}"


class Router:
    def __init__(self, providers: dict[str, Provider], specs: dict[str, ProviderSpec],
                 routes: tuple[Route, ...]):
        self.name = "routes"
        self.members = {n: Member(n, p, specs[n]) for n, p in providers.items()}
        self.routes = routes
        self._lock = threading.RLock()
        self._waiting: dict[int, tuple[Job, float]] = {}  # job id -> (job, waiting since)
        self._sticky: dict[int, tuple[str, float]] = {}  # job id -> (the provider that may have it, since)
        # A sticky job not seen for this long has ended elsewhere (expired, deleted): forgotten.
        self.forget_after = 2.0 * max((sp.smpp.validity for sp in specs.values() if sp.smpp), default=172800)
        self._on_result: ResultCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._ticker: threading.Thread | None = None

    def providers(self) -> list[tuple[str, Provider]]:
        return [(n, m.provider) for n, m in self.members.items()]

    # -- Provider ------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_change = on_result, on_change
        for m in self.members.values():
            m.provider.start(self._result_of(m), self._receipt_of(m, on_receipt), self._changed)
        self._ticker = threading.Thread(target=self._tick, name="router", daemon=True)
        self._ticker.start()

    def ready(self) -> bool:
        return any(m.provider.ready() for m in self.members.values())

    def capacity(self) -> int:
        self._pump()
        now = time.monotonic()
        up, room = self._look()
        with self._lock:
            usable = sum(max(0, m.room(room[n])) for n, m in self.members.items() if m.usable(now, up[n]))
            return max(0, usable - len(self._waiting))

    def submit(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        with self._lock:
            for job in jobs:
                self._waiting[job.id] = (job, now)
                if job.provider in self.members and job.id not in self._sticky:
                    self._sticky[job.id] = (job.provider, now)  # pinned in the spool (a restart)
        self._pump()

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        by_member: dict[str, list[OverduePart]] = {}
        for p in parts:
            if p.provider in self.members:
                by_member.setdefault(p.provider, []).append(p)
            else:
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", f"no provider named {p.provider!r} "
                                      "is configured now", p.provider))
        for name, items in by_member.items():
            self.members[name].provider.query(items, _named(on_answer, name))

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        by_member: dict[str, list[Receipt]] = {}
        for r in receipts:
            if isinstance(r.token, tuple) and len(r.token) == 2 and r.token[0] in self.members:
                name, token = r.token
                by_member.setdefault(name, []).append(replace(r, token=token))
        for name, items in by_member.items():
            self.members[name].provider.ack_receipts(items)

    def drain(self, timeout: float) -> None:
        self._stop.set()
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for job, _ in waiting.values():
            self._on_result(SubmitResult(job.id, error="dispatcher stopping", temporary=True,
                                         count_attempt=False, provider=self._waited_for(job)))
        deadline = time.monotonic() + timeout
        for m in self.members.values():
            m.provider.drain(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float) -> None:
        self.drain(timeout)
        for m in self.members.values():
            m.provider.close(timeout)
        if self._ticker is not None:
            self._ticker.join(2.0)

    # -- routing ---------------------------------------------------------------------------
    def route_of(self, job: Job) -> Route | None:
        return next((r for r in self.routes if r.matches(job.recipient, job.account)), None)

    def _look(self) -> tuple[dict[str, bool], dict[str, int]]:
        """Each provider's readiness and room, asked without holding the router's lock (a
        provider calls back into the router holding its own)."""
        up = {n: m.provider.ready() for n, m in self.members.items()}
        room = {n: m.provider.capacity() if up[n] else 0 for n, m in self.members.items()}
        return up, room

    def _target(self, job: Job, now: float, up: dict[str, bool],
                room: dict[str, int]) -> tuple[Member | None, str]:
        """The provider to take the job now, or None and why not (caller holds the lock)."""
        sticky = self._sticky.get(job.id, ("", 0.0))[0] or None
        if sticky is not None and sticky in self.members:
            m = self.members[sticky]
            if up[sticky]:
                return m, ""
            return None, (f"waiting for provider {sticky}: a submit to it got no answer, so it is not sent "
                          f"by another provider ({m.state(now, False)})")
        route = self.route_of(job)
        if route is None:
            return None, "no route matches this destination"
        for name in route.providers:
            m = self.members[name]
            if m.usable(now, up[name]) and (not m.probing or m.room(room[name]) > 0):
                return m, ""
        return None, "no provider of its route is up (" + "; ".join(
            self.members[n].state(now, up[n]) for n in route.providers) + ")"

    def _waited_for(self, job: Job) -> str:
        """The provider a job that could not be handed over waited for (metrics' label): the
        one that may have it, else its route's first ("" when no route matches)."""
        sticky = self._sticky.get(job.id, ("", 0.0))[0]
        if sticky in self.members:
            return sticky
        route = self.route_of(job)
        return route.providers[0] if route is not None else ""

    def _pump(self) -> None:
        """Hand waiting jobs to their providers as far as each has room; jobs that waited HOLD
        seconds for a provider that is down go back to the queue. Only the engine's thread and
        the router's own call it, holding no provider's lock."""
        if not self._waiting:
            return
        up, room = self._look()
        batches: dict[str, list[Job]] = {}
        back: list[SubmitResult] = []
        now = time.monotonic()
        with self._lock:
            for jid, (job, since) in list(self._waiting.items()):
                m, why = self._target(job, now, up, room)
                if m is None:
                    if now - since >= HOLD or self._stop.is_set():
                        del self._waiting[jid]
                        back.append(SubmitResult(jid, error=why, temporary=True, count_attempt=False,
                                                 retry_in=RETRY, unavailable=True,
                                                 provider=self._waited_for(job)))
                    continue
                if m.room(room[m.name]) <= 0:
                    continue  # its provider is up but full: wait for room there (not overflow elsewhere)
                room[m.name] -= 1
                del self._waiting[jid]
                m.handed.add(jid)
                batches.setdefault(m.name, []).append(job)
        for r in back:
            self._on_result(r)
        for name, jobs in batches.items():
            self.members[name].provider.submit(jobs)

    def _result_of(self, m: Member) -> ResultCallback:
        def result(r: SubmitResult) -> None:
            with self._lock:
                m.handed.discard(r.job_id)
                if r.ok or not r.temporary:
                    m.errors = 0
                    m.probing = False
                    self._sticky.pop(r.job_id, None)
                else:
                    if r.maybe_sent:
                        if r.job_id not in self._sticky:
                            log.info("job %d may be at provider %s (%s): it is sent again through %s only",
                                     r.job_id, m.name, r.error, m.name)
                        self._sticky[r.job_id] = (m.name, time.monotonic())
                    if r.count_attempt:  # the provider's own temporary error (not: connection lost, stop)
                        m.errors += 1
                        if m.errors == m.spec.down_after:
                            m.down_until = time.monotonic() + m.spec.cooldown
                            log.warning("provider %s: %d temporary errors in a row (last: %s): skipped by "
                                        "the routes for %gs", m.name, m.errors, r.error, m.spec.cooldown)
            self._on_result(replace(r, provider=m.name))
        return result

    def _receipt_of(self, m: Member, on_receipt: ReceiptCallback) -> ReceiptCallback:
        def receipt(r: Receipt) -> None:
            on_receipt(replace(r, provider=m.name, token=(m.name, r.token) if r.token is not None else None))
        return receipt

    def adopt(self, old: Router) -> None:
        """After a reload: keep which jobs may be at which provider (for the providers kept)."""
        with old._lock:  # noqa: SLF001 (the same class)
            kept = {j: v for j, v in old._sticky.items() if v[0] in self.members}  # noqa: SLF001
        with self._lock:
            self._sticky.update(kept)

    def _forget_old(self, now: float) -> None:
        with self._lock:
            for jid in [j for j, (_, since) in self._sticky.items() if now - since > self.forget_after]:
                del self._sticky[jid]

    def _changed(self) -> None:
        """From a provider's thread (maybe holding its lock): the router's thread pumps."""
        self._kick.set()
        self._on_change()

    def _tick(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(0.5)
            self._kick.clear()
            try:
                self._pump()
                self._forget_old(time.monotonic())
            except Exception:  # noqa: BLE001 (a bug here must not stop routing)
                log.exception("router")
            self._on_change()
