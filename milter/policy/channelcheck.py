"""What a voice or fax message may carry, decided inline (values in, values out).

SMS keeps its own rules (policy/content.py: plain text only). A voice call speaks the text
(the account's template, as for SMS) in the account's `voice_language` (default
`voice.language`), at most `voice.max_seconds` of speech at `words_per_minute`; an audio
attachment is the message instead when the account has `voice_recordings: true` and the
format can be decoded here. A fax takes the text and documents: text/plain, PDF, PNG, JPEG,
GIF, TIFF, and office documents when LibreOffice is installed; at most `fax.max_bytes` of
documents and at most `fax.max_pages` pages where policy/faxpages.py can count them. What the
host can decode comes in as `Capabilities` (channels/capabilities.py).
"""

from __future__ import annotations

import email.policy
import math
import unicodedata
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser

from ..model import Account, FaxConfig, VoiceConfig
from ..spool.files import JobFile
from . import catalogue as replies
from .charsets import safe_text
from .content import MessageText, _leaves, _param, _plain_text, _raw_header, _subject_and_id, _transfer_decode
from .faxpages import fax_pages
from .refusal import Refusal

WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
AUDIO_TYPES = {**dict.fromkeys(WAV_TYPES, "wav"), "audio/ogg": "ogg", "audio/vorbis": "ogg",
               "audio/mpeg": "mp3", "audio/mp3": "mp3"}  # content type -> sox format
FAX_TYPES = ("text/plain", "application/pdf", "image/png", "image/jpeg", "image/jpg", "image/gif",
             "image/tiff", "image/x-tiff")
OFFICE_TYPES = {
    "application/msword": "Word", "application/rtf": "RTF", "text/rtf": "RTF",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "Word",
    "application/vnd.oasis.opendocument.text": "OpenDocument text",
    "application/vnd.ms-excel": "Excel",
    "application/vnd.oasis.opendocument.spreadsheet": "OpenDocument sheet",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "Excel",
}
CHARS_PER_WORD = 6  # a word with its space, for text without spaces (e.g. Chinese)
MAX_ATTACHMENTS = 100  # MIME leaves of a voice/fax mail: more is refused before any is decoded
# How the bytes of a declared type start (its magic): a lying Content-Type or an empty file is
# refused at SMTP instead of being spooled and failing in the dispatcher. PDF readers accept a
# header within the first KB, so PDF is looked for there.
_PNG, _JPEG, _GIF, _TIFF = (b"\x89PNG",), (b"\xff\xd8\xff",), (b"GIF87a", b"GIF89a"), (b"II*\0", b"MM\0*")
MAGIC: dict[str, tuple[str, tuple[bytes, ...]]] = {
    "audio/ogg": ("OGG", (b"OggS",)), "audio/vorbis": ("OGG", (b"OggS",)),
    "image/png": ("PNG", _PNG), "image/jpeg": ("JPEG", _JPEG), "image/jpg": ("JPEG", _JPEG),
    "image/gif": ("GIF", _GIF), "image/tiff": ("TIFF", _TIFF), "image/x-tiff": ("TIFF", _TIFF),
}


@dataclass(frozen=True)
class Capabilities:
    audio_formats: frozenset[str] = frozenset({"wav"})  # sox formats: wav, ogg, mp3
    office: bool = False  # LibreOffice (soffice) is installed


@dataclass(frozen=True)
class ChannelMail:
    """A mail for voice or fax: its text and its attachments (content type, name, bytes)."""

    text: MessageText
    attachments: tuple[JobFile, ...]


def split_mail(raw: bytes) -> ChannelMail | Refusal:
    """Subject, the first inline text/plain part as the body, everything else as attachments."""
    try:
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
        return _split(msg)
    except Exception:  # a parser bug on hostile input must become an answer, not a crash
        return replies.MIME_UNPARSABLE()


def _split(msg: Message) -> ChannelMail | Refusal:
    head = _subject_and_id(msg)
    if isinstance(head, Refusal):
        return head
    subject, message_id = head
    body: tuple[bytes, str | None] | None = None
    files: list[JobFile] = []
    for n, leaf in enumerate(_leaves(msg)):
        if isinstance(leaf, Refusal):
            return leaf
        if n >= MAX_ATTACHMENTS:  # the body and MAX_ATTACHMENTS attachments at most
            return replies.TOO_MANY_ATTACHMENTS(limit=MAX_ATTACHMENTS)
        ctype = leaf.get_content_type()
        if ctype == "text/html":
            return replies.HTML_PART(what="the text")
        data = _transfer_decode(leaf, "attachment" if _filename(leaf) else "text part")
        if isinstance(data, Refusal):
            return data
        disposition = (_raw_header(leaf, "content-disposition") or "").strip().lower()
        name = _printable(safe_text(_filename(leaf)))[:200]
        if ctype == "text/plain" and body is None and not name and not disposition.startswith("attachment"):
            body = (data, _param(leaf, "charset"))
        else:
            files.append(JobFile.of(safe_text(ctype)[:100], name, data))
    text = _plain_text(body[0] if body else b"", body[1] if body else None, subject, message_id)
    if isinstance(text, Refusal):
        return text
    return ChannelMail(text=text, attachments=tuple(files))


