"""One Provider in front of several: each job goes to the channel of its device.

The engine claims jobs of every device together; the router hands each to its channel's
provider as that provider has room, keeping the rest in a small backlog per channel (reported
back as a temporary failure that counts no attempt if the router is drained first). Results,
receipts and query answers come straight from the channel providers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..dispatcher.provider import (
    Provider,
    QueryAnswer,
    Receipt,
    ReceiptCallback,
    ResultCallback,
    SubmitResult,
)
from ..spool.base import Job, OverduePart

# Device (the address's TeleMessage device) -> channel.
CHANNEL_OF_DEVICE = {"sms": "sms", "business": "voice", "mobile": "voice", "home": "voice", "fax": "fax"}
REF_PREFIXES = {"voice": "call-", "fax": "hylafax:"}  # whose ref is whose (query); other refs are SMS


class ChannelRouter:
    name = "channels"

    def __init__(self, providers: dict[str, Provider]):
        self.providers = providers  # channel -> provider
        self._lock = threading.Lock()
        self._backlog: dict[str, deque[Job]] = {c: deque() for c in providers}
        self._on_result: ResultCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None

    def accepts(self, device: str) -> bool:
        return CHANNEL_OF_DEVICE.get(device) in self.providers

    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_change = on_result, on_change

        def changed() -> None:
            self._feed()
            on_change()

        for p in self.providers.values():
            p.start(on_result, on_receipt, changed)

    def ready(self) -> bool:
        return any(p.ready() for p in self.providers.values())

    def capacity(self) -> int:
        with self._lock:
            waiting = sum(len(b) for b in self._backlog.values())
        room = sum(p.capacity() for p in self.providers.values() if p.ready())
        return max(0, room - waiting)

    @property
    def pipeline_per_number(self) -> int:
        """The SMS provider's trains (SMPP sends one number's jobs in order on one bind)."""
        sms = self.providers.get("sms")
        return int(getattr(sms, "pipeline_per_number", 1)) if sms is not None else 1

    def capacity_by_channel(self) -> dict[str, int]:
        """Room per channel (the engine claims each channel's jobs by it)."""
        with self._lock:
            waiting = {c: len(b) for c, b in self._backlog.items()}
        return {c: max(0, p.capacity() - waiting[c]) if p.ready() else 0 for c, p in self.providers.items()}

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                self._backlog[CHANNEL_OF_DEVICE[job.device]].append(job)
        self._feed()

    def _feed(self) -> None:
        for channel, p in self.providers.items():
            with self._lock:
                room = p.capacity() if p.ready() else 0
                backlog = self._backlog[channel]
                batch = [backlog.popleft() for _ in range(min(room, len(backlog)))]
            if batch:
                p.submit(batch)

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        tokens = [r for r in receipts if r.token is not None]  # only SMPP receipts carry one
        if tokens and "sms" in self.providers:
            self.providers["sms"].ack_receipts(tokens)

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        by_channel: dict[str, list[OverduePart]] = {}
        for part in parts:
            channel = next((c for c, pre in REF_PREFIXES.items() if part.ref.startswith(pre)), "sms")
            by_channel.setdefault(channel, []).append(part)
        for channel, some in by_channel.items():
            query: Any = getattr(self.providers.get(channel), "query", None)
            if query is not None:
                query(some, on_answer)

    def _give_back(self) -> None:
        with self._lock:
            left = [j for b in self._backlog.values() for j in b]
            for b in self._backlog.values():
                b.clear()
        for job in left:
            self._on_result(SubmitResult(job.id, error="dispatcher stopping", temporary=True,
                                         count_attempt=False))

    def drain(self, timeout: float) -> None:
        self._give_back()
        for p in self.providers.values():
            p.drain(timeout / max(1, len(self.providers)))

    def close(self, timeout: float) -> None:
        self._give_back()
        for p in self.providers.values():
            p.close(timeout / max(1, len(self.providers)))
