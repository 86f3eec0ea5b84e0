"""The whole trip on loopback: mail in, SMS at the SMSC, receipt, notification mail.

Started by `bash demo/run` (which installs what is missing first). Everything runs in
a fresh directory under /tmp and is stopped at the end (or on Ctrl-C with --keep).
"""

from __future__ import annotations

import argparse
import json
import smtplib
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bed import MailSink, Milter, Postfix, free_port  # noqa: E402
from dispatcher_bed import DispatcherProc, Smsc  # noqa: E402
from sms_milter.policy.smstext import decode_gsm7  # noqa: E402

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


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sms-milter-demo-"))
    base.chmod(0o755)
    milter_port, smpp_port = free_port(), free_port()
    notify = MailSink().start()
    relay = MailSink().start()
    cfg = base / "sms-milter.yaml"
    cfg.write_text(CONFIG.format(base=base, milter_port=milter_port, smpp_port=smpp_port,
                                 notify_port=notify.port))
    smsc = Smsc(base, port=smpp_port)
    milter = Milter(cfg)
    dispatcher = DispatcherProc(cfg, base / "dispatcher.log")
    postfix = Postfix(None, relay.port, f"inet:127.0.0.1:{milter_port}")
    try:
        say(f"configuration {cfg}")
        print(cfg.read_text())
        smsc.start()
        print(f"SMSC simulator (npm smpp) listening on 127.0.0.1:{smpp_port}")
        milter.start()
        print(f"sms-milter milter listening on 127.0.0.1:{milter_port}")
        dispatcher.start()
        print("sms-milter dispatcher started")
        postfix.start()
        print(f"private Postfix listening on 127.0.0.1:{postfix.port} with smtpd_milters = "
              f"inet:127.0.0.1:{milter_port}")

        say("sending: From c4ca423@client.example To 0041791234567@sms.example.com")
        with smtplib.SMTP("127.0.0.1", postfix.port) as s:
            s.ehlo("demo.client.example")
            print("MAIL FROM ->", *s.mail("c4ca423@client.example"))
            print("RCPT TO   ->", *s.rcpt("0041791234567@sms.example.com"))
            print("RCPT TO   ->", *s.rcpt("+41791234567@sms.example.com"), " (refused: + instead of 00)")
            body = (b"From: Monitoring <c4ca423@client.example>\r\nSubject: Originator=Monitor\r\n"
                    b"Message-ID: <demo-1@client.example>\r\n\r\nDisk /var on db1 is 97% full.\r\n")
            print("DATA      ->", *s.data(body))

        say("the spool (sms-milter queue list)")
        import subprocess

        subprocess.run([sys.executable, "-m", "sms_milter.cli", "queue", "-c", str(cfg), "list"], check=True)

        say("what the SMSC received")
        sub = wait("submit_sm at the SMSC", lambda: smsc.submits())[0]
        text = decode_gsm7(bytes.fromhex(sub["short_message_hex"])) if sub["data_coding"] == 0 else "?"
        print(json.dumps({k: sub[k] for k in ("source_addr", "source_addr_ton", "destination_addr",
                                              "data_coding", "registered_delivery") if k in sub}))
        print(f"text: {text!r}")

        say("delivery receipt -> job state")
        db = sqlite3.connect(base / "spool.sqlite3")
        state = wait("the receipt", lambda: (db.execute("SELECT state FROM jobs").fetchone() or [None])[0]
                     in ("delivered", "failed") and db.execute("SELECT state FROM jobs").fetchone()[0])
        print(f"job 1 is {state}")

        say("notification mail to the sender")
        note = wait("the notification mail", lambda: notify.messages)[0]
        print(note.content.decode("utf-8", "replace").strip())

        if args.keep:
            say(f"all running; send mail to 127.0.0.1:{postfix.port}, e.g.\n"
                f"   swaks --server 127.0.0.1:{postfix.port} -f c4ca423@client.example "
                "-t 0041791234567@sms.example.com --body hello\n"
                f"   logs and spool in {base}. Ctrl-C stops everything.")
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


if __name__ == "__main__":
    sys.exit(main())
