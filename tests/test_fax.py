"""The fax channel (issue 15): rendering to G3 TIFF, jobs queued in and followed through a private
HylaFAX (faxq + hfaxd, tests/fax_bed.py), states driven by HylaFAX's own tools (faxrm, a fake
modem whose SendFaxCmd plays the far end)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fax_bed import HylaFax, free_tcp_port
from PIL import Image, ImageDraw
from sms_milter.channels import faxdoc
from sms_milter.channels.fax import FaxProvider
from sms_milter.channels.tools import Attachment, ChannelError
from sms_milter.dispatcher.provider import QueryAnswer, Receipt, SubmitResult
from sms_milter.model import FaxConfig
from sms_milter.spool.base import Job, OverduePart


def tiff_pages(path: Path) -> list[dict[str, str]]:
    """Each page's tags as tiffinfo (libtiff) prints them."""
    out = subprocess.run(["tiffinfo", str(path)], capture_output=True, text=True, check=True).stdout
    pages: list[dict[str, str]] = []
    for line in out.splitlines():
        if line.startswith("TIFF Directory"):
            pages.append({})
        elif ":" in line and pages:
            k, _, v = line.strip().partition(":")
            pages[-1][k.strip()] = v.strip()
    return pages


def make_pdf(path: Path, pages: int) -> Path:
    ps = "".join(f"72 700 moveto (Page {i + 1} of {pages}) show showpage " for i in range(pages))
    subprocess.run(["gs", "-q", "-dSAFER", "-sDEVICE=pdfwrite", "-o", str(path), "-c",
                    f"/Helvetica findfont 24 scalefont setfont {ps}"], check=True)
    return path


def make_picture(path: Path, fmt: str) -> Path:
    img = Image.new("RGB", (640, 480), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((100, 100, 540, 380), fill=(200, 20, 20))
    img.save(path, format=fmt)
    return path


def job(jid: int, text: str = "Dear customer,\nplease find the invoice attached.\n",
        recipient: str = "+41441234567") -> Job:
    return Job(recipient=recipient, originator="+41440000000", text=text, parts=1, account="acme",
               device="fax", id=jid, attempts=1)


# -- rendering -------------------------------------------------------------------------------------
def test_text_pdf_and_pictures_become_one_fine_g3_tiff(tmp_path):
    docs = [Attachment(make_pdf(tmp_path / "inv.pdf", 3), "application/pdf", "inv.pdf"),
            Attachment(make_picture(tmp_path / "a.png", "PNG"), "image/png"),
            Attachment(make_picture(tmp_path / "b.jpg", "JPEG"), "image/jpeg")]
    text = "Fax für Herrn Müller – Grüße\n" + "\n".join(f"line {i}" for i in range(80))  # 2 text pages
    fax = faxdoc.render(text, docs, tmp_path / "fax.tif")
    pages = tiff_pages(fax.path)
    assert fax.pages == len(pages) == 2 + 3 + 1 + 1
    for p in pages:
        assert p["Compression Scheme"] == "CCITT Group 3"
        assert p["Image Width"].startswith("1728 ") and p["Image Width"].endswith("Image Length: 2292")
        assert p["Resolution"].startswith("204, 196")  # fine
        assert p["Photometric Interpretation"] == "min-is-white"
        assert p["Bits/Sample"] == "1"
    assert fax.size == fax.path.stat().st_size


def test_caps_and_unknown_types_are_refused_by_name(tmp_path):
    pdf = make_pdf(tmp_path / "long.pdf", 8)
    with pytest.raises(ChannelError, match=r"more than 5 pages \(attachment 1 \(long.pdf\)") as e:
        faxdoc.render("cover", [Attachment(pdf, "application/pdf", "long.pdf")], tmp_path / "f.tif",
                      max_pages=5)
    assert not e.value.temporary
    with pytest.raises(ChannelError, match=r"the fax is \d+ bytes, more than the 1000 allowed"):
        faxdoc.render("a page of text", [], tmp_path / "g.tif", max_bytes=1000)
    zip_ = tmp_path / "x.zip"
    zip_.write_bytes(b"PK\x03\x04")
    with pytest.raises(ChannelError, match=r"attachment 1 \(x.zip\): application/zip cannot be faxed"):
        faxdoc.render("", [Attachment(zip_, "application/zip", "x.zip")], tmp_path / "h.tif")
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 this is not really a PDF")
    with pytest.raises(ChannelError, match=r"attachment 1 \(bad.pdf\) (cannot be read as PDF|has no pages)"):
        faxdoc.render("", [Attachment(bad, "application/pdf", "bad.pdf")], tmp_path / "i.tif")
    with pytest.raises(ChannelError, match="nothing to send"):
        faxdoc.render(" \n", [], tmp_path / "j.tif")


def test_office_documents_need_libreoffice(tmp_path):
    doc = tmp_path / "letter.docx"
    doc.write_bytes(b"PK\x03\x04 not really a docx")
    ctype = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    if shutil.which("soffice") or shutil.which("libreoffice"):
        pytest.skip("LibreOffice is installed here: the refusal cannot be shown")
    with pytest.raises(ChannelError, match=r"Word documents \(.*\) cannot be faxed here: LibreOffice is not "
                                           r"installed; send a PDF"):
        faxdoc.render("", [Attachment(doc, ctype, "letter.docx")], tmp_path / "o.tif")


# -- HylaFAX ---------------------------------------------------------------------------------------
class Collector:
    def __init__(self) -> None:
        self.results: list[SubmitResult] = []
        self.receipts: list[Receipt] = []
        self.cond = threading.Condition()

    def on_result(self, r: SubmitResult) -> None:
        with self.cond:
            self.results.append(r)
            self.cond.notify_all()

    def on_receipt(self, r: Receipt) -> None:
        with self.cond:
            self.receipts.append(r)
            self.cond.notify_all()

    def wait(self, what: str, n: int = 1, timeout: float = 60) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(getattr(self, what)) >= n, timeout), f"no {what}"
            return list(getattr(self, what))


