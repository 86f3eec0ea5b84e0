"""The milter protocol adapter: the only module that talks to the MTA's sockets.

python-libmilter parses the protocol; this module works around its known bugs
(FIELD-NOTES) and the costs around it, in one place:

- one event-loop thread serves every MTA connection (a thread per connection spent
  its time handing the GIL around); the messages that end in one loop iteration are
  committed together in one transaction (one fsync), and each reply goes out only
  after that commit;
- replies are buffered and written once per packet batch, TCP_NODELAY on every
  accepted socket, and TCP_QUICKACK after every read: headers and body are negotiated
  as "no reply", so nothing of ours would carry the ACK and Postfix's Nagle would wait
  ~40 ms a message for our delayed ACK;
- a custom reply is the SMFIR_REPLYCODE packet alone (never followed by a second
  REJECT, which Postfix would take as its answer to the next MAIL FROM);
- macros are collected per connection and per message (the library keeps the last);
- callbacks we do not need are negotiated away (HELO, DATA, unknown commands);
- an exception in a callback becomes 451 4.3.0, never a dropped connection;
- SIGTERM: stop accepting at once, let sessions in the middle of a message finish it,
  remove a unix socket on exit; `inet6:`/IPv6 addresses get a real IPv6 socket.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import libmilter as lm

from .gateway import Commit, Gateway, Message, Outcome
from .policy.refusal import INTERNAL_ERROR, Refusal
from .spool.base import AddRequest

log = logging.getLogger("sms_milter.adapter")

PROTOCOL_FLAGS = (
    lm.SMFIP_NOHELO | lm.SMFIP_NODATA | lm.SMFIP_NOUNKNOWN
    | lm.SMFIP_NR_CONN | lm.SMFIP_NR_MAIL | lm.SMFIP_NR_HDR | lm.SMFIP_NR_BODY
)
ACTIONS = lm.SMFIF_DELRCPT


_UINT32 = struct.Struct("!I")
# Commands whose macros we read: connect (client), MAIL/RCPT/end of message (queue id).
_MACROS_USED = frozenset((lm.SMFIC_CONNECT, lm.SMFIC_MAIL, lm.SMFIC_RCPT, lm.SMFIC_BODYEOB))
_NEGOTIATION = {kind: lm.optCBs[name] for kind, name in lm.protoMap.items()}
DEFERRED = lm.Deferred()  # "no reply now": libmilter sends nothing for it


@dataclass
class Pending:
    msg: Message
    commit: Commit
    request: AddRequest


def _packet(cmd: bytes, payload: bytes = b"") -> bytes:
    body = cmd + payload
    return lm.pack_uint32(len(body)) + body


def reply_packet(r: Refusal) -> bytes:
    """SMFIR_REPLYCODE alone is the whole answer (never a REJECT after it: the double reply).

    SMTP replies are ASCII: anything else in the text (say, an address written in UTF-8)
    goes out as backslash escapes rather than raw 8-bit bytes."""
    text = " ".join(r.text.split()).replace("%", "%%")
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return _packet(lm.SMFIR_REPLYCODE, f"{r.code} {r.xcode} {text}".encode() + b"\0")


def _addr(raw: bytes) -> str:
    first = raw.split(b"\0", 1)[0].strip()
    if first.startswith(b"<") and first.endswith(b">"):
        first = first[1:-1]
    return first.decode("utf-8", "replace")


def _decode(md: dict, key: bytes) -> str | None:
    v = md.get(key)
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else None


class MilterSession(lm.MilterProtocol):
    """One MTA connection (one SMTP session, possibly several messages)."""

    def __init__(self, gateway: Gateway, peer: str):
        super().__init__(opts=ACTIONS, protos=PROTOCOL_FLAGS)
        self.protos = PROTOCOL_FLAGS  # ignore the base class's per-callback defaults
        self.gateway = gateway
        self.peer = peer
        self.out: list[bytes] = []
        self.conn_macros: dict[bytes, bytes] = {}
        self.client_ip: str | None = None
        self.msg = Message()
        self.in_message = False
        self.pending: Pending | None = None
        self._inbuf = bytearray()
        # Set by the server: queue a commit (returns its request) / withdraw a queued one.
        self.commit: Callable[[Commit, MilterSession], AddRequest] | None = None
        self.withdraw: Callable[[AddRequest], bool] | None = None

    # libmilter calls send() for every reply: collect them, the loop writes them at once.
    def send(self, msg: bytes) -> None:
        self.out.append(msg)

    # libmilter's framing loop builds `%r` debug strings of every buffer and command list
    # (the body included) even with debugging off, and parses the macro packet of every
    # command; after the spool, it was the milter's largest cost. These two keep its
    # semantics (macro pairing, no-callback/no-reply negotiation, Deferred) and still use
    # its per-command parsers (_connect, _rcpt, _header, ...) and its negotiation.
    def dataReceived(self, buf: bytes) -> None:  # noqa: N802 (library name)
        inbuf = self._inbuf
        inbuf += buf
        cmds = []
        pos, end = 0, len(inbuf)
        while end - pos >= 4:
            size = _UINT32.unpack_from(inbuf, pos)[0]
            if end - pos - 4 < size:
                break
            cmds.append(bytes(inbuf[pos + 4:pos + 4 + size]))
            pos += 4 + size
        del inbuf[:pos]
        if cmds:
            self._procCmdAndData(cmds)

    def _procCmdAndData(self, cmds: list[bytes]) -> None:  # noqa: N802 (library name)
        for cmd in cmds:
            kind = cmd[:1]
            if kind == lm.SMFIC_MACRO:
                self._lastMacro = cmd
                continue
            if kind == lm.SMFIC_OPTNEG:
                self.send(self._negotiate(cmd))
                continue
            if kind == lm.SMFIC_ABORT:
                self._abort()
                continue
            if kind in (lm.SMFIC_QUIT, lm.SMFIC_QUIT_NC):
                self._close()
                continue
            handler = self._MACMAP.get(kind)
            if handler is None:
                raise lm.UnsupportedError(f"unsupported milter command {kind!r}")
            last = self._lastMacro
            macro = last if kind in _MACROS_USED and last is not None and last[1:2] == kind else None
            no_call, no_reply = _NEGOTIATION.get(kind, (0, 0))
            if self.protos & no_call:
                continue
            reply = handler(macro, [cmd])
            if self.protos & no_reply:
                continue
            if not isinstance(reply, lm.Deferred):
                self.send(reply or lm.CONTINUE)

    def log(self, msg: str) -> None:
        log.debug("libmilter: %s", msg)

    def _new_message(self) -> None:
        self.msg = Message(client_ip=self.client_ip)

    def _guard(self, what: str, fn: Callable[[], bytes | None], replies: bool = True) -> bytes | None:
        try:
            return fn()
        except Exception:
            log.exception("%s: internal error in %s", self.msg.queue_id or "NOQUEUE", what)
            if replies:
                self._new_message()
                return reply_packet(INTERNAL_ERROR)
            self.msg.failed = INTERNAL_ERROR
            return None

    def _macros(self, md: dict) -> None:
        qid = _decode(md, b"i")
        if qid:
            self.msg.queue_id = qid

    # -- callbacks -------------------------------------------------------------------------
    def connect(self, hostname: bytes, family: bytes, ip: bytes, port: int, md: dict) -> bytes:
        def run() -> None:
            self.conn_macros.update(md)
            addr = ip.decode("ascii", "replace") if family in (b"4", b"6") else None
            if addr and addr.lower().startswith("ipv6:"):
                addr = addr[5:]
            self.client_ip = addr or _decode(self.conn_macros, b"{client_addr}")
            self._new_message()
        self._guard("connect", run, replies=False)
        return lm.CONTINUE

    def mailFrom(self, frAddr: bytes, md: dict) -> bytes:  # noqa: N802 (library name)
        def run() -> None:
            self._new_message()
            self.in_message = True
            self.msg.sender = _addr(frAddr)
            self._macros(md)
        self._guard("MAIL FROM", run, replies=False)
        return lm.CONTINUE

    def rcpt(self, recip: bytes, md: dict) -> bytes:
        def run() -> bytes:
            self._macros(md)
            raw = recip.split(b"\0", 1)[0]
            refusal = self.gateway.rcpt(self.msg, raw, _addr(recip))
            return reply_packet(refusal) if refusal else lm.CONTINUE
        return self._guard("RCPT TO", run) or lm.CONTINUE

    def header(self, key: bytes, val: bytes, md: dict) -> None:
        def run() -> None:
            self._macros(md)
            if self.msg.sms:
                self.msg.headers.append((key, val))
                self.msg.size += len(key) + len(val) + 4  # "Key: value\r\n"
        self._guard("header", run, replies=False)

    def eoh(self, md: dict) -> bytes:
        self._macros(md)
        # Mail with no SMS recipient needs nothing more from us: let it go untouched.
        return lm.CONTINUE if self.msg.sms else lm.ACCEPT

    def body(self, chunk: bytes, md: dict) -> None:
        def run() -> None:
            self.msg.add_body(chunk, self.gateway.cfg.milter.max_message_bytes)
        self._guard("body", run, replies=False)

    def eob(self, md: dict) -> bytes | lm.Deferred:
        def run() -> bytes | lm.Deferred:
            self._macros(md)
            decided = self.gateway.decide(self.msg)
            if isinstance(decided, Outcome):
                return self._packets(decided)
            if self.commit is None:  # no event loop (tests, tools): wait here
                return self._packets(self.gateway.end_of_message(self.msg))
            self.pending = Pending(self.msg, decided, self.commit(decided, self))
            return DEFERRED  # the reply goes out when the spool has committed
        try:
            return self._guard("end of message", run) or lm.CONTINUE
        finally:
            self.in_message = self.pending is not None
            self._new_message()

    def _packets(self, outcome: Outcome) -> bytes:
        if outcome.refusal:
            return reply_packet(outcome.refusal)
        if outcome.discard:
            return lm.DISCARD
        return b"".join(_packet(lm.SMFIR_DELRCPT, raw + b"\0") for raw in outcome.delete) + lm.CONTINUE

    def committed(self) -> None:
        """The spool answered for the pending message: queue the final reply."""
        p, self.pending = self.pending, None
        self.in_message = False
        if p is None:
            return
        result = p.request.error if p.request.error is not None else p.request.result
        assert result is not None
        self.out.append(self._guard("end of message", lambda: self._packets(
            self.gateway.committed(p.msg, p.commit, result))) or lm.TEMPFAIL)

    def abort(self) -> None:
        # The MTA gave up on the message (its own timeout, or the client went away).
        # A commit still queued is withdrawn; one already made stays (a resend is
        # recognised by its idempotency key).
        if self.pending is not None and self.withdraw is not None:
            self.withdraw(self.pending.request)
        self.pending = None
        self.in_message = False
        self._new_message()

    def close(self) -> None:
        self.abort()


class _Conn:
    __slots__ = ("sock", "session", "outbuf", "last", "writing", "quickack")

    def __init__(self, sock: socket.socket, session: MilterSession):
        self.sock = sock
        self.session = session
        self.outbuf = bytearray()
        self.last = time.monotonic()
        self.writing = False
        self.quickack = sock.family != socket.AF_UNIX and hasattr(socket, "TCP_QUICKACK")


class Server:
    """All MTA connections in one thread around a selector, as Postfix itself works.

    A thread per connection spent most of its time handing the GIL around. Here one
    thread parses, decides and, once per loop iteration, commits every message that
    ended in it in one transaction, then writes their replies.
    """

    def __init__(self, spec: str, gateway: Gateway, idle_timeout: float = 1800.0,
                 stopping: threading.Event | None = None):
        self.spec = spec
        self.gateway = gateway
        self.spool = gateway.spool
        self.idle_timeout = idle_timeout
        self.stopping = stopping or threading.Event()
        self.sock = self._listen(spec)
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.to_commit: list[AddRequest] = []

    def _listen(self, spec: str) -> socket.socket:
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

    # -- commits ---------------------------------------------------------------------------------
    def _commit(self, commit: Commit, session: MilterSession) -> AddRequest:
        request = AddRequest(commit.key, commit.jobs, commit.key_ttl, commit.mails, context=session)
        self.to_commit.append(request)  # committed with the others at the end of this iteration
        return request

    def _withdraw(self, request: AddRequest) -> bool:
        if request in self.to_commit:
            self.to_commit.remove(request)
            return True
        return False

    def _commit_round(self) -> None:
        """One transaction for every message that ended in this loop iteration, then their replies."""
        batch, self.to_commit = self.to_commit, []
        self.spool.commit_now(batch)
        for request in batch:
            session = request.context
            assert isinstance(session, MilterSession)
            if session.pending is None or session.pending.request is not request:
                continue  # aborted or closed meanwhile: the MTA expects no answer
            session.committed()
            conn = self.conns.get(session.transport.fileno()) if session.transport else None
            if conn is not None:
                self._flush(conn)

    # -- the loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        log.info("listening on %s", self.spec)
        self.sel.register(self.sock, selectors.EVENT_READ, "listen")
        draining_until: float | None = None
        last_sweep = time.monotonic()
        try:
            while True:
                if self.stopping.is_set() and draining_until is None:
                    self.sel.unregister(self.sock)
                    self.sock.close()
                    draining_until = time.monotonic() + 30.0
                if draining_until is not None:
                    for c in [c for c in self.conns.values() if not c.session.in_message]:
                        self._close(c)  # idle between messages: close now
                    if not self.conns or time.monotonic() > draining_until:
                        break
                for key, mask in self.sel.select(0.2):
                    if key.data == "listen":
                        self._accept()
                    elif mask & selectors.EVENT_READ:
                        self._readable(key.data)
                    if isinstance(key.data, _Conn) and mask & selectors.EVENT_WRITE:
                        self._flush(key.data)
                if self.to_commit:
                    self._commit_round()
                now = time.monotonic()
                if now - last_sweep >= 0.1:
                    last_sweep = now
                    self._sweep(now)
        finally:
            for c in list(self.conns.values()):
                self._close(c)
            if draining_until is None:
                self.sock.close()
            if self.spec.startswith("unix:"):
                try:
                    os.unlink(self.spec[5:])
                except OSError:
                    pass
            self.sel.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = MilterSession(self.gateway, str(addr))
            session.transport = sock
            session.commit = self._commit
            session.withdraw = self._withdraw
            conn = _Conn(sock, session)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(lm.MILTER_CHUNK_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c.last = time.monotonic()
        try:
            c.session.dataReceived(data)
        except Exception:
            log.exception("protocol error from the MTA, closing the connection")
            c.session.out.append(lm.TEMPFAIL)
            self._flush(c)
            self._close(c)
            return
        if not c.session.out and c.quickack:
            # Headers and body need no reply, so nothing of ours carries the ACK; the
            # MTA's Nagle would then wait ~40 ms for our delayed ACK. (A reply carries it.)
            try:
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        self._flush(c)

    def _sweep(self, now: float) -> None:
        for c in list(self.conns.values()):
            if c.session.pending is None and now - c.last > self.idle_timeout:
                self._close(c)

    def _flush(self, c: _Conn) -> None:
        if c.session.out:
            c.outbuf += b"".join(c.session.out)
            c.session.out.clear()
        if c.outbuf:
            try:
                sent = c.sock.send(c.outbuf)
                del c.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(c)
                return
        want = bool(c.outbuf)
        if want != c.writing:
            c.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(c.sock, events, c)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            self.conns.pop(fd, None)
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.session.close()
        c.session.transport = None
        _shutdown(c.sock)

    def stop(self) -> None:
        self.stopping.set()


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass
