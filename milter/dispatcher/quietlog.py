"""A log that says a repeated line once a minute, not a thousand times."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("sms_milter.dispatcher.smpp")


class QuietLog:
    """Logs a repeated identical line (same key) at most once per `every` seconds; the next
    one that is logged says how many were held back. A reconnect storm or a silent SMSC
    gives a handful of lines, not thousands."""

    def __init__(self, every: float = 60.0, logger: logging.Logger = log):
        self.every = every
        self.logger = logger
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (0.0, 0))
            if last and now - last < self.every:
                self._seen[key] = (last, held + 1)
                return
            if len(self._seen) > 1000:  # keys carry error texts: keep the table small
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            msg += " (%d more like this in the last %.0fs not logged)"
            args = (*args, held, now - last)
        self.logger.log(level, msg, *args)
