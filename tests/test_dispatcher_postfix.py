"""postfix-conf/ snippets in a real Postfix: SMS-domain mail that bypassed the milter never
reaches the relay (the internet), and is not silently lost.

The instance runs WITHOUT smtpd_milters (every message here "bypassed the milter") and with
transport_maps / smsgw_destination_recipient_limit taken verbatim from main.cf.snippet and the
smsgw service from master.cf.snippet. The pipe's argv command is replaced by a stub that
records what pipe(8) hands over and exits as told (0 spooled, 65 refused, 75 tempfail), since
pipe(8) runs it as an unprivileged user who cannot reach this machine's Python under /root;
`sms-milter submit` itself is tested with the CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from bed import MailSink, Postfix, make_message, unique, wait_until

CONF = Path(__file__).resolve().parent.parent / "postfix-conf"


def read_main_snippet(text: str) -> dict[str, str]:
    """main.cf syntax: `name = value`, indented lines continue it, # comments."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            if not line.strip() or not line.startswith((" ", "\t")):
                key = None
            continue
        if line[0] in " \t" and key:
            out[key] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        key = name.strip()
        out[key] = value.strip()
    return out


def read_master_snippet(text: str, argv: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    body = "\n".join(lines) + "\n"
    body = re.sub(r"user=\S+", "user=nobody", body)
    return re.sub(r"argv=\S+", f"argv={argv}", body)


class SnippetPostfix(Postfix):
    def __init__(self, *a, master_extra: str = "", **kw):
        super().__init__(*a, **kw)
        self.master_extra = master_extra

    def master_cf(self) -> str:
        return super().master_cf() + self.master_extra


@pytest.fixture(scope="module")
def relay_sink():
    with MailSink() as s:
        yield s


@pytest.fixture(scope="module")
def stub():
    d = Path(tempfile.mkdtemp(prefix="sms-milter-smsgw-"))
    os.chmod(d, 0o777)
    script = d / "sms-milter"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(date +%s%N); printf '%s\\n' \"$@\" > {d}/call.$n.args; cat > {d}/call.$n.msg\n"
        f"code=$(cat {d}/exit 2>/dev/null || echo 0)\n"
        f"[ \"$code\" = 65 ] && echo '5.7.1 Sender c4ca423@client.example is not authorized for SMS' >&2\n"
        f"[ \"$code\" = 75 ] && echo '4.3.0 spool unavailable' >&2\n"
        "exit $code\n")
    os.chmod(script, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def calls(stub: Path) -> list[tuple[list[str], bytes]]:
    out = []
    for a in sorted(stub.glob("call.*.args")):
        out.append((a.read_text().splitlines(), a.with_suffix(".msg").read_bytes()))
    return out


@pytest.fixture(scope="module")
def pf(relay_sink, stub):
    main = read_main_snippet((CONF / "main.cf.snippet").read_text())
    assert main["transport_maps"].startswith("inline:{")
    extra = {"transport_maps": main["transport_maps"],
             "smsgw_destination_recipient_limit": main["smsgw_destination_recipient_limit"],
             "delay_warning_time": "0"}
    master = read_master_snippet((CONF / "master.cf.snippet").read_text(), str(stub / "sms-milter"))
    p = SnippetPostfix(None, sink_port=relay_sink.port, milter_socket=None, extra_main=extra,
                       master_extra=master)
    p.start()
    yield p
    p.stop()


def _send(pf: Postfix, sender: str, rcpts: list[str], token: str) -> None:
    import smtplib

    msg = make_message(f"bypass {token}", f"body {token}", sender=sender)
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
        s.sendmail(sender, rcpts, msg)


def test_bypassing_sms_mail_goes_to_the_pipe_never_to_the_relay(pf, relay_sink, stub):
    (stub / "exit").write_text("0")
    token = unique("pipe")
    other = f"{token}@relay.example"
    sms = ["0041791234567@sms.example.com", "41791234567@mobile.tm.example.com"]
    _send(pf, "c4ca423@client.example", [*sms, other], token)
    relay_sink.wait_for(lambda m: token in m.text(), timeout=20)
    got = wait_until(lambda: [c for c in calls(stub) if token.encode() in c[1]], 20, "the smsgw pipe call",
                     detail=lambda: pf.log()[-3000:])
    assert len(got) == 1  # one call for all SMS recipients (fixed next-hop, recipient limit)
    argv, content = got[0]
    assert argv[:3] == ["submit", "-c", "/etc/sms-milter/sms-milter.yaml"]
    assert argv[3:5] == ["-f", "c4ca423@client.example"] and argv[5] == "-q" and argv[7] == "--"
    assert sorted(argv[8:]) == sorted(sms)
    assert content.startswith(b"Return-Path: <c4ca423@client.example>")
    relayed = [m for m in relay_sink.messages if token in m.text()]
    assert [m.rcpt_tos for m in relayed] == [[other]]  # only the non-SMS recipient went out


def test_local_submission_goes_to_the_pipe_too(pf, relay_sink, stub):
    (stub / "exit").write_text("0")
    token = unique("local")
    msg = make_message(f"local {token}", f"body {token}", sender="monitor@client.example")
    r = subprocess.run(["sendmail", "-C", str(pf.confdir), "-f", "", "0041791234567@sms.example.com"],
                       input=msg, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    argv, _ = wait_until(lambda: next((c for c in calls(stub) if token.encode() in c[1]), None), 20,
                         "the smsgw pipe call", detail=lambda: pf.log()[-3000:])
    assert argv[3:5] == ["-f", ""]  # the null sender reaches `submit` as '' (null_sender=)
    assert not [m for m in relay_sink.messages if token in m.text()]


def test_refused_by_the_pipe_bounces_with_the_reason(pf, relay_sink, stub):
    (stub / "exit").write_text("65")
    token = unique("refused")
    _send(pf, "c4ca423@client.example", ["0041791234568@sms.example.com"], token)
    bounce = relay_sink.wait_for(lambda m: token in m.text() and m.mail_from in ("", "<>"), timeout=20)[0]
    assert bounce.rcpt_tos == ["c4ca423@client.example"]
    assert "is not authorized for SMS" in " ".join(bounce.text().split())
    assert not [m for m in relay_sink.messages if "0041791234568@sms.example.com" in m.rcpt_tos]


def test_tempfail_by_the_pipe_keeps_the_mail_queued(pf, relay_sink, stub):
    (stub / "exit").write_text("75")
    token = unique("deferred")
    off = pf.log_offset()
    _send(pf, "c4ca423@client.example", ["0041791234569@sms.example.com"], token)
    pf.wait_log(r"to=<0041791234569@sms\.example\.com>.*relay=smsgw.*status=deferred", timeout=20, since=off)
    assert pf.queue_ids()  # still queued: it is retried, not lost
    assert not [m for m in relay_sink.messages if token in m.text()]
    (stub / "exit").write_text("0")
    pf.flush()
    wait_until(lambda: any(token.encode() in c[1] for c in calls(stub) if len(c[0]) > 8), 20,
               "the retried delivery")
    (stub / "exit").write_text("0")


def test_error_variant_for_hosts_without_the_milter(relay_sink):
    """The commented `error:` alternative of main.cf.snippet (for relays that do not run the
    milter), uncommented: SMTP gets 550 at RCPT with the reason, a local submission bounces."""
    import smtplib

    text = (CONF / "main.cf.snippet").read_text()
    block = text[text.index("# transport_maps = inline:{"):]
    lines = []
    for ln in block.splitlines():
        if not ln.startswith("# ") or ln.startswith("# ("):
            break
        lines.append(ln[2:])
    variant = read_main_snippet("\n".join(lines))["transport_maps"]
    assert "error:5.7.1" in variant
    p = Postfix(None, sink_port=relay_sink.port, milter_socket=None, extra_main={"transport_maps": variant})
    p.start()
    try:
        token = unique("errmap")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            _send(p, "c4ca423@client.example", ["41791234567@sms.tm.example.com"], token)
        code, reply = e.value.recipients["41791234567@sms.tm.example.com"]
        assert code == 550 and b"SMS mail must pass the sms-milter" in reply
        msg = make_message(f"local {token}", f"body {token}", sender="monitor@client.example")
        r = subprocess.run(["sendmail", "-C", str(p.confdir), "-f", "monitor@client.example",
                            "0041791234567@sms.example.com"], input=msg, capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        bounce = relay_sink.wait_for(lambda m: token in m.text() and m.mail_from in ("", "<>"), timeout=20)[0]
        assert bounce.rcpt_tos == ["monitor@client.example"]
        assert "SMS mail must pass the sms-milter" in " ".join(bounce.text().split())
        assert not [m for m in relay_sink.messages if "0041791234567@sms.example.com" in m.rcpt_tos]
    finally:
        p.stop()
