"""Fax rendering: a job's text and documents as one fax-ready TIFF (G3, fine resolution).

Pages are 1728 x 2292 pixels, 204 x 196 dpi (A4, "fine"), 1 bit, CCITT Group 3: what HylaFAX
sends as it is. The text (the mail body) becomes the first page(s), set in DejaVu Sans Mono
(any Unicode the font has); a PDF is rasterised by Ghostscript (`tiffg3`, fitted to the page);
PNG/JPEG/GIF/TIFF images are fitted to the page and dithered (Pillow); Ghostscript writes the
final file (`tiffg3`: min-is-white, as fax software expects); office documents go
through LibreOffice (`soffice --headless --convert-to pdf`) when it is installed, else a clear
error names the type. Page and size caps are checked while rendering, so a huge document
costs at most `max_pages + 1` rasterised pages.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..policy.channelcheck import OFFICE_TYPES
from ..policy.faxpages import DPI, FONT_SIZE, HEIGHT, LINE_HEIGHT, MARGIN, ROWS, WIDTH, text_lines
from .tools import Attachment, ChannelError, run, tool

Document = Attachment

FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
              "/usr/share/fonts/truetype/noto/NotoSansMono-Regular.ttf")
GS_TIMEOUT = 120.0
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/gif", "image/tiff", "image/x-tiff"}
Image.MAX_IMAGE_PIXELS = 60_000_000  # larger pictures are refused (decompression bombs)


@dataclass(frozen=True)
class FaxImage:
    path: Path
    pages: int
    size: int  # bytes


class _Pages:
    """Pages collected so far, against the page cap."""

    def __init__(self, max_pages: int):
        self.max_pages = max_pages
        self.pages: list[Image.Image] = []

    def add(self, page: Image.Image, what: str) -> None:
        if len(self.pages) >= self.max_pages:
            raise ChannelError(f"the fax would have more than {self.max_pages} pages "
                               f"({what} goes beyond the cap)")
        self.pages.append(page)


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for p in FONT_PATHS:
        if Path(p).exists():
            return ImageFont.truetype(p, FONT_SIZE)
    raise ChannelError("no monospace TrueType font for fax text (fonts-dejavu-core)", temporary=True)


def text_pages(text: str, pages: _Pages) -> None:
    """The text's pages, laid out as policy/faxpages.py counts them (COLUMNS wide, ROWS a page)."""
    font = _font()
    lines = text_lines(text)
    for start in range(0, len(lines), ROWS):
        page = Image.new("1", (WIDTH, HEIGHT), 1)
        draw = ImageDraw.Draw(page)
        for i, line in enumerate(lines[start:start + ROWS]):
            draw.text((MARGIN, MARGIN + i * LINE_HEIGHT), line, font=font, fill=0)
        pages.add(page, "the text")


def image_pages(path: Path, pages: _Pages, label: str) -> None:
    try:
        with Image.open(path) as img:
            frame = 0
            while True:
                img.seek(frame)
                pages.add(_fit(img), label)
                frame += 1
                if frame >= getattr(img, "n_frames", 1):
                    break
    except ChannelError:
        raise
    except Image.DecompressionBombError:
        raise ChannelError(f"{label} is too large a picture") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ChannelError(f"{label} cannot be read as an image: {e}") from None


