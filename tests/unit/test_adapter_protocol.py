"""session.MilterSession parses the milter protocol itself (for speed): the replies it gives
for a whole Postfix-like conversation, for any way the bytes are cut into reads, and for
what an MTA may send that we negotiated away or that is no milter protocol at all.

(Postfix itself talks to the milter in tests/test_inline.py and the miltertest scripts.)"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import libmilter as lm
import pytest
from sms_milter.config import load
from sms_milter.gateway import Gateway
from sms_milter.session import PROTOCOL_FLAGS, MilterSession, ProtocolError
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


OPTNEG = pkt(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
CONNECT = macro(b"C", j="mx") + pkt(b"C", b"localhost\x004" + struct.pack("!H", 4444) + b"127.0.0.1\0")
STREAM = (
    OPTNEG + CONNECT
    + message([b"0041791234567@sms.example.com", b"other@relay.example"], b"hello\r\n")
    + message([b"+41791234567@sms.example.com"], b"x\r\n")  # refused at RCPT
    + message([b"0041791234567@sms.example.com"], b"<b>markup</b>\r\n")  # refused at the end
    + message([b"someone@relay.example"], b"plain mail\r\n")  # not SMS: accepted at EOH
    + pkt(b"A") + message([b"textsms@sms.example.com"], b"t\r\n", b"U=ACME123 P=wrong R=0041791234567")
    + pkt(b"Q")
)
C, A = lm.CONTINUE, lm.ACCEPT


class InstantSpool:
    def add_message(self, key, jobs, key_ttl=0.0, mails=None, limits=None) -> AddResult:
        return AddResult(tuple(range(1, len(jobs) + 1)), False)


@pytest.fixture
def gateway(tmp_path: Path) -> Gateway:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bed import write_config

    return Gateway(load(write_config(tmp_path, 1, 2, spool_path=tmp_path / "s.db")), InstantSpool())


def replies(gateway: Gateway, stream: bytes, cuts: list[int] = ()) -> list[bytes]:  # type: ignore[assignment]
    session = MilterSession(gateway)
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            session.feed(stream[a:b])
    return list(session.out)


def shape(reply: bytes) -> bytes:
    """A reply as the test names it: the command letter, or `y` and the enhanced code."""
    if reply[4:5] == lm.SMFIR_REPLYCODE:
        return b"y " + reply[9:14]
    if reply[4:5] == lm.SMFIR_DELRCPT:
        return b"- " + reply[5:].split(b"\0")[0] + b" " + reply[-1:]
    return reply[4:]


def test_a_whole_conversation_answers_every_command_that_wants_an_answer(gateway: Gateway) -> None:
    out = replies(gateway, STREAM)
    negotiated = out.pop(0)
    assert negotiated == pkt(b"O", struct.pack("!III", 6, lm.SMFIF_DELRCPT, PROTOCOL_FLAGS))
    assert [shape(r) for r in out] == [
        b"c", b"c", b"c", b"- <0041791234567@sms.example.com> c",  # RCPT x2, EOH, end: SMS rcpt removed
        b"y 5.1.3", b"a", b"c",  # + instead of 00 refused at RCPT; no SMS rcpt left: accepted at EOH
        b"c", b"c", b"y 5.6.1",  # markup refused at the end
        b"c", b"a", b"c",  # mail for nobody SMS: accepted at EOH
        b"c", b"c", b"y 5.7.8",  # after an ABORT: the wrong password refused
    ]


@pytest.mark.parametrize("seed", range(25))
def test_any_read_boundaries_give_the_same_answers(gateway: Gateway, seed: int) -> None:
    rnd = random.Random(seed)
    cuts = rnd.sample(range(1, len(STREAM)), rnd.randint(1, 60))
    assert replies(gateway, STREAM, cuts) == replies(gateway, STREAM)


def test_negotiation_keeps_only_what_the_mta_offers(gateway: Gateway) -> None:
    offered = lm.SMFIP_NOHELO | lm.SMFIP_NR_HDR  # an old MTA: no other "no reply" steps
    out = replies(gateway, pkt(b"O", struct.pack("!III", 2, lm.SMFIF_DELRCPT, offered)) + CONNECT
                  + message([b"0041791234567@sms.example.com"], b"hi\r\n"))
    assert out[0] == pkt(b"O", struct.pack("!III", 2, lm.SMFIF_DELRCPT, offered))
    # connect, MAIL and the body chunk now get their CONTINUE; headers still none; the
    # message has no recipient left: discarded.
    assert [shape(r) for r in out[1:]] == [b"c", b"c", b"c", b"c", b"c", b"d"]


@pytest.mark.parametrize("cmd", [b"H", b"T", b"U"])
def test_negotiated_away_commands_get_continue_if_the_mta_sends_them_anyway(gateway: Gateway,
                                                                           cmd: bytes) -> None:
    without = pkt(b"O", struct.pack("!III", 6, lm.SMFIF_DELRCPT, lm.SMFIP_NR_CONN))  # no NOHELO etc.
    assert replies(gateway, without + pkt(cmd, b"x\0"))[1:] == [C]
    # Negotiated away: sent anyway, it is ignored without a reply.
    assert replies(gateway, OPTNEG + pkt(cmd, b"x\0"))[1:] == []


@pytest.mark.parametrize("bad", [
    pkt(b"Z", b"junk"),  # no such command
    struct.pack("!I", 0),  # an empty packet
    struct.pack("!I", 1 << 30) + b"O",  # a gigabyte "packet": garbage, not a reason to buffer
])
def test_what_is_no_milter_protocol_is_a_protocol_error(gateway: Gateway, bad: bytes) -> None:
    session = MilterSession(gateway)
    session.feed(OPTNEG)
    with pytest.raises(ProtocolError):
        session.feed(bad)


def test_macros_are_read_only_for_the_command_they_precede(gateway: Gateway) -> None:
    session = MilterSession(gateway)
    session.feed(OPTNEG + CONNECT + macro(b"R", i="RCPTQID")
                 + macro(b"M", **{"{mail_addr}": "c4ca423@client.example"}) + pkt(b"M", b"<x@y>\0"))
    assert session.msg.sender == "c4ca423@client.example"  # Postfix's parsed address wins
    assert session.msg.queue_id == ""  # the RCPT-stage macro before it was not MAIL's
    assert session.client_ip == "127.0.0.1"


def test_an_internal_error_at_rcpt_is_a_451_for_that_recipient_only(gateway: Gateway,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def rcpt(msg, raw, address):
        calls.append(address)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return None

    monkeypatch.setattr(gateway, "rcpt", rcpt)
    out = replies(gateway, OPTNEG + CONNECT + message([b"a@relay.example", b"b@relay.example"], b"x\r\n"))
    assert [shape(r) for r in out[1:3]] == [b"y 4.3.0", b"c"]


def test_quit_closes_and_quit_nc_starts_a_new_session(gateway: Gateway) -> None:
    session = MilterSession(gateway)
    session.feed(OPTNEG + CONNECT + pkt(b"K"))
    assert not session.closed and session.client_ip is None
    session.feed(pkt(b"Q"))
    assert session.closed


def packets(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(stream):
        size = struct.unpack_from("!I", stream, pos)[0]
        out.append(stream[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


COMMANDS = b"ABCDEHKLMNOQRTU"


def garble(rnd: random.Random) -> bytes:
    """STREAM with well-framed packets whose contents are cut, changed or invented, or with
    its bytes changed, lost or added regardless of the framing."""
    cmds = packets(STREAM)
    for _ in range(rnd.randint(1, 6)):
        i = rnd.randrange(len(cmds))
        what = rnd.random()
        if what < 0.3:
            cmds[i] = cmds[i][:rnd.randint(1, max(1, len(cmds[i]) - 1))]  # a packet cut short
        elif what < 0.5:
            cmds[i] = bytes([rnd.choice(COMMANDS)]) + cmds[i][1:]  # another command's letter
        elif what < 0.7:
            cmds.insert(i, bytes([rnd.choice(COMMANDS)]) + rnd.randbytes(rnd.randint(0, 30)))
        elif what < 0.85:
            cmds[i] = cmds[i].replace(b"\0", b"", rnd.randint(1, 3))  # NULs lost
        else:
            cmds[i] = cmds[i] + b"\0" * rnd.randint(1, 3)  # NULs added
    data = bytearray(b"".join(pkt(c[:1], c[1:]) for c in cmds))
    if rnd.random() < 0.3:
        at = rnd.randrange(len(data))
        data[at:at + rnd.randint(0, 8)] = rnd.randbytes(rnd.randint(0, 8))
    return bytes(data)


def test_garbled_input_is_answered_or_a_protocol_error_never_a_crash(gateway: Gateway) -> None:
    """Whatever bytes an MTA (or something else on the port) sends, the session either answers
    or raises ProtocolError (the server then answers TEMPFAIL and closes): no other exception."""
    for seed in range(400):
        session = MilterSession(gateway)
        try:
            session.feed(garble(random.Random(seed)))
        except ProtocolError:
            pass
        except Exception as e:
            raise AssertionError(f"seed {seed}: {e!r}") from e
        assert all(isinstance(r, bytes) and len(r) >= 5 for r in session.out), seed


def test_a_message_decided_after_its_deadline_is_answered_451_and_never_committed(tmp_path: Path) -> None:
    """Issue 9 item 3: a job exists if and only if the client was told 250. A decision that
    comes back after the message's deadline (milter.spool_timeout after its end) is answered
    451 and nothing is committed; the same decision in time is committed and answered."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bed import write_config
    from sms_milter.gateway import Commit

    class CountingSpool(InstantSpool):
        calls = 0

        def add_message(self, key, jobs, key_ttl=0.0, mails=None, limits=None) -> AddResult:
            CountingSpool.calls += 1
            return super().add_message(key, jobs, key_ttl, mails)

    gw = Gateway(load(write_config(tmp_path, 1, 2, spool_path=tmp_path / "s.db")), CountingSpool())
    for late, want in ((True, b"y 4.3.0"), (False, b"d")):  # in time: committed, no rcpt left: discard
        session = MilterSession(gw)
        session.feed(OPTNEG + CONNECT + message([b"0041791234567@sms.example.com"], b"hello\r\n")[:-5])
        decided = gw.decide(session.msg)
        assert isinstance(decided, Commit)
        session.out.clear()
        session.deadline = 0.0 if late else float("inf")
        session.decided(decided)
        assert [shape(r) for r in session.out] == [want]
    assert CountingSpool.calls == 1  # only the one in time
