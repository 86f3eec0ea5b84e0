"""adapter.MilterSession replaces python-libmilter's framing loop (for speed): for any way
the MTA's bytes are cut into reads, it must answer exactly as the library's own loop."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import libmilter as lm
import pytest
from sms_milter.adapter import MilterSession
from sms_milter.config import load
from sms_milter.gateway import Gateway
from sms_milter.spool.base import AddResult


def pkt(cmd: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(cmd + payload)) + cmd + payload


def macro(stage: bytes, **kv: str) -> bytes:
    return pkt(b"D", stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in kv.items()))


def message(rcpts: list[bytes], body: bytes, subject: bytes = b"Hi") -> bytes:
    out = macro(b"M", **{"{mail_addr}": "c4ca423@client.example"}) + pkt(b"M", b"<c4ca423@client.example>\0")
    for i, r in enumerate(rcpts):
        out += macro(b"R", i=f"Q{i}") + pkt(b"R", b"<" + r + b">\0NOTIFY=NEVER\0")
    for k, v in ((b"Subject", subject), (b"Message-Id", b"<m@x>"), (b"Content-Type", b"text/plain")):
        out += pkt(b"L", k + b"\0" + v + b"\0")
    return out + pkt(b"N") + pkt(b"B", body) + macro(b"E", i="QID") + pkt(b"E")


STREAM = (
    pkt(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
    + macro(b"C", j="mx") + pkt(b"C", b"localhost\x004" + struct.pack("!H", 4444) + b"127.0.0.1\0")
    + message([b"0041791234567@sms.example.com", b"other@relay.example"], b"hello\r\n")
    + message([b"+41791234567@sms.example.com"], b"x\r\n")  # refused at RCPT
    + message([b"0041791234567@sms.example.com"], b"<b>markup</b>\r\n")  # refused at the end
    + message([b"someone@relay.example"], b"plain mail\r\n")  # not SMS: accepted at EOH
    + pkt(b"A") + message([b"textsms@sms.example.com"], b"t\r\n", b"U=ACME123 P=wrong R=0041791234567")
    + pkt(b"Q")
)


class InstantSpool:
    def add_message(self, key, jobs, key_ttl=0.0, mails=None) -> AddResult:
        return AddResult(tuple(range(1, len(jobs) + 1)), False)


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bed import write_config

    return Gateway(load(write_config(tmp_path, 1, 2, spool_path=tmp_path / "s.db")), InstantSpool())


def replies(gateway: Gateway, cuts: list[int], library_loop: bool) -> list[bytes]:
    session = MilterSession(gateway, "test")
    if library_loop:
        session.dataReceived = lm.MilterProtocol.dataReceived.__get__(session)  # type: ignore[method-assign]
        session._procCmdAndData = lm.MilterProtocol._procCmdAndData.__get__(session)  # type: ignore[method-assign]
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            session.dataReceived(STREAM[a:b])
    return list(session.out)


def test_whole_stream_answers(gateway: Gateway) -> None:
    out = b"".join(replies(gateway, [], library_loop=False))
    assert b"5.1.3" in out and b"5.6.1" in out and b"5.7.8" in out  # the three refusals
    assert lm.ACCEPT in out and lm.DISCARD not in out  # plain mail accepted at EOH
    assert out.count(pkt(b"-", b"<0041791234567@sms.example.com>\0")) == 1  # SMS rcpt removed


@pytest.mark.parametrize("seed", range(25))
def test_any_read_boundaries_answer_like_the_library(gateway: Gateway, seed: int) -> None:
    rnd = random.Random(seed)
    cuts = rnd.sample(range(1, len(STREAM)), rnd.randint(1, 60))
    ours = replies(gateway, cuts, library_loop=False)
    assert ours == replies(gateway, [], library_loop=False)  # the cuts change nothing
    assert ours == replies(gateway, cuts, library_loop=True)  # and it is what libmilter answers
