"""The one value every policy check returns when mail must not pass."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class Reply:
    """A catalogue entry (policy/catalogue.py): calling it with its fields gives the Refusal."""

    code: str  # "550"
    xcode: str  # "5.1.3"
    stage: str  # a key of catalogue.STAGES
    template: str  # the text, str.format fields by name
    when: str  # README: when this reply is given
    example: Mapping[str, Any] = field(default_factory=dict)  # README: the fields shown
    name: str = ""  # set by the catalogue: the entry's name there

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.template) if f))

    def __call__(self, **values: Any) -> Refusal:
        return Refusal(self.code, self.xcode, self.template.format(**values))

    def sample(self) -> Refusal:
        return self(**self.example)


def __getattr__(name: str) -> Refusal:
    """The gateway's own 4xx under their old names here; every refusal is built in `catalogue`."""
    if name in ("SPOOL_UNAVAILABLE", "INTERNAL_ERROR"):
        from . import catalogue

        entry: catalogue.Reply = getattr(catalogue, name)
        return entry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
