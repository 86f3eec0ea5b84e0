"""Prometheus metrics of both daemons (`metrics:` in the configuration).

Every name starts with `sms_milter_`. The exposition format is prometheus_client's; its
HTTP server runs in threads of its own, so a scrape never touches the milter's event loop.
What the daemons do on their hot paths is one counter increment or one histogram
observation (a lock and an addition); the jobs-by-state gauge is read from the spool at
scrape time (one GROUP BY, cached for a second).

    decisions_total{outcome,reason}   milter: accepted | rejected | tempfailed, and why
    jobs{state}                       jobs in the spool by state (both daemons)
    channel_jobs{channel,state}       the same by channel: sms | voice | fax (every state, 0 included)
    submits_total{provider,result}    dispatcher: ok | temporary | failed | unavailable (the provider
                                      was not bound/connected: not handed over), per job
    receipts_total{provider,result}   dispatcher: delivered | buffered | failed | expired, per part
    smtp_to_commit_seconds            milter: end of message -> jobs committed (the 250 waits for it)
    commit_to_submit_seconds          dispatcher: job committed -> accepted by the provider
    submit_to_receipt_seconds         dispatcher: part accepted -> its receipt (parts this process sent)
    config_reloads_total{result}      SIGHUP: ok | failed
    provider_bound{provider}          1 while the dispatcher is bound to the provider
    binds_total{provider,result}      bind attempts: ok | refused (the SMSC said no) | failed (connect,
                                      timeout, garbage); a reload that changes the settings re-binds
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .policy.refusal import INTERNAL_ERROR, SPOOL_UNAVAILABLE, Refusal
from .spool.base import normalize_ref, refs_for_lookup

log = logging.getLogger("sms_milter.metrics")

disable_created_metrics()  # no *_created series: they only double the scrape
REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter("sms_milter_decisions", "Milter decisions by outcome and reason",
                    ["outcome", "reason"], registry=REGISTRY)
SUBMITS = Counter("sms_milter_submits", "Jobs handed to a provider, by result",
                  ["provider", "result"], registry=REGISTRY)
RECEIPTS = Counter("sms_milter_receipts", "Delivery receipts stored, by part state",
                   ["provider", "result"], registry=REGISTRY)
RELOADS = Counter("sms_milter_config_reloads", "Configuration reloads (SIGHUP), by result",
                  ["result"], registry=REGISTRY)
BINDS = Counter("sms_milter_binds", "Bind attempts to the provider, by result", ["provider", "result"],
                registry=REGISTRY)
# Limits (abuse control): every rule that refused (mode enforce) or would have (mode monitor).
LIMIT_HITS = Counter("sms_milter_limit_hits", "Limits that refused (enforce) or would have refused "
                     "(monitor), by rule", ["rule", "mode"], registry=REGISTRY)


def limit_hit(rule: str, mode: str) -> None:
    LIMIT_HITS.labels(rule, mode).inc()
BOUND = Gauge("sms_milter_provider_bound", "1 while bound to the provider", ["provider"],
              registry=REGISTRY)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)
SMTP_TO_COMMIT = Histogram("sms_milter_smtp_to_commit_seconds",
                           "End of message (SMTP) to the jobs committed in the spool",
                           buckets=_FAST, registry=REGISTRY)
COMMIT_TO_SUBMIT = Histogram("sms_milter_commit_to_submit_seconds",
                             "Job committed to accepted by the provider", buckets=_SLOW, registry=REGISTRY)
SUBMIT_TO_RECEIPT = Histogram("sms_milter_submit_to_receipt_seconds",
                              "Part accepted by the provider to its delivery receipt", buckets=_SLOW,
                              registry=REGISTRY)

# Refusals by enhanced status code: a short, bounded label (never the reply text, which
# may name an address).
REASONS = {
    "5.1.1": "bad_number",
    "5.1.3": "bad_address",
    "5.2.2": "quota",
    "5.3.3": "no_channel",
    "5.3.4": "too_long",
    "5.5.3": "too_many_recipients",
    "5.5.4": "bad_subject",
    "5.6.0": "bad_text",
    "5.6.1": "bad_mime",
    "5.7.1": "not_authorized",
    "5.7.8": "bad_credentials",
    "4.7.1": "rate_limited",
}
_decision_children: dict[tuple[str, str], object] = {}
# Decisions by outcome since start, for the one-line systemd STATUS.
TALLY = {"accepted": 0, "rejected": 0, "tempfailed": 0}


def reason_of(refusal: Refusal) -> str:
    if refusal is SPOOL_UNAVAILABLE or refusal == SPOOL_UNAVAILABLE:
        return "spool_unavailable"
    if refusal is INTERNAL_ERROR or refusal == INTERNAL_ERROR:
        return "internal_error"
    if refusal.xcode == "4.3.0":  # the adapter's TOO_SLOW: not decided within spool_timeout
        return "too_slow"
    return REASONS.get(refusal.xcode, refusal.xcode if len(refusal.xcode) <= 9 else "other")


def decision(refusal: Refusal | None) -> None:
    """Count one milter decision: None = accepted (jobs committed)."""
    if refusal is None:
        key = ("accepted", "committed")
    else:
        key = ("tempfailed" if refusal.temporary else "rejected", reason_of(refusal))
    child = _decision_children.get(key)
    if child is None:
        child = _decision_children[key] = DECISIONS.labels(*key)
    child.inc()  # type: ignore[attr-defined]
    TALLY[key[0]] += 1


CHANNELS = ("sms", "voice", "fax")  # always in sms_milter_channel_jobs (with 0s), with any other found


class SpoolStates(Collector):
    """`sms_milter_jobs{state}` and `sms_milter_channel_jobs{channel,state}` read from the spool at
    scrape time (cached for a second): one GROUP BY channel, state when `by_channel` is given,
    the totals by state summed from it (so the two families always agree)."""

    def __init__(self, counts: Callable[[], dict[str, int]], states: Iterable[str],
                 by_channel: Callable[[], dict[str, dict[str, int]]] | None = None):
        self.counts = counts
        self.by_channel = by_channel
        self.states = tuple(states)
        self._lock = threading.Lock()
        self._at = 0.0
        self._last: dict[str, int] = {}
        self._last_channels: dict[str, dict[str, int]] = {}

    def _read(self) -> None:
        if self.by_channel is None:
            self._last = self.counts()
            return
        channels = self.by_channel()
        totals: dict[str, int] = {}
        for per_state in channels.values():
            for state, n in per_state.items():
                totals[state] = totals.get(state, 0) + n
        self._last, self._last_channels = totals, channels

    def collect(self):  # noqa: ANN201 (prometheus_client's interface)
        with self._lock:
            now = time.monotonic()
            if now - self._at >= 1.0:
                try:
                    self._read()
                except Exception as e:  # noqa: BLE001 (a scrape must not fail because the spool is busy)
                    log.warning("metrics: cannot count jobs: %s", e)
                self._at = now
            counts = dict(self._last)
            channels = {c: dict(n) for c, n in self._last_channels.items()}
        g = GaugeMetricFamily("sms_milter_jobs", "Jobs in the spool by state", labels=["state"])
        for state in dict.fromkeys((*self.states, *counts)):
            g.add_metric([state], counts.get(state, 0))
        yield g
        if self.by_channel is None:
            return
        c = GaugeMetricFamily("sms_milter_channel_jobs", "Jobs in the spool by channel and state",
                              labels=["channel", "state"])
        for channel in dict.fromkeys((*CHANNELS, *channels)):
            per_state = channels.get(channel, {})
            for state in dict.fromkeys((*self.states, *per_state)):
                c.add_metric([channel, state], per_state.get(state, 0))
        yield c

    def describe(self):  # noqa: ANN201
        return []


_collector: SpoolStates | None = None


def watch_spool(counts: Callable[[], dict[str, int]], states: Iterable[str],
                by_channel: Callable[[], dict[str, dict[str, int]]] | None = None) -> None:
    """Serve `sms_milter_jobs` (and `sms_milter_channel_jobs` given `by_channel`) from this spool
    (one spool per process)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = SpoolStates(counts, states, by_channel)
    REGISTRY.register(_collector)


def serve(address: str) -> object:
    """Start the /metrics HTTP server on "host:port" (threads of its own); returns the server."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=REGISTRY)
    log.info("metrics on http://%s/metrics", address)
    return server


class SubmitClock:
    """When each part this process sent was accepted, for submit -> receipt (bounded)."""

    def __init__(self, size: int = 20_000):
        self.size = size
        self._at: dict[str, float] = {}
        self._order: deque[str] = deque()  # oldest first
        self._lock = threading.Lock()

    def sent(self, refs: Iterable[str], at: float) -> None:
        with self._lock:
            for ref in refs:
                key = normalize_ref(ref)
                self._at[key] = at
                self._order.append(key)
            while len(self._order) > self.size:
                self._at.pop(self._order.popleft(), None)

    def receipt(self, ref: str, at: float) -> float | None:
        """Seconds since the part with this id was accepted (hex/decimal forms both match)."""
        with self._lock:
            for form in refs_for_lookup(ref):
                t = self._at.get(form)
                if t is not None:
                    return max(0.0, at - t)
        return None
