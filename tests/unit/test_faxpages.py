"""The inline page count of a fax (policy/faxpages.py, pure) and the page cap in check_fax (issue 15):
worst inputs included (TIFF loops and offsets past the end, PDFs that cannot be read inline)."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sms_milter.channels import faxdoc
from sms_milter.model import FaxConfig
from sms_milter.policy import catalogue, channelcheck, faxpages
from sms_milter.policy.channelcheck import Capabilities
from sms_milter.policy.faxpages import ROWS, PageCount, fax_pages, pdf_pages, text_pages, tiff_pages
from sms_milter.spool.files import JobFile


def _tiff(n: int) -> bytes:
    frames = [Image.new("1", (40, 30), i % 2) for i in range(n)]
    out = io.BytesIO()
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def _pil_pdf(n: int) -> bytes:
    frames = [Image.new("L", (60, 80), 255) for _ in range(n)]
    out = io.BytesIO()
    frames[0].save(out, format="PDF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def gs_pdf(tmp: Path, pages: int) -> bytes:
    """A PDF of `pages` pages made by Ghostscript (the tests' usual producer)."""
    ps = tmp / "doc.ps"
    ps.write_text("%!PS\n" + "".join(f"/Helvetica findfont 24 scalefont setfont 72 700 moveto (Page {i}) "
                                     "show showpage\n" for i in range(1, pages + 1)))
    out = tmp / "doc.pdf"
    subprocess.run(["gs", "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", "-sDEVICE=pdfwrite", f"-sOutputFile={out}",
                    str(ps)], check=True, timeout=60)
    return out.read_bytes()


def test_text_pages_follow_the_fax_layout():
    assert (faxpages.COLUMNS, ROWS) == (85, 53)
    assert text_pages("") == text_pages(" \n \n") == 0
    assert text_pages("a") == 1
    assert text_pages("\n".join(["x"] * ROWS)) == 1
    assert text_pages("\n".join(["x"] * (ROWS + 1))) == 2
    assert text_pages("\n".join(["x"] * ROWS) + "\n\n\n  \n") == 1  # a blank tail is no page
    assert len(faxpages.text_lines("y" * 85)) == 1 and len(faxpages.text_lines("y" * 86)) == 2
    assert text_pages("word " * 17 * ROWS) == 1  # one paragraph, 17 words a line
    assert text_pages("word " * (17 * ROWS + 1)) == 2


def test_text_pages_beyond_the_cap_are_a_lower_bound_without_layout():
    for text in ("x " * 2_000_000, "a" + "\n" * 2_000_000 + "b", "\r\n".join(["y"] * 5000)):
        full = text_pages(text)
        bounded = text_pages(text, 20)
        assert 20 < bounded <= full
    for text in ("\n".join(["x"] * (21 * ROWS)), "z" * (21 * ROWS * 85), "a\n" * 60 + "\n" * 10_000):
        assert text_pages(text, 20) == text_pages(text)  # within the bound: laid out, exact
    assert fax_pages("a" + "\n" * 2_000_000 + "b", [], 20) == PageCount(37736, False)  # 2,000,001 lines


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \t\r\n\u00e9\u3000"), max_size=3000), st.integers(0, 3))
def test_the_bounded_text_count_never_undercounts_past_the_cap(text, most):
    full, bounded = text_pages(text), text_pages(text, most)
    assert bounded == full or most < bounded <= full


@pytest.mark.parametrize("text", ["", "one line", "\n".join(["x"] * 53), "\n".join(["x"] * 54),
                                  "long " * 1200, "tab\there\r\nand\n\n\n" * 40])
def test_text_pages_are_what_faxdoc_renders(text):
    pages = faxdoc._Pages(100)
    faxdoc.text_pages(text, pages)
    assert len(pages.pages) == text_pages(text)


def test_tiff_pages_count_the_ifd_chain_as_pillow_does():
    for n in (1, 2, 5):
        data = _tiff(n)
        with Image.open(io.BytesIO(data)) as img:
            assert getattr(img, "n_frames", 1) == n
        assert tiff_pages(data, 20) == n
    assert tiff_pages(_tiff(9), 3) == 4  # the walk stops one beyond `most`
    # big-endian: the same chain
    one = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 1) + b"\0" * 12 + struct.pack(">I", 0)
    assert tiff_pages(one, 5) == 1


def test_tiff_worst_inputs_are_not_counted():
    ifd = struct.pack("<H", 1) + b"\0" * 12
    assert tiff_pages(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 8), 1000) is None  # loop
    two_loop = (b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 26) + ifd + struct.pack("<I", 8))
    assert tiff_pages(two_loop, 1000) is None
    assert tiff_pages(b"II*\0" + struct.pack("<I", 0xFFFFFFF0), 20) is None  # offset past the end
    assert tiff_pages(b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 0xFFFF), 20) is None  # entries past
    assert tiff_pages(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0xFFFFFFFF), 20) is None
    assert tiff_pages(b"II*\0", 20) is None and tiff_pages(b"", 20) is None
    assert tiff_pages(b"II+\0" + b"\0" * 12, 20) is None  # BigTIFF: left to the dispatcher
    assert tiff_pages(b"GIF89a", 20) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=50))
