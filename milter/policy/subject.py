"""The ASPSMS keyword Subject: `Userkey=ACME123 Password=s3cret Recipient=0041790000000 ...`.

Keywords are case-insensitive and may be abbreviated to their first letter; pairs are
separated by blanks, commas or semicolons; blanks around '=' are tolerated. No text
produced here ever contains a Password value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..model import NOTIFY_POLICIES
from . import catalogue as replies
from .refusal import Refusal

_KEYWORDS = {
    "userkey": "userkey", "u": "userkey",
    "password": "password", "p": "password",
    "recipient": "recipient", "r": "recipient",
    "originator": "originator", "o": "originator",
    "notify": "notify", "n": "notify",
}
_NAMES = {"userkey": "Userkey", "password": "Password", "recipient": "Recipient",
          "originator": "Originator", "notify": "Notify"}
_SEP = re.compile(r"[\s,;]+")
_RUN = re.compile(r"[^\s,;]+")
_BLANKS = re.compile(r"[ \t\r\n]+")
_EQUALS_AHEAD = re.compile(r"[ \t\r\n]*=")
_KEYISH = re.compile(r"[A-Za-z]+=")
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class SubjectFields:
    userkey: str | None = None
    password: str | None = None
    recipients: tuple[str, ...] = ()  # raw values, one number each
    originator: str | None = None
    notify: str | None = None  # uppercased; "" if given empty


@dataclass(frozen=True)
class _Token:
    key: str | None  # None: a bare word without '='
    value: str
    start: int
    end: int


def _value_at(s: str, pos: int) -> tuple[str, int]:
    """The value right after '=' at `pos`; blanks before it are skipped unless a new pair follows."""
    m = _RUN.match(s, pos)
    if m:
        return m.group(), m.end()
    b = _BLANKS.match(s, pos)
    if b:
        m = _RUN.match(s, b.end())
        if m and not _KEYISH.match(m.group()):
            return m.group(), m.end()
    return "", pos


def _tokens(s: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while True:
        m = _SEP.match(s, pos)
        if m:
            pos = m.end()
        if pos >= len(s):
            return out
        m = _RUN.match(s, pos)
        assert m is not None
        start, run, pos = pos, m.group(), m.end()
        if "=" in run and not run.startswith("="):
            key, _, value = run.partition("=")
            if not value:
                value, pos = _value_at(s, pos)
            out.append(_Token(key, value, start, pos))
            continue
        eq = _EQUALS_AHEAD.match(s, pos) if _WORD.fullmatch(run) else None
        if eq:
            value, pos = _value_at(s, eq.end())
            out.append(_Token(run, value, start, pos))
        else:
            out.append(_Token(None, run, start, pos))


# What may be echoed from a Subject: a keyword-like name, a phone-number-like value.
# Anything else could be (part of) a credential and is named by its position instead.
_ECHO_KEY = re.compile(r"[A-Za-z]{1,20}")
_ECHO_NUMBER = re.compile(r"[0-9+()./-]{1,30}")
_CREDENTIAL_WORD = re.compile(r"(userkey|password|u|p)\b", re.IGNORECASE)


def _word(n: int) -> str:
    return f"word {n} of the Subject"


_AFTER_PASSWORD = replies.AFTER_PASSWORD()


# A textsms@ Subject longer than this is refused before it is parsed. Postfix passes a header
# to the milter cut at about 60 KB without saying so: a cut R= value can be another valid
# number. 100 R= (the default recipients_per_message) fit in about 2,000 characters.
MAX_TEXTSMS_SUBJECT = 8000
_RECIPIENT_KEY = re.compile(r"(?:^|[\s,;])(?:r|recipient)[ \t\r\n]*=", re.IGNORECASE)


def count_recipient_keys(subject: str) -> int:
    """How many Recipient= (R=) pairs the Subject has, without parsing it (a cut Subject: at least)."""
    return len(_RECIPIENT_KEY.findall(subject))


def textsms_length_problem(subject: str, max_recipients: int) -> Refusal | None:
    """A Refusal for a textsms@ Subject over MAX_TEXTSMS_SUBJECT characters: 550 5.5.3 if it
    gives more Recipient= than `max_recipients` (no account could take them), else 550 5.5.4."""
    if len(subject) <= MAX_TEXTSMS_SUBJECT:
        return None
    many = count_recipient_keys(subject)
    if many > max_recipients:
        return replies.SUBJECT_TOO_MANY_RECIPIENTS(count=many, limit=max_recipients)
    return replies.SUBJECT_TOO_LONG(length=len(subject), limit=MAX_TEXTSMS_SUBJECT)


def parse_subject(subject: str) -> SubjectFields | Refusal:
    """Parse keyword pairs; a Refusal names the first problem (never a Password value)."""
    seen: dict[str, str] = {}
    recipients: list[str] = []
    after_password = False
    for n, tok in enumerate(_tokens(subject), 1):
        if tok.key is None:
            if after_password:
                return _AFTER_PASSWORD
            cred = _CREDENTIAL_WORD.match(tok.value)
            if cred:
                label = _NAMES[_KEYWORDS[cred.group(1).lower()]]
                return replies.CREDENTIAL_WORD(n=n, label=label)
            return replies.NOT_A_PAIR(n=n)
        name = _KEYWORDS.get(tok.key.lower())
        if name is None:
            if after_password:
                return _AFTER_PASSWORD
            where = f"'{tok.key}' in the Subject" if _ECHO_KEY.fullmatch(tok.key) else f"in {_word(n)}"
            return replies.UNKNOWN_KEYWORD(where=where)
        after_password = name == "password"
        label = _NAMES[name]
        if name == "recipient":
            if not tok.value:
                return replies.EMPTY_RECIPIENT()
            recipients.append(tok.value)
            continue
        if name in seen:
            return replies.KEYWORD_TWICE(label=label)
        if name in ("userkey", "password") and not tok.value:
            return replies.EMPTY_VALUE(label=label)
        if name == "notify" and tok.value.upper() not in NOTIFY_POLICIES:
            return replies.BAD_NOTIFY(n=n)
        seen[name] = tok.value
    originator = seen.get("originator") or None
    notify = seen["notify"].upper() if "notify" in seen else None
    return SubjectFields(userkey=seen.get("userkey"), password=seen.get("password"),
                         recipients=tuple(recipients), originator=originator, notify=notify)


def recipient_label(value: str) -> str:
    """How a reply names a Recipient= value: the value if it looks like a number, else not at all."""
    return f"Recipient={value}" if _ECHO_NUMBER.fullmatch(value) else "A Recipient= value"


def textsms_problem(f: SubjectFields) -> Refusal | None:
    """A Refusal if a textsms@ Subject lacks Userkey, Password or a Recipient."""
    for present, label, short in ((f.userkey, "Userkey", "U"), (f.password, "Password", "P"),
                                  (f.recipients, "Recipient", "R")):
        if not present:
            return replies.SUBJECT_MISSING(label=label, short=short)
    return None


def parse_optional_originator(subject: str) -> tuple[str | None, str | None]:
    """(originator, notify) from an optional `Originator=... Notify=...` Subject, else (None, None)."""
    f = parse_subject(subject)
    if isinstance(f, Refusal) or f.userkey is not None or f.password is not None or f.recipients:
        return None, None
    return f.originator, f.notify


def strip_credentials(subject: str, drop_recipients: bool = False) -> str:
    """The Subject without its Userkey and Password pairs (and any stray words after a Password).

    drop_recipients: without the Recipient pairs too (a textsms@ job keeps its own number;
    every job of a mail with 3,000 R= holding all of them made the stored size quadratic)."""
    kept: list[str] = []
    after_password = False
    drop = ("userkey", "password", "recipient") if drop_recipients else ("userkey", "password")
    for tok in _tokens(subject):
        name = _KEYWORDS.get(tok.key.lower()) if tok.key is not None else None
        if name in drop:
            after_password = name == "password"
            continue
        if after_password and name is None:
            continue  # more of a Password value written with blanks, commas or semicolons
        after_password = False
        kept.append(subject[tok.start:tok.end])
    return " ".join(kept)
