"""The SQLite spool's file store: content-addressed files beside the database,
`<spool>.files/<sha[:2]>/<sha>`, each written to a temporary name, fsynced, renamed and its
directory fsynced before the transaction that references it commits (a crash leaves at most
an unreferenced file, never a job without its file)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..base import SpoolError
from ..files import JobFile


def root_of(spool_path: str) -> Path:
    return Path(spool_path + ".files")


def path_of(spool_path: str, sha256: str) -> Path:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise KeyError(sha256)
    return root_of(spool_path) / sha256[:2] / sha256


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store(spool_path: str, files: Iterable[JobFile]) -> None:
    """Write each file not stored yet, durably; a SpoolError if the disk refuses."""
    for f in files:
        dst = path_of(spool_path, f.sha256)
        if f.data is None or dst.exists():
            continue
        try:
            made = not dst.parent.exists()
            dst.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            if made:
                _fsync_dir(dst.parent.parent)
            tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(f.data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dst)
            _fsync_dir(dst.parent)
        except OSError as e:
            raise SpoolError(f"cannot store a job's file in {root_of(spool_path)}: {e.strerror}") from None


class FilesSide:
    path: str

    def file_data(self, sha256: str) -> bytes:
        """A stored file's content (FileStore); KeyError if the store does not have it."""
        try:
            return path_of(self.path, sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None
