"""The milter protocol adapter: the only module that talks to the MTA's sockets.

The milter protocol (version 6, as Postfix and Sendmail speak it) is parsed here:
python-libmilter's constants name the commands, but its session object and per-command
parsers are not used. Profiled on the milter_path benchmark they were the largest part of
the milter's CPU time per message (an object of some thirty attributes per connection,
every macro packet turned into a dict, debug strings built for every packet); this
module does only what the gateway needs and keeps the library's fixes listed in
FIELD-NOTES:

- one event-loop thread (epoll) serves every MTA connection; the messages that end
  close together are committed in one transaction (one fsync; see `Server`), and each
  reply goes out only after that commit;
- replies are written once per read, TCP_NODELAY on every accepted socket, and
  TCP_QUICKACK after every read we do not answer: headers and body are negotiated as
  "no reply", so nothing of ours would carry the ACK and Postfix's Nagle would wait
  ~40 ms a message for our delayed ACK;
- a custom reply is the SMFIR_REPLYCODE packet alone (never followed by a second
  REJECT, which Postfix would take as its answer to the next MAIL FROM);
- macros are read per command (connect: the client; MAIL, RCPT, end of message: the
  queue id), never carried over from another stage;
- callbacks we do not need are negotiated away (HELO, DATA, unknown commands), and an
  MTA that sends them anyway gets CONTINUE;
- an exception in the gateway becomes 451 4.3.0, never a dropped connection; bytes that
  are no milter protocol get a TEMPFAIL and the connection is closed;
- SIGTERM: stop accepting at once, let sessions in the middle of a message finish it,
  remove a unix socket on exit; `inet6:`/IPv6 addresses get a real IPv6 socket.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import libmilter as lm

from . import metrics
from .gateway import Commit, Gateway, Message, Outcome
from .policy import catalogue as replies
from .policy.refusal import INTERNAL_ERROR, Refusal
from .spool.base import AddRequest, SpoolError

log = logging.getLogger("sms_milter.adapter")

PROTOCOL_FLAGS = (
    lm.SMFIP_NOHELO | lm.SMFIP_NODATA | lm.SMFIP_NOUNKNOWN
    | lm.SMFIP_NR_CONN | lm.SMFIP_NR_MAIL | lm.SMFIP_NR_HDR | lm.SMFIP_NR_BODY
)
ACTIONS = lm.SMFIF_DELRCPT
# The longest a finished message's commit waits for messages still open on other
# connections to share its transaction (group commit, as PostgreSQL's commit_delay).
COMMIT_DELAY = 0.005
# A packet longer than this is no milter protocol (Postfix's body chunks are < 64 KB).
MAX_PACKET = 1 << 20
READ_SIZE = 65536
# Decisions that may take long (textsms@/xml@: password hashes, many R=; many recipients;
# a large body) run on these threads so that the event loop answers every other session.
DECIDE_WORKERS = 2
# The loop retries a commit that found the spool locked after this pause, doubling up to
# the maximum, until each message's deadline (milter.spool_timeout after its end).
RETRY_PAUSE, RETRY_PAUSE_MAX = 0.002, 0.05
TOO_SLOW = replies.TOO_SLOW()

_UINT32 = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")
CONTINUE, ACCEPT, DISCARD, TEMPFAIL = lm.CONTINUE, lm.ACCEPT, lm.DISCARD, lm.TEMPFAIL
# Commands we negotiated away: the flag that says "not sent", the one that says "no reply".
_OPTIONAL = {lm.SMFIC_HELO: (lm.SMFIP_NOHELO, lm.SMFIP_NR_HELO),
             lm.SMFIC_DATA: (lm.SMFIP_NODATA, lm.SMFIP_NR_DATA),
             lm.SMFIC_UNKNOWN: (lm.SMFIP_NOUNKNOWN, lm.SMFIP_NR_UNKN)}


class ProtocolError(Exception):
    """The MTA sent something that is not the milter protocol."""


def _packet(cmd: bytes, payload: bytes = b"") -> bytes:
    return _UINT32.pack(len(cmd) + len(payload)) + cmd + payload


def reply_packet(r: Refusal) -> bytes:
    """SMFIR_REPLYCODE alone is the whole answer (never a REJECT after it: the double reply).

    SMTP replies are ASCII: anything else in the text (say, an address written in UTF-8)
    goes out as backslash escapes rather than raw 8-bit bytes."""
    metrics.decision(r)  # every refusal the MTA hears passes here (RCPT and end of message)
    text = " ".join(r.text.split()).replace("%", "%%")
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return _packet(lm.SMFIR_REPLYCODE, f"{r.code} {r.xcode} {text}".encode() + b"\0")


def macros(packet: bytes) -> dict[bytes, bytes]:
    """A macro packet (`D`, stage, name NUL value NUL ...) as {name: value}, braces dropped."""
    items = packet[2:].split(b"\0")
    return {items[i].strip(b"{}"): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _addr(raw: bytes) -> str:
    first = raw.split(b"\0", 1)[0].strip()
    if first.startswith(b"<") and first.endswith(b">"):
        first = first[1:-1]
    return first.decode("utf-8", "replace")


class MilterSession:
    """One MTA connection (one SMTP session, possibly several messages).

    `feed()` takes the bytes the MTA sent and leaves our replies in `out`; the server does
    the socket work. A message's end is answered at once (refusal, nothing to do) or,
    when the spool must commit first, through `commit` and later `committed()`.
    """

    __slots__ = ("gateway", "out", "rest", "protos", "macro", "client_ip", "msg", "in_message",
                 "pending", "commit", "withdraw", "closed", "sock", "outbuf", "last", "writing",
                 "quickack", "deciding", "offload", "deadline", "ended")

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.out: list[bytes] = []
        self.rest = b""  # an incomplete packet from the last read
        self.protos = PROTOCOL_FLAGS  # narrowed to what the MTA offers at negotiation
        self.macro = b""  # the last macro packet; it belongs to the command that follows it
        self.client_ip: str | None = None
        self.msg = Message()
        self.in_message = False  # between MAIL FROM and our answer to its end
        # (msg, commit, request) while the spool commits the ended message
        self.pending: tuple[Message, Commit, AddRequest] | None = None
        # Set by the server: queue a commit (returns its request) / withdraw a queued one.
        self.commit: Callable[[Commit, MilterSession], AddRequest] | None = None
        self.withdraw: Callable[[AddRequest], bool] | None = None
        # Set by the server: decide this message on a worker thread (the answer comes later).
        self.offload: Callable[[MilterSession, Message], None] | None = None
        self.deciding: Message | None = None  # being decided off the loop
        self.deadline = 0.0  # monotonic: the ended message is answered 451 if not done by then
        self.closed = False
        # The server's per-connection state.
        self.sock: socket.socket | None = None
        self.outbuf = b""
        self.last = 0.0
        self.writing = False
        self.quickack = False
        self.ended = 0.0  # when the message's end came (metrics: SMTP end -> commit)

    def feed(self, data: bytes) -> None:
        """Handle every whole packet in what was read; keep an incomplete one for the next read."""
        if self.rest:
            data = self.rest + data
        pos, end = 0, len(data)
        while end - pos >= 4:
            size = _UINT32.unpack_from(data, pos)[0]
            if not 0 < size <= MAX_PACKET:
                raise ProtocolError(f"a packet of {size} bytes")
            stop = pos + 4 + size
            if stop > end:
                break
            self.command(data[pos + 4:stop])
            pos = stop
        self.rest = data[pos:]

    def command(self, cmd: bytes) -> None:
        handler = _HANDLERS.get(cmd[:1])
        if handler is None:
            self._optional(cmd)
            return
        handler(self, cmd)

    def _stage_macros(self, stage: bytes) -> dict[bytes, bytes]:
        m = self.macro
        self.macro = b""
        return macros(m) if m[1:2] == stage else {}

    def _queue_id(self, md: dict[bytes, bytes]) -> None:
        qid = md.get(b"i")
        if qid:
            self.msg.queue_id = qid.decode("ascii", "replace")

    def _internal_error(self, what: str) -> None:
        log.exception("%s: internal error in %s", self.msg.queue_id or "NOQUEUE", what)

    # -- the commands --------------------------------------------------------------------
    def _on_macro(self, cmd: bytes) -> None:
        self.macro = cmd

    def _on_optneg(self, cmd: bytes) -> None:
        if len(cmd) < 13:
            raise ProtocolError("a short option negotiation")
        version, actions, protos = _OPTNEG.unpack_from(cmd, 1)
        self.protos = PROTOCOL_FLAGS & protos
        self.out.append(_packet(lm.SMFIC_OPTNEG, _OPTNEG.pack(version, ACTIONS & actions, self.protos)))

    def _on_connect(self, cmd: bytes) -> None:
        md = self._stage_macros(lm.SMFIC_CONNECT)
        try:
            _host, _, rest = cmd[1:].partition(b"\0")
            family = rest[:1]
            addr = rest[3:].split(b"\0", 1)[0].decode("ascii", "replace") if family in (b"4", b"6") else ""
            if addr.lower().startswith("ipv6:"):
                addr = addr[5:]
            client = md.get(b"client_addr")
            self.client_ip = addr or (client.decode("ascii", "replace") if client else None)
        except Exception:
            self._internal_error("connect")
        if not self.protos & lm.SMFIP_NR_CONN:
            self.out.append(CONTINUE)

    def _on_mail(self, cmd: bytes) -> None:
        md = self._stage_macros(lm.SMFIC_MAIL)
        self.msg = msg = Message(client_ip=self.client_ip)
        self.in_message = True
        try:
            self._queue_id(md)
            msg.sender = _addr(md.get(b"mail_addr") or cmd[1:])
            login = md.get(b"auth_authen")  # SMTP AUTH login: limits' smtp_auth (milter_mail_macros)
            msg.auth_login = login.decode("utf-8", "replace") if login else None
        except Exception:
            self._internal_error("MAIL FROM")
            msg.failed = INTERNAL_ERROR
        if not self.protos & lm.SMFIP_NR_MAIL:
            self.out.append(CONTINUE)

    def _on_rcpt(self, cmd: bytes) -> None:
        md = self._stage_macros(lm.SMFIC_RCPT)
        try:
            self._queue_id(md)
            raw = cmd[1:].split(b"\0", 1)[0]
            refusal = self.gateway.rcpt(self.msg, raw, _addr(raw))
            self.out.append(reply_packet(refusal) if refusal else CONTINUE)
        except Exception:
            self._internal_error("RCPT TO")
            self.out.append(reply_packet(INTERNAL_ERROR))

    def _on_header(self, cmd: bytes) -> None:
        msg = self.msg
        if msg.sms:
            key, _, rest = cmd[1:].partition(b"\0")
            # The value is everything up to the packet's final NUL: a NUL inside it (the MTA
            # passes one on) is kept, and made safe later like any other unsafe byte; cutting
            # the value there made distinct Message-IDs collide (one mail taken for a resend).
            val = rest[:-1] if rest.endswith(b"\0") else rest
            msg.headers.append((key, val))
            msg.size += len(key) + len(val) + 4  # "Key: value\r\n"
        if not self.protos & lm.SMFIP_NR_HDR:
            self.out.append(CONTINUE)

    def _on_eoh(self, cmd: bytes) -> None:
        self.macro = b""
        # Mail with no SMS recipient needs nothing more from us: let it go untouched.
        self.out.append(CONTINUE if self.msg.sms else ACCEPT)

    def _on_body(self, cmd: bytes) -> None:
        msg = self.msg
        if msg.sms:
            msg.add_body(cmd[1:], self.gateway.cfg.milter.max_message_bytes)
        if not self.protos & lm.SMFIP_NR_BODY:
            self.out.append(CONTINUE)

    def _on_eob(self, cmd: bytes) -> None:
        md = self._stage_macros(lm.SMFIC_BODYEOB)
        msg = self.msg
        self.in_message = False
        # Whatever happens, this message is answered by then (and never committed later).
        self.deadline = time.monotonic() + self.gateway.cfg.milter.spool_timeout
        self.ended = time.monotonic()
        try:
            self._queue_id(md)
            if self.offload is not None and self.gateway.slow(msg):
                self.deciding = msg
                self.in_message = True  # the answer goes out when a worker has decided
                self.offload(self, msg)
                return
            self.decided(self.gateway.decide(msg))
        except Exception:
            self.deciding = None
            self.in_message = False
            self._internal_error("end of message")
            self.out.append(reply_packet(INTERNAL_ERROR))

    def decided(self, decided: Outcome | Commit) -> None:
        """The gateway decided the ended message: answer it, or hand its commit over."""
        self.deciding = None
        self.in_message = False
        if isinstance(decided, Outcome):
            self.out.append(self._packets(decided))
        elif time.monotonic() >= self.deadline:  # decided too late: the client hears 451, no job
            log.warning("%s: decided after the deadline, answering 451 without a commit",
                        self.msg.queue_id or "NOQUEUE")
            self.out.append(reply_packet(TOO_SLOW))
        elif self.commit is None:  # no event loop (tests, tools): commit and wait here
            self.out.append(self._packets(self.gateway.commit_and_wait(self.msg, decided)))
        else:
            self.pending = (self.msg, decided, self.commit(decided, self))
            self.in_message = True  # the answer goes out when the spool has committed

    def _on_abort(self, cmd: bytes) -> None:
        self.abort()

    def _on_quit(self, cmd: bytes) -> None:
        self.close()

    def _on_quit_nc(self, cmd: bytes) -> None:
        # A new SMTP session on the same connection: forget this one's client.
        self.abort()
        self.client_ip = None

    def _optional(self, cmd: bytes) -> None:
        """HELO, DATA, unknown SMTP commands: negotiated away, CONTINUE if they come anyway."""
        flags = _OPTIONAL.get(cmd[:1])
        if flags is None:
            raise ProtocolError(f"unknown milter command {cmd[:1]!r}")
        self.macro = b""
        no_call, no_reply = flags
        if not self.protos & (no_call | no_reply):
            self.out.append(CONTINUE)

    # -- answers -----------------------------------------------------------------------------
    def _packets(self, outcome: Outcome) -> bytes:
        if outcome.refusal:
            return reply_packet(outcome.refusal)
        metrics.decision(None)  # accepted: the jobs are committed
        if outcome.discard:
            return DISCARD
        return b"".join(_packet(lm.SMFIR_DELRCPT, raw + b"\0") for raw in outcome.delete) + CONTINUE

    def committed(self) -> None:
        """The spool answered for the pending message: queue the final reply."""
        p, self.pending = self.pending, None
        self.in_message = False
        if p is None:
            return
        msg, commit, request = p
        result = request.error if request.error is not None else request.result
        assert result is not None
        if request.error is None:
            metrics.SMTP_TO_COMMIT.observe(time.monotonic() - self.ended)
        try:
            self.out.append(self._packets(self.gateway.committed(msg, commit, result)))
        except Exception:
            self._internal_error("end of message")
            self.out.append(TEMPFAIL)

    def abort(self) -> None:
        # The MTA gave up on the message (its own timeout, or the client went away).
        # A commit still queued is withdrawn; one already made stays (a resend is
        # recognised by its idempotency key). A decision still running is dropped.
        if self.pending is not None and self.withdraw is not None:
            self.withdraw(self.pending[2])
        self.pending = None
        self.deciding = None
        self.in_message = False
        self.macro = b""

    def close(self) -> None:
        self.abort()
        self.closed = True


_HANDLERS: dict[bytes, Callable[[MilterSession, bytes], None]] = {
    lm.SMFIC_MACRO: MilterSession._on_macro,
    lm.SMFIC_HEADER: MilterSession._on_header,
    lm.SMFIC_BODY: MilterSession._on_body,
    lm.SMFIC_RCPT: MilterSession._on_rcpt,
    lm.SMFIC_MAIL: MilterSession._on_mail,
    lm.SMFIC_EOH: MilterSession._on_eoh,
    lm.SMFIC_BODYEOB: MilterSession._on_eob,
    lm.SMFIC_CONNECT: MilterSession._on_connect,
    lm.SMFIC_OPTNEG: MilterSession._on_optneg,
    lm.SMFIC_ABORT: MilterSession._on_abort,
    lm.SMFIC_QUIT: MilterSession._on_quit,
    lm.SMFIC_QUIT_NC: MilterSession._on_quit_nc,
}


class Server:
    """All MTA connections in one thread around epoll, as Postfix itself works.

    A thread per connection spent most of its time handing the GIL around. Here one
    thread parses and decides; a message whose end needs a spool commit waits up to
    `commit_delay` for messages still open on other connections, so that one
    transaction (one fsync) serves them all, then the replies go out. A lone message is
    committed at once. Measured on the milter_path benchmark (20 sessions, A/B in one
    run): no delay 0.53 ms CPU a message and 1-2 messages a commit; 2 ms 0.48; 5 ms
    0.43, about 7 messages a commit.
    """

    def __init__(self, spec: str, gateway: Gateway, idle_timeout: float = 1800.0,
                 stopping: threading.Event | None = None, commit_delay: float = COMMIT_DELAY):
        self.spec = spec
        self.gateway = gateway
        self.spool = gateway.spool
        self.idle_timeout = idle_timeout
        self.stopping = stopping or threading.Event()
        # Called from the loop at least every 0.2 s (systemd watchdog, reload, status).
        self.on_tick: Callable[[], None] | None = None
        self.sock = self._listen(spec)
        self.tcp = self.sock.family != socket.AF_UNIX
        self.poll = select.epoll()
        self.conns: dict[int, MilterSession] = {}
        self.to_commit: list[AddRequest] = []
        self.commit_delay = commit_delay
        self.commit_due = 0.0  # when the oldest queued commit must be made at the latest
        self.retry_pause = 0.0  # > 0 while the spool is locked by another process
        # Off-loop decisions: workers append (session, message, decision) and write a byte
        # to the pipe the loop polls; the loop answers them.
        self.workers: ThreadPoolExecutor | None = None
        self.decisions: deque[tuple[MilterSession, Message, Outcome | Commit]] = deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

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
        request = AddRequest(commit.key, commit.jobs, commit.key_ttl, commit.mails, context=session,
                             limits=commit.limits)
        request.deadline = session.deadline
        if not self.to_commit:
            self.commit_due = time.monotonic() + self.commit_delay
        self.to_commit.append(request)
        return request

    # -- decisions off the loop -----------------------------------------------------------------
    def _offload(self, session: MilterSession, msg: Message) -> None:
        if self.workers is None:
            self.workers = ThreadPoolExecutor(DECIDE_WORKERS, thread_name_prefix="decide")
        self.workers.submit(self._decide_off_loop, session, msg)

    def _decide_off_loop(self, session: MilterSession, msg: Message) -> None:
        try:
            decided: Outcome | Commit = self.gateway.decide(msg)
        except Exception:
            log.exception("%s: internal error while deciding", msg.queue_id or "NOQUEUE")
            decided = Outcome(refusal=INTERNAL_ERROR)
        self.decisions.append((session, msg, decided))
        try:
            os.write(self.wake_w, b"d")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def _take_decisions(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.decisions:
            session, msg, decided = self.decisions.popleft()
            if session.deciding is not msg:
                continue  # aborted or closed meanwhile: the MTA expects no answer
            try:
                session.decided(decided)
            except Exception:
                session._internal_error("end of message")
                session.out.append(reply_packet(INTERNAL_ERROR))
            if session.sock is not None:
                self._flush(session)

    def _withdraw(self, request: AddRequest) -> bool:
        if request in self.to_commit:
            self.to_commit.remove(request)
            return True
        return False

    def _others_busy(self) -> bool:
        """Is a message still open on a connection whose end has not been queued?"""
        for s in self.conns.values():
            if s.in_message and s.pending is None and s.deciding is None:
                return True
        return False

    def _commit_round(self) -> None:
        """One transaction for every queued message, then their replies.

        The loop never waits for the spool's lock: if another process holds it, the batch
        stays queued and is tried again after a short pause (doubling up to RETRY_PAUSE_MAX);
        a message whose deadline passes meanwhile is answered 451 and never committed."""
        now = time.monotonic()
        late = [r for r in self.to_commit if now >= r.deadline]
        if late:
            self.to_commit = [r for r in self.to_commit if now < r.deadline]
            err = SpoolError("the spool stayed locked by another process until the message's deadline "
                             "(milter.spool_timeout)")
            for r in late:
                r.error = err
            self._answer(late)
        if not self.to_commit:
            self.retry_pause = 0.0
            return
        if not self.spool.try_commit(self.to_commit):
            if not self.retry_pause:
                log.warning("the spool is locked by another process; retrying until each message's "
                            "deadline")
            self.retry_pause = min(self.retry_pause * 2 or RETRY_PAUSE, RETRY_PAUSE_MAX)
            self.commit_due = now + self.retry_pause
            return
        self.retry_pause = 0.0
        batch, self.to_commit = self.to_commit, []
        self._answer(batch)

    def _answer(self, batch: list[AddRequest]) -> None:
        for request in batch:
            session = request.context
            assert isinstance(session, MilterSession)
            if session.pending is None or session.pending[2] is not request:
                continue  # aborted or closed meanwhile: the MTA expects no answer
            session.committed()
            if session.sock is not None:
                self._flush(session)

    # -- the loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        log.info("listening on %s", self.spec)
        listen_fd = self.sock.fileno()
        self.poll.register(listen_fd, select.EPOLLIN)
        self.poll.register(self.wake_r, select.EPOLLIN)
        draining_until: float | None = None
        last_sweep = time.monotonic()
        conns = self.conns
        try:
            while True:
                if self.stopping.is_set() and draining_until is None:
                    self.poll.unregister(listen_fd)
                    self.sock.close()
                    draining_until = time.monotonic() + 30.0
                if draining_until is not None:
                    for s in [s for s in conns.values() if not s.in_message]:
                        self._close(s)  # idle between messages: close now
                    if not conns or time.monotonic() > draining_until:
                        break
                timeout = 0.2
                if self.to_commit:
                    timeout = max(0.0, self.commit_due - time.monotonic())
                for fd, events in self.poll.poll(timeout):
                    if fd == listen_fd:
                        self._accept()
                        continue
                    if fd == self.wake_r:
                        self._take_decisions()
                        continue
                    session = conns.get(fd)
                    if session is None:
                        continue
                    if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._readable(session)
                    if events & select.EPOLLOUT and session.sock is not None:
                        self._flush(session)
                if self.to_commit and (time.monotonic() >= self.commit_due
                                       or (not self.retry_pause and not self._others_busy())):
                    self._commit_round()
                now = time.monotonic()
                if now - last_sweep >= 0.1:
                    last_sweep = now
                    self._sweep(now)
                    if self.on_tick is not None:
                        self.on_tick()
        finally:
            for s in list(conns.values()):
                self._close(s)
            if draining_until is None:
                self.sock.close()
            if self.spec.startswith("unix:"):
                try:
                    os.unlink(self.spec[5:])
                except OSError:
                    pass
            self.poll.close()
            if self.workers is not None:
                self.workers.shutdown(wait=False, cancel_futures=True)
            os.close(self.wake_r)
            os.close(self.wake_w)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            sock.setblocking(False)
            if self.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = MilterSession(self.gateway)
            session.sock = sock
            session.last = time.monotonic()
            session.quickack = self.tcp and hasattr(socket, "TCP_QUICKACK")
            session.commit = self._commit
            session.withdraw = self._withdraw
            session.offload = self._offload
            fd = sock.fileno()
            self.conns[fd] = session
            self.poll.register(fd, select.EPOLLIN)

    def _readable(self, s: MilterSession) -> None:
        sock = s.sock
        assert sock is not None
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(s)
            return
        s.last = time.monotonic()
        try:
            s.feed(data)
        except Exception as e:
            if isinstance(e, ProtocolError):
                log.warning("protocol error from the MTA (%s), closing the connection", e)
            else:
                log.exception("protocol error from the MTA, closing the connection")
            s.out.append(TEMPFAIL)
            self._flush(s)
            self._close(s)
            return
        replied = bool(s.out)
        if replied:
            self._flush(s)
        if s.closed:
            self._close(s)  # QUIT: no need to wait for the MTA to hang up
        elif not replied and s.quickack:
            # Headers and body need no reply, so nothing of ours carries the ACK; the
            # MTA's Nagle would then wait ~40 ms for our delayed ACK. (A reply carries it.)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def _sweep(self, now: float) -> None:
        for s in list(self.conns.values()):
            if s.pending is None and now - s.last > self.idle_timeout:
                self._close(s)

    def _flush(self, s: MilterSession) -> None:
        sock = s.sock
        if sock is None:
            return
        if s.out:
            s.outbuf += s.out[0] if len(s.out) == 1 else b"".join(s.out)
            s.out.clear()
        if s.outbuf:
            try:
                sent = sock.send(s.outbuf)
                s.outbuf = s.outbuf[sent:]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(s)
                return
        want = bool(s.outbuf)
        if want != s.writing:
            s.writing = want
            self.poll.modify(sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if want else 0))

    def _close(self, s: MilterSession) -> None:
        sock, s.sock = s.sock, None
        s.close()
        if sock is None:
            return
        self.conns.pop(sock.fileno(), None)
        # close() alone: it also takes the socket out of the epoll set (nothing else holds
        # the descriptor), and the FIN is the same as after a shutdown().
        try:
            sock.close()
        except OSError:
            pass

    def stop(self) -> None:
        self.stopping.set()
