"""The voice and fax providers as the dispatcher builds them from the configuration: their
files come from the spool (spool.files.FileStore, by hash), copied into the channel's
`work_dir/files/` for the tools that read files; their TTS language is the job's."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model import Config
from ..spool.base import Job
from ..spool.files import FileStore
from .tools import Attachment, ChannelError

KEEP_COPIES = 24 * 3600.0  # a copy not used for this long is removed


def attachments_from(store: FileStore | None, work_dir: str) -> Callable[[Job], list[Attachment]]:
    """A job's files as local paths (copied out of the spool once, by hash)."""
    cache = Path(work_dir) / "files"

    def get(job: Job) -> list[Attachment]:
        out = []
        for f in job.files:
            path = cache / f.sha256
            if not path.exists():
                if store is None:
                    raise ChannelError("this dispatcher has no spool to read the job's files from")
                try:
                    data = store.file_data(f.sha256)
                except KeyError:
                    raise ChannelError(f"the job's file {f.name or f.content_type} is missing from the "
                                       "spool") from None
                cache.mkdir(parents=True, exist_ok=True, mode=0o750)
                tmp = path.with_name(f"{f.sha256}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                _prune(cache)
            else:
                os.utime(path)
            out.append(Attachment(path=path, content_type=f.content_type, name=f.name))
        return out

    return get


def _prune(cache: Path) -> None:
    old = time.time() - KEEP_COPIES
    for p in cache.iterdir():
        try:
            if p.stat().st_mtime < old:
                p.unlink()
        except OSError:
            pass


def channel_providers(cfg: Config, store: FileStore | None) -> dict[str, Any]:
    """channel -> provider for each configured channel (`voice:`, `fax:`)."""
    out: dict[str, Any] = {}  # VoiceProvider and FaxProvider: Providers without query_sm
    if cfg.voice is not None:
        from .voice import VoiceProvider

        voice = cfg.voice
        out["voice"] = VoiceProvider(voice, attachments_from(store, voice.work_dir),
                                     language_for=lambda job: job.language or voice.language)
    if cfg.fax is not None:
        from .fax import FaxProvider

        out["fax"] = FaxProvider(cfg.fax, attachments_from(store, cfg.fax.work_dir))
    return out