def _printable(name: str) -> str:
    """A file name as `queue show` may print it: control characters (ESC, CR, LF, ...) as U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in name)


def _filename(part: Message) -> str:
    try:
        return part.get_filename() or ""
    except Exception:  # a malformed Content-Disposition: no usable file name
        return ""


def _is_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def not_its_type(files: tuple[JobFile, ...]) -> Refusal | None:
    """The refusal for the first file whose bytes are not of its declared type (text/plain and
    office documents are not looked at), None when every one starts as its type does."""
    for n, f in enumerate(files, 1):
        ctype, data = f.content_type.lower(), f.data or b""
        if ctype == "application/pdf":
            kind, ok = "PDF", b"%PDF" in data[:1024]
        elif ctype in ("audio/mpeg", "audio/mp3"):
            kind, ok = "MP3", _is_mp3(data)
        elif ctype in WAV_TYPES:  # RIFF is also AVI, WebP, ...: the form type must be WAVE
            kind, ok = "WAV", data[:4] == b"RIFF" and data[8:12] == b"WAVE"
        elif ctype in MAGIC:
            kind, magic = MAGIC[ctype]
            ok = data.startswith(magic)
        else:
            continue
        if not ok:
            return replies.ATTACHMENT_NOT_ITS_TYPE(n=n, ctype=ctype, kind=kind,
                                                   empty=" (it is empty)" if not data else "")
    return None


def speech_seconds(text: str, words_per_minute: int) -> int:
    """How long `text` takes to speak, rounded up: words (or characters / 6) at the given rate."""
    words = max(len(text.split()), math.ceil(sum(not c.isspace() for c in text) / CHARS_PER_WORD))
    return math.ceil(words * 60 / words_per_minute)


def _audio_names(caps: Capabilities) -> str:
    return ", ".join(f.upper() for f in ("wav", "mp3", "ogg") if f in caps.audio_formats)


def check_voice(text: str, files: tuple[JobFile, ...], account: Account, cfg: VoiceConfig,
                caps: Capabilities) -> tuple[JobFile, ...] | Refusal:
    """The files a voice job keeps (one recording or none), or the Refusal."""
    recording: list[JobFile] = []
    for f in files:
        kind = AUDIO_TYPES.get(f.content_type.lower())
        if kind is not None and not account.voice_recordings:
            return replies.VOICE_RECORDINGS_OFF(ctype=f.content_type)
        if kind is None or kind not in caps.audio_formats or recording:
            return replies.VOICE_ATTACHMENT(ctype=f.content_type, formats=_audio_names(caps))
        recording.append(f)
    if recording:
        return not_its_type(tuple(recording)) or tuple(recording)
    if not text.strip():
        return replies.CHANNEL_EMPTY(channel="voice call", needs="text to speak")
    seconds = speech_seconds(text, cfg.words_per_minute)
    if seconds > cfg.max_seconds:
        most = int(cfg.max_seconds * cfg.words_per_minute / 60 * CHARS_PER_WORD)
        return replies.VOICE_TOO_LONG(seconds=seconds, chars=len(text), max_seconds=f"{cfg.max_seconds:g}",
                                      max_chars=most)
    return ()


def voice_language(account: Account, cfg: VoiceConfig) -> str:
    return account.voice_language or cfg.language


def check_fax(text: str, files: tuple[JobFile, ...], cfg: FaxConfig, caps: Capabilities
              ) -> tuple[JobFile, ...] | Refusal:
    """The documents of a fax job, or the Refusal."""
    for f in files:
        ctype = f.content_type.lower()
        if ctype in OFFICE_TYPES:
            if not caps.office:
                return replies.FAX_NO_OFFICE(kind=OFFICE_TYPES[ctype], ctype=ctype)
        elif ctype not in FAX_TYPES:
            office = ", office documents" if caps.office else ""
            return replies.FAX_ATTACHMENT(ctype=f.content_type, office=office)
    size = sum(f.size for f in files)
    if size > cfg.max_bytes:
        return replies.FAX_TOO_BIG(size=size, limit=cfg.max_bytes)
    if not files and not text.strip():
        return replies.CHANNEL_EMPTY(channel="fax", needs="text or a document (PDF, PNG, JPEG, TIFF)")
    wrong = not_its_type(files)
    if wrong is not None:
        return wrong
    count = fax_pages(text, ((f.content_type, f.data or b"") for f in files), cfg.max_pages)
    if count.pages > cfg.max_pages:
        return replies.FAX_TOO_MANY_PAGES(pages=str(count), limit=cfg.max_pages)
    return files
