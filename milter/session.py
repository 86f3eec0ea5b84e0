"""One MTA connection's milter conversation: commands in, replies out, decisions by the gateway.

`MilterSession.feed()` takes the bytes the MTA sent and leaves our replies in `out`; it
knows no socket (the server in `adapter.py` does the socket work and owns the
connection's socket state). A message's end is answered at once (refusal, nothing to
do) or, when the spool must commit first, through the host's `commit` and later
`committed()`. Without a host (tests, tools) the commit is made and waited for here.

What this keeps of python-libmilter's known bugs fixed (FIELD-NOTES):
- a custom reply is the SMFIR_REPLYCODE packet alone (never followed by a second
  REJECT, which Postfix would take as its answer to the next MAIL FROM);
- macros are read per command (connect: the client; MAIL, RCPT, end of message: the
  queue id), never carried over from another stage;
- callbacks we do not need are negotiated away (HELO, DATA, unknown commands), and an
  MTA that sends them anyway gets CONTINUE;
- an exception in the gateway becomes 451 4.3.0, never a dropped connection; bytes that
  are no milter protocol raise ProtocolError (the server answers TEMPFAIL and closes).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import libmilter as lm

from . import codec, metrics
from .codec import ACCEPT, CONTINUE, DISCARD, PROTOCOL_FLAGS, TEMPFAIL, ProtocolError
from .gateway import Commit, Gateway, Message, Outcome
from .policy import catalogue as replies
from .policy.refusal import INTERNAL_ERROR, Refusal
from .spool.base import AddRequest

__all__ = ["PROTOCOL_FLAGS", "TOO_SLOW", "CommitHost", "MilterSession", "ProtocolError", "reply_packet"]

log = logging.getLogger("sms_milter.adapter")

TOO_SLOW = replies.TOO_SLOW()


def reply_packet(r: Refusal) -> bytes:
    """The refusal as the MTA hears it (see codec.reply_text_packet), counted in the metrics:
    every refusal the MTA hears passes here (RCPT and end of message)."""
    metrics.decision(r)
    return codec.reply_text_packet(r.code, r.xcode, r.text)


class CommitHost(Protocol):
    """What a session needs of the event loop that serves it (adapter.Connection)."""

    def commit(self, commit: Commit, session: MilterSession) -> AddRequest:
        """Queue the ended message's commit; `committed()` is called once it is made."""

    def withdraw(self, request: AddRequest) -> bool:
        """Take a queued commit back (the MTA aborted the message)."""

    def offload(self, session: MilterSession, msg: Message) -> None:
        """Decide the message off the loop; `decided()` is called with the result."""


