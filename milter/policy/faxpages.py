"""How many pages a fax will have, counted inline where that is cheap and reliable (pure).

The page layout is defined here once; channels/faxdoc.py renders with it. The count is a
lower bound that is never a guess: the text (body or text/plain attachment) in lines per page
as faxdoc lays it out; a TIFF by its chain of IFDs (a bounded walk: a loop, an offset past the
end or more IFDs than asked for end it); a PDF by the /Count of the page tree root the catalogue
(/Root) names; any other image as one page (an animated GIF may render more). What cannot be
read here (a PDF whose objects sit in compressed object streams, office documents, a damaged
TIFF) counts 0 and marks the total as "at least": the dispatcher counts it while rendering.
"""

from __future__ import annotations

import math
import re
import struct
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

WIDTH, HEIGHT = 1728, 2292  # A4 at 204 x 196 dpi ("fine")
DPI = (204, 196)
MARGIN = 96
FONT_SIZE = 30
CHAR_WIDTH = 18  # the advance of DejaVu Sans Mono / Noto Sans Mono at FONT_SIZE (0.6 em), whole pixels
LINE_HEIGHT = int(FONT_SIZE * 1.3)
COLUMNS = (WIDTH - 2 * MARGIN) // CHAR_WIDTH  # 85
ROWS = (HEIGHT - 2 * MARGIN) // LINE_HEIGHT  # 53 lines a page
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif")
TIFF_TYPES = ("image/tiff", "image/x-tiff")


@dataclass(frozen=True)
class PageCount:
    pages: int  # pages counted (a lower bound when not exact)
    exact: bool  # every part could be counted here

    def __str__(self) -> str:
        return str(self.pages) if self.exact else f"at least {self.pages}"


def text_lines(text: str) -> list[str]:
    """The text's lines as the fax sets them: tabs as 4 spaces, wrapped at COLUMNS, no blank tail."""
    lines: list[str] = []
    for para in text.replace("\r\n", "\n").replace("\t", "    ").split("\n"):
        lines.extend(textwrap.wrap(para, COLUMNS, replace_whitespace=False, drop_whitespace=True) or [""])
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def text_pages(text: str, most: int | None = None) -> int:
    """The text's pages; with `most`, a text that surely has more than `most` pages is not laid out
    (a lower bound above `most` comes back): every line up to the last non-blank one is at least a
    line, and a line holds at most COLUMNS of the text's visible characters."""
    if not text.strip():
        return 0
    if most is not None:
        kept = text.replace("\r\n", "\n").rstrip()
        least = max(kept.count("\n") + 1, math.ceil(len("".join(kept.split())) / COLUMNS))
        if least > (most + 1) * ROWS:
            return math.ceil(least / ROWS)
    return math.ceil(len(text_lines(text)) / ROWS)


def tiff_pages(data: bytes, most: int) -> int | None:
    """The IFDs in the TIFF's chain (Pillow's frames, faxdoc's pages); `most + 1` at the most walked.
    None when the chain is damaged (a loop, an offset outside the file) or not classic TIFF."""
    if data[:4] == b"II*\0":
        short, long_ = "<H", "<I"
    elif data[:4] == b"MM\0*":
        short, long_ = ">H", ">I"
    else:
        return None
    (offset,) = struct.unpack_from(long_, data, 4) if len(data) >= 8 else (0,)
    seen: set[int] = set()
    count = 0
    while offset and count <= most:
        if offset in seen or offset + 2 > len(data):
            return None
        seen.add(offset)
        (entries,) = struct.unpack_from(short, data, offset)
        nxt = offset + 2 + 12 * entries
        if entries == 0 or nxt + 4 > len(data):
            return None
        count += 1
        (offset,) = struct.unpack_from(long_, data, nxt)
    return count or None


_NUM = rb"(\d{1,10})\s+(\d{1,5})"
_ROOT = re.compile(rb"/Root\s*" + _NUM + rb"\s+R\b")
_PAGES = re.compile(rb"/Pages\s*" + _NUM + rb"\s+R\b")
_COUNT = re.compile(rb"/Count\s+(\d{1,9})(?![\d.]|\s+\d+\s+R\b)")
_TYPE_PAGES = re.compile(rb"/Type\s*/Pages\b")


def _object(data: bytes, num: bytes, gen: bytes) -> bytes | None:
    """The body of the last `num gen obj ... endobj` in the file (incremental updates append)."""
    head = rb"(?<![\d])%d\s+%d\s+obj\b" % (int(num), int(gen))
    last = None
    for match in re.finditer(head, data):
        last = match
    if last is None:
        return None
    end = data.find(b"endobj", last.end())
    return data[last.end():end if end >= 0 else len(data)]


def pdf_pages(data: bytes) -> int | None:
    """The /Count of the page tree root named by the last trailer's (or xref stream's) /Root.
    None when that cannot be read (objects in compressed object streams, an indirect /Count)."""
    if not data.lstrip()[:5] == b"%PDF-":
        return None
    roots = list(_ROOT.finditer(data))
    if not roots:
        return None
    catalog = _object(data, roots[-1].group(1), roots[-1].group(2))
    ref = _PAGES.search(catalog) if catalog is not None else None
    tree = _object(data, ref.group(1), ref.group(2)) if ref is not None else None
    if tree is None or not _TYPE_PAGES.search(tree):
        return None
    count = _COUNT.search(tree)
    return int(count.group(1)) if count is not None and int(count.group(1)) > 0 else None


def fax_pages(text: str, files: Iterable[tuple[str, bytes]], most: int) -> PageCount:
    """The fax's pages: the text's, then each (content type, bytes) document's; `most` bounds the
    text layout and the TIFF walks (a part's count may stop being exact beyond it: the refusal
    needs no more)."""
    pages = text_pages(text, most)
    exact = pages <= most
    for ctype, data in files:
        ctype = ctype.lower()
        n: int | None
        if ctype == "text/plain":
            n = text_pages(data.decode("utf-8", errors="replace"), most)
            exact = exact and n <= most
        elif ctype in TIFF_TYPES:
            n = tiff_pages(data, most)
            exact = exact and (n is None or n <= most)  # the walk stops one beyond `most`
        elif ctype == "application/pdf":
            n = pdf_pages(data)
        elif ctype in IMAGE_TYPES:
            n, exact = 1, exact and ctype in ("image/jpeg", "image/jpg")  # animated GIF/PNG: a page a frame
        else:
            n = None
        if n is None:
            exact = False
        pages += n or 0
    return PageCount(pages, exact)
