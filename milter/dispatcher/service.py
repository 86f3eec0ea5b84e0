"""`sms-milter dispatcher`: the engine, the SMPP provider and the notifier in one process.

`run(cfg, stop)` runs until `stop` is set (the CLI maps SIGTERM/SIGINT to it) and returns
an exit code. Stopping finishes what is in flight (or leaves it to be retried), acknowledges
stored receipts, unbinds, and hands back every lease.

Leases last 45 s (renewed every 15 s while a job is in flight); the environment variable
SMS_MILTER_LEASE_SECONDS overrides that (the crash tests use a short lease).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from .. import metrics, sdnotify
from ..channels.router import ChannelRouter
from ..model import Config
from ..runtime import JOB_QUEUE_IDS, DaemonRuntime
from ..spool import open_spool
from ..spool.base import STATES, Job, OverduePart, Spool, SpoolError
from .engine import Engine
from .notify import Notifier
from .provider import Provider, QueryAnswer, Receipt, ReceiptCallback, ResultCallback, SubmitResult
from .providers import build_dispatch
from .router import Router

log = logging.getLogger("sms_milter.dispatcher")


@dataclass(frozen=True)
class _Token:
    """A receipt's token as the engine sees it: which provider must acknowledge it, and how."""

    provider: Provider
    token: object


def members(p: Provider) -> dict[str, Provider]:
    """The named providers behind `p`: a router's members (each channel's), or `p` itself."""
    if isinstance(p, ChannelRouter):
        return {n: m for sub in p.providers.values() for n, m in members(sub).items()}
    return dict(p.providers()) if isinstance(p, Router) else {p.name: p}


class MeteredProvider:
    """The provider as the engine sees it: counts submits, receipts and binds for /metrics,
    and lets a reload swap the provider underneath (the engine keeps this object)."""

    def __init__(self, inner: Provider):
        self.inner = inner
        self.name = inner.name
        self.clock = metrics.SubmitClock()
        self._created: dict[int, float] = {}  # job id -> committed at, while handed over
        self._lock = threading.Lock()
        self._bound: dict[str, bool] = {}  # provider name -> bound (the gauge's value)
        self._on_result: ResultCallback = lambda r: None
        self._on_receipt: ReceiptCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None

    # -- Provider ------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_receipt, self._on_change = on_result, on_receipt, on_change
        self._start(self.inner)

    def _start(self, inner: Provider) -> None:
        def result(r: SubmitResult) -> None:
            outcome = ("ok" if r.ok else "unavailable" if r.unavailable else "temporary" if r.temporary
                       else "failed")
            metrics.SUBMITS.labels(r.provider or inner.name, outcome).inc()
            with self._lock:
                created = self._created.pop(r.job_id, None)
            if r.ok:
                now = time.time()
                self.clock.sent(r.refs, now)
                if created is not None:
                    metrics.COMMIT_TO_SUBMIT.observe(max(0.0, now - created))
            self._on_result(r)

        def receipt(r: Receipt) -> None:
            metrics.RECEIPTS.labels(r.provider or inner.name, r.state).inc()
            took = self.clock.receipt(r.ref, time.time())
            if took is not None:
                metrics.SUBMIT_TO_RECEIPT.observe(took)
            # The token names the provider that must acknowledge it (a reload may swap it).
            self._on_receipt(replace(r, token=_Token(inner, r.token)))

        def change() -> None:
            current = inner is self.inner
            for name, p in members(inner).items():
                bound = current and p.ready()
                if bound != self._bound.get(name, False):
                    self._bound[name] = bound
                    metrics.BOUND.labels(name).set(1 if bound else 0)
            self._on_change()

        inner.start(result, receipt, change)

    def ready(self) -> bool:
        return self.inner.ready()

    def capacity(self) -> int:
        return self.inner.capacity()

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            for j in jobs:
                self._created[j.id] = j.created_at
                JOB_QUEUE_IDS.note(j.id, j.queue_id)
        self.inner.submit(jobs)

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        self.inner.query(parts, on_answer)

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        by_inner: dict[int, tuple[Provider, list[Receipt]]] = {}
        for r in receipts:
            if isinstance(r.token, _Token):
                inner, r = r.token.provider, replace(r, token=r.token.token)
            else:  # made by the engine itself (a query_sm answer): nothing of ours to unwrap
                inner = self.inner
            by_inner.setdefault(id(inner), (inner, []))[1].append(r)
        for inner, items in by_inner.values():
            inner.ack_receipts(items)

    def drain(self, timeout: float) -> None:
        self.inner.drain(timeout)

    def close(self, timeout: float) -> None:
        self.inner.close(timeout)

    def __getattr__(self, name: str) -> object:
        # Anything else a provider offers (added later) is the current provider's.
        return getattr(self.inner, name)

    def swap(self, inner: Provider) -> None:
        """Close the current provider (its open jobs come back to the engine as temporary
        failures that count no attempt) and start `inner` in its place."""
        old = self.inner
        old.drain(5.0)
        old.close(1.0)
        for name in members(old):
            metrics.BOUND.labels(name).set(0)
        self._bound = {}
        if isinstance(old, Router) and isinstance(inner, Router):
            inner.adopt(old)
        self.inner = inner
        self.name = inner.name
        self._start(inner)


