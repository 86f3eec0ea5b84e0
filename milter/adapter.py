"""The milter protocol adapter: the only module that talks to the MTA's sockets.

python-libmilter parses the protocol; this module works around its known bugs
(FIELD-NOTES) in one place:

- replies are buffered and written once per packet batch (no Nagle/delayed-ACK stalls,
  no split end-of-message writes), with TCP_NODELAY on every accepted socket;
- a custom reply is the SMFIR_REPLYCODE packet alone (never followed by a second
  REJECT, which Postfix would take as its answer to the next MAIL FROM);
- macros are collected per connection and per message (the library keeps the last);
- callbacks that need no reply are negotiated as "no reply" (headers, body, connect),
  callbacks we do not need are negotiated away (HELO, DATA, unknown commands);
- an exception in a callback becomes 451 4.3.0, never a dropped connection;
- the accept loop notices SIGTERM within 0.2 s, open sessions finish their message,
  a unix socket is removed on exit; `inet6:`/IPv6 addresses get a real IPv6 socket.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable

import libmilter as lm

from .gateway import Gateway, Message
from .policy.refusal import INTERNAL_ERROR, Refusal

log = logging.getLogger("sms_milter.adapter")

PROTOCOL_FLAGS = (
    lm.SMFIP_NOHELO | lm.SMFIP_NODATA | lm.SMFIP_NOUNKNOWN
    | lm.SMFIP_NR_CONN | lm.SMFIP_NR_MAIL | lm.SMFIP_NR_HDR | lm.SMFIP_NR_BODY
)
ACTIONS = lm.SMFIF_DELRCPT


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

    # libmilter calls send() for every reply: collect them, the loop writes them at once.
    def send(self, msg: bytes) -> None:
        self.out.append(msg)

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

    def eob(self, md: dict) -> bytes:
        def run() -> bytes:
            self._macros(md)
            outcome = self.gateway.end_of_message(self.msg)
            if outcome.refusal:
                return reply_packet(outcome.refusal)
            if outcome.discard:
                return lm.DISCARD
            for raw in outcome.delete:
                self.out.append(_packet(lm.SMFIR_DELRCPT, raw + b"\0"))
            return lm.CONTINUE
        try:
            return self._guard("end of message", run) or lm.CONTINUE
        finally:
            self.in_message = False
            self._new_message()

    def abort(self) -> None:
        self.in_message = False
        self._new_message()

    def close(self) -> None:
        self.in_message = False


class Server:
    """Accepts MTA connections, one thread each; stops promptly on request."""

    def __init__(self, spec: str, gateway: Gateway, idle_timeout: float = 1800.0,
                 stopping: threading.Event | None = None):
        self.spec = spec
        self.gateway = gateway
        self.idle_timeout = idle_timeout
        self.stopping = stopping or threading.Event()
        self.sessions: dict[int, tuple[socket.socket, MilterSession]] = {}
        self.lock = threading.Lock()
        self.sock = self._listen(spec)

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
        s.settimeout(0.2)
        return s

    def serve(self) -> None:
        log.info("listening on %s", self.spec)
        try:
            while not self.stopping.is_set():
                try:
                    conn, addr = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError as e:
                    if self.stopping.is_set():
                        break
                    log.warning("accept failed: %s", e)
                    time.sleep(0.05)
                    continue
                t = threading.Thread(target=self._session, args=(conn, str(addr)), daemon=True)
                t.start()
        finally:
            self.sock.close()
            if self.spec.startswith("unix:"):
                try:
                    os.unlink(self.spec[5:])
                except OSError:
                    pass
        self._drain()

    def _drain(self, limit: float = 30.0) -> None:
        """Let sessions in the middle of a message finish it; close idle ones."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self.lock:
                busy = [s for s in self.sessions.values() if s[1].in_message]
                idle = [s for s in self.sessions.values() if not s[1].in_message]
            for conn, _ in idle:
                _shutdown(conn)
            if not busy:
                break
            time.sleep(0.05)
        with self.lock:
            for conn, _ in self.sessions.values():
                _shutdown(conn)

    def _session(self, conn: socket.socket, peer: str) -> None:
        quickack = conn.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_QUICKACK")
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.idle_timeout)
        session = MilterSession(self.gateway, peer)
        session.transport = conn
        with self.lock:
            self.sessions[id(session)] = (conn, session)
        try:
            while True:
                try:
                    data = conn.recv(lm.MILTER_CHUNK_SIZE)
                    if quickack:
                        # Headers and body need no reply, so nothing of ours carries the ACK;
                        # the MTA's Nagle would then wait ~40 ms for our delayed ACK.
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                except OSError:
                    break
                if not data:
                    break
                try:
                    session.dataReceived(data)
                except Exception:
                    log.exception("protocol error from the MTA, closing the connection")
                    session.out.append(lm.TEMPFAIL)
                    _flush(conn, session)
                    break
                if not _flush(conn, session):
                    break
        finally:
            with self.lock:
                self.sessions.pop(id(session), None)
            session.in_message = False
            _shutdown(conn)

    def stop(self) -> None:
        self.stopping.set()


def _flush(conn: socket.socket, session: MilterSession) -> bool:
    if not session.out:
        return True
    data = b"".join(session.out)
    session.out.clear()
    try:
        conn.sendall(data)
        return True
    except OSError:
        return False


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass
