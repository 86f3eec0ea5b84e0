"""The milter protocol codec: bytes in, packets out. Pure: no sockets, no gateway, no clock.

The wire format (milter protocol version 6, as Postfix and Sendmail speak it): every
packet is a 4-byte big-endian length, a one-letter command and its payload. The command,
action and protocol-flag constants come from python-libmilter (docs/decisions/0001), so
the wire values have one source; its session object and per-command parsers are not
used (they were the largest part of the milter's CPU time per message).

`Framer` cuts a stream of reads into whole commands; the `parse_*` functions read a
command's payload; the packet builders (`packet`, `optneg_reply`, `reply_text_packet`,
`delrcpt_packet`) make our replies. `milter/session.py` puts them together into the
conversation with one MTA connection, `milter/adapter.py` does the sockets.
"""
from __future__ import annotations

import struct
from collections.abc import Callable

import libmilter as lm

# What we ask of the MTA: no HELO, DATA or unknown-command callbacks, and no reply expected
# for connect, MAIL, headers and body chunks (one reply fewer per step, no Nagle stall).
PROTOCOL_FLAGS = (
    lm.SMFIP_NOHELO | lm.SMFIP_NODATA | lm.SMFIP_NOUNKNOWN
    | lm.SMFIP_NR_CONN | lm.SMFIP_NR_MAIL | lm.SMFIP_NR_HDR | lm.SMFIP_NR_BODY
)
ACTIONS = lm.SMFIF_DELRCPT
# A packet longer than this is no milter protocol (Postfix's body chunks are < 64 KB).
MAX_PACKET = 1 << 20

CONTINUE, ACCEPT, DISCARD, TEMPFAIL = lm.CONTINUE, lm.ACCEPT, lm.DISCARD, lm.TEMPFAIL
# Commands we negotiated away: the flag that says "not sent", the one that says "no reply".
OPTIONAL = {lm.SMFIC_HELO: (lm.SMFIP_NOHELO, lm.SMFIP_NR_HELO),
            lm.SMFIC_DATA: (lm.SMFIP_NODATA, lm.SMFIP_NR_DATA),
            lm.SMFIC_UNKNOWN: (lm.SMFIP_NOUNKNOWN, lm.SMFIP_NR_UNKN)}

_UINT32 = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")


class ProtocolError(Exception):
    """The MTA sent something that is not the milter protocol."""


class Framer:
    """Cuts the bytes of successive reads into whole commands (letter + payload)."""

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""  # an incomplete packet from the last read

    def feed(self, data: bytes, handle: Callable[[bytes], None]) -> None:
        """`handle(command)` for every whole packet in what was read, in order; an incomplete
        one is kept for the next read. A length that no milter packet has raises ProtocolError
        after the commands before it were handled (their answers still go out)."""
        if self.rest:
            data = self.rest + data
        pos, end = 0, len(data)
        unpack = _UINT32.unpack_from
        while end - pos >= 4:
            size = unpack(data, pos)[0]
            if not 0 < size <= MAX_PACKET:
                raise ProtocolError(f"a packet of {size} bytes")
            stop = pos + 4 + size
            if stop > end:
                break
            handle(data[pos + 4:stop])
            pos = stop
        self.rest = data[pos:]


# -- reading commands ------------------------------------------------------------------------

def macros(packet: bytes) -> dict[bytes, bytes]:
    """A macro packet (`D`, stage, name NUL value NUL ...) as {name: value}, braces dropped."""
    items = packet[2:].split(b"\0")
    return {items[i].strip(b"{}"): items[i + 1] for i in range(0, len(items) - 1, 2)}


def envelope_address(raw: bytes) -> str:
    """MAIL/RCPT's argument (`<addr>` NUL esmtp-args ...) as the bare address."""
    first = raw.split(b"\0", 1)[0].strip()
    if first.startswith(b"<") and first.endswith(b">"):
        first = first[1:-1]
    return first.decode("utf-8", "replace")


def parse_optneg(cmd: bytes) -> tuple[int, int, int]:
    """SMFIC_OPTNEG: (version, actions, protocol flags) the MTA offers."""
    if len(cmd) < 13:
        raise ProtocolError("a short option negotiation")
    version, actions, protos = _OPTNEG.unpack_from(cmd, 1)
    return version, actions, protos


def parse_connect(cmd: bytes, md: dict[bytes, bytes]) -> str | None:
    """SMFIC_CONNECT (hostname NUL family port address NUL): the client's IP address, or
    the `client_addr` macro when the family says the address is not IP."""
    _host, _, rest = cmd[1:].partition(b"\0")
    family = rest[:1]
    addr = rest[3:].split(b"\0", 1)[0].decode("ascii", "replace") if family in (b"4", b"6") else ""
    if addr.lower().startswith("ipv6:"):
        addr = addr[5:]
    client = md.get(b"client_addr")
    return addr or (client.decode("ascii", "replace") if client else None)


def parse_header(cmd: bytes) -> tuple[bytes, bytes]:
    """SMFIC_HEADER (name NUL value NUL): the value is everything up to the packet's final
    NUL. A NUL inside it (the MTA passes one on) is kept, and made safe later like any other
    unsafe byte; cutting the value there made distinct Message-IDs collide."""
    key, _, rest = cmd[1:].partition(b"\0")
    return key, rest[:-1] if rest.endswith(b"\0") else rest


# -- writing replies ---------------------------------------------------------------------------

def packet(cmd: bytes, payload: bytes = b"") -> bytes:
    return _UINT32.pack(len(cmd) + len(payload)) + cmd + payload


def optneg_reply(version: int, actions: int, protos: int) -> bytes:
    return packet(lm.SMFIC_OPTNEG, _OPTNEG.pack(version, actions, protos))


def reply_text_packet(code: str, xcode: str, text: str) -> bytes:
    """SMFIR_REPLYCODE alone is the whole answer (never a REJECT after it: the double reply).

    SMTP replies are ASCII: anything else in the text (say, an address written in UTF-8)
    goes out as backslash escapes rather than raw 8-bit bytes; `%` is doubled (the MTA
    formats the text)."""
    text = " ".join(text.split()).replace("%", "%%")
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return packet(lm.SMFIR_REPLYCODE, f"{code} {xcode} {text}".encode() + b"\0")


def delrcpt_packet(raw: bytes) -> bytes:
    """SMFIR_DELRCPT: `raw` exactly as the MTA sent it at RCPT (Postfix matches it)."""
    return packet(lm.SMFIR_DELRCPT, raw + b"\0")
