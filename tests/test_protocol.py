"""Raw milter-protocol cases Postfix cannot produce, driven by miltertest (tests/miltertest/*.lua).

Each script talks straight to the running milter of the `gw` fixture (no Postfix in between);
numbers are passed with -D so the jobs each script creates can be checked afterwards. The
IPv6 listener is driven by a raw client: miltertest here cannot connect over IPv6.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import bed
import pytest

LUA = Path(__file__).parent / "miltertest"


def run_lua(gw, script: str, **defines: str) -> subprocess.CompletedProcess:
    exe = shutil.which("miltertest")
    if exe is None:
        pytest.fail("miltertest is not installed: run .ci/run (apt-get install -y miltertest)", pytrace=False)
    args = [exe, "-s", str(LUA / "run.lua"), "-D", f"script={script}", "-D", f"port={gw.milter_port}",
            "-D", f"dir={LUA}"]
    for k, v in defines.items():
        args += ["-D", f"{k}={v}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    passed = r.returncode == 0 and f"PASS {script}" in r.stdout
    assert passed, (f"{script} failed (exit {r.returncode})\n--- stdout:\n{r.stdout}\n"
                    f"--- stderr:\n{r.stderr}\n{gw.logs()}")
    return r


def numbers(k: int) -> list[tuple[str, str]]:
    return [bed.unique_number() for _ in range(k)]


def test_abort_mid_message_then_valid_message(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "abort_then_valid.lua", n1=n1, n2=n2)
    assert gw.jobs(recipient=e1) == []
    assert [j["text"] for j in gw.jobs(recipient=e2)] == [f"after abort {n2}"]


def test_esmtp_args_and_exact_rcpt_delete(gw):
    ((n1, e1),) = numbers(1)
    run_lua(gw, "esmtp_args.lua", n1=n1)
    assert len(gw.jobs(recipient=e1)) == 1


def test_macros_only_at_connect_and_queue_id_only_at_rcpt(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "connect_macros_only.lua", n1=n1, n2=n2)
    assert [j["account"] for j in gw.jobs(recipient=e1)] == ["netlimited"]
    assert gw.jobs(recipient=e2) == []


def test_rejected_rcpt_gets_exactly_one_reply(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "rcpt_reject_one_reply.lua", n1=n1, n2=n2)
    assert len(gw.jobs(recipient=e1)) == 1
    assert len(gw.jobs(recipient=e2)) == 1


def test_rejected_message_gets_exactly_one_reply(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "eom_reject_one_reply.lua", n1=n1, n2=n2)
    assert gw.jobs(recipient=e1) == []
    assert len(gw.jobs(recipient=e2)) == 1


@pytest.mark.parametrize("spelling", ["inet:[::1]:{port}", "inet6:{port}@[::1]"])
def test_ipv6_listener(tmp_path, spelling):
    """`inet:[::1]:PORT` (Postfix's spelling) and `inet6:PORT@[::1]` (Sendmail's) give a real IPv6
    listener (python-libmilter made a unix socket named after `inet6:...`). A raw client, as
    miltertest here cannot connect over IPv6."""
    port = bed.free_port()
    config = bed.write_config(tmp_path, port, 1, extra={"milter": {"socket": spelling.format(port=port)}})
    milter = bed.Milter(config, tmp_path / "milter.log", socket_spec=f"inet:[::1]:{port}").start()
    ((n1, e1),) = numbers(1)
    try:
        with socket.create_connection(("::1", port), timeout=10) as c:
            c.sendall(bed.milter_packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF)))
            assert bed.milter_replies(c, 1)[0][:1] == b"O"
            c.sendall(bed.milter_packet(b"C", b"client\x006" + struct.pack("!H", 4444) + b"::1\0")
                      + bed.milter_packet(b"M", b"<c4ca423@client.example>\0")
                      + bed.milter_packet(b"R", f"<{n1}@sms.example.com>\0".encode()))
            assert bed.milter_replies(c, 1) == [b"c"]
            c.sendall(bed.milter_packet(b"L", b"Subject\0\0") + bed.milter_packet(b"N"))
            assert bed.milter_replies(c, 1) == [b"c"]
            c.sendall(bed.milter_packet(b"B", f"over IPv6 {n1}\r\n".encode()) + bed.milter_packet(b"E"))
            assert bed.milter_replies(c, 1) == [b"d"]  # spooled; no recipient left: discarded
            c.sendall(bed.milter_packet(b"Q"))
        assert [(j["recipient"], j["text"]) for j in bed.queue_list(config)] == [(e1, f"over IPv6 {n1}")]
    finally:
        assert milter.stop() == 0
