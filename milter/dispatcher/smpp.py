"""SMPP 3.4 provider: one bind_transceiver, a window of pipelined submit_sm, receipts.

Threads: `smpp-send` connects/binds (with backoff), sends submit_sm while the window and the
rate allow, and keeps the link alive with enquire_link; `smpp-read` (one per connection)
reads every PDU, answers enquire_link/unbind at once and hands submit_sm_resp results and
delivery receipts to the engine. The reader takes every PDU of one read at once (one lock,
one wake-up of the engine) and refills the window it freed itself, without waking the
sender (both send under the connection's write lock, so submits go out in order).
smpplib connects and makes the bind; the hot PDUs (submit_sm, submit_sm_resp, deliver_sm
and their answers) are coded by hand in `pdus`.

Throttling (ESME_RTHROTTLED, ESME_RMSGQFUL) is not a job failure: the part is sent again
from memory, in order, after a pause, and the bind's rate is halved (then recovers).
A lost connection hands every open job back to the engine as a temporary failure that
counts no attempt (it goes back to the queue and is sent again after the reconnect:
at-least-once for the submits that were in flight).
"""

from __future__ import annotations

import heapq
import logging
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import smpplib.client
import smpplib.consts
import smpplib.exceptions

from ..model import SmppConfig
from ..policy.addresses import originator_wire
from ..spool.base import Job, OverduePart
from .pdus import HEADER, SUBMIT_SM, Part, job_parts, parse_deliver_sm, submit_sm_body
from .provider import QueryAnswer, Receipt, ReceiptCallback, ResultCallback, SubmitResult
from .receipts import MESSAGE_STATES, STAT_TO_STATE, interpret

log = logging.getLogger("sms_milter.dispatcher.smpp")

GENERIC_NACK = 0x80000000
SUBMIT_SM_RESP = 0x80000004
DELIVER_SM = 0x00000005
DELIVER_SM_RESP = 0x80000005
UNBIND = 0x00000006
UNBIND_RESP = 0x80000006
QUERY_SM = 0x00000003
QUERY_SM_RESP = 0x80000003
ENQUIRE_LINK = 0x00000015
ENQUIRE_LINK_RESP = 0x80000015

ESME_RTHROTTLED = 0x58
ESME_RMSGQFUL = 0x14
THROTTLE_STATUSES = frozenset((ESME_RTHROTTLED, ESME_RMSGQFUL))
# Worth trying again later; every other error status fails the job.
TEMPORARY_STATUSES = frozenset((
    0x04,  # ESME_RINVBNDSTS (a bind problem, not the message's)
    0x08,  # ESME_RSYSERR
    0x45,  # ESME_RSUBMITFAIL
    0x64,  # ESME_RX_T_APPN
    0xFE,  # ESME_RDELIVERYFAILURE
    0xFF,  # ESME_RUNKNOWNERR
))
STATUS_NAMES = {v: k[5:] for k, v in vars(smpplib.consts).items()
                if k.startswith("SMPP_ESME_") and isinstance(v, int)}


def status_text(status: int) -> str:
    name = STATUS_NAMES.get(status, "ESME_UNKNOWN")
    desc = smpplib.consts.DESCRIPTIONS.get(status, "unknown status")
    return f"{name} (0x{status:08X}): {desc}"


def _pdu(command_id: int, seq: int, status: int = 0, body: bytes = b"") -> bytes:
    return struct.pack(">LLLL", 16 + len(body), command_id, status, seq) + body


@dataclass(eq=False)
class _JobState:
    job: Job
    parts: list[Part]
    bodies: list[bytes]  # each part's submit_sm without the header
    refs: list[str | None]
    outstanding: int  # parts without a final answer (sent or not)
    error: str = ""
    temporary: bool = False
    count_attempt: bool = True


@dataclass(order=True)
class _Retry:
    job_id: int
    index: int
    js: _JobState = field(compare=False)


class _Conn:
    """One bound TCP connection."""

    def __init__(self, sock: socket.socket, gen: int):
        self.sock = sock
        self.gen = gen
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


