"""Which value of a message the spool could not store, in words for the 550 reply (every backend)."""

from __future__ import annotations

from .base import AddRequest

FIELD_NAMES = {"message_id": "the Message-ID header", "subject": "the Subject header",
               "sender": "the envelope sender", "text": "the SMS text", "originator": "the originator",
               "queue_id": "the queue id", "recipient": "the recipient", "account": "the account name",
               "trans_ref": "the TransRefNumber", "device": "the device"}


def unstorable(r: AddRequest, e: BaseException) -> str:
    """Name the value of this request the database refused (never the value itself)."""
    for j in r.jobs:
        for name, label in FIELD_NAMES.items():
            value = getattr(j, name)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeError:
                    return f"{label} (it is not valid text)"
    for m in r.mails:
        try:
            m.rcpt.encode("utf-8")
        except UnicodeError:
            return "the reply address (it is not valid text)"
    return f"the message ({type(e).__name__})"
