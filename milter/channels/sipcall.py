"""One outgoing voice call placed by baresip (Debian `baresip-core`), driven over ctrl_tcp.

Each call runs its own headless baresip from a private config directory: the SIP account of the
trunk, the call's audio as the `aufile` source (baresip hangs up by itself when the file ends),
no sound card (`aubridge`), the control socket on loopback. The driver dials, waits for an
answer within the ring timeout (else hangs up), waits for the end of the audio, and reads the
outcome from baresip's events (CALL_RINGING, CALL_ESTABLISHED, CALL_CLOSED with the SIP reason).
A ring timeout without any 180/183 (baresip reports no event for 100 Trying) counts as the trunk
unreachable, like baresip's own "Connection timed out" (SIP timer B, 32 s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tools import ChannelError, tool

log = logging.getLogger("sms_milter.channels.sip")

MODULES = ("g711.so", "aufile.so", "aubridge.so", "ctrl_tcp.so")
START_TIMEOUT = 10.0  # seconds for baresip to open its control socket
# SIP reasons in CALL_CLOSED (baresip writes "<code> <phrase>" or an errno text).
_CODE = re.compile(r"^([3-6]\d\d)\b")
BUSY = frozenset((486, 600, 603))
NO_ANSWER = frozenset((408, 480, 487))
WRONG_NUMBER = frozenset((404, 410, 484, 485, 604))


@dataclass(frozen=True)
class Trunk:
    """Where calls go: a SIP trunk / registrar (host:port) and our account on it."""

    host: str
    port: int = 5060
    user: str = "gateway"
    domain: str = ""  # SIP domain of our address-of-record ("" = the trunk host)
    auth_user: str = ""
    password: str = ""  # never logged
    register: bool = False
    codec: str = "PCMU"  # PCMU | PCMA
    listen: str = "127.0.0.1"  # local address for SIP and RTP
    rtp_ports: str = "20000-29999"


@dataclass(frozen=True)
class CallOutcome:
    outcome: str  # played | busy | no_answer | wrong_number | hung_up | unconfirmed | unreachable | failed
    detail: str  # the SIP reason or what went wrong
    answered: bool = False
    played: float = 0.0  # seconds between answer and hang-up
    ringing: bool = False


def _bindable(host: str, port: int, kind: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, port))
        return True
    except OSError:
        return False


def _free_ports(host: str) -> tuple[int, int]:
    """(SIP port, control port): baresip binds the SIP port for UDP and TCP and the next one for
    TLS (whatever sip_transports says), so all of those must be free, and the control port apart."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            sip = int(s.getsockname()[1])
        if sip < 65535 and all(_bindable(host, port, kind) for port, kind in (
                (sip, socket.SOCK_DGRAM), (sip, socket.SOCK_STREAM), (sip + 1, socket.SOCK_STREAM))):
            for _ in range(50):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", 0))
                    ctrl = int(s.getsockname()[1])
                if ctrl not in (sip, sip + 1):
                    return sip, ctrl
    raise ChannelError("no free local ports for SIP", temporary=True)


