"""The pieces of an SMPP bind below its window: the TCP connection and its bind handshake
(our own PDU code), the reconnect backoff, and the table of query_sm not answered yet."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable

from ..model import SmppConfig
from ..spool.base import OverduePart
from . import pdus as P
from .provider import QueryAnswer
from .quietlog import QuietLog
from .receipts import MESSAGE_STATES, STAT_TO_STATE

Answer = Callable[[QueryAnswer], None]


class BindRefused(ConnectionError):
    """The SMSC answered the bind with an error status (wrong login, ESME_RBINDFAIL, ESME_RALYBND...)."""

    def __init__(self, status: int):
        super().__init__(P.status_text(status))
        self.status = status


class Link:
    """One bound TCP connection."""

    def __init__(self, sock: socket.socket, gen: int, pending: bytes):
        self.sock = sock
        self.gen = gen
        self.pending = pending  # bytes read with the bind_resp that belong to later PDUs
        self.wlock = threading.Lock()
        self.unbound = threading.Event()
        self.closed = False
        self.since = time.monotonic()

    def send(self, data: bytes) -> None:
        with self.wlock:
            self.sock.sendall(data)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def connect(cfg: SmppConfig, timeout: float, seq: int, gen: int) -> Link:
    """Connect and bind_transceiver within `timeout`; OSError (BindRefused: the SMSC said no)
    or ValueError (garbage) otherwise. Keep-alives the SMSC sends meanwhile are answered."""
    sock = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(P.bind_transceiver(seq, cfg.system_id, cfg.password, cfg.system_type))
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the SMSC before it answered the bind")
            got, buf = P.split_pdus(buf + data)
            for i, raw in enumerate(got):
                _, cmd, status, rseq = P.HEADER.unpack_from(raw)
                if cmd in (P.BIND_TRANSCEIVER_RESP, P.GENERIC_NACK) and rseq == seq:
                    if status:
                        raise BindRefused(status)
                    sock.settimeout(None)
                    return Link(sock, gen, b"".join(got[i + 1:]) + buf)
                if cmd == P.ENQUIRE_LINK:
                    sock.sendall(P.pdu(P.ENQUIRE_LINK_RESP, rseq))
    except BaseException:
        sock.close()
        raise


STABLE_CONNECTION = 10.0  # seconds a connection must last before the reconnect backoff starts over


class Backoff:
    """Exponential backoff from reconnect_min to reconnect_max with jitter, started over after a
    connection that lasted. Every path that drops or fails a connection goes through it: an
    SMSC that binds and drops every connection within seconds is put in a growing cool-down
    (said once a minute when `quiet` is given), never reconnected in a tight loop."""

    def __init__(self, low: float, high: float, quiet: QuietLog | None = None, where: str = ""):
        self.low, self.high = low, high
        self.next = low  # the next reconnect waits about this long
        self.quiet, self.where = quiet, where

    def delay(self, life: float) -> float:
        """The wait before connecting again after a connection that lasted `life` seconds (0: failed)."""
        if life >= STABLE_CONNECTION:
            self.next = self.low
        delay = self.next * random.uniform(0.5, 1.0)
        if self.quiet is not None and 0 < life < STABLE_CONNECTION:
            self.quiet.log(logging.WARNING, f"flapping {self.where}",
                           "%s dropped the connection %.1fs after the bind: cool-down, reconnecting in %.1fs "
                           "(doubling up to reconnect_max %gs until a connection lasts %gs)",
                           self.where, life, delay, self.high, STABLE_CONNECTION)
        self.next = min(self.next * 2, self.high)
        return delay


class Queries:
    """query_sm sent and not answered yet: seq -> (part, callback, sent at). Used under the bind's lock."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[OverduePart, Answer, float]] = {}

    def __contains__(self, seq: int) -> bool:
        return seq in self.open

    def __bool__(self) -> bool:
        return bool(self.open)

    def add(self, seq: int, p: OverduePart, on_answer: Answer) -> None:
        self.open[seq] = (p, on_answer, time.monotonic())

    def answer(self, cmd: int, status: int, seq: int, raw: bytes) -> bool:
        """A query_sm_resp (or generic_nack) for `seq`; False if no query has that number."""
        entry = self.open.pop(seq, None)
        if entry is None:
            return False
        p, on_answer, _ = entry
        if cmd != P.QUERY_SM_RESP or status != 0:
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", f"query_sm: {P.status_text(status)}"))
            return True
        try:
            state, err = P.parse_query_sm_resp(raw)
        except ValueError:
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", "query_sm: malformed answer"))
            return True
        stat = MESSAGE_STATES.get(state, f"state {state}")
        on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, STAT_TO_STATE.get(stat, ""),
                              f"query_sm stat:{stat}" + (f" err:{err:03d}" if err else "")))
        return True

    def expire(self, now: float, limit: float) -> None:
        """Queries unanswered for `limit` seconds are answered 'no answer'."""
        for seq in [s for s, (_, _, at) in self.open.items() if now - at >= limit]:
            p, on_answer, _ = self.open.pop(seq)
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "",
                                  f"no answer to query_sm within {limit:g}s"))

    def fail_all(self, why: str) -> None:
        queries, self.open = self.open, {}
        for p, on_answer, _ in queries.values():
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", why))
