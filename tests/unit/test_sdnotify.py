"""sms_milter.sdnotify against a unix datagram socket of the test's own."""

from __future__ import annotations

import os
import socket
import time

from sms_milter.sdnotify import Notifier


def _recv(s: socket.socket) -> list[str]:
    s.settimeout(2)
    return s.recv(4096).decode().split("\n")


def test_datagrams_to_a_path_and_an_abstract_socket(tmp_path, monkeypatch):
    for abstract in (False, True):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"sms-milter-unit-{os.getpid()}"
            s.bind(b"\0" + name.encode())
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            s.bind(str(tmp_path / "n.sock"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        n = Notifier.from_environment()
        n.ready("listening\non  x")
        assert _recv(s) == ["READY=1", "STATUS=listening on x"]
        n.tick()
        assert _recv(s) == ["WATCHDOG=1"]
        n.tick()  # not due yet: nothing sent
        s.settimeout(0.05)
        try:
            extra = s.recv(100)
        except TimeoutError:
            extra = b""
        assert extra == b""
        time.sleep(0.11)  # half of WATCHDOG_USEC has passed
        n.tick()
        assert _recv(s) == ["WATCHDOG=1"]
        n.reloading()
        msg = _recv(s)
        assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
        n.stopping()
        assert _recv(s) == ["STOPPING=1"]
        n.close()
        s.close()


def test_not_under_systemd_or_watchdog_for_another_pid(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_environment()
    assert not n.enabled
    n.ready("x")
    n.tick()  # nothing to send to, no error
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    n = Notifier.from_environment()
    assert n.enabled and n.watchdog_every is None
    n.ready("x")  # the socket does not exist: logged, never raised