def link_status(cfg: Config, inner: Provider) -> str:
    """`bound to SMSC host:port` (one SMPP provider) or each provider's name and state."""
    if isinstance(inner, ChannelRouter):
        return "; ".join(link_status(cfg, p) if c == "sms" else f"{c} {'up' if p.ready() else 'down'}"
                         for c, p in inner.providers.items())
    if not isinstance(inner, Router):
        s = cfg.smpp
        return f"{'bound to' if inner.ready() else 'connecting to'} SMSC {s.host}:{s.port}"
    return "providers: " + ", ".join(f"{n} {'up' if p.ready() else 'down'}" for n, p in inner.providers())


class Runtime(DaemonRuntime):
    """What the engine loop does besides dispatching: systemd notifications, SIGHUP reloads."""

    name = "dispatcher"

    def __init__(self, cfg: Config, config_path: str | None, engine: Engine, provider: MeteredProvider,
                 notifier: Notifier, spool: Spool, reload: threading.Event,
                 sd: sdnotify.Notifier):
        super().__init__(config_path, reload, sd, log)
        self._cfg = cfg
        self.engine = engine
        self.provider = provider
        self.notifier = notifier
        self.spool = spool
        self.ready_sent = False

    @property
    def cfg(self) -> Config:
        return self._cfg

    def status(self) -> str:
        st = self.engine.stats
        return (f"{link_status(self.cfg, self.provider.inner)}; {st['submitted']} submitted, "
                f"{st['receipts']} receipt(s), {st['failed']} failed, "
                f"{len(self.engine._jobs)} in flight")  # noqa: SLF001

    def on_turn(self) -> None:
        if not self.ready_sent:  # the first turn of the loop: spool open, provider started
            self.ready_sent = True
            self.sd.ready(self.status())

    def restart_only(self, old: Config, new: Config) -> list[tuple[str, object, object]]:
        return [("spool", old.spool, new.spool),
                ("metrics.dispatcher", old.metrics.dispatcher, new.metrics.dispatcher)]

    def apply(self, old: Config, new: Config) -> str:
        self._cfg = new
        self.engine.cfg = new
        self.notifier.cfg = new
        self.spool.validity = new.smpp.validity
        rebind = ((new.providers, new.routes, new.voice, new.fax)
                  != (old.providers, old.routes, old.voice, old.fax))
        if rebind:
            self.provider.swap(build_dispatch(new, self.spool))
        return (f"{len(new.accounts)} account(s); provider "
                + ("settings changed: re-binding" if rebind else "unchanged: binding kept"))


def describe(cfg: Config) -> str:
    parts = []
    for spec in cfg.providers.values():
        s = spec.smpp
        what = f"SMSC {s.host}:{s.port}, window {s.window}, rate {s.rate or 'unlimited'}" + (
            f", {s.binds} binds" if s.binds > 1 else "") if s else spec.kind
        parts.append(what if len(cfg.providers) == 1 else f"provider {spec.name} ({what})")
    if cfg.voice is not None:
        parts.append(f"voice calls through SIP trunk {cfg.voice.trunk}")
    if cfg.fax is not None:
        parts.append(f"faxes through HylaFAX {cfg.fax.server}")
    return "; ".join(parts)


def run(cfg: Config, stop: threading.Event | None = None, reload: threading.Event | None = None,
        config_path: str | None = None) -> int:
    """Dispatch until `stop`; `reload` set (SIGHUP) re-reads `config_path`."""
    if stop is None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
    reload = reload or threading.Event()
    sd = sdnotify.Notifier.from_environment()
    try:
        spool = open_spool(cfg, busy_timeout=10.0)
    except SpoolError as e:
        log.error("%s", e)
        return 1
    metrics.watch_spool(spool.counts_apart, STATES, spool.channel_counts_apart)
    if cfg.metrics.dispatcher:
        try:
            metrics.serve(cfg.metrics.dispatcher)
        except OSError as e:
            log.error("cannot serve metrics on %s: %s", cfg.metrics.dispatcher, e.strerror or e)
            spool.close()
            return 1
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    provider = MeteredProvider(build_dispatch(cfg, spool))
    notifier = Notifier(spool, cfg)
    try:
        lease = float(os.environ.get("SMS_MILTER_LEASE_SECONDS", "") or 45.0)
    except ValueError:
        lease = 45.0
    engine = Engine(spool, provider, cfg, owner, on_events=notifier.kick, lease_seconds=max(lease, 1.0))
    runtime = Runtime(cfg, config_path, engine, provider, notifier, spool, reload, sd)
    engine.tick = runtime.tick
    log.info("dispatcher %s started: spool %s, %s", owner, spool.path, describe(cfg))
    notifier.start(stop)
    try:
        engine.run(stop)
    except Exception:  # noqa: BLE001 (log it; leases bring every open job back)
        log.exception("dispatcher failed")
        return 1
    finally:
        sd.stopping()
        stop.set()
        notifier.join(10.0)
        spool.close()
        sd.close()
    log.info("dispatcher stopped: %s", engine.stats)
    return 0

