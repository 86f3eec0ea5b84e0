"""The milter's listening socket: opening and removing it, the deadline for the packets that
come through it, and what the event loop does when accept() finds no free file descriptor
(EMFILE, ENFILE).

The connection that could not be accepted stays in the listen queue, so a level-triggered
epoll reports the listening socket again at once: retrying would spin the loop at 100% CPU
and starve every open session. Instead the loop stops polling the listening socket for a
pause (100 ms, doubling up to 2 s while accept keeps failing) and then tries again; a
successful accept resets the pause. One log line at most every LOG_EVERY seconds says how
many pauses there were and how many connections wait in the listen queue.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import time

log = logging.getLogger("sms_milter.adapter")

# accept() errors that mean "no descriptor or kernel memory now", not "this connection is bad"
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_FIRST, PAUSE_MAX = 0.1, 2.0
LOG_EVERY = 10.0
# A packet whose length came but not all its bytes within this is closed with TEMPFAIL
# (a stuck or hostile peer); SMS_MILTER_PACKET_TIMEOUT overrides it (internal: tests).
PACKET_TIMEOUT = 30.0
_TCP_INFO_UNACKED = struct.Struct("=I")  # tcpi_unacked: the accept queue's length when listening
_TCP_INFO_UNACKED_AT = 24


def waiting(sock: socket.socket) -> int | None:
    """Connections in a TCP listening socket's accept queue (Linux TCP_INFO), None if unknown."""
    if sock.family == socket.AF_UNIX or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(_TCP_INFO_UNACKED.unpack_from(info, _TCP_INFO_UNACKED_AT)[0])
    except (OSError, struct.error):
        return None


def listen(spec: str) -> socket.socket:
    """The non-blocking listening socket for `unix:PATH` or `inet:HOST:PORT` (IPv6 too)."""
    if spec.startswith("unix:"):
        path = spec[5:]
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o660)
    else:
        host, _, port = spec[5:].rpartition(":")
        info = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)[0]
        s = socket.socket(info[0], socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(info[4])
    s.listen(128)
    s.setblocking(False)
    return s


def unlink_unix(spec: str) -> None:
    """Remove a unix listening socket's file (on exit)."""
    if spec.startswith("unix:"):
        try:
            os.unlink(spec[5:])
        except OSError:
            pass


def packet_timeout() -> float:
    """PACKET_TIMEOUT, or SMS_MILTER_PACKET_TIMEOUT's seconds (internal; no number: ignored)."""
    try:
        return float(os.environ.get("SMS_MILTER_PACKET_TIMEOUT") or PACKET_TIMEOUT)
    except ValueError:
        return PACKET_TIMEOUT


class AcceptBackoff:
    """The listening socket's pause after accept() ran out of descriptors."""

    __slots__ = ("pause", "resume_at", "last_log", "pauses")

    def __init__(self) -> None:
        self.pause = 0.0  # the current pause; 0: accept worked last time
        self.resume_at = 0.0  # monotonic; > 0 while the listening socket is not polled
        self.last_log = -LOG_EVERY
        self.pauses = 0  # pauses since the last log line

    def exhausted(self, err: OSError, sock: socket.socket) -> None:
        """accept() failed with one of EXHAUSTED: start (or lengthen) a pause."""
        now = time.monotonic()
        self.pause = min(self.pause * 2 or PAUSE_FIRST, PAUSE_MAX)
        self.resume_at = now + self.pause
        self.pauses += 1
        if now - self.last_log >= LOG_EVERY:
            n = waiting(sock)
            log.warning("too many open files (%s): not accepting MTA connections for %.1f s "
                        "(%d pauses since the last such line); %s connections waiting",
                        err.strerror or err, self.pause, self.pauses, "some" if n is None else n)
            self.last_log = now
            self.pauses = 0

    def accepted(self) -> None:
        """accept() worked: the next exhaustion starts again from the shortest pause."""
        self.pause = 0.0

    def due(self, now: float) -> bool:
        """Is the pause over (the listening socket to be polled again)?"""
        return bool(self.resume_at) and now >= self.resume_at
