"""Milter protocol edges found by an outside hostile probe, against `sms-milter milter` started
here and a raw socket speaking the milter protocol (no Postfix: it never sends these).

1. accept() out of file descriptors (a low RLIMIT_NOFILE set with prlimit): no 100% CPU spin,
   a rate-limited log line, open sessions served, new ones again once descriptors free up;
2. end of message after ABORT: CONTINUE, nothing decided or committed;
3. a command before the option negotiation: TEMPFAIL and close;
4. a partial packet then silence: closed after the deadline (SMS_MILTER_PACKET_TIMEOUT, internal,
   short here), while other sessions stay served.
"""
from __future__ import annotations

import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import bed
import pytest
from bed import milter_packet as pkt

SENDER = b"<c4ca423@client.example>\0"
PACKET_TIMEOUT = 2.0


OPTNEG = pkt(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
CONNECT = pkt(b"C", b"client\x004" + struct.pack("!H", 4444) + b"127.0.0.1\0")


def replies(sock: socket.socket, n: int, timeout: float = 10) -> list[bytes]:
    return bed.milter_replies(sock, n, timeout)


def hung_up(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the milter still sends until it closes the connection (fails on a timeout)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def session(port: int) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(OPTNEG)
    assert replies(c, 1)[0][:1] == b"O"
    return c


def message(c: socket.socket, number: str, text: str) -> bytes:
    """One SMS message on a negotiated connection; the answer to its end."""
    c.sendall(CONNECT + pkt(b"M", SENDER) + pkt(b"R", f"<{number}@sms.example.com>\0".encode()))
    assert replies(c, 1) == [b"c"]
    c.sendall(pkt(b"L", b"Subject\0\0") + pkt(b"N"))
    assert replies(c, 1) == [b"c"]
    c.sendall(pkt(b"B", f"{text}\r\n".encode()) + pkt(b"E"))
    return replies(c, 1)[0]


def texts(config: Path, e164: str) -> list[str]:
    return [j["text"] for j in bed.queue_list(config) if j["recipient"] == e164]


class Running:
    def __init__(self, config: Path, milter: bed.Milter, port: int):
        self.config, self.milter, self.port = config, milter, port

    def log(self) -> str:
        return self.milter.log()


def start(tmp_path: Path) -> Running:
    port = bed.free_port()
    config = bed.write_config(tmp_path, port, bed.free_port())
    return Running(config, bed.Milter(config, tmp_path / "milter.log").start(), port)


@pytest.fixture(scope="module")
def milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    old = os.environ.get("SMS_MILTER_PACKET_TIMEOUT")
    os.environ["SMS_MILTER_PACKET_TIMEOUT"] = str(PACKET_TIMEOUT)
    try:
        m = start(tmp_path_factory.mktemp("edges"))
    finally:
        if old is None:
            del os.environ["SMS_MILTER_PACKET_TIMEOUT"]
        else:
            os.environ["SMS_MILTER_PACKET_TIMEOUT"] = old
    yield m
    assert m.milter.stop() == 0
    assert "Traceback" not in m.log(), m.log()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# --------------------------------------------------------------------------- item 2


def test_end_of_message_after_abort_is_continue_and_decides_nothing(milter: Running) -> None:
    (n1, e1), (n2, e2) = bed.unique_number(), bed.unique_number()
    with session(milter.port) as c:
        c.sendall(CONNECT + pkt(b"M", SENDER) + pkt(b"R", f"<{n1}@sms.example.com>\0".encode()))
        assert replies(c, 1) == [b"c"]
        c.sendall(pkt(b"L", b"Subject\0\0") + pkt(b"N"))
        assert replies(c, 1) == [b"c"]
        c.sendall(pkt(b"B", b"aborted\r\n") + pkt(b"A") + pkt(b"E"))
        assert replies(c, 1) == [b"c"]  # nothing open: nothing to decide
        c.sendall(pkt(b"E"))  # and an end with no MAIL at all
        assert replies(c, 1) == [b"c"]
        assert message(c, n2, f"after abort {n2}") == b"d"  # the session still works
        c.sendall(pkt(b"Q"))
    assert texts(milter.config, e1) == []
    assert texts(milter.config, e2) == [f"after abort {n2}"]
    assert "Traceback" not in milter.log()


# --------------------------------------------------------------------------- item 3


@pytest.mark.parametrize("first", [pkt(b"M", SENDER), CONNECT, pkt(b"E"), pkt(b"D", b"Mi\0ABC\0")],
                         ids=["MAIL", "CONNECT", "EOM", "macro"])
def test_a_command_before_option_negotiation_gets_tempfail_and_close(milter: Running, first: bytes) -> None:
    with socket.create_connection(("127.0.0.1", milter.port), timeout=10) as c:
        c.sendall(first)
        assert hung_up(c) == pkt(b"t")
    assert "before option negotiation" in milter.log()
    assert "Traceback" not in milter.log()
    ((n, e),) = [bed.unique_number()]
    with session(milter.port) as c:  # the next connection is served
        assert message(c, n, f"after a bad start {n}") == b"d"
    assert texts(milter.config, e) == [f"after a bad start {n}"]


# --------------------------------------------------------------------------- item 4


def test_a_partial_packet_is_closed_after_the_deadline_and_stalls_no_one(milter: Running) -> None:
    with session(milter.port) as stuck:
        stuck.sendall(struct.pack("!I", 300) + b"M<half")  # 300 bytes promised, 6 sent, silence
        started = time.monotonic()
        served = []
        with session(milter.port) as other:
            while time.monotonic() - started < PACKET_TIMEOUT * 0.8:
                n, e = bed.unique_number()
                t0 = time.monotonic()
                assert message(other, n, f"beside a stuck one {n}") == b"d"
                served.append(time.monotonic() - t0)
        assert len(served) >= 3 and max(served) < PACKET_TIMEOUT * 0.8, served
        assert hung_up(stuck, timeout=PACKET_TIMEOUT * 5) == pkt(b"t")
        waited = time.monotonic() - started
    assert PACKET_TIMEOUT * 0.9 <= waited < PACKET_TIMEOUT * 5, waited
    assert "stayed incomplete" in milter.log()


# --------------------------------------------------------------------------- item 1


def test_out_of_file_descriptors_no_spin_and_served_again(tmp_path: Path) -> None:
    m = start(tmp_path)
    pid = m.milter.pid
    assert pid is not None
    clients: list[socket.socket] = []
    try:
        early = session(m.port)  # open before the exhaustion: must stay served
        # A running milter has loaded what a message needs (phonenumbers loads a region's
        # metadata file at its first number); here the first message does it.
        w, _ = bed.unique_number()
        assert message(early, w, f"warm-up {w}") == b"d"
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 5, in_use + 5))
        for _ in range(40):  # the kernel completes the handshakes: they wait in the listen queue
            clients.append(socket.create_connection(("127.0.0.1", m.port), timeout=10))
        bed.wait_until(lambda: "too many open files" in m.log(), 10, "the exhaustion logged",
                       detail=lambda: bed.tail(m.milter.logfile))
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(3)  # measuring CPU over an interval: nothing to poll for
        cpu = cpu_seconds(pid) - cpu0
        elapsed = time.monotonic() - t0
        assert cpu < 0.25 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.1f} s: the loop spins"
        n, e = bed.unique_number()
        assert message(early, n, f"during exhaustion {n}") == b"d"
        lines = m.log().count("too many open files")
        assert lines == 1, m.log()  # at most one line per 10 s (listener.LOG_EVERY)
        for c in clients:
            c.close()
        clients.clear()
        late = bed.wait_until(lambda: _try_session(m.port), 15, "a new session served after the fds freed")
        with late:
            n2, e2 = bed.unique_number()
            assert message(late, n2, f"after exhaustion {n2}") == b"d"
        early.close()
        assert texts(m.config, e) == [f"during exhaustion {n}"]
        assert texts(m.config, e2) == [f"after exhaustion {n2}"]
    finally:
        for c in clients:
            c.close()
        assert m.milter.stop() == 0
    assert "Traceback" not in m.log(), m.log()


def _try_session(port: int) -> socket.socket | None:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.sendall(OPTNEG)
        if replies(c, 1, timeout=2)[0][:1] == b"O":
            return c
        c.close()
    except (OSError, AssertionError):
        pass
    return None
