"""The milter's event loop: the only module that talks to the MTA's sockets.

One thread (epoll) serves every MTA connection; the protocol itself is `codec.py` (bytes
and packets) and `session.py` (one connection's conversation with the gateway), neither
of which knows a socket. Here:

- the messages that end close together are committed in one transaction (one fsync;
  see `Server`), and each reply goes out only after that commit; the commit never waits
  for the spool's lock (docs/decisions/0002);
- replies are written once per read, TCP_NODELAY on every accepted socket, and
  TCP_QUICKACK after every read we do not answer: headers and body are negotiated as
  "no reply", so nothing of ours would carry the ACK and Postfix's Nagle would wait
  ~40 ms a message for our delayed ACK;
- decisions that cost CPU run on worker threads and come back through a pipe;
- bytes that are no milter protocol get a TEMPFAIL and the connection is closed, and so
  does a packet left incomplete for PACKET_TIMEOUT;
- accept() out of file descriptors pauses the listening socket (`listener.py`), never a spin;
- SIGTERM: stop accepting at once, let sessions in the middle of a message finish it,
  remove a unix socket on exit; `inet6:`/IPv6 addresses get a real IPv6 socket.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .codec import TEMPFAIL, ProtocolError
from .gateway import Commit, Gateway, Message, Outcome
from .listener import EXHAUSTED, AcceptBackoff, listen, packet_timeout, unlink_unix
from .policy.refusal import INTERNAL_ERROR
from .session import MilterSession, reply_packet
from .spool.base import AddRequest, SpoolError

log = logging.getLogger("sms_milter.adapter")

# The longest a finished message's commit waits for messages still open on other
# connections to share its transaction (group commit, as PostgreSQL's commit_delay).
COMMIT_DELAY = 0.005
READ_SIZE = 65536
# Decisions that may take long (textsms@/xml@: password hashes, many R=; many recipients;
# a large body) run on these threads so that the event loop answers every other session.
DECIDE_WORKERS = 2
# The loop retries a commit that found the spool locked after this pause, doubling up to
# the maximum, until each message's deadline (milter.spool_timeout after its end).
RETRY_PAUSE, RETRY_PAUSE_MAX = 0.002, 0.05


class Connection:
    """One accepted MTA socket: its session and the server's state for it (what is left to
    write, when it last spoke). It is the session's CommitHost: it hands the session's
    commits and slow decisions to the server."""

    __slots__ = ("server", "sock", "session", "outbuf", "last", "writing", "quickack", "partial_since")

    def __init__(self, server: Server, sock: socket.socket, quickack: bool):
        self.server = server
        self.sock: socket.socket | None = sock
        self.session = MilterSession(server.gateway, self)
        self.outbuf = b""
        self.last = time.monotonic()
        self.writing = False  # EPOLLOUT registered: the socket's buffer was full
        self.quickack = quickack
        self.partial_since = 0.0  # monotonic: since when an incomplete packet waits; 0: none

    # CommitHost
    def commit(self, commit: Commit, session: MilterSession) -> AddRequest:
        return self.server._commit(commit, self)

    def withdraw(self, request: AddRequest) -> bool:
        return self.server._withdraw(request)

    def offload(self, session: MilterSession, msg: Message) -> None:
        self.server._offload(self, msg)


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
        self.sock = listen(spec)
        self.tcp = self.sock.family != socket.AF_UNIX
        self.poll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.to_commit: list[AddRequest] = []
        self.commit_delay = commit_delay
        self.commit_due = 0.0  # when the oldest queued commit must be made at the latest
        self.retry_pause = 0.0  # > 0 while the spool is locked by another process
        # Off-loop decisions: workers append (session, message, decision) and write a byte
        # to the pipe the loop polls; the loop answers them.
        self.workers: ThreadPoolExecutor | None = None
        self.decisions: deque[tuple[Connection, Message, Outcome | Commit]] = deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.packet_timeout = packet_timeout()
        self.backoff = AcceptBackoff()

    # -- commits ---------------------------------------------------------------------------------
    def _commit(self, commit: Commit, conn: Connection) -> AddRequest:
        request = AddRequest(commit.key, commit.jobs, commit.key_ttl, commit.mails, context=conn,
                             limits=commit.limits)
        request.deadline = conn.session.deadline
        if not self.to_commit:
            self.commit_due = time.monotonic() + self.commit_delay
        self.to_commit.append(request)
        return request

    # -- decisions off the loop -----------------------------------------------------------------
    def _offload(self, conn: Connection, msg: Message) -> None:
        if self.workers is None:
            self.workers = ThreadPoolExecutor(DECIDE_WORKERS, thread_name_prefix="decide")
        self.workers.submit(self._decide_off_loop, conn, msg)

    def _decide_off_loop(self, conn: Connection, msg: Message) -> None:
        try:
            decided: Outcome | Commit = self.gateway.decide(msg)
        except Exception:
            log.exception("%s: internal error while deciding", msg.queue_id or "NOQUEUE")
            decided = Outcome(refusal=INTERNAL_ERROR)
        self.decisions.append((conn, msg, decided))
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
            conn, msg, decided = self.decisions.popleft()
            session = conn.session
            if session.deciding is not msg:
                continue  # aborted or closed meanwhile: the MTA expects no answer
            try:
                session.decided(decided)
            except Exception:
                session._internal_error("end of message")
                session.out.append(reply_packet(INTERNAL_ERROR))
            if conn.sock is not None:
                self._flush(conn)

    def _withdraw(self, request: AddRequest) -> bool:
        if request in self.to_commit:
            self.to_commit.remove(request)
            return True
        return False

    def _others_busy(self) -> bool:
        """Is a message still open on a connection whose end has not been queued?"""
        for c in self.conns.values():
            s = c.session
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
            conn = request.context
            assert isinstance(conn, Connection)
            session = conn.session
            if session.pending is None or session.pending[2] is not request:
                continue  # aborted or closed meanwhile: the MTA expects no answer
            session.committed()
            if conn.sock is not None:
                self._flush(conn)

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
                    if not self.backoff.resume_at:
                        self.poll.unregister(listen_fd)
                    self.sock.close()
                    draining_until = time.monotonic() + 30.0
                if draining_until is not None:
                    for c in [c for c in conns.values() if not c.session.in_message]:
                        self._close(c)  # idle between messages: close now
                    if not conns or time.monotonic() > draining_until:
                        break
                timeout = 0.2
                if self.to_commit:
                    timeout = max(0.0, self.commit_due - time.monotonic())
                if self.backoff.resume_at:
                    timeout = min(timeout, max(0.0, self.backoff.resume_at - time.monotonic()))
                for fd, events in self.poll.poll(timeout):
                    if fd == listen_fd:
                        self._accept()
                        continue
                    if fd == self.wake_r:
                        self._take_decisions()
                        continue
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._readable(conn)
                    if events & select.EPOLLOUT and conn.sock is not None:
                        self._flush(conn)
                if self.to_commit and (time.monotonic() >= self.commit_due
                                       or (not self.retry_pause and not self._others_busy())):
                    self._commit_round()
                now = time.monotonic()
                if self.backoff.due(now):
                    self.backoff.resume_at = 0.0
                    if draining_until is None:
                        self.poll.register(listen_fd, select.EPOLLIN)
                if now - last_sweep >= 0.1:
                    last_sweep = now
                    self._sweep(now)
                    if self.on_tick is not None:
                        self.on_tick()
        finally:
            for c in list(conns.values()):
                self._close(c)
            if draining_until is None:
                self.sock.close()
            unlink_unix(self.spec)
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
                if e.errno in EXHAUSTED:
                    # The connection stays queued: polling on would spin. Pause (listener.py).
                    self.poll.unregister(self.sock.fileno())
                    self.backoff.exhausted(e, self.sock)
                else:
                    log.warning("accept failed: %s", e)
                return
            self.backoff.accepted()
            sock.setblocking(False)
            if self.tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = sock.fileno()
            self.conns[fd] = Connection(self, sock, self.tcp and hasattr(socket, "TCP_QUICKACK"))
            self.poll.register(fd, select.EPOLLIN)

    def _readable(self, c: Connection) -> None:
        sock = c.sock
        assert sock is not None
        try:
            data = sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c.last = now = time.monotonic()
        s = c.session
        try:
            s.feed(data)
            if s.framer.rest:
                c.partial_since = c.partial_since or now
            else:
                c.partial_since = 0.0
        except Exception as e:
            if isinstance(e, ProtocolError):
                log.warning("protocol error from the MTA (%s), closing the connection", e)
            else:
                log.exception("protocol error from the MTA, closing the connection")
            s.out.append(TEMPFAIL)
            self._flush(c)
            self._close(c)
            return
        replied = bool(s.out)
        if replied:
            self._flush(c)
        if s.closed:
            self._close(c)  # QUIT: no need to wait for the MTA to hang up
        elif not replied and c.quickack:
            # Headers and body need no reply, so nothing of ours carries the ACK; the
            # MTA's Nagle would then wait ~40 ms for our delayed ACK. (A reply carries it.)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def _sweep(self, now: float) -> None:
        for c in list(self.conns.values()):
            if c.partial_since and now - c.partial_since > self.packet_timeout:
                log.warning("a milter packet stayed incomplete for %.0f s (%d of its bytes came), "
                            "closing the connection", self.packet_timeout, len(c.session.framer.rest))
                c.session.out.append(TEMPFAIL)
                self._flush(c)
                self._close(c)
            elif c.session.pending is None and now - c.last > self.idle_timeout:
                self._close(c)

    def _flush(self, c: Connection) -> None:
        sock = c.sock
        if sock is None:
            return
        out = c.session.out
        if out:
            c.outbuf += out[0] if len(out) == 1 else b"".join(out)
            out.clear()
        if c.outbuf:
            try:
                sent = sock.send(c.outbuf)
                c.outbuf = c.outbuf[sent:]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(c)
                return
        want = bool(c.outbuf)
        if want != c.writing:
            c.writing = want
            self.poll.modify(sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if want else 0))

    def _close(self, c: Connection) -> None:
        sock, c.sock = c.sock, None
        c.session.close()
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
