#!/usr/bin/env python3
"""The cost of counting a fax's pages inline (issue 15: the page cap at SMTP time).

    python bench/fax_pages.py [--rounds R]

For a few fax mails (a 3-page PDF made by Ghostscript, a 20-page TIFF, 200 KB of text, a
hostile 1 MB PDF), the milter's inline work is timed: split_mail (the MIME parse the gateway
does for every fax mail; the baseline, measured in the same run) and fax_pages (the new
count) on the parsed parts. Prints milliseconds (median of R rounds) and the ratio
(split + count) / split: what the count adds to the inline work of such a mail.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import banner, result, say  # noqa: E402
from PIL import Image  # noqa: E402
from sms_milter.policy.channelcheck import ChannelMail, split_mail  # noqa: E402
from sms_milter.policy.faxpages import fax_pages  # noqa: E402


def _pdf(pages: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "doc.pdf"
        ps = "".join(f"72 700 moveto (Page {i}) show showpage " for i in range(pages))
        subprocess.run(["gs", "-q", "-dSAFER", "-sDEVICE=pdfwrite", "-o", str(out), "-c",
                        f"/Helvetica findfont 24 scalefont setfont {ps}"], check=True)
        return out.read_bytes()


def _tiff(pages: int) -> bytes:
    frames = [Image.new("1", (1728, 2292), 1) for _ in range(pages)]
    out = io.BytesIO()
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:], compression="group4")
    return out.getvalue()


def _mail(body: str, attach: tuple[bytes, str] | None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "ops@client.example", "41441234567@Fax.tm.example.com", "fax"
    m.set_content(body)
    if attach is not None:
        main, sub = attach[1].split("/")
        m.add_attachment(attach[0], maintype=main, subtype=sub, filename="doc")
    return m.as_bytes()


def _ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    banner("fax page count inline")
    cases = {
        "3-page PDF (gs)": _mail("cover text", (_pdf(3), "application/pdf")),
        "20-page TIFF (G4)": _mail("", (_tiff(20), "image/tiff")),
        "200 KB text": _mail("Dear customer, the order is on its way. " * 5000, None),
        "hostile 1 MB PDF": _mail("", (b"%PDF-1.4\n" + b"/Root 1 0 R 1 0 obj " * 52_000, "application/pdf")),
    }
    figures = {}
    for name, raw in cases.items():
        mail = split_mail(raw)
        assert isinstance(mail, ChannelMail), mail
        files = [(f.content_type, f.data or b"") for f in mail.attachments]
        count = fax_pages(mail.text.body, files, 20)
        split = _ms(partial(split_mail, raw), args.rounds)
        pages = _ms(partial(fax_pages, mail.text.body, files, 20), args.rounds)
        ratio = (split + pages) / split
        say(f"{name}: {len(raw):,} bytes, {count} pages; split_mail {split:.2f} ms, count {pages:.2f} ms, "
            f"ratio {ratio:.2f}")
        figures[name] = {"split_ms": round(split, 3), "count_ms": round(pages, 3), "ratio": round(ratio, 3)}
    result("fax_pages", **figures)


if __name__ == "__main__":
    main()
