"""What this host can take inline for voice and fax (policy/channelcheck.py gets it as a value):
the audio formats sox decodes (WAV always; MP3/OGG when sox has them) and whether LibreOffice is
installed for office documents. Looked up once per process."""

from __future__ import annotations

import shutil
from functools import lru_cache

from ..policy.channelcheck import Capabilities
from . import audio
from .tools import ChannelError


@lru_cache(maxsize=1)
def detect() -> Capabilities:
    try:
        have = audio.formats()
    except ChannelError:  # sox missing: the dispatcher will say so; WAV is still the format to send
        have = frozenset()
    formats = frozenset({"wav"} | {f for f in ("mp3", "ogg") if f in have})
    office = bool(shutil.which("soffice") or shutil.which("libreoffice"))
    return Capabilities(audio_formats=formats, office=office)
