"""Voice rendering: text to speech (espeak-ng) or an uploaded recording, as telephony audio.

The result is a WAV file in G.711 (µ-law or A-law), 8 kHz mono, the audio a phone call carries,
with its duration. Runs in the dispatcher (never in the SMTP session): `speak` and `convert`
take a fraction of a second per sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .tools import ChannelError, run, tool

ENCODINGS = {"ulaw": "u-law", "alaw": "a-law"}
RATE = 8000
# Containers sox reads here (libsox-fmt-base; mp3 with libsox-fmt-mp3): name -> sox type.
AUDIO_TYPES = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
               "audio/ogg": "ogg", "audio/vorbis": "ogg", "audio/mpeg": "mp3", "audio/mp3": "mp3"}
_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{1,8})*$")
TOOL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Audio:
    path: Path
    seconds: float
    encoding: str  # ulaw | alaw


def _encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ChannelError(f"audio encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    return ENCODINGS[encoding]


@lru_cache(maxsize=1)
def languages() -> frozenset[str]:
    """The languages espeak-ng has voices for (`espeak-ng --voices`: the language column, its
    "other languages" such as `(en 2)`, and the base of each, e.g. fr for fr-ch)."""
    out = run([tool("espeak-ng"), "--voices"], TOOL_TIMEOUT)
    langs: set[str] = set()
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2:
            names = [cols[1], *re.findall(r"\(([a-z0-9-]+) \d+\)", line)]
            langs.update(n.lower() for n in names)
            langs.update(n.lower().split("-")[0] for n in names)
    return frozenset(langs)


def check_language(language: str) -> str:
    lang = language.strip().lower()
    if not _LANG.match(lang) or lang not in languages():
        raise ChannelError(f"no text-to-speech voice for language {language[:20]!r}")
    return lang


def seconds(path: Path) -> float:
    """The duration of an audio file as sox reads it."""
    out = run([tool("sox"), "--i", "-D", str(path)], TOOL_TIMEOUT)
    try:
        return float(out.strip())
    except ValueError:
        raise ChannelError(f"sox could not tell the duration of {path.name}") from None


def _telephony(src: list[str], dst: Path, encoding: str) -> Audio:
    """sox SRC... -> 8 kHz mono G.711 WAV (a little gain headroom: speech is not clipped)."""
    run([tool("sox"), *src, "-r", str(RATE), "-c", "1", "-e", _encoding(encoding), "-b", "8",
         str(dst), "gain", "-n", "-3"], TOOL_TIMEOUT)
    return Audio(dst, seconds(dst), encoding)


def speak(text: str, language: str, dst: Path, encoding: str = "ulaw", words_per_minute: int = 160) -> Audio:
    """Text to speech in `language` (an espeak-ng language such as en, de, fr-ch), as telephony audio."""
    if not text.strip():
        raise ChannelError("the message has no text to speak")
    lang = check_language(language)
    raw = dst.with_name(dst.stem + ".tts.wav")
    try:
        # The text goes in on stdin (-b 1: UTF-8), never as an argument.
        run([tool("espeak-ng"), "-v", lang, "-s", str(words_per_minute), "-b", "1", "--stdin",
             "-w", str(raw)], TOOL_TIMEOUT, stdin=text.encode("utf-8"))
        return _telephony([str(raw)], dst, encoding)
    finally:
        raw.unlink(missing_ok=True)


def convert(src: Path, content_type: str, dst: Path, encoding: str = "ulaw") -> Audio:
    """An uploaded recording (WAV, OGG/Vorbis, MP3) as telephony audio."""
    kind = AUDIO_TYPES.get(content_type.lower().split(";")[0].strip())
    if kind is None:
        raise ChannelError(f"{content_type[:60]} is not a playable audio type (WAV, OGG, MP3)")
    if kind == "mp3" and "mp3" not in formats():
        raise ChannelError("MP3 audio cannot be decoded here (sox has no mp3 format: libsox-fmt-mp3)")
    try:
        return _telephony(["-t", kind, str(src)], dst, encoding)
    except ChannelError as e:
        if e.temporary:
            raise
        raise ChannelError(f"the {kind.upper()} audio cannot be read: {e}") from None


@lru_cache(maxsize=1)
def formats() -> frozenset[str]:
    """The audio file formats sox was built with (`sox -h`)."""
    out = run([tool("sox"), "-h"], TOOL_TIMEOUT)
    for line in out.splitlines():
        if line.startswith("AUDIO FILE FORMATS:"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def repeated(audio: Audio, dst: Path, pause: float = 1.5) -> Audio:
    """The message, a pause, the message again (the "repeat once" option)."""
    return joined(audio, audio, dst, pause)


def joined(first: Audio, second: Audio, dst: Path, pause: float = 1.5) -> Audio:
    """Two recordings of the same encoding with a pause between them."""
    enc = _encoding(first.encoding)
    gap = dst.with_name(dst.stem + ".gap.wav")
    try:
        run([tool("sox"), "-n", "-r", str(RATE), "-c", "1", "-e", enc, "-b", "8", str(gap),
             "trim", "0", f"{pause:.3f}"], TOOL_TIMEOUT)
        run([tool("sox"), str(first.path), str(gap), str(second.path), str(dst)], TOOL_TIMEOUT)
    finally:
        gap.unlink(missing_ok=True)
    return Audio(dst, seconds(dst), first.encoding)


def linear(audio: Audio, dst: Path) -> Path:
    """The same telephony audio as 16-bit linear PCM (what baresip's aufile source reads)."""
    run([tool("sox"), str(audio.path), "-e", "signed-integer", "-b", "16", str(dst)], TOOL_TIMEOUT)
    return dst
