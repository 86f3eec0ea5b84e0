"""systemd's notify protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET per message.

    notifier = Notifier.from_environment()
    notifier.ready("listening on inet:127.0.0.1:8894")  # READY=1 + STATUS=
    notifier.tick()          # from the event loop: WATCHDOG=1 at most every $WATCHDOG_USEC/2
    notifier.reloading(); notifier.ready(...)
    notifier.stopping()

Without $NOTIFY_SOCKET (not run by systemd with Type=notify) every call does nothing.
A socket path starting with `@` is an abstract socket. A failed send is logged once, never
raised: systemd's bookkeeping must not stop mail.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("sms_milter.sdnotify")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address: str | bytes | None = None
        if address:
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WATCHDOG=1 every half of the watchdog period, as sd_watchdog_enabled(3) advises.
        self.watchdog_every = watchdog_usec / 2e6 if watchdog_usec else None
        self._next_watchdog = 0.0
        self._failed = False

    @classmethod
    def from_environment(cls) -> Notifier:
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> None:
        if self.sock is None or self.address is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
            self._failed = False
        except OSError as e:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
            self._failed = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd's Type=notify-reload match the reload; older ones ignore it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def tick(self) -> None:
        """Call from the event loop: sends WATCHDOG=1 when it is due (cheap when not)."""
        if self.watchdog_every is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog_every
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