def test_tiff_pages_never_raise_and_stay_bounded(tail, most):
    for head in (b"II*\0", b"MM\0*"):
        n = tiff_pages(head + tail, most)
        assert n is None or 1 <= n <= most + 1


def test_pdf_pages_read_the_root_page_count(tmp_path):
    if shutil.which("gs") is None:
        pytest.skip("ghostscript is not installed")
    assert pdf_pages(gs_pdf(tmp_path, 3)) == 3
    assert pdf_pages(gs_pdf(tmp_path, 1)) == 1
    for n in (1, 4):
        assert pdf_pages(_pil_pdf(n)) == n


def _pdf(*objects: str, root: str = "1 0 R") -> bytes:
    body = "".join(f"{o}\n" for o in objects)
    return f"%PDF-1.4\n{body}trailer\n<< /Size 9 /Root {root} >>\n%%EOF\n".encode()


def test_pdf_pages_defer_when_the_count_cannot_be_read():
    cat = "1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj"
    assert pdf_pages(_pdf(cat, "2 0 obj << /Type /Pages /Kids [] /Count 7 >> endobj")) == 7
    assert pdf_pages(_pdf(cat, "2 0 obj << /Type /Pages /Count 3 0 R >> endobj")) is None  # indirect
    assert pdf_pages(_pdf(cat)) is None  # the tree in a compressed object stream: not in the file's text
    assert pdf_pages(_pdf("5 0 obj << /Type /ObjStm /N 2 /Filter /FlateDecode >> stream\nx\nendstream endobj",
                          root="1 0 R")) is None
    assert pdf_pages(_pdf(cat, "2 0 obj << /Type /Page /Count 7 >> endobj")) is None  # not a /Pages node
    assert pdf_pages(_pdf(cat, "2 0 obj << /Type /Pages /Count 0 >> endobj")) is None
    assert pdf_pages(b"not a pdf /Root 1 0 R") is None and pdf_pages(b"") is None
    # object 12 is not object 2; an incremental update's later object wins
    assert pdf_pages(_pdf(cat, "12 0 obj << /Type /Pages /Count 99 >> endobj",
                          "2 0 obj << /Type /Pages /Count 2 >> endobj",
                          "2 0 obj << /Type /Pages /Count 5 >> endobj")) == 5


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([b"", b"1 0 obj << /Pages 2 0 R >> endobj 2 0 obj <<",
                                                 b"/Root 1 0 R", b"/Type /Pages /Count 9"]))
def test_pdf_pages_never_raise(noise, piece):
    n = pdf_pages(b"%PDF-1.7\n" + noise + piece + noise + b"trailer << /Root 1 0 R >>")
    assert n is None or n >= 1


def test_fax_pages_sum_text_and_documents():
    text = "\n".join(["x"] * (ROWS + 1))  # 2 pages
    files = [("application/pdf", _pil_pdf(3)), ("image/tiff", _tiff(2)), ("IMAGE/JPEG", b"\xff\xd8"),
             ("text/plain", b"a\nb\n")]
    assert fax_pages(text, files, 20) == PageCount(2 + 3 + 2 + 1 + 1, True)
    assert str(PageCount(4, True)) == "4" and str(PageCount(4, False)) == "at least 4"
    unknown = fax_pages("", [("application/pdf", b"%PDF-1.5 compressed"), ("application/msword", b"x")], 20)
    assert unknown == PageCount(0, False)
    assert fax_pages("", [("image/gif", b"GIF89a")], 20) == PageCount(1, False)  # may be animated


def test_check_fax_refuses_over_max_pages_naming_both_numbers():
    cfg = FaxConfig(max_pages=2, max_bytes=10_000_000)
    caps = Capabilities()
    three = JobFile.of("application/pdf", "three.pdf", _pil_pdf(3))
    two = JobFile.of("application/pdf", "two.pdf", _pil_pdf(2))
    r = channelcheck.check_fax("", (three,), cfg, caps)
    assert r == catalogue.FAX_TOO_MANY_PAGES(pages="3", limit=2)
    assert (r.code, r.xcode) == ("552", "5.3.4") and "3 pages" in r.text and "at most 2" in r.text  # type: ignore
    assert channelcheck.check_fax("", (two,), cfg, caps) == (two,)
    assert channelcheck.check_fax("one page of text", (two,), cfg, caps) == catalogue.FAX_TOO_MANY_PAGES(
        pages="3", limit=2)
    # a part that cannot be counted never makes a refusal on its own; a lower bound over the cap does
    odd = JobFile.of("application/pdf", "odd.pdf", b"%PDF-1.5 object streams")
    assert channelcheck.check_fax("", (odd, odd), cfg, caps) == (odd, odd)
    r = channelcheck.check_fax("", (odd, three), cfg, caps)
    assert r == catalogue.FAX_TOO_MANY_PAGES(pages="at least 3", limit=2)
    loop = JobFile.of("image/tiff", "loop.tif", b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 1)
                      + b"\0" * 12 + struct.pack("<I", 8))
    assert channelcheck.check_fax("", (loop,), cfg, caps) == (loop,)
