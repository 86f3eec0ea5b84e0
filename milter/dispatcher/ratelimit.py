"""The submit rate of one SMPP bind: a token bucket with an adaptive cap.

Throttling (ESME_RTHROTTLED, ESME_RMSGQFUL) halves the cap once per episode (at least 5/s);
while quiet it grows back by half every 0.5 s, up to the configured rate (or, without one,
until it no longer limits). Used under the bind's lock.
"""

from __future__ import annotations

import time
from collections import deque


class Rate:
    def __init__(self, configured: float):
        self.configured = configured  # 0 = no cap of our own
        self.cap: float | None = configured or None
        self.tokens = 1.0
        self.last = time.monotonic()
        self.last_cut = 0.0
        self.sent: deque[float] = deque()

    def observed(self, now: float) -> float:
        while self.sent and self.sent[0] < now - 1.0:
            self.sent.popleft()
        return float(len(self.sent))

    def throttled(self, now: float) -> bool:
        """Cut the rate once per throttle episode; True if it was cut now."""
        if now - self.last_cut < 0.25:
            return False
        base = self.observed(now) if self.cap is None else min(self.cap, self.observed(now) or self.cap)
        self.cap = max(base / 2, 5.0)
        self.last_cut = now
        self.tokens = min(self.tokens, 1.0)
        return True

    def _grow(self, now: float) -> None:
        if self.cap is None or self.cap == self.configured or now - self.last_cut < 0.5:
            return
        steps = min(int((now - self.last_cut) / 0.5), 40)
        self.last_cut = now
        self.cap *= 1.5 ** steps
        if self.configured and self.cap >= self.configured:
            self.cap = self.configured
        elif not self.configured and self.cap > 20000:
            self.cap = None

    def wait_time(self, now: float) -> float:
        """0 if one submit may go now (and takes its token), else seconds to wait."""
        self._grow(now)
        if self.cap is None:
            sent = self.sent
            sent.append(now)
            if sent[0] < now - 1.0:  # keep only the last second (bounded memory, amortised O(1))
                sent.popleft()
            return 0.0
        self.tokens = min(max(1.0, self.cap / 20), self.tokens + (now - self.last) * self.cap)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.sent.append(now)
            return 0.0
        return (1.0 - self.tokens) / self.cap
