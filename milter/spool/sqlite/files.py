"""The SQLite spool's file store: content-addressed files beside the database,
`<spool>.files/<sha[:2]>/<sha>`, each written to a temporary name, fsynced, renamed and its
directory fsynced before the transaction that references it commits (a crash leaves at most
an unreferenced file, never a job without its file).

Removal (`remove`, under the spool's write lock, after the transaction that removed the last
job naming a file committed): the milter stores (or touches) its files before its BEGIN
IMMEDIATE and stores them again once it holds the lock (a `utime` each when they are there), so
a file removed in between is written again before its job commits."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from ..admin import FilesRemoved
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
        if f.data is None:
            continue
        try:
            os.utime(dst)  # reused: touched, so a concurrent sweep's grace period protects it
            continue
        except FileNotFoundError:
            pass
        except PermissionError:
            if dst.exists():
                continue
        except OSError as e:
            raise SpoolError(f"cannot store a job's file in {root_of(spool_path)}: {e.strerror}") from None
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


def _is_sha(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def stored(spool_path: str) -> list[str]:
    """The hashes of every stored file."""
    root = root_of(spool_path)
    if not root.is_dir():
        return []
    return [p.name for d in root.iterdir() if d.is_dir() for p in d.iterdir() if _is_sha(p.name)]


def remove(spool_path: str, shas: Iterable[str], grace: float, out: FilesRemoved) -> None:
    """Remove these stored files if they were not written or reused in the last `grace` seconds
    (0: whatever their age); the caller holds the spool's write lock and has checked that no
    job names them. Stale temporary files (a crash mid-write) older than `grace` go too."""
    cutoff = time.time() - grace
    for sha in shas:
        try:
            p = path_of(spool_path, sha)
            st = p.stat()
            if grace and st.st_mtime >= cutoff:
                continue
            p.unlink()
            out.add(st.st_size)
        except (KeyError, FileNotFoundError):
            continue
        except OSError as e:
            raise SpoolError(f"cannot remove a stored file in {root_of(spool_path)}: {e.strerror}") from None
    root = root_of(spool_path)
    if grace and root.is_dir():
        for d in root.iterdir():
            for p in d.glob("*.tmp") if d.is_dir() else ():
                try:
                    if p.stat().st_mtime < cutoff:
                        p.unlink()
                except FileNotFoundError:
                    pass


class FilesSide:
    path: str

    def file_data(self, sha256: str) -> bytes:
        """A stored file's content (FileStore); KeyError if the store does not have it."""
        try:
            return path_of(self.path, sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None