@pytest.fixture
def hylafax(tmp_path):
    hf = HylaFax(tmp_path)
    yield hf
    hf.stop()


def provider(tmp_path: Path, server: str, docs: dict[int, list[Attachment]] | None = None,
             **kw) -> tuple[FaxProvider, Collector]:
    cfg = FaxConfig(server=server, work_dir=str(tmp_path / "work"), poll=0.3, **kw)
    p = FaxProvider(cfg, attachments=lambda j: (docs or {}).get(j.id, []))
    c = Collector()
    p.start(c.on_result, c.on_receipt, lambda: None)
    return p, c


def test_fax_is_queued_with_its_number_and_pages_then_sent(tmp_path, hylafax):
    pdf = Attachment(make_pdf(tmp_path / "invoice.pdf", 3), "application/pdf", "invoice.pdf")
    p, c = provider(tmp_path, hylafax.server, {21: [pdf]})
    try:
        t0 = time.monotonic()
        p.submit([job(21)])
        (r,) = c.wait("results")
        assert r.ok and r.refs[0].startswith("hylafax:"), r
        jobid = r.refs[0].removeprefix("hylafax:")
        queued = p.client.jobs()[jobid]
        # Queued in HylaFAX, waiting for a modem: the right number and our tag.
        assert (queued.state, queued.number, queued.tag) == ("W", "0041441234567", "sms-milter:21")
        (doc,) = hylafax.documents(jobid)
        assert len(tiff_pages(doc)) == 4  # the cover text + 3 PDF pages, as uploaded to hfaxd
        assert p.submitted[21] == (jobid, 4)
        assert not c.receipts
        hylafax.announce_modem()  # the fake modem: HylaFAX prepares the job and sends it
        (rc,) = c.wait("receipts")
        assert rc == Receipt(ref=r.refs[0], state="delivered", error="", source="+41441234567")
        q = hylafax.qfile(jobid)
        assert (q["state"], q["totpages"], q["npages"]) == ("7", "4", "4")  # done, all 4 pages
        assert hylafax.sent_log() == "0041441234567 done 4\n"
        print(f"\nfax: 4 pages queued as HylaFAX job {jobid}, delivered after {time.monotonic() - t0:.1f}s")
    finally:
        p.close(5)


