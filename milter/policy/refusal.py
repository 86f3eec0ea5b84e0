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


SPOOL_UNAVAILABLE = Refusal("451", "4.3.0", "The SMS spool is unavailable right now; please try again later.")
INTERNAL_ERROR = Refusal("451", "4.3.0", "The SMS gateway hit an internal error; please try again later.")
