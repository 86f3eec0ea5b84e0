"""SMPP 3.4 provider: `binds` bind_transceiver sessions to one SMSC, pipelined submit_sm, receipts.

Each bind (`smpp_bind.Bind`) is its own TCP connection with its own window, rate and
throttle pause (`smpp_window`), so throttling slows only the bind that got it, and a bind
the SMSC refuses (its session limit) is retried with backoff while the others carry the
traffic. A job goes whole to one bind (the bound one with the most room); the spool hands
out one job per recipient at a time, or one train of a recipient's jobs (ADR 0003) that goes
whole to one bind and is sent in order there, so per-recipient order holds across binds.

Throttling (ESME_RTHROTTLED, ESME_RMSGQFUL) is not a job failure: the part is sent again
from memory, in order, after a pause, and the bind's rate is halved (then recovers).
A lost connection hands every open job of that bind back to the engine as a temporary
failure that counts no attempt (at-least-once for the submits that were in flight).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..model import SmppConfig
from ..spool.base import Job, OverduePart
from .pdus import status_text
from .provider import QueryAnswer, Receipt, ReceiptCallback, ResultCallback
from .quietlog import QuietLog
from .smpp_bind import Bind
from .smpp_window import JobState, encode_jobs

log = logging.getLogger("sms_milter.dispatcher.smpp")

__all__ = ["SmppProvider", "status_text"]


class SmppProvider:
    def __init__(self, cfg: SmppConfig, connect_timeout: float = 10.0, name: str = "smpp"):
        self.name = name
        self.cfg = cfg
        self.quiet = QuietLog()
        n = cfg.binds
        labels = [f" (provider {name}, bind {i + 1} of {n})" if n > 1 else
                  (f" (provider {name})" if name != "smpp" else "") for i in range(n)]
        self.binds = [Bind(cfg, i, labels[i], self.quiet, connect_timeout, name) for i in range(n)]
        self._on_result: ResultCallback = lambda r: None
        self._next_query = 0
        # The engine claims trains of one number's jobs (ADR 0003): each goes whole to one bind,
        # which sends them in order.
        self.pipeline_per_number = cfg.pipeline_per_number

    # -- Provider ------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        for what, value, limit in (("system_id", self.cfg.system_id, 15), ("password", self.cfg.password, 8),
                                   ("system_type", self.cfg.system_type, 12)):
            if len(value) > limit:
                log.warning("provider.smpp.%s is longer than the %d characters SMPP 3.4 allows: "
                            "only its first %d are sent", what, limit, limit)
        self._on_result = on_result
        for b in self.binds:
            b.start(on_result, on_receipt, on_change)

    def ready(self) -> bool:
        return any(b.ready() for b in self.binds)

    def capacity(self) -> int:
        return sum(b.capacity() for b in self.binds)

    def bound(self) -> int:
        """How many binds are up."""
        return sum(1 for b in self.binds if b.ready())

    def submit(self, jobs: list[Job]) -> None:
        ready = encode_jobs(jobs, self._on_result)  # outside every lock: the binds go on meanwhile
        if len(self.binds) == 1:
            self.binds[0].add(ready)
            return
        room = {b.index: b.capacity() for b in self.binds}
        shares: dict[int, list[JobState]] = {}
        trains: dict[str, list[JobState]] = {}  # one number's jobs, in order: one bind for all of them
        for js in ready:
            trains.setdefault(js.job.recipient, []).append(js)
        for train in trains.values():
            best = max(room, key=lambda i: room[i])  # the bound bind with the most room (0 if none)
            room[best] -= len(train)
            shares.setdefault(best, []).extend(train)
        for i, share in shares.items():
            self.binds[i].add(share)

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        """Ask the SMSC (query_sm) for the state of parts whose receipt did not come; each part
        gets one QueryAnswer (state "" when the SMSC could not tell, or did not answer)."""
        for p in parts:
            up = [b for b in self.binds if b.ready()] or self.binds
            self._next_query += 1
            up[self._next_query % len(up)].query(p, on_answer)

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        by_bind: dict[int, list[tuple[int, int]]] = {}
        for r in receipts:
            if r.token is None:  # not a deliver_sm (a query_sm answer): nothing to acknowledge
                continue
            index, gen, seq = r.token
            by_bind.setdefault(index, []).append((gen, seq))
        for index, tokens in by_bind.items():
            self.binds[index].ack(tokens)

    def drain(self, timeout: float) -> None:
        """Stop sending; wait up to `timeout` for the answers to what is in flight."""
        deadline = time.monotonic() + timeout
        for b in self.binds:
            b.stop_sending()
        for b in self.binds:
            b.wait_answers(deadline)

    def close(self, timeout: float = 2.0) -> None:
        self.drain(timeout)
        for b in self.binds:
            b.unbind()
        for b in self.binds:
            b.join()