def test_transfers_do_not_need_the_port_below_hfaxd(tmp_path, hylafax):
    """The flake of the test above under load: in active mode hfaxd binds each data transfer to its
    control port - 1; any socket there (another bed's server, an ephemeral client port) made sendfax
    fail with "425 Cannot create data socket ... Address already in use" after 55 s of retries. The
    client uses passive mode: with that port held, an upload and a listing still work."""
    from sms_milter.channels.hylafax import HylaFaxClient

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", hylafax.port - 1))
        holder.listen()
    except OSError:  # already held by some other socket: the same condition
        pass
    client = HylaFaxClient(hylafax.server)
    try:
        doc = tmp_path / "page.tif"
        make_picture(doc, "TIFF")
        jobid = client.submit(doc, "0041449999999", "sms-milter:77", 3, 3, 600)
        listed = client.jobs()
        assert jobid in listed and listed[jobid].tag == "sms-milter:77", listed
    finally:
        client.close()
        holder.close()


def test_failed_and_retried_faxes_map_to_failed_and_buffered(tmp_path, hylafax):
    hylafax.outcome("0041441111111", "fail")
    hylafax.outcome("0041442222222", "retry")
    p, c = provider(tmp_path, hylafax.server)
    try:
        p.submit([job(31, recipient="+41441111111"), job(32, recipient="+41442222222")])
        results = c.wait("results", 2)
        assert all(r.ok for r in results), results
        refs = {r.job_id: r.refs[0] for r in results}
        hylafax.announce_modem()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(c.receipts) < 2:
            hylafax.announce_modem()  # the fake modem is free again after each call
            time.sleep(0.5)
        got = {r.ref: r for r in c.wait("receipts", 2)}
        assert got[refs[31]].state == "failed" and "Busy signal detected" in got[refs[31]].error
        assert got[refs[32]].state == "buffered" and "No answer from remote" in got[refs[32]].error
        jid32 = refs[32].removeprefix("hylafax:")
        assert p.client.jobs()[jid32].state in ("S", "P")  # HylaFAX sleeps until its next try
        # The sender gives up on the retried one: faxrm (HylaFAX's own tool) -> failed.
        subprocess.run(["faxrm", "-h", hylafax.server, jid32], check=True, capture_output=True, timeout=30,
                       env={"HOME": str(p.client.home), "PATH": "/usr/bin:/bin"})
        receipts = c.wait("receipts", 3)
        assert receipts[-1].ref == refs[32] and receipts[-1].state == "failed", receipts
        assert hylafax.qfile(jid32)["state"] == "8"
    finally:
        p.close(5)


def test_status_after_a_restart_comes_from_query(tmp_path, hylafax):
    p, c = provider(tmp_path, hylafax.server)
    p.submit([job(41)])
    (r,) = c.wait("results")
    p.close(5)  # the dispatcher stops while HylaFAX still has the fax
    hylafax.announce_modem()
    jobid = r.refs[0].removeprefix("hylafax:")
    deadline = time.monotonic() + 60
    while hylafax.qfile(jobid).get("state") != "7" and time.monotonic() < deadline:
        time.sleep(0.2)
    p2, _ = provider(tmp_path, hylafax.server)
    answers: list[QueryAnswer] = []
    p2.query([OverduePart(41, 0, r.refs[0], "+41441234567", "+41440000000"),
              OverduePart(42, 0, "hylafax:999", "+41441234567", "+41440000000")], answers.append)
    assert answers[0] == QueryAnswer(41, r.refs[0], "+41441234567", "delivered", "done")
    assert answers[1].state == "" and answers[1].detail == "HylaFAX has no such job"
    p2.close(1)


def test_hylafax_down_is_temporary_and_content_errors_are_not(tmp_path):
    zip_ = tmp_path / "x.zip"
    zip_.write_bytes(b"PK")
    p, c = provider(tmp_path, f"127.0.0.1:{free_tcp_port()}", {52: [Attachment(zip_, "application/zip")]})
    try:
        p.submit([job(51), job(52)])
        r51, r52 = sorted(c.wait("results", 2), key=lambda r: r.job_id)
        assert r51.temporary and r51.error.startswith("HylaFAX at 127.0.0.1:"), r51
        assert not r52.temporary and "application/zip cannot be faxed" in r52.error, r52
        assert not list((tmp_path / "work").iterdir())  # rendering scratch removed
    finally:
        p.close(1)