class MilterSession:
    """One MTA connection (one SMTP session, possibly several messages)."""

    __slots__ = ("gateway", "host", "out", "framer", "protos", "macro", "client_ip", "msg", "in_message",
                 "pending", "closed", "deciding", "deadline", "ended", "_handle", "negotiated", "msg_open")

    def __init__(self, gateway: Gateway, host: CommitHost | None = None):
        self.gateway = gateway
        self.host = host  # None: commits are made and waited for in decided()
        self.out: list[bytes] = []
        self.framer = codec.Framer()
        self.protos = PROTOCOL_FLAGS  # narrowed to what the MTA offers at negotiation
        self.macro = b""  # the last macro packet; it belongs to the command that follows it
        self.client_ip: str | None = None
        self.msg = Message()
        self.in_message = False  # between MAIL FROM and our answer to its end
        # (msg, commit, request) while the spool commits the ended message
        self.pending: tuple[Message, Commit, AddRequest] | None = None
        self.deciding: Message | None = None  # being decided off the loop
        self.deadline = 0.0  # monotonic: the ended message is answered 451 if not done by then
        self.ended = 0.0  # when the message's end came (metrics: SMTP end -> commit)
        self.closed = False
        self.negotiated = False  # the MTA's option negotiation came: commands may follow
        self.msg_open = False  # a message is open: MAIL came and neither its end nor ABORT yet
        self._handle = self.command

    def feed(self, data: bytes) -> None:
        """Handle every whole packet in what was read; keep an incomplete one for the next read."""
        self.framer.feed(data, self._handle)

    def command(self, cmd: bytes) -> None:
        handler = _HANDLERS.get(cmd[:1])
        if not self.negotiated and handler not in _BEFORE_OPTNEG:
            # Nothing but the negotiation says which replies the MTA expects: answering
            # (or not) would desynchronise the conversation. TEMPFAIL and close (adapter).
            raise ProtocolError(f"command {cmd[:1]!r} before option negotiation")
        if handler is None:
            self._optional(cmd)
            return
        handler(self, cmd)

    def _stage_macros(self, stage: bytes) -> dict[bytes, bytes]:
        m = self.macro
        self.macro = b""
        return codec.macros(m) if m[1:2] == stage else {}

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
        version, actions, protos = codec.parse_optneg(cmd)
        self.protos = PROTOCOL_FLAGS & protos
        self.negotiated = True
        self.out.append(codec.optneg_reply(version, codec.ACTIONS & actions, self.protos))

    def _on_connect(self, cmd: bytes) -> None:
        md = self._stage_macros(lm.SMFIC_CONNECT)
        try:
            self.client_ip = codec.parse_connect(cmd, md)
        except Exception:
            self._internal_error("connect")
        if not self.protos & lm.SMFIP_NR_CONN:
            self.out.append(CONTINUE)

    def _on_mail(self, cmd: bytes) -> None:
        md = self._stage_macros(lm.SMFIC_MAIL)
        self.msg = msg = Message(client_ip=self.client_ip)
        self.in_message = True
        self.msg_open = True
        try:
            self._queue_id(md)
            msg.sender = codec.envelope_address(md.get(b"mail_addr") or cmd[1:])
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
            refusal = self.gateway.rcpt(self.msg, raw, codec.envelope_address(raw))
            self.out.append(reply_packet(refusal) if refusal else CONTINUE)
        except Exception:
            self._internal_error("RCPT TO")
            self.out.append(reply_packet(INTERNAL_ERROR))

    def _on_header(self, cmd: bytes) -> None:
        msg = self.msg
        if msg.sms:
            key, val = codec.parse_header(cmd)
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
        if not self.msg_open or self.pending is not None or self.deciding is not None:
            # No message open (ABORT came, or no MAIL at all), or its end came twice:
            # nothing to decide, and the old message must not be decided (or committed) again.
            log.info("%s: end of message with no message open, answering CONTINUE",
                     msg.queue_id or "NOQUEUE")
            self.out.append(CONTINUE)
            return
        self.msg_open = False
        self.in_message = False
        # Whatever happens, this message is answered by then (and never committed later).
        self.ended = now = time.monotonic()
        self.deadline = now + self.gateway.cfg.milter.spool_timeout
        try:
            self._queue_id(md)
            if self.host is not None and self.gateway.slow(msg):
                self.deciding = msg
                self.in_message = True  # the answer goes out when a worker has decided
                self.host.offload(self, msg)
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
        elif self.host is None:  # no event loop (tests, tools): commit and wait here
            self.out.append(self._packets(self.gateway.commit_and_wait(self.msg, decided)))
        else:
            self.pending = (self.msg, decided, self.host.commit(decided, self))
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
        flags = codec.OPTIONAL.get(cmd[:1])
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
        return b"".join(codec.delrcpt_packet(raw) for raw in outcome.delete) + CONTINUE

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
        if self.pending is not None and self.host is not None:
            self.host.withdraw(self.pending[2])
        self.pending = None
        self.deciding = None
        self.in_message = False
        self.msg_open = False
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
# What may come before the option negotiation: the negotiation itself, QUIT.
_BEFORE_OPTNEG = frozenset({MilterSession._on_optneg, MilterSession._on_quit})