def _fit(img: Image.Image) -> Image.Image:
    """A picture scaled to fit the page inside the margins (at most 4x up), dithered to 1 bit."""
    grey = img.convert("RGBA")
    white = Image.new("RGBA", grey.size, (255, 255, 255, 255))
    grey = Image.alpha_composite(white, grey).convert("L")
    box_w, box_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    scale = min(box_w / grey.width, box_h / grey.height, 4.0)
    size = (max(1, int(grey.width * scale)), max(1, int(grey.height * scale)))
    grey = grey.resize(size, Image.Resampling.LANCZOS)
    page = Image.new("L", (WIDTH, HEIGHT), 255)
    page.paste(grey, ((WIDTH - size[0]) // 2, MARGIN))
    return page.convert("1")


def pdf_pages(path: Path, pages: _Pages, label: str, work: Path) -> None:
    """Ghostscript renders the PDF (at most one page beyond the cap) to G3 at fax size."""
    out = work / f"{path.stem}.gs.tif"
    left = pages.max_pages - len(pages.pages)
    try:
        run([tool("gs"), "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", "-sDEVICE=tiffg3",
             f"-r{DPI[0]}x{DPI[1]}", f"-dDEVICEWIDTH={WIDTH}", f"-dDEVICEHEIGHT={HEIGHT}", "-dFIXEDMEDIA",
             "-dPDFFitPage", f"-dLastPage={left + 1}", f"-sOutputFile={out}", "-f", str(path)], GS_TIMEOUT)
    except ChannelError as e:
        if e.temporary:
            raise
        raise ChannelError(f"{label} cannot be read as PDF ({e})") from None
    if not out.exists() or out.stat().st_size == 0:
        raise ChannelError(f"{label} has no pages Ghostscript could render")
    image_pages(out, pages, label)
    out.unlink()


def office_pdf(doc: Document, kind: str, work: Path) -> Path:
    soffice = shutil.which("soffice") or shutil.which("libreoffice")
    if soffice is None:
        raise ChannelError(f"{kind} documents ({doc.content_type}) cannot be faxed here: LibreOffice "
                           "is not installed; send a PDF")
    outdir = work / "office"
    outdir.mkdir(exist_ok=True)
    run([soffice, "--headless", f"-env:UserInstallation=file://{work}/lo-profile", "--convert-to", "pdf",
         "--outdir", str(outdir), str(doc.path)], GS_TIMEOUT)
    pdfs = list(outdir.glob("*.pdf"))
    if not pdfs:
        raise ChannelError(f"LibreOffice could not convert the {kind} document")
    return pdfs[0]


def _write_g3(pages: list[Image.Image], dst: Path) -> None:
    """The pages as a G3 TIFF, written by Ghostscript's tiffg3 device (min-is-white, the form fax
    software expects; Pillow writes 1-bit TIFF as min-is-black) from a PDF of the bitmaps."""
    pdf = dst.with_suffix(".pages.pdf")
    first, *rest = pages
    first.save(pdf, format="PDF", save_all=True, append_images=rest, dpi=DPI)
    try:
        run([tool("gs"), "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", "-sDEVICE=tiffg3", f"-r{DPI[0]}x{DPI[1]}",
             f"-dDEVICEWIDTH={WIDTH}", f"-dDEVICEHEIGHT={HEIGHT}", "-dFIXEDMEDIA", "-dPDFFitPage",
             f"-sOutputFile={dst}", "-f", str(pdf)], GS_TIMEOUT)
    finally:
        pdf.unlink(missing_ok=True)


def render(text: str, documents: Sequence[Document], dst: Path, max_pages: int = 20,
           max_bytes: int = 10 * 1024 * 1024) -> FaxImage:
    """The text (first page(s), if any) and each document's pages, as one G3 TIFF at `dst`."""
    pages = _Pages(max_pages)
    work = dst.parent
    if text.strip():
        text_pages(text, pages)
    for n, doc in enumerate(documents, 1):
        ctype = doc.content_type.lower().split(";")[0].strip()
        label = f"attachment {n} ({doc.name or ctype})"
        if ctype == "text/plain":
            text_pages(doc.path.read_text("utf-8", errors="replace"), pages)
        elif ctype == "application/pdf":
            pdf_pages(doc.path, pages, label, work)
        elif ctype in IMAGE_TYPES:
            image_pages(doc.path, pages, label)
        elif ctype in OFFICE_TYPES:
            pdf_pages(office_pdf(doc, OFFICE_TYPES[ctype], work), pages, label, work)
        else:
            raise ChannelError(f"{label}: {ctype[:60]} cannot be faxed (text, PDF, PNG, JPEG, GIF, TIFF"
                               f"{', office documents' if shutil.which('soffice') else ''})")
    if not pages.pages:
        raise ChannelError("the fax has nothing to send (no text, no document)")
    _write_g3(pages.pages, dst)
    size = dst.stat().st_size
    if size > max_bytes:
        dst.unlink()
        raise ChannelError(f"the fax is {size} bytes, more than the {max_bytes} allowed")
    return FaxImage(dst, len(pages.pages), size)
