"""Files a job carries (a voice recording, fax documents): stored content-addressed by the spool
in the same commit as the job (SQLite: files beside the database, `<spool>.files/<sha[:2]>/<sha>`,
written and fsynced before the commit; PostgreSQL: bytea), referenced from the job by hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class JobFile:
    sha256: str  # hex digest of the content: the store's key
    content_type: str  # e.g. application/pdf, audio/wav
    name: str  # the attachment's file name ("" if none)
    size: int  # bytes
    # the content: given to add_message; None when read back (FileStore.file_data has it)
    data: bytes | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def of(content_type: str, name: str, data: bytes) -> JobFile:
        return JobFile(hashlib.sha256(data).hexdigest(), content_type, name, len(data), data)


def files_to_json(files: Iterable[JobFile]) -> str:
    """A job's file references as stored with it (the content is stored apart, by hash)."""
    return json.dumps([[f.sha256, f.content_type, f.name, f.size] for f in files]) if files else "[]"


def files_from_json(text: str | None) -> tuple[JobFile, ...]:
    if not text or text == "[]":
        return ()
    return tuple(JobFile(sha, ctype, name, size) for sha, ctype, name, size in json.loads(text))


class FileStore(Protocol):
    """What the dispatcher asks of a spool about a job's files (nothing else knows where they are)."""

    def file_data(self, sha256: str) -> bytes:
        """The content of a stored file; KeyError if the store does not have it."""
        ...
