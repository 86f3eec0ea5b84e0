"""One SMTP transaction as the milter sees it, and what the gateway answers about it.

The adapter (or the pipe transport) fills a `Message`; the gateway decides it (`gateway.py`) into
an `Outcome` or a `Commit` that the spool must make before the 250.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Account, SenderRule
from .policy import addresses
from .policy.refusal import Refusal
from .spool.base import LimitPlan, NewJob, OutMail


@dataclass
class SmsRecipient:
    raw: bytes  # exactly as the MTA gave it (needed to delete it)
    address: str
    target: addresses.SmsTarget
    account: Account | None = None  # known at RCPT for <number>@ addresses
    rule: SenderRule | None = None
    duplicate: bool = False  # the same target again in this message: deleted, no job of its own

    @property
    def target_key(self) -> tuple[str, str, str]:
        """One SMS per (number, device) per message, one textsms@/xml@ handling per domain."""
        t = self.target
        return (t.number or t.kind, t.device, "" if t.number else t.domain.name)


@dataclass
class Message:
    """One transaction's state, reset at MAIL FROM and after the end of message."""

    sender: str = ""
    queue_id: str = ""
    client_ip: str | None = None
    sms: list[SmsRecipient] = field(default_factory=list)
    others: int = 0  # recipients that are not SMS addresses
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    failed: Refusal | None = None  # an error in a no-reply callback, reported at the end
    targets: set[tuple[str, str, str]] = field(default_factory=set)  # SmsRecipient.target_key seen
    auth_login: str | None = None  # the SMTP AUTH login ({auth_authen}), None when not authenticated
    numbers: set[str] = field(default_factory=set)  # E.164 of the <number>@ recipients accepted so far

    def add_body(self, chunk: bytes, limit: int) -> None:
        self.size += len(chunk)
        room = limit + 1 - len(self.body)
        if room > 0:
            self.body += chunk[:room]

    def raw(self) -> bytes:
        head = b"".join(k + b": " + v.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
                        for k, v in self.headers)
        return head + b"\r\n" + bytes(self.body)

    def header(self, name: str) -> str | None:
        lname = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == lname:
                return v.decode("latin-1").strip()
        return None


def split_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A whole message as (headers as the milter protocol gives them, body)."""
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    if not sep and not head.startswith((b" ", b"\t")) and b":" not in head.split(b"\n", 1)[0]:
        head, body = b"", data
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.lstrip(b" ")))
    return headers, body.replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class Commit:
    """What the spool must commit, in one transaction, before the message may be accepted."""

    key: str
    key_ttl: float
    jobs: list[NewJob]
    mails: list[OutMail]
    notes: list[str]
    limits: LimitPlan | None = None  # checked and counted by the spool inside the commit


@dataclass(frozen=True)
class Outcome:
    refusal: Refusal | None = None
    delete: tuple[bytes, ...] = ()  # recipients to remove from the message
    discard: bool = False  # no recipient left: drop the message (the client still sees 250)
