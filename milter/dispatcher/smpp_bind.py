"""One SMPP 3.4 bind_transceiver: a TCP connection, its window, its threads.

Threads: `smpp-send` connects/binds (with backoff), sends submit_sm while the window and the
rate allow, and keeps the link alive with enquire_link; `smpp-read` (one per connection)
reads every PDU, answers enquire_link/unbind at once and hands submit_sm_resp results and
delivery receipts on. The reader takes every PDU of one read at once (one lock, one
wake-up of the engine) and refills the window it freed itself, without waking the sender
(both write under the connection's lock, so submits go out in order). Every PDU, the bind
included, is coded in `pdus`.

A lost connection hands every open job back as a temporary failure that counts no attempt
(it is sent again after the reconnect: at-least-once for the submits that were in flight,
which are marked `maybe_sent`). A refused bind (ESME_RBINDFAIL, ESME_RALYBND: the SMSC's
session limit) is retried with the same backoff; other binds are not affected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .. import metrics
from ..model import SmppConfig
from ..policy.addresses import originator_wire
from ..spool.base import OverduePart
from . import pdus as P
from .provider import QueryAnswer, Receipt, ReceiptCallback, ResultCallback, SubmitResult
from .quietlog import QuietLog
from .receipts import interpret
from .smpp_link import Backoff, BindRefused, Link, Queries, connect
from .smpp_window import JobState, Window

log = logging.getLogger("sms_milter.dispatcher.smpp")

class Bind:
    def __init__(self, cfg: SmppConfig, index: int, label: str, quiet: QuietLog,
                 connect_timeout: float = 10.0, provider: str = "smpp"):
        self.cfg = cfg
        self.provider = provider  # the provider's name (metrics)
        self.index = index  # which bind of the provider (receipt tokens name it)
        self.label = label  # "" for a lone bind, else " (provider x, bind 2 of 3)"
        self.where = f"SMSC {cfg.host}:{cfg.port}{label}"
        self.connect_timeout = connect_timeout
        self.quiet = quiet
        self._cond = threading.Condition(threading.RLock())
        self._on_result: ResultCallback = lambda r: None
        self._on_receipt: ReceiptCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None
        self.win = Window(cfg, lambda r: self._on_result(r), quiet, label)
        self._conn: Link | None = None
        self._gen = 0
        self._closed = False
        self._enquire_sent: float | None = None
        self._last_tx = 0.0
        self._sender: threading.Thread | None = None
        self._readers: list[threading.Thread] = []
        self._backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max, quiet, self.where)
        self._last_life: float | None = None  # how long the last connection lasted (0: connect failed)
        self._queries = Queries()

    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_receipt, self._on_change = on_result, on_receipt, on_change
        self._sender = threading.Thread(target=self._send_loop, name="smpp-send", daemon=True)
        self._sender.start()

    def ready(self) -> bool:
        return self._conn is not None and not self.win.stopping

    def capacity(self) -> int:
        with self._cond:
            if self._conn is None or self.win.stopping:
                return 0
            return self.win.capacity()

    def add(self, jobs: list[JobState]) -> None:
        with self._cond:
            for js in jobs:
                if self.win.stopping or self._conn is None:
                    self._on_result(SubmitResult(js.job.id, error="not connected to the SMSC", temporary=True,
                                                 count_attempt=False, unavailable=True))
                    continue
                self.win.add(js)
            self._cond.notify_all()

    # -- query_sm --------------------------------------------------------------------------
    def query(self, p: OverduePart, on_answer: Callable[[QueryAnswer], None]) -> None:
        conn = self._conn
        if conn is None or self.win.stopping:
            on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", "not connected to the SMSC"))
            return
        with self._cond:
            seq = self.win.next_seq()
            self._queries.add(seq, p, on_answer)
        try:
            conn.send(P.query_sm(seq, p.ref, originator_wire(p.originator)))
        except OSError as e:
            self._lost(conn, f"send failed: {e}")

    def ack(self, tokens: list[tuple[int, int]]) -> None:
        """deliver_sm_resp for stored receipts: tokens are (connection generation, sequence)."""
        conn = self._conn
        by_gen: dict[int, list[bytes]] = {}
        for gen, seq in tokens:
            by_gen.setdefault(gen, []).append(P.pdu(P.DELIVER_SM_RESP, seq, 0, b"\0"))
        for gen, out in by_gen.items():
            if conn is None or conn.gen != gen:
                log.info("%d receipt(s) not acknowledged: their connection is gone (the SMSC sends them "
                         "again)", len(out))
                continue
            try:
                conn.send(b"".join(out))
            except OSError as e:
                self._lost(conn, f"send failed: {e}")

    # -- stopping --------------------------------------------------------------------------
    def stop_sending(self) -> None:
        with self._cond:
            self.win.stop("dispatcher stopping")
            self._cond.notify_all()

    def wait_answers(self, deadline: float) -> None:
        with self._cond:
            while self.win.inflight and self._conn is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def unbind(self) -> None:
        with self._cond:
            conn = self._conn
            self._closed = True
            self._cond.notify_all()
        if conn is not None:
            try:
                conn.send(P.pdu(P.UNBIND, self._next_seq()))
                if not conn.unbound.wait(1.0):
                    log.info("%s did not answer unbind within 1s; closing", self.where)
            except OSError:
                pass
            self._lost(conn, "unbound")

    def join(self) -> None:
        if self._sender is not None:
            self._sender.join(timeout=5)
        for t in self._readers:
            t.join(timeout=2)

    # -- connecting ------------------------------------------------------------------------
    def _next_seq(self) -> int:
        with self._cond:
            return self.win.next_seq()

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
        """How long to wait before the next connect (None: at once, nothing was lost yet)."""
        with self._cond:
            life, self._last_life = self._last_life, None
        return None if life is None else self._backoff.delay(life)

    def _send_loop_inner(self) -> None:
        while True:
            with self._cond:
                if self._closed or (self.win.stopping and self._conn is None):
                    return
                conn = self._conn
            if conn is None:
                delay = self._reconnect_delay()
                if delay is not None:
                    with self._cond:
                        if self._cond.wait_for(lambda: self._closed or self.win.stopping, delay):
                            continue
                try:
                    with self._cond:
                        seq = self.win.next_seq()
                        self._gen += 1
                    conn = connect(self.cfg, self.connect_timeout, seq, self._gen)
                except (OSError, ValueError) as e:
                    why = str(e) or type(e).__name__
                    result = "refused" if isinstance(e, BindRefused) else "failed"
                    metrics.BINDS.labels(self.provider, result).inc()
                    with self._cond:
                        self._last_life = 0.0
                    self.quiet.log(logging.WARNING, f"bind{self.index}:{why}",
                                   "SMSC %s:%d: connect/bind failed: %s; retrying in at most %.1fs%s",
                                   self.cfg.host, self.cfg.port, why, self._backoff.next, self.label)
                    continue
                metrics.BINDS.labels(self.provider, "ok").inc()
                self.quiet.log(logging.INFO, f"bound{self.index}",
                               "bound to SMSC %s:%d as %s (transceiver)%s",
                               self.cfg.host, self.cfg.port, self.cfg.system_id, self.label)
                with self._cond:
                    self._conn = conn
                    self._last_tx = time.monotonic()
                    self._enquire_sent = None
                    self.win.timeouts = 0
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

    # -- sending ---------------------------------------------------------------------------
    def _pump(self, conn: Link, reader: bool = False) -> tuple[bool, float]:
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

    def _next_batch(self, conn: Link, reader: bool = False) -> tuple[bytes, float]:
        """Submits (and keep-alives) to send now, or how long to wait. From the reader, parts
        held back by a pause or the rate wake the sender, which waits for them."""
        with self._cond:
            if self._conn is not conn or self._closed:
                return b"", 0.0
            now = time.monotonic()
            out, wait = self.win.take(now)
            if self._queries:
                self._queries.expire(now, self.cfg.submit_timeout)
                if self._queries:
                    wait = min(wait, self.cfg.submit_timeout)
            if self.win.sent:
                drop, left = self.win.expire(now)
                if drop:
                    self._lost(conn, f"{self.win.timeouts} submit_sm in a row without an answer")
                    return b"", 0.0
                wait = min(wait, max(0.01, left))
            idle = now - self._last_tx
            if self._enquire_sent is not None:
                if now - self._enquire_sent > max(10.0, self.cfg.enquire_link):
                    self._lost(conn, "no answer to enquire_link")
                    return b"", 0.0
            elif idle >= self.cfg.enquire_link and not out:
                out.append(P.pdu(P.ENQUIRE_LINK, self.win.next_seq()))
                self._enquire_sent = now
            if out:
                self._last_tx = now
            else:
                wait = min(wait, max(0.01, self.cfg.enquire_link - idle))
            if reader and self.win.waiting():
                self._cond.notify_all()
        return b"".join(out), wait

    # -- reading ---------------------------------------------------------------------------
    def _read_loop(self, conn: Link) -> None:
        buf = b""
        pending = conn.pending  # read together with the bind_resp
        space = bytearray(262144)  # one buffer for every read (no large allocation per recv)
        view = memoryview(space)
        reason = "connection closed by the SMSC"
        going = True
        try:
            while going:
                if pending:
                    data, pending = pending, b""
                else:
                    try:
                        got = conn.sock.recv_into(space)
                    except OSError as e:
                        reason = f"read failed: {e}"
                        break
                    if not got:
                        break
                    data = bytes(view[:got])
                buf = buf + data if buf else data
                found, buf = P.split_pdus(buf)
                if found and not self._handle_all(conn, found):
                    reason, going = "unbound by the SMSC", False
        except OSError as e:
            reason = f"connection failed: {e}"
        except Exception as e:  # noqa: BLE001 (any garbage from the peer ends this connection only)
            reason = f"protocol error: {e}"
            log.exception("SMPP reader")
        if conn.unbound.is_set():
            reason = "unbound"
        self._lost(conn, reason)

    def _handle_all(self, conn: Link, raws: list[bytes]) -> bool:
        """Act on the PDUs of one read; False when the connection is to end. Submit responses
        first (one lock for all), then the receipts: a receipt never reaches the engine before
        the result of a submit answered in the same read."""
        resps: list[tuple[int, int, str]] = []
        receipts: list[Receipt] = []
        going = True
        for raw in raws:
            _, cmd, status, seq = P.HEADER.unpack_from(raw)
            if cmd == P.QUERY_SM_RESP or (cmd == P.GENERIC_NACK and seq in self._queries):
                with self._cond:
                    known = self._queries.answer(cmd, status, seq, raw)
                if not known:
                    log.debug("query_sm_resp for unknown sequence %d", seq)
            elif cmd == P.SUBMIT_SM_RESP or cmd == P.GENERIC_NACK:
                resps.append((seq, status, P.message_id(raw)))
            elif cmd == P.DELIVER_SM:
                r = self._deliver_sm(conn, raw, seq)
                if r is not None:
                    receipts.append(r)
            elif going and not self._handle(conn, cmd, seq):
                going = False
        if resps:
            with self._cond:
                now = time.monotonic()
                for seq, status, message_id in resps:
                    self.win.answer(seq, status, message_id, now)
                if self.win.stopping:
                    self._cond.notify_all()  # wait_answers() waits for the window to empty
            self._pump(conn, reader=True)  # refill the window these answers freed, from this thread
            self._on_change()
        for r in receipts:
            self._on_receipt(r)
        return going

    def _handle(self, conn: Link, cmd: int, seq: int) -> bool:
        """Act on one PDU other than submit_sm_resp / deliver_sm; False when the connection is to end."""
        if cmd == P.ENQUIRE_LINK:
            conn.send(P.pdu(P.ENQUIRE_LINK_RESP, seq))
        elif cmd == P.ENQUIRE_LINK_RESP:
            with self._cond:
                self._enquire_sent = None
        elif cmd == P.UNBIND:
            log.info("%s asked to unbind", self.where)
            conn.send(P.pdu(P.UNBIND_RESP, seq))
            return False
        elif cmd == P.UNBIND_RESP:
            conn.unbound.set()
        elif not cmd & 0x80000000:
            conn.send(P.pdu(P.GENERIC_NACK, seq, P.ESME_RINVCMDID))
        else:
            log.debug("ignoring PDU 0x%08X seq %d", cmd, seq)
        return True

    def _deliver_sm(self, conn: Link, raw: bytes, seq: int) -> Receipt | None:
        """The receipt in a deliver_sm, or None (anything else is acknowledged here)."""
        try:
            pdu = P.parse_deliver_sm(raw)
        except ValueError as e:
            log.warning("unparsable deliver_sm seq %d acknowledged: %s", seq, e)
            conn.send(P.pdu(P.DELIVER_SM_RESP, seq, 0, b"\0"))
            return None
        esm = pdu.esm_class
        text = pdu.short_message.decode("latin-1")
        found = interpret(pdu.receipted_message_id, pdu.message_state, text) if esm & 0x3C else None
        if found is None:
            log.info("deliver_sm seq %d (esm_class 0x%02X) is not a delivery receipt: acknowledged, ignored",
                     seq, esm)
            conn.send(P.pdu(P.DELIVER_SM_RESP, seq, 0, b"\0"))
            return None
        ref, state, detail = found
        return Receipt(ref, state, detail, (self.index, conn.gen, seq), pdu.source_addr)

    def _lost(self, conn: Link, reason: str) -> None:
        with self._cond:
            if conn.closed:
                return
            was_current = self._conn is conn
            if was_current:
                self._conn = None
                self._last_life = time.monotonic() - conn.since
            open_jobs = self.win.lose(reason)
            self._queries.fail_all(f"connection lost: {reason}")
            conn.close()
            self._cond.notify_all()
        if was_current:
            lvl = logging.INFO if self._closed else logging.WARNING
            self.quiet.log(lvl, f"lost{self.index}:{reason}",
                           "SMSC connection closed (%s); %d open job(s) go back to the queue%s", reason,
                           open_jobs, self.label)
        conn.unbound.set()
        self._on_change()