class _Rate:
    """Token bucket with an adaptive cap: halved on throttling, grown back while quiet."""

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
            self.sent.append(now)
            return 0.0
        self.tokens = min(max(1.0, self.cap / 20), self.tokens + (now - self.last) * self.cap)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.sent.append(now)
            return 0.0
        return (1.0 - self.tokens) / self.cap


STABLE_CONNECTION = 10.0  # seconds a connection must last before the reconnect backoff starts over
TIMEOUTS_BEFORE_RECONNECT = 3  # submit_sm in a row without an answer: the bind is dropped and made again


class QuietLog:
    """Logs a repeated identical line (same key) at most once per `every` seconds; the next
    one that is logged says how many were held back. A reconnect storm or a silent SMSC
    gives a handful of lines, not thousands."""

    def __init__(self, every: float = 60.0):
        self.every = every
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
        log.log(level, msg, *args)


class SmppProvider:
    def __init__(self, cfg: SmppConfig, connect_timeout: float = 10.0, name: str = "smpp"):
        self.name = name
        self.cfg = cfg
        self.connect_timeout = connect_timeout
        self._cond = threading.Condition(threading.RLock())
        self._jobs: dict[int, _JobState] = {}
        self._queue: deque[tuple[_JobState, int]] = deque()
        self._retry: list[_Retry] = []
        self._inflight: dict[int, tuple[_JobState, int]] = {}
        self._conn: _Conn | None = None
        self._gen = 0
        self._seq = 0
        self._stopping = False
        self._closed = False
        self._pause_until = 0.0
        self._pause = 0.05
        self._rate = _Rate(cfg.rate)
        self._enquire_sent: float | None = None
        self._last_tx = 0.0
        self._on_result: ResultCallback = lambda r: None
        self._on_receipt: ReceiptCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None
        self._sender: threading.Thread | None = None
        self._readers: list[threading.Thread] = []
        self.max_jobs = max(2 * cfg.window, cfg.window + 64)
        self._sent: deque[tuple[float, int]] = deque()  # (sent at, seq) of submits, oldest first
        self._timeouts = 0  # submit_sm in a row that got no answer within submit_timeout
        self._backoff = cfg.reconnect_min  # the next reconnect waits about this long (doubling)
        self._last_life: float | None = None  # how long the last connection lasted (0: connect failed)
        self.quiet = QuietLog()
        # query_sm sent and not answered yet: seq -> (part, callback, sent at)
        self._queries: dict[int, tuple[OverduePart, Callable[[QueryAnswer], None], float]] = {}

    # -- Provider ------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        for what, value, limit in (("system_id", self.cfg.system_id, 15), ("password", self.cfg.password, 8),
                                   ("system_type", self.cfg.system_type, 12)):
            if len(value) > limit:
                log.warning("provider.smpp.%s is longer than the %d characters SMPP 3.4 allows: "
                            "only its first %d are sent", what, limit, limit)
        self._on_result, self._on_receipt, self._on_change = on_result, on_receipt, on_change
        self._sender = threading.Thread(target=self._send_loop, name="smpp-send", daemon=True)
        self._sender.start()

    def ready(self) -> bool:
        return self._conn is not None and not self._stopping

    def capacity(self) -> int:
        with self._cond:
            if self._conn is None or self._stopping:
                return 0
            limit = self.max_jobs
            if self._rate.cap is not None:
                limit = min(limit, max(self.cfg.window, int(self._rate.cap)))
            return max(0, limit - len(self._jobs))

    def submit(self, jobs: list[Job]) -> None:
        ready: list[_JobState] = []
        for job in jobs:  # encoded outside the lock: the reader and the sender go on meanwhile
            try:
                parts = job_parts(job)
                bodies = [submit_sm_body(p) for p in parts]
            except Exception as e:  # noqa: BLE001 (a job we cannot encode must not stop the bind)
                self._on_result(SubmitResult(job.id, error=f"cannot encode the text: {e}"))
                continue
            if len(parts) != job.parts:
                log.warning("job %d: text encodes to %d part(s), spool says %d", job.id, len(parts),
                            job.parts)
            ready.append(_JobState(job, parts, bodies, [None] * len(parts), len(parts)))
        with self._cond:
            for js in ready:
                if self._stopping or self._conn is None:
                    self._on_result(SubmitResult(js.job.id, error="not connected to the SMSC", temporary=True,
                                                 count_attempt=False))
                    continue
                self._jobs[js.job.id] = js
                self._queue.extend((js, i) for i in range(len(js.parts)))
            self._cond.notify_all()

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        """Ask the SMSC (query_sm) for the state of parts whose receipt did not come; each part
        gets one QueryAnswer (state "" when the SMSC could not tell, or did not answer)."""
        for p in parts:
            conn = self._conn
            if conn is None or self._stopping:
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", "not connected to the SMSC"))
                continue
            ton, npi, addr = originator_wire(p.originator)
            body = p.ref.encode("latin-1", "replace")[:64] + b"\0" + bytes((ton, npi)) + \
                addr.encode("latin-1", "replace")[:20] + b"\0"
            with self._cond:
                seq = self._seq = self._seq % 0x7FFFFFFF + 1
                self._queries[seq] = (p, on_answer, time.monotonic())
            try:
                conn.send(_pdu(QUERY_SM, seq, 0, body))
            except OSError as e:
                self._lost(conn, f"send failed: {e}")

    def _query_resp(self, cmd: int, status: int, seq: int, raw: bytes) -> None:
        with self._cond:
            entry = self._queries.pop(seq, None)
        if entry is None:
            log.debug("query_sm_resp for unknown sequence %d", seq)
            return
        p, on_answer, _ = entry
        if cmd != QUERY_SM_RESP or status != 0:
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", f"query_sm: {status_text(status)}"))
            return
        try:
            pos = raw.index(b"\0", 16) + 1  # message_id
            pos = raw.index(b"\0", pos) + 1  # final_date
            state, err = raw[pos], raw[pos + 1]
        except (ValueError, IndexError):
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", "query_sm: malformed answer"))
            return
        stat = MESSAGE_STATES.get(state, f"state {state}")
        on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, STAT_TO_STATE.get(stat, ""),
                              f"query_sm stat:{stat}" + (f" err:{err:03d}" if err else "")))

    def _check_queries(self, now: float) -> None:
        """query_sm unanswered for submit_timeout: answered 'no answer' (caller holds the lock)."""
        late = [seq for seq, (_, _, at) in self._queries.items() if now - at >= self.cfg.submit_timeout]
        for seq in late:
            p, on_answer, _ = self._queries.pop(seq)
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "",
                                  f"no answer to query_sm within {self.cfg.submit_timeout:g}s"))

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        by_conn: dict[int, list[bytes]] = {}
        for r in receipts:
            if r.token is None:  # not a deliver_sm (a query_sm answer): nothing to acknowledge
                continue
            gen, seq = r.token
            by_conn.setdefault(gen, []).append(_pdu(DELIVER_SM_RESP, seq, 0, b"\0"))
        conn = self._conn
        for gen, pdus in by_conn.items():
            if conn is None or conn.gen != gen:
                log.info("%d receipt(s) not acknowledged: their connection is gone "
                         "(the SMSC sends them again)", len(pdus))
                continue
            try:
                conn.send(b"".join(pdus))
            except OSError as e:
                self._lost(conn, f"send failed: {e}")

    def drain(self, timeout: float) -> None:
        """Stop sending; wait up to `timeout` for the answers to what is in flight."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            for js, _ in self._queue:
                self._abort(js, "dispatcher stopping")
            for r in self._retry:
                self._abort(r.js, "dispatcher stopping")
            self._drop_unsent()
            self._cond.notify_all()
            while self._inflight and self._conn is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def close(self, timeout: float = 2.0) -> None:
        self.drain(timeout)
        with self._cond:
            conn = self._conn
            self._closed = True
            self._cond.notify_all()
        if conn is not None:
            try:
                conn.send(_pdu(UNBIND, self._next_seq()))
                if not conn.unbound.wait(1.0):
                    log.info("SMSC did not answer unbind within 1s; closing")
            except OSError:
                pass
            self._lost(conn, "unbound")
        if self._sender is not None:
            self._sender.join(timeout=5)
        for t in self._readers:
            t.join(timeout=2)

    # -- internals -----------------------------------------------------------------------
    def _next_seq(self) -> int:
        with self._cond:
            self._seq = self._seq % 0x7FFFFFFF + 1
            return self._seq

    def _abort(self, js: _JobState, error: str, temporary: bool = True, count_attempt: bool = False) -> None:
        if not js.error:
            js.error, js.temporary, js.count_attempt = error, temporary, count_attempt

    def _drop_unsent(self) -> None:
        """Forget queued/retry parts of aborted jobs (caller holds the lock)."""
        keep: deque[tuple[_JobState, int]] = deque()
        for js, i in self._queue:
            if js.error:
                self._part_done(js)
            else:
                keep.append((js, i))
        self._queue = keep
        retry = []
        for r in self._retry:
            if r.js.error:
                self._part_done(r.js)
            else:
                retry.append(r)
        heapq.heapify(retry)
        self._retry = retry

    def _part_done(self, js: _JobState) -> None:
        js.outstanding -= 1
        if js.outstanding > 0:
            return
        self._jobs.pop(js.job.id, None)
        if js.error:
            self._on_result(SubmitResult(js.job.id, error=js.error, temporary=js.temporary,
                                         count_attempt=js.count_attempt))
        else:
            self._on_result(SubmitResult(js.job.id, refs=tuple(r or "" for r in js.refs)))

    def _connect(self) -> _Conn:
        cfg = self.cfg
        client = smpplib.client.Client(cfg.host, cfg.port, timeout=self.connect_timeout,
                                       allow_unknown_opt_params=True)
        client.connect()
        try:
            client.bind_transceiver(system_id=cfg.system_id, password=cfg.password,
                                    system_type=cfg.system_type)
        except BaseException:
            client.disconnect()
            raise
        sock = client._socket  # noqa: SLF001 (smpplib made the bind; the socket is ours from here)
        client._socket = None  # noqa: SLF001
        client.state = smpplib.consts.SMPP_CLIENT_STATE_CLOSED
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            self._gen += 1
            self._seq = max(self._seq, client.sequence)
            return _Conn(sock, self._gen)

    def _send_loop(self) -> None:
        while True:
            try:
                self._send_loop_inner()
                return
            except Exception:  # noqa: BLE001 (a bug must not silently stop all sending)
                log.exception("SMPP sender failed; dropping the connection")
                conn = self._conn
                if conn is not None:
                    self._lost(conn, "internal error")
                time.sleep(self.cfg.reconnect_min)

    def _reconnect_delay(self) -> float | None:
        """How long to wait before the next connect (None: at once, nothing was lost yet). Every
        path that drops or fails a connection goes through here: exponential backoff from
        reconnect_min to reconnect_max with jitter, started over after a connection that lasted."""
        with self._cond:
            life, self._last_life = self._last_life, None
        if life is None:
            return None
        if life >= STABLE_CONNECTION:
            self._backoff = self.cfg.reconnect_min
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2, self.cfg.reconnect_max)
        return delay

    def _send_loop_inner(self) -> None:
        while True:
            with self._cond:
                if self._closed or (self._stopping and self._conn is None):
                    return
                conn = self._conn
            if conn is None:
                delay = self._reconnect_delay()
                if delay is not None:
                    with self._cond:
                        if self._cond.wait_for(lambda: self._closed or self._stopping, delay):
                            continue
                try:
                    conn = self._connect()
                except (smpplib.exceptions.ConnectionError, smpplib.exceptions.PDUError, OSError) as e:
                    args: tuple[Any, ...] = getattr(e, "args", ())
                    why = status_text(args[1]) if len(args) > 1 else (str(e) or type(e).__name__)
                    with self._cond:
                        self._last_life = 0.0
                    self.quiet.log(logging.WARNING, f"bind:{why}",
                                   "SMSC %s:%d: connect/bind failed: %s; retrying in at most %.1fs",
                                   self.cfg.host, self.cfg.port, why, self._backoff)
                    continue
                self.quiet.log(logging.INFO, "bound", "bound to SMSC %s:%d as %s (transceiver)",
                               self.cfg.host, self.cfg.port, self.cfg.system_id)
                with self._cond:
                    self._conn = conn
                    self._last_tx = time.monotonic()
                    self._enquire_sent = None
                    self._timeouts = 0
                reader = threading.Thread(target=self._read_loop, args=(conn,), name="smpp-read", daemon=True)
                self._readers = [t for t in self._readers if t.is_alive()] + [reader]
                reader.start()
                self._on_change()
                continue
            sent, wait = self._pump(conn)
            if sent:
                continue
            with self._cond:
                if self._conn is conn and not self._closed:
                    self._cond.wait(wait)
                # else: lost; the top of the loop waits (backoff) before connecting again

    def _check_timeouts(self, conn: _Conn, now: float) -> float:
        """Give up on submits unanswered for submit_timeout (caller holds the lock): their jobs
        go back to the queue with last_error saying so; TIMEOUTS_BEFORE_RECONNECT in a row drop
        the bind. Returns how long until the oldest open submit times out."""
        limit = self.cfg.submit_timeout
        sent = self._sent
        while sent and sent[0][1] not in self._inflight:
            sent.popleft()
        expired: list[int] = []
        while sent and now - sent[0][0] >= limit:
            seq = sent.popleft()[1]
            if seq in self._inflight:
                expired.append(seq)
            while sent and sent[0][1] not in self._inflight:
                sent.popleft()
        if expired:
            self._timeouts += len(expired)
            self.quiet.log(logging.WARNING, "submit-timeout",
                           "SMSC %s:%d did not answer %d submit_sm within %.1fs (%d in a row): "
                           "their job(s) go back to the queue",
                           self.cfg.host, self.cfg.port, len(expired), limit, self._timeouts)
            for seq in expired:
                js, _ = self._inflight.pop(seq)
                self._abort(js, f"no answer from the SMSC to submit_sm within {limit:g}s", temporary=True,
                            count_attempt=True)
                self._part_done(js)
            self._drop_unsent()
            if self._timeouts >= TIMEOUTS_BEFORE_RECONNECT:
                self._lost(conn, f"{self._timeouts} submit_sm in a row without an answer")
                return 0.0
        return limit - (now - sent[0][0]) if sent else limit

    def _pump(self, conn: _Conn, reader: bool = False) -> tuple[bool, float]:
        """Send what may go now (from the sender or the reader); (anything sent, wait hint)."""
        with conn.wlock:  # numbered and sent under one lock: submits leave in sequence order
            data, wait = self._next_batch(conn, reader)
            if not data:
                return False, wait
            try:
                conn.sock.sendall(data)
            except OSError as e:
                err = e
            else:
                return True, wait
        self._lost(conn, f"send failed: {err}")
        return False, 0.0

    def _next_batch(self, conn: _Conn, reader: bool = False) -> tuple[bytes, float]:
        """Submits (and keep-alives) to send now, or how long to wait. From the reader, parts
        held back by a pause or the rate wake the sender, which waits for them."""
        out: list[bytes] = []
        with self._cond:
            if self._conn is not conn or self._closed:
                return b"", 0.0
            now = time.monotonic()
            wait = 1.0
            if now < self._pause_until:
                wait = self._pause_until - now
            else:
                while len(self._inflight) < self.cfg.window and (self._retry or self._queue):
                    if self._retry:
                        r = self._retry[0]
                        js, idx = r.js, r.index
                    else:
                        js, idx = self._queue[0]
                    if js.error:  # the job failed meanwhile: do not send its other parts
                        (heapq.heappop(self._retry) if self._retry else self._queue.popleft())
                        self._part_done(js)
                        continue
                    w = self._rate.wait_time(now)
                    if w > 0:
                        wait = w
                        break
                    if self._retry:
                        heapq.heappop(self._retry)
                    else:
                        self._queue.popleft()
                    self._seq = seq = self._seq % 0x7FFFFFFF + 1
                    self._inflight[seq] = (js, idx)
                    self._sent.append((now, seq))
                    body = js.bodies[idx]
                    out.append(HEADER.pack(16 + len(body), SUBMIT_SM, 0, seq) + body)
            if self._queries:
                self._check_queries(now)
                if self._queries:
                    wait = min(wait, self.cfg.submit_timeout)
            if self._sent:
                wait = min(wait, max(0.01, self._check_timeouts(conn, now)))
                if self._conn is not conn:
                    return b"", 0.0
            idle = now - self._last_tx
            if self._enquire_sent is not None:
                if now - self._enquire_sent > max(10.0, self.cfg.enquire_link):
                    self._lost(conn, "no answer to enquire_link")
                    return b"", 0.0
            elif idle >= self.cfg.enquire_link and not out:
                self._seq = self._seq % 0x7FFFFFFF + 1
                out.append(_pdu(ENQUIRE_LINK, self._seq))
                self._enquire_sent = now
            if out:
                self._last_tx = now
            else:
                wait = min(wait, max(0.01, self.cfg.enquire_link - idle))
            if reader and (self._retry or self._queue) and len(self._inflight) < self.cfg.window:
                self._cond.notify_all()
        return b"".join(out), wait

    def _read_loop(self, conn: _Conn) -> None:
        buf = b""
        space = bytearray(262144)  # one buffer for every read (no large allocation per recv)
        view = memoryview(space)
        reason = "connection closed by the SMSC"
        going = True
        try:
            while going:
                try:
                    got = conn.sock.recv_into(space)
                except OSError as e:
                    reason = f"read failed: {e}"
                    break
                if not got:
                    break
                data = bytes(view[:got])
                buf = buf + data if buf else data
                pdus: list[bytes] = []
                pos, end = 0, len(buf)
                while end - pos >= 16:
                    n = int.from_bytes(buf[pos:pos + 4], "big")
                    if n < 16 or n > 65536:
                        raise ValueError(f"bad PDU length {n}")
                    if end - pos < n:
                        break
                    pdus.append(buf[pos:pos + n])
                    pos += n
                buf = buf[pos:]
                if pdus and not self._handle_all(conn, pdus):
                    reason, going = "unbound by the SMSC", False
        except OSError as e:
            reason = f"connection failed: {e}"
        except Exception as e:  # noqa: BLE001 (any garbage from the peer ends this connection only)
            reason = f"protocol error: {e}"
            log.exception("SMPP reader")
        if conn.unbound.is_set():
            reason = "unbound"
        self._lost(conn, reason)

    def _handle_all(self, conn: _Conn, pdus: list[bytes]) -> bool:
        """Act on the PDUs of one read; False when the connection is to end. Submit responses
        first (one lock for all), then the receipts: a receipt never reaches the engine before
        the result of a submit answered in the same read."""
        resps: list[tuple[int, int, str]] = []
        receipts: list[Receipt] = []
        going = True
        for raw in pdus:
            _, cmd, status, seq = HEADER.unpack_from(raw)
            if cmd == QUERY_SM_RESP or (cmd == GENERIC_NACK and seq in self._queries):
                self._query_resp(cmd, status, seq, raw)
            elif cmd == SUBMIT_SM_RESP or cmd == GENERIC_NACK:
                message_id = raw[16:].split(b"\0", 1)[0].decode("ascii", "replace") if len(raw) > 16 else ""
                resps.append((seq, status, message_id))
            elif cmd == DELIVER_SM:
                r = self._deliver_sm(conn, raw, seq)
                if r is not None:
                    receipts.append(r)
            elif going and not self._handle(conn, cmd, status, seq):
                going = False
        if resps:
            self._submit_resps(resps)
            self._pump(conn, reader=True)  # refill the window these answers freed, from this thread
            self._on_change()
        for r in receipts:
            self._on_receipt(r)
        return going

    def _handle(self, conn: _Conn, cmd: int, status: int, seq: int) -> bool:
        """Act on one PDU other than submit_sm_resp / deliver_sm; False when the connection is to end."""
        if cmd == ENQUIRE_LINK:
            conn.send(_pdu(ENQUIRE_LINK_RESP, seq))
        elif cmd == ENQUIRE_LINK_RESP:
            with self._cond:
                self._enquire_sent = None
        elif cmd == UNBIND:
            log.info("SMSC asked to unbind")
            conn.send(_pdu(UNBIND_RESP, seq))
            return False
        elif cmd == UNBIND_RESP:
            conn.unbound.set()
        elif not cmd & 0x80000000:
            conn.send(_pdu(GENERIC_NACK, seq, 0x03))  # ESME_RINVCMDID
        else:
            log.debug("ignoring PDU 0x%08X seq %d", cmd, seq)
        return True

    def _submit_resps(self, resps: list[tuple[int, int, str]]) -> None:
        with self._cond:
            for seq, status, message_id in resps:
                self._submit_resp(seq, status, message_id)
            if self._stopping:
                self._cond.notify_all()  # drain() waits for the window to empty

    def _submit_resp(self, seq: int, status: int, message_id: str) -> None:
        """One submit_sm_resp (caller holds the lock)."""
        entry = self._inflight.pop(seq, None)
        if entry is None:
            log.warning("submit_sm_resp for unknown sequence %d (status 0x%X)", seq, status)
            return
        js, idx = entry
        self._timeouts = 0  # the SMSC answers
        if status == 0 and message_id:
            js.refs[idx] = message_id
            self._pause = 0.05
            self._part_done(js)
            return
        now = time.monotonic()
        if status in THROTTLE_STATUSES and not js.error and not self._stopping:
            if self._rate.throttled(now):
                self._pause = min(self._pause * 2, 2.0)
                log.warning("SMSC throttling (%s): pausing %.2fs, rate now %.0f/s",
                            status_text(status), self._pause, self._rate.cap or 0)
            self._pause_until = max(self._pause_until, now + self._pause)
            heapq.heappush(self._retry, _Retry(js.job.id, idx, js))
        else:
            if status == 0:
                status = 0xFF  # ROK without a message id: cannot be tracked
            throttled = status in THROTTLE_STATUSES
            self._abort(js, status_text(status), temporary=status in TEMPORARY_STATUSES or throttled,
                        count_attempt=not throttled)
            self._part_done(js)

    def _deliver_sm(self, conn: _Conn, raw: bytes, seq: int) -> Receipt | None:
        """The receipt in a deliver_sm, or None (anything else is acknowledged here)."""
        try:
            pdu = parse_deliver_sm(raw)
        except ValueError as e:
            log.warning("unparsable deliver_sm seq %d acknowledged: %s", seq, e)
            conn.send(_pdu(DELIVER_SM_RESP, seq, 0, b"\0"))
            return None
        esm = pdu.esm_class
        text = pdu.short_message.decode("latin-1")
        found = interpret(pdu.receipted_message_id, pdu.message_state, text) if esm & 0x3C else None
        if found is None:
            log.info("deliver_sm seq %d (esm_class 0x%02X) is not a delivery receipt: acknowledged, ignored",
                     seq, esm)
            conn.send(_pdu(DELIVER_SM_RESP, seq, 0, b"\0"))
            return None
        ref, state, detail = found
        return Receipt(ref, state, detail, (conn.gen, seq), pdu.source_addr)

    def _lost(self, conn: _Conn, reason: str) -> None:
        with self._cond:
            if conn.closed:
                return
            was_current = self._conn is conn
            if was_current:
                self._conn = None
                self._last_life = time.monotonic() - conn.since
                self._sent.clear()
            open_jobs = len(self._jobs)
            for js in list(self._jobs.values()):
                self._abort(js, f"connection lost: {reason}")
            for js, _ in list(self._inflight.values()):
                self._part_done(js)
            self._inflight.clear()
            self._drop_unsent()
            queries, self._queries = self._queries, {}
            for p, on_answer, _ in queries.values():
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", f"connection lost: {reason}"))
            conn.close()
            self._cond.notify_all()
        if was_current:
            lvl = logging.INFO if self._closed else logging.WARNING
            self.quiet.log(lvl, f"lost:{reason}",
                           "SMSC connection closed (%s); %d open job(s) go back to the queue",
                           reason, open_jobs)
        conn.unbound.set()
        self._on_change()
