"""Voice and fax end to end through Postfix (issue 15): mail to <number>@Mobile.<domain> rings
SIPp and plays the rendered speech; a PDF to <number>@Fax.<domain> becomes a queued HylaFAX job
with its pages; both end in the right states with the right notification mails. Refusals come
at SMTP with the catalogue's reply.

Real peers: Postfix + `sms-milter milter` (tests/bed.py), `sms-milter dispatcher` as a process
(tests/dispatcher_bed.py) with the SMSC simulator for SMS, SIPp (tests/voice_bed.py), a private
HylaFAX (tests/fax_bed.py), Ghostscript for the PDF.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from bed import MailSink, Milter, Postfix, free_port, queue_list, run_cli, wait_until
from dispatcher_bed import DispatcherProc, Smsc, dispatcher_config, node_ready
from sms_milter.policy import catalogue

SENDER = "ops@tm-client.example"
TM = "tm.example.com"

TOOLS = ("sipp", "baresip", "faxq", "gs", "espeak-ng", "sox")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason=f"needs {', '.join(TOOLS)}")


class ChannelBed:
    """Postfix + milter + dispatcher with `voice:` and `fax:` configured, a notification sink."""

    def __init__(self, tmp: Path, voice: dict, fax: dict, account: dict | None = None):
        if node_ready() is not None:
            pytest.skip(node_ready())
        self.tmp = tmp
        self.notify = MailSink().start()
        self.relay = MailSink().start()
        self.smsc = Smsc(tmp).start()
        self.milter_port = free_port()
        acct = {"notify": "ALWAYS", "template": "{subject},{body}", **(account or {})}
        self.config = dispatcher_config(tmp, self.smsc.port, self.notify.port, smpp={"reconnect_min": 1.0},
                                        extra={"voice": voice, "fax": fax, "accounts": {"tmco": acct},
                                               "milter": {"socket": f"inet:127.0.0.1:{self.milter_port}",
                                                          "max_message_bytes": 1048576, "spool_timeout": 1}})
        self.milter = Milter(self.config, tmp / "milter.log").start()
        self.postfix = Postfix(None, self.relay.port, f"inet:127.0.0.1:{self.milter_port}").start()
        self.dispatcher = DispatcherProc(self.config, tmp / "dispatcher.log").start()

    def send(self, rcpt: str, body: str = "", subject: str = "", attach: tuple = ()) -> dict:
        from bed import smtp_send

        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = SENDER, rcpt, subject
        m.set_content(body)
        for data, ctype, name in attach:
            main, sub = ctype.split("/")
            m.add_attachment(data, maintype=main, subtype=sub, filename=name)
        return smtp_send(self.postfix.port, SENDER, [rcpt], m)

    def job(self, recipient: str) -> dict:
        (j,) = [j for j in queue_list(self.config) if j["recipient"] == recipient]
        return j

    def wait_state(self, recipient: str, states: tuple[str, ...], timeout: float = 90) -> dict:
        wait_until(lambda: self.job(recipient)["state"] in states, timeout,
                   f"job to {recipient} in {states}",
                   detail=lambda: f"job: {self.job(recipient)}\n--- dispatcher:\n"
                   f"{self.dispatcher.log_tail()}")
        return self.job(recipient)

    def close(self) -> None:
        for stop in (self.dispatcher.stop, self.postfix.stop, self.milter.stop, self.smsc.stop,
                     self.notify.stop, self.relay.stop):
            try:
                stop()
            except Exception:  # noqa: BLE001 (stop the rest)
                pass


@pytest.fixture
def hylafax(tmp_path) -> Iterator:
    from fax_bed import HylaFax

    hf = HylaFax(tmp_path)
    yield hf
    hf.stop()


def _voice(tmp: Path, port: int, **kw) -> dict:
    return {"trunk": f"127.0.0.1:{port}", "work_dir": str(tmp / "voice"), "rtp_ports": "45000-49999",
            "max_seconds": 30, **kw}


def _fax(tmp: Path, server: str = "127.0.0.1:1", **kw) -> dict:
    return {"server": server, "work_dir": str(tmp / "fax"), "poll": 0.3, "max_bytes": 200000, **kw}


def two_page_pdf(tmp: Path) -> bytes:
    out = tmp / "two.pdf"
    ps = ("/Helvetica findfont 36 scalefont setfont 72 700 moveto (Page one) show showpage "
          "72 700 moveto (Page two) show showpage")
    subprocess.run(["gs", "-q", "-dNOPAUSE", "-dBATCH", "-sDEVICE=pdfwrite", f"-sOutputFile={out}", "-c", ps],
                   check=True, timeout=60)
    return out.read_bytes()


def test_mail_to_mobile_rings_sipp_and_plays_the_speech(tmp_path):
    from voice_bed import RtpCounter, Sipp

    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "answer", rtp.port)
    bed = ChannelBed(tmp_path, _voice(tmp_path, sipp.port), _fax(tmp_path))
    try:
        r = bed.send(f"41791234567@Mobile.{TM}", "Your table is ready. We look forward to seeing you.")
        assert r["data"][0] == 250, r
        job = bed.job("+41791234567")
        assert (job["device"], job["channel"], job["language"]) == ("mobile", "voice", "en")
        job = bed.wait_state("+41791234567", ("delivered", "failed"))
        assert job["state"] == "delivered", job
        assert job["provider_refs"][0].startswith(f"call-{job['id']}-")
        assert sipp.wait(20) == 0, sipp.errors()
        m = re.search(r"calling \+41791234567 \((\d+\.\d)s of audio\)", bed.dispatcher.log())
        assert m, bed.dispatcher.log_tail()
        seconds = float(m.group(1))
        assert seconds > 2.0  # the sentence spoken, not a click
        # 20 ms packets: about 50 a second, plus up to ~0.7 s of padding around the file
        wait_until(lambda: rtp.packets >= seconds * 50 * 0.9, 10, "the RTP of the whole message")
        assert seconds * 50 * 0.9 <= rtp.packets <= (seconds + 1.5) * 50, (rtp.packets, seconds)
        (mail,) = bed.notify.wait_for(lambda m: "+41791234567" in m.subject, timeout=30)
        assert mail.subject == "Voice call to +41791234567: Delivered" and mail.rcpt_tos == [SENDER]
    finally:
        bed.close()
        sipp.stop()
        rtp.close()


def test_busy_mobile_is_retried_then_failed_with_a_failed_mail(tmp_path):
    from voice_bed import Sipp

    sipp = Sipp(tmp_path, "busy", calls=2)
    bed = ChannelBed(tmp_path, _voice(tmp_path, sipp.port, max_attempts=2), _fax(tmp_path))
    try:
        assert bed.send(f"41791234568@Home.{TM}", "Call me back.")["data"][0] == 250
        job = bed.wait_state("+41791234568", ("delivered", "failed"))
        assert job["state"] == "failed" and job["attempts"] == 2, job
        assert job["last_error"] == "call busy: 486 Busy Here (attempt 2 of 2)"
        assert sipp.wait(15) == 0, sipp.errors()  # two INVITEs, two 486
        (mail,) = bed.notify.wait_for(lambda m: "+41791234568" in m.subject, timeout=30)
        assert mail.subject == "Voice call to +41791234568: Failed"
        assert "486 Busy Here" in mail.text()
    finally:
        bed.close()
        sipp.stop()


def test_pdf_to_fax_is_a_hylafax_job_with_two_pages_then_delivered(tmp_path, hylafax):
    from PIL import Image

    pdf = two_page_pdf(tmp_path)
    bed = ChannelBed(tmp_path, _voice(tmp_path, 9), _fax(tmp_path, hylafax.server))
    try:
        r = bed.send(f"41441234567@Fax.{TM}", "", attach=((pdf, "application/pdf", "order.pdf"),))
        assert r["data"][0] == 250, r
        job = bed.job("+41441234567")
        assert (job["channel"], [f["name"] for f in job["files"]]) == ("fax", ["order.pdf"])
        job = bed.wait_state("+41441234567", ("submitted", "failed"), timeout=180)  # slow sendfax under load
        assert job["state"] == "submitted", job
        hf_id = job["provider_refs"][0].removeprefix("hylafax:")
        q = hylafax.qfile(hf_id)
        assert q["number"] == "0041441234567", q
        (doc,) = hylafax.documents(hf_id)
        with Image.open(doc) as tiff:
            assert tiff.n_frames == 2  # the PDF's two pages, nothing else (no text page)
        hylafax.announce_modem()
        job = bed.wait_state("+41441234567", ("delivered", "failed"))
        assert job["state"] == "delivered", job
        q = hylafax.qfile(hf_id)
        assert (q["state"], q["npages"]) == ("7", "2")
        (mail,) = bed.notify.wait_for(lambda m: "+41441234567" in m.subject, timeout=30)
        assert mail.subject == "Fax to +41441234567: Delivered"
        show = run_cli(bed.config, "queue", "show", str(job["id"]))
        assert re.search(r"channel:\s+fax", show.stdout) and "file:         order.pdf (application/pdf, " \
            f"{len(pdf)} bytes" in show.stdout, show.stdout + show.stderr
        stats = json.loads(run_cli(bed.config, "stats", "--json").stdout)
        assert stats["channels"] == {"fax": {"delivered": 1}}, stats
    finally:
        bed.close()


def test_refusals_at_smtp_carry_the_catalogue_reply(tmp_path):
    bed = ChannelBed(tmp_path, _voice(tmp_path, 9, max_seconds=5), _fax(tmp_path, max_bytes=10000))
    try:
        r = bed.send(f"41791234567@Mobile.{TM}", "word " * 40)
        assert r["data"][0] == 552, r
        want = catalogue.VOICE_TOO_LONG(chars=199, seconds=15, max_seconds="5", max_chars=80)
        assert r["data"][1] == f"{want.xcode} {want.text}", r
        r = bed.send(f"41791234567@Mobile.{TM}", "hi", attach=((b"%PDF-1.4", "application/pdf", "a.pdf"),))
        assert r["data"][0] == 550 and "attachment (application/pdf); a voice call" in r["data"][1], r
        r = bed.send(f"41441234567@Fax.{TM}", "", attach=((b"PK\x03\x04", "application/zip", "a.zip"),))
        assert r["data"][0] == 550 and "(application/zip) that cannot be faxed" in r["data"][1], r
        big = (b"%PDF" + b"0" * 20000, "application/pdf", "b.pdf")
        r = bed.send(f"41441234567@Fax.{TM}", "", attach=(big,))
        want = catalogue.FAX_TOO_BIG(size=20004, limit=10000)
        assert r["data"] == (552, f"{want.xcode} {want.text}"), r
        # SMS still refuses any attachment
        r = bed.send(f"41791234567@{TM}", "hi", attach=((b"%PDF-1.4", "application/pdf", "a.pdf"),))
        assert r["data"][0] == 550 and "SMS mail must be plain text only" in r["data"][1], r
        assert queue_list(bed.config) == []
    finally:
        bed.close()