def _write_config(d: Path, trunk: Trunk, audio: Path) -> int:
    sip_port, ctrl_port = _free_ports(trunk.listen)
    lines = [
        ("poll_method", "epoll"), ("sip_listen", f"{trunk.listen}:{sip_port}"), ("sip_transports", "udp"),
        ("call_local_timeout", "300"), ("call_max_calls", "1"),
        ("audio_player", "aubridge,null"), ("audio_source", f"aufile,{audio}"),
        ("audio_alert", "aubridge,null"), ("rtp_ports", trunk.rtp_ports),
        ("module_path", "/usr/lib/baresip/modules"),
        *[("module", m) for m in MODULES],
        ("module_tmp", "uuid.so"), ("module_tmp", "account.so"), ("module_app", "menu.so"),
        ("ctrl_tcp_listen", f"127.0.0.1:{ctrl_port}"),
    ]
    (d / "config").write_text("".join(f"{k}\t\t{v}\n" for k, v in lines if v))
    domain = trunk.domain or trunk.host
    params = [f"regint={3600 if trunk.register else 0}", "answermode=manual",
              f"audio_codecs={trunk.codec}", f'outbound="sip:{trunk.host}:{trunk.port}"']
    if trunk.password:
        params += [f"auth_user={trunk.auth_user or trunk.user}", f"auth_pass={trunk.password}"]
    acct = d / "accounts"
    fd = os.open(acct, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the trunk password
    with os.fdopen(fd, "w") as f:
        f.write(f"<sip:{trunk.user}@{domain}>;" + ";".join(params) + "\n")
    return ctrl_port


class _Control:
    """baresip's ctrl_tcp: JSON commands and events framed as netstrings."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def send(self, command: str, params: str = "", token: str = "1") -> None:
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self.sock.sendall(str(len(body)).encode() + b":" + body + b",")

    def next(self, deadline: float) -> dict | None:
        """The next event or response, or None when `deadline` (monotonic) passes first."""
        while True:
            head, sep, rest = self.buf.partition(b":")
            if sep and head.isdigit() and len(rest) > int(head):
                n = int(head)
                msg, self.buf = rest[:n], rest[n + 1:]
                try:
                    obj = json.loads(msg)
                except ValueError:
                    continue
                return obj if isinstance(obj, dict) else None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("baresip closed its control connection")
            self.buf += data


def _classify(reason: str, answered: bool, played: float, expected: float) -> CallOutcome:
    if answered:
        if reason == "end of file" or played >= expected - 0.5:
            return CallOutcome("played", reason, True, played)
        return CallOutcome("hung_up", f"hung up after {played:.1f}s of {expected:.1f}s ({reason})",
                           True, played)
    m = _CODE.match(reason)
    code = int(m.group(1)) if m else 0
    if code in BUSY:
        return CallOutcome("busy", reason)
    if code in NO_ANSWER:
        return CallOutcome("no_answer", reason)
    if code in WRONG_NUMBER:
        return CallOutcome("wrong_number", reason)
    if code:
        return CallOutcome("failed", reason)
    return CallOutcome("unreachable", reason or "no answer from the SIP trunk")


def place_call(trunk: Trunk, number: str, audio: Path, audio_seconds: float, work: Path,
               ring_timeout: float = 30.0, stop: object = None, confirm: str = "") -> CallOutcome:
    """Call `number` (the user part of the request URI) through the trunk and play `audio`
    (16-bit linear 8 kHz WAV) once answered. `confirm`: a DTMF digit (SIP INFO or RFC 4733, as
    baresip reports it) the listener must press before the call ends; we hang up when it comes.
    Blocks for the call; never raises for call outcomes (only ChannelError when baresip itself
    cannot run)."""
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a port taken between our look and baresip's bind: new ports
        proc, sock, out = _start(work, trunk, audio)
        if sock is not None:
            break
        out.close()
        why = _why(work / "baresip.log")
        if attempt == 2 or "in use" not in why:
            raise ChannelError(f"baresip did not start: {why}", temporary=True)
    if sock is None:  # (for the type checker: the loop either connected or raised)
        raise ChannelError("baresip did not start", temporary=True)
    try:
        ctl = _Control(sock)
        ctl.send("dial", f"sip:{number}@{trunk.host}:{trunk.port}")
        return _follow(ctl, ring_timeout, audio_seconds, stop, confirm)
    finally:
        if sock is not None:
            try:
                _Control(sock).send("quit", token="q")
            except OSError:
                pass
            sock.close()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def _start(work: Path, trunk: Trunk, audio: Path) -> tuple[subprocess.Popen, socket.socket | None, Any]:
    """baresip with a fresh config; its control connection, or None if it exited / did not open it."""
    ctrl_port = _write_config(work, trunk, audio)
    out = open(work / "baresip.log", "wb")  # noqa: SIM115 (closed by the caller, after the process)
    proc = subprocess.Popen([tool("baresip"), "-f", str(work)], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, cwd=work)
    t_end = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return proc, socket.create_connection(("127.0.0.1", ctrl_port), timeout=1.0), out
        except OSError:
            if proc.poll() is not None or time.monotonic() > t_end:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                return proc, None, out
            time.sleep(0.05)


def _why(log_file: Path) -> str:
    """baresip's first error line (colour codes removed), else its last line."""
    try:
        text = re.sub(r"\x1b\[[0-9;]*m|\[;?[0-9;]*m", "", log_file.read_text(errors="replace"))
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "failed" in ln or "error" in ln.lower()]
    return (errors or lines or ["control port not open"])[0][:200]


def _follow(ctl: _Control, ring_timeout: float, expected: float, stop: object,
            confirm: str = "") -> CallOutcome:
    ring_deadline = time.monotonic() + ring_timeout
    deadline = ring_deadline
    answered_at: float | None = None
    ringing = hung_up_by_us = confirmed = False
    while True:
        if stop is not None and getattr(stop, "is_set", lambda: False)() and not hung_up_by_us:
            ctl.send("hangup", token="h")
            hung_up_by_us = True
            deadline = time.monotonic() + 5.0
        try:
            ev = ctl.next(deadline)
        except (ConnectionError, OSError) as e:
            return CallOutcome("failed", f"baresip: {e}", answered_at is not None)
        now = time.monotonic()
        if ev is None:
            if hung_up_by_us:
                return CallOutcome("failed", "baresip did not end the call", answered_at is not None)
            ctl.send("hangup", token="h")
            hung_up_by_us = True
            deadline = now + 5.0
            if answered_at is None:
                ring_deadline = 0.0  # the hang-up is ours: no answer within the ring timeout
            continue
        kind = ev.get("type")
        if kind in ("CALL_RINGING", "CALL_PROGRESS"):
            ringing = True
        elif kind == "CALL_ESTABLISHED":
            answered_at = now
            deadline = now + expected + 15.0
        elif kind == "CALL_DTMF_START" and confirm and str(ev.get("param", "")) == confirm:
            confirmed = True  # the listener pressed the digit: done, hang up
            if not hung_up_by_us:
                ctl.send("hangup", token="h")
                hung_up_by_us = True
                deadline = now + 5.0
        elif kind == "CALL_CLOSED":
            reason = str(ev.get("param", ""))
            played = now - answered_at if answered_at is not None else 0.0
            if answered_at is None and hung_up_by_us and ring_deadline == 0.0:
                if not ringing:  # not even a 180/183: no sign of the phone or the trunk
                    return CallOutcome("unreachable", f"no ringing within {ring_timeout:g}s")
                return CallOutcome("no_answer", f"no answer within {ring_timeout:g}s", ringing=True)
            if stop is not None and getattr(stop, "is_set", lambda: False)():
                return CallOutcome("failed", "stopped", answered_at is not None, played)
            if confirm and answered_at is not None:
                if confirmed:
                    detail = f"confirmed with {confirm} after {played:.1f}s"
                    return CallOutcome("played", detail, True, played, ringing)
                return CallOutcome("unconfirmed", f"{confirm} not pressed ({reason})", True, played, ringing)
            out = _classify(reason, answered_at is not None, played, expected)
            return CallOutcome(out.outcome, out.detail, out.answered, out.played, ringing)
