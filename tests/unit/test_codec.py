"""codec.py, the milter protocol's wire format alone: no session, no gateway, no socket.

Each function is checked against python-libmilter, the reference (docs/decisions/0001):
its constants, and for framing and replies the bytes its own encoder would send."""

from __future__ import annotations

import random
import struct

import libmilter as lm
import pytest
from sms_milter import codec


def pkt(cmd: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(cmd + payload)) + cmd + payload


COMMANDS = [pkt(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)), pkt(b"D", b"Cj\0mx\0"),
            pkt(b"C", b"h\x004\x11\x5c127.0.0.1\0"), pkt(b"B", b"x" * 70000), pkt(b"E"), pkt(b"Q")]
STREAM = b"".join(COMMANDS)


def framed(stream: bytes, cuts: list[int]) -> list[bytes]:
    framer, got = codec.Framer(), []
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        framer.feed(stream[a:b], got.append)
    assert framer.rest == b""
    return got


@pytest.mark.parametrize("seed", range(20))
def test_the_framer_gives_whole_commands_whatever_the_reads(seed: int) -> None:
    rnd = random.Random(seed)
    cuts = rnd.sample(range(1, len(STREAM)), rnd.randint(1, 40))
    assert framed(STREAM, cuts) == [c[4:] for c in COMMANDS]


@pytest.mark.parametrize("size", [0, codec.MAX_PACKET + 1, 1 << 31])
def test_a_length_no_milter_packet_has_is_a_protocol_error_after_the_commands_before_it(size: int) -> None:
    got: list[bytes] = []
    with pytest.raises(codec.ProtocolError):
        codec.Framer().feed(pkt(b"E") + struct.pack("!I", size) + b"junk", got.append)
    assert got == [b"E"]


def test_replies_are_the_bytes_the_reference_library_names() -> None:
    assert codec.packet(lm.SMFIR_CONTINUE) == lm.CONTINUE
    assert codec.optneg_reply(6, 1, 2) == pkt(lm.SMFIC_OPTNEG, struct.pack("!III", 6, 1, 2))
    assert codec.delrcpt_packet(b"<a@b>") == pkt(lm.SMFIR_DELRCPT, b"<a@b>\0")
    assert codec.PROTOCOL_FLAGS & lm.SMFIP_NR_HDR and not codec.PROTOCOL_FLAGS & lm.SMFIP_NR_RCPT


def test_a_custom_reply_is_one_ascii_packet_with_percent_doubled() -> None:
    out = codec.reply_text_packet("550", "5.1.3", "Bad  n\u00fcmber\n 100%")
    assert out == pkt(lm.SMFIR_REPLYCODE, b"550 5.1.3 Bad n\\xfcmber 100%%\0")


def test_commands_are_read_as_postfix_writes_them() -> None:
    assert codec.macros(b"DR{rcpt_addr}\0a@b\0i\0Q1\0") == {b"rcpt_addr": b"a@b", b"i": b"Q1"}
    assert codec.envelope_address(b" <a@b.example>\0NOTIFY=NEVER\0") == "a@b.example"
    assert codec.parse_optneg(b"O" + struct.pack("!III", 6, 3, 7)) == (6, 3, 7)
    with pytest.raises(codec.ProtocolError):
        codec.parse_optneg(b"O\0\0")
    assert codec.parse_connect(b"Ch\x004\x11\x5c192.0.2.1\0", {}) == "192.0.2.1"
    assert codec.parse_connect(b"Ch\x006\x11\x5cIPv6:2001:db8::1\0", {}) == "2001:db8::1"
    assert codec.parse_connect(b"Ch\0L", {b"client_addr": b"10.0.0.1"}) == "10.0.0.1"
    assert codec.parse_connect(b"Ch\0U", {}) is None
    # A NUL inside a header value is kept; only the packet's final NUL ends it.
    assert codec.parse_header(b"LMessage-Id\0<a\0b>\0") == (b"Message-Id", b"<a\0b>")
