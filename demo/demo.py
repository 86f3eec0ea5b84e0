"""The whole trip on loopback: mail in, SMS at the SMSC, receipt, notification mail.

Started by `bash demo/run` (which installs what is missing first). Everything runs in a
fresh scratch directory under /tmp, which is stopped and removed at the end; with --keep
everything stays running (and the directory stays) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bed import MailSink, Milter, Postfix, free_port  # noqa: E402
from dispatcher_bed import DispatcherProc, Smsc  # noqa: E402

# The command set-up installed into the project venv, beside this interpreter.
SMS_MILTER = str(Path(sys.executable).parent / "sms-milter")

CONFIG = """\
milter:
  socket: inet:127.0.0.1:{milter_port}
spool:
  path: {base}/spool.sqlite3
domains:
  sms.example.com: {{style: aspsms}}
  tm.example.com: {{style: telemessage}}
accounts:
  demo:
    userkey: DEMO1
    password: demo-password
    senders:
      - address: c4ca423@client.example
        originator: "+41760000000"
      - domain: tm-client.example
    originator: DemoCo
    notify: ALWAYS
provider:
  smpp: {{host: 127.0.0.1, port: {smpp_port}, system_id: gw, password: pw}}
notify:
  smtp: 127.0.0.1:{notify_port}
  from: sms-gateway@example.com
"""

# The SMSC simulator sends each delivery receipt this long after accepting the SMS (a real
# SMSC takes seconds too), so the job is seen in `submitted` before it turns `delivered`.
RECEIPT_DELAY_MS = 1500


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def reply(answer: tuple[int, bytes]) -> str:
    """An SMTP reply as the client saw it: `250 2.1.0 Ok`."""
    code, text = answer
    return f"{code} {text.decode('utf-8', 'replace')}"


def sms_text(sub: dict) -> str:
    raw = bytes.fromhex(sub["short_message_hex"])
    if sub["data_coding"] == 8:
        return raw.decode("utf-16-be", "replace")
    try:
        from sms_milter.policy.smstext import decode_gsm7
    except ImportError:  # unpacked GSM 03.38: its printable ASCII letters read as ASCII
        return raw.decode("ascii", "replace")
    return decode_gsm7(raw)


def queue_json(cfg: Path) -> list[dict]:
    out = subprocess.run([SMS_MILTER, "queue", "-c", str(cfg), "list", "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def log_lines(path: Path, words: tuple[str, ...]) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith("=====") and any(w in line for w in words)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true",
                    help="leave everything running until Ctrl-C and keep the scratch directory")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sms-milter-demo-"))
    base.chmod(0o755)  # the postfix user must reach the private Postfix's queue inside
    milter_port, smpp_port = free_port(), free_port()
    notify = MailSink().start()
    relay = MailSink().start()
    cfg = base / "sms-milter.yaml"
    cfg.write_text(CONFIG.format(base=base, milter_port=milter_port, smpp_port=smpp_port,
                                 notify_port=notify.port))
    milter_log, dispatcher_log = base / "milter.log", base / "dispatcher.log"
    smsc = Smsc(base, port=smpp_port)
    milter = Milter(cfg, milter_log)
    dispatcher = DispatcherProc(cfg, dispatcher_log)
    postfix = Postfix(base / "postfix", relay.port, f"inet:127.0.0.1:{milter_port}")
    try:
        say(f"configuration {cfg}")
        print(cfg.read_text())
        smsc.start("--receipt-delay", str(RECEIPT_DELAY_MS))
        print(f"SMSC simulator (npm smpp) listening on 127.0.0.1:{smpp_port}, "
              f"delivery receipts after {RECEIPT_DELAY_MS} ms")
        milter.start()
        print(f"sms-milter milter -c {cfg}: listening on 127.0.0.1:{milter_port}")
        dispatcher.start()
        print(f"sms-milter dispatcher -c {cfg}: started")
        postfix.start()
        print(f"private Postfix listening on 127.0.0.1:{postfix.port} with smtpd_milters = "
              f"inet:127.0.0.1:{milter_port}")

        say("the SMTP session (From c4ca423@client.example, an authorized sender)")
        with smtplib.SMTP("127.0.0.1", postfix.port) as s:
            s.ehlo("demo.client.example")
            for verb, address, send in (("MAIL FROM", "c4ca423@client.example", s.mail),
                                        ("RCPT TO", "0041791234567@sms.example.com", s.rcpt),
                                        ("RCPT TO", "+41791234567@sms.example.com", s.rcpt)):
                print(f"{verb}:<{address}>".ljust(41), "->", reply(send(address)))
            body = (b"From: Monitoring <c4ca423@client.example>\r\nSubject: Originator=Monitor\r\n"
                    b"Message-ID: <demo-1@client.example>\r\n\r\nDisk /var on db1 is 97% full.\r\n")
            print("DATA".ljust(41), "->", reply(s.data(body)))

        say(f"the milter's log ({milter_log.name}): a decision line per refused recipient and per message")
        for line in wait("the milter's decision line", lambda: log_lines(milter_log, ("accepted",))
                         and log_lines(milter_log, ("",))):
            print(line)

        say("the job's way through the spool (sms-milter queue list --json, polled)")
        seen: list[str] = []
        start = time.monotonic()

        def final() -> bool:
            jobs = queue_json(cfg)
            state = jobs[0]["state"] if jobs else None
            if state and (not seen or seen[-1] != state):
                seen.append(state)
                print(f"  +{time.monotonic() - start:4.1f}s  job {jobs[0]['id']}  {state:<10} "
                      f"to {jobs[0]['recipient']}  from {jobs[0]['originator']}")
            return state in ("delivered", "failed", "expired")

        wait("the job's final state", final, timeout=30)

        say("what the SMSC received (submit_sm)")
        sub = wait("submit_sm at the SMSC", smsc.submits)[0]
        print(json.dumps({k: sub[k] for k in ("source_addr", "source_addr_ton", "destination_addr",
                                              "data_coding", "registered_delivery") if k in sub}))
        print(f"text: {sms_text(sub)}")

        say(f"the dispatcher's log ({dispatcher_log.name})")
        for line in wait("the dispatcher's log lines", lambda: log_lines(dispatcher_log, ("",))):
            print(line)

        say("notification mail to the sender")
        note = wait("the notification mail", lambda: notify.messages)[0]
        print(note.content.decode("utf-8", "replace").strip())

        if args.keep:
            say(f"all running; scratch directory {base} (configuration, spool, logs, Postfix maillog)\n"
                f"   send your own mail to 127.0.0.1:{postfix.port}, e.g.\n"
                f"   {sys.executable} -c \"import smtplib; smtplib.SMTP('127.0.0.1', {postfix.port})"
                ".sendmail('c4ca423@client.example', ['0041791234567@sms.example.com'], "
                "'Subject: test\\n\\nhello')\"\n"
                f"   then: {SMS_MILTER} queue -c {cfg} list\n"
                "   Ctrl-C stops everything (the directory stays).")
            while True:
                time.sleep(3600)
        say("demo done: one mail in, one SMS out, receipt recorded, sender notified")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        postfix.stop()
        dispatcher.stop()
        milter.stop()
        smsc.stop()
        notify.stop()
        relay.stop()
        if args.keep:
            print(f"\nstopped; the scratch directory {base} is kept", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
            print(f"\nstopped everything and removed the scratch directory {base}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
