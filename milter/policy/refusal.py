"""The one value every policy check returns when mail must not pass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """An SMTP reply: `code` "550", `xcode` "5.1.3", `text` one sentence naming what to fix.

    A 4xx code means "try again later" (the gateway's problem, nothing lost).
    """

    code: str
    xcode: str
    text: str

    @property
    def temporary(self) -> bool:
        return self.code.startswith("4")

    def __str__(self) -> str:
        return f"{self.code} {self.xcode} {self.text}"


def __getattr__(name: str) -> Refusal:
    """The gateway's own 4xx under their old names here; every refusal is built in `catalogue`."""
    if name in ("SPOOL_UNAVAILABLE", "INTERNAL_ERROR"):
        from . import catalogue

        entry: catalogue.Reply = getattr(catalogue, name)
        return entry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
