"""Running the external tools the channels use (espeak-ng, sox, Ghostscript, ImageMagick,
HylaFAX clients): argument lists only (no shell), a timeout, and errors that name the tool."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Attachment:
    """A file that belongs to a job (the spool's attachment store hands these out)."""

    path: Path
    content_type: str
    name: str = ""


class ChannelError(Exception):
    """Content cannot be rendered or sent.

    `temporary`: the gateway's own trouble (a tool missing or timing out, a peer down): try the
    job again later; otherwise the content itself is wrong and the job fails with `str(self)`."""

    def __init__(self, message: str, temporary: bool = False):
        super().__init__(message)
        self.temporary = temporary


def tool(name: str) -> str:
    """The path of a tool on PATH, or a temporary ChannelError naming it."""
    path = shutil.which(name)
    if path is None:
        raise ChannelError(f"{name} is not installed", temporary=True)
    return path


def run(cmd: Sequence[str], timeout: float, stdin: bytes | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run a tool; its stdout (text), or a ChannelError with the tool's last stderr line."""
    name = cmd[0].rsplit("/", 1)[-1]
    try:
        p = subprocess.run(list(cmd), input=stdin, capture_output=True, timeout=timeout, env=env,
                           check=False)
    except FileNotFoundError:
        raise ChannelError(f"{name} is not installed", temporary=True) from None
    except subprocess.TimeoutExpired:
        raise ChannelError(f"{name} took longer than {timeout:g}s", temporary=True) from None
    if p.returncode != 0:
        lines = [ln.strip() for ln in p.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        raise ChannelError(f"{name} failed (exit {p.returncode}): {lines[-1] if lines else 'no message'}")
    return p.stdout.decode("utf-8", "replace")
