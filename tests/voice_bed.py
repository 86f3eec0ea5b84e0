"""A SIPp far end (Debian `sip-tester`) for the voice channel tests, and an RTP counter.

SIPp plays the called phone as a UAS scenario: `answer` (180, 200 with SDP, waits for BYE),
`busy` (486) or `ring` (180 and never answers: CANCEL -> 200, 487, ACK). SIPp does not count
RTP itself, so the answer's SDP announces a port owned by `RtpCounter`, a UDP socket of the test.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

HEAD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="{name}">
"""
REPLY = """  <send{extra}>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:]{tag}
      [last_Call-ID:]
      {cseq}
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
{body}
    ]]>
  </send>
"""
NOBODY = "      Content-Length: 0\n"
TAG = ";tag=[pid]SIPpTag01[call_number]"
SDP = """      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio {rtp_port} RTP/AVP 0 8
      a=rtpmap:0 PCMU/8000
      a=rtpmap:8 PCMA/8000
"""


INFO = """  <send>
    <![CDATA[
      INFO [$contact] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: [$me];tag=[pid]SIPpTag01[call_number]
      To: [$remote]
      [last_Call-ID:]
      CSeq: 1 INFO
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Type: application/dtmf-relay
      Content-Length: [len]

      Signal=1
      Duration=160
    ]]>
  </send>
"""


def _reply(status: str, body: str = NOBODY, tag: bool = True, cseq: str = "[last_CSeq:]",
           extra: str = "") -> str:
    return REPLY.format(status=status, body=body, tag=TAG if tag else "", cseq=cseq, extra=extra)


def scenario(kind: str, rtp_port: int = 0) -> str:
    if kind == "answer":
        steps = ('  <recv request="INVITE" crlf="true"/>\n' + _reply("180 Ringing")
                 + _reply("200 OK", SDP.format(rtp_port=rtp_port), extra=' retrans="500"')
                 + '  <recv request="ACK" crlf="true"/>\n  <recv request="BYE"/>\n'
                 + _reply("200 OK", tag=False))
    elif kind == "confirm":  # answers, and after 1.5 s the listener presses 1 (SIP INFO dtmf-relay)
        steps = ('  <recv request="INVITE" crlf="true">\n    <action>\n'
                 '      <ereg regexp="sip:[^>;]*" search_in="hdr" header="Contact:" assign_to="contact"/>\n'
                 '      <ereg regexp="[^ ].*" search_in="hdr" header="From:" assign_to="remote"/>\n'
                 '      <ereg regexp="&lt;[^&gt;]*&gt;" search_in="hdr" header="To:" assign_to="me"/>\n'
                 '    </action>\n  </recv>\n' + _reply("180 Ringing")
                 + _reply("200 OK", SDP.format(rtp_port=rtp_port), extra=' retrans="500"')
                 + '  <recv request="ACK" crlf="true"/>\n  <pause milliseconds="1500"/>\n' + INFO
                 + '  <recv response="200"/>\n  <recv request="BYE"/>\n' + _reply("200 OK", tag=False))
    elif kind == "busy":
        steps = ('  <recv request="INVITE" crlf="true"/>\n' + _reply("100 Trying", tag=False)
                 + _reply("486 Busy Here") + '  <recv request="ACK"/>\n')
    elif kind == "ring":
        steps = ('  <recv request="INVITE" crlf="true">\n    <action>\n'
                 '      <ereg regexp="[0-9]+ INVITE" search_in="hdr" header="CSeq:" assign_to="cseq"/>\n'
                 '    </action>\n  </recv>\n' + _reply("180 Ringing")
                 + '  <recv request="CANCEL"/>\n' + _reply("200 OK")
                 + _reply("487 Request Terminated", cseq="CSeq: [$cseq]") + '  <recv request="ACK"/>\n')
    else:
        raise ValueError(kind)
    return HEAD.format(name=kind) + steps + "</scenario>\n"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtpCounter:
    """Counts the RTP packets (and payload bytes, per payload type) sent to its port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.packets = 0
        self.payload = 0
        self.types: set[int] = set()
        self.first = self.last = 0.0
        self._stop = False
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 12 or data[0] >> 6 != 2:
                continue
            cc = data[0] & 0x0F
            self.types.add(data[1] & 0x7F)
            self.payload += len(data) - 12 - 4 * cc
            self.packets += 1
            self.last = time.monotonic()
            self.first = self.first or self.last

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


class Sipp:
    """`sipp` running one UAS scenario for one call on a loopback port."""

    def __init__(self, tmp: Path, kind: str, rtp_port: int = 0, calls: int = 1):
        self.port = free_port()
        self.kind = kind
        path = tmp / f"uas-{kind}-{self.port}.xml"
        path.write_text(scenario(kind, rtp_port))
        self.log = tmp / f"sipp-{self.port}.log"
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(path), "-i", "127.0.0.1", "-p", str(self.port), "-mp", str(free_port()),
             "-m", str(calls), "-nostdin", "-trace_err", "-error_file", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp)
        # Ready when its SIP port is bound (a UDP bind on it fails).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("127.0.0.1", self.port))
                except OSError:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sipp did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def wait(self, timeout: float = 30) -> int:
        """SIPp's exit code: 0 when every call went through the scenario to its end."""
        return self.proc.wait(timeout)

    def errors(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
