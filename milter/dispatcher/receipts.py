"""Delivery receipts: SMPP message_state / receipt text `stat:` to job part states."""

from __future__ import annotations

import re

# message_state TLV values (SMPP 3.4, 5.2.28) and receipt-text stat words.
MESSAGE_STATES = {1: "ENROUTE", 2: "DELIVRD", 3: "EXPIRED", 4: "DELETED", 5: "UNDELIV",
                  6: "ACCEPTD", 7: "UNKNOWN", 8: "REJECTD"}
STAT_TO_STATE = {
    "DELIVRD": "delivered",
    "ENROUTE": "buffered", "ACCEPTD": "buffered",
    "UNDELIV": "failed", "REJECTD": "failed", "DELETED": "failed", "UNKNOWN": "failed",
    "EXPIRED": "expired",
}

_FIELD = re.compile(r"(id|sub|dlvrd|submit date|done date|stat|err):\s*(\S*)", re.I)


def parse_receipt_text(text: str) -> dict[str, str]:
    """`id:X sub:001 dlvrd:001 submit date:... done date:... stat:DELIVRD err:000 text:...` -> fields.

    Everything from `text:` on is the message excerpt and is ignored (it may hold anything).
    """
    head = re.split(r"\btext:", text, maxsplit=1, flags=re.I)[0]
    return {k.lower(): v for k, v in _FIELD.findall(head)}


def interpret(receipted_id: str | None, message_state: int | None, text: str) -> tuple[str, str, str] | None:
    """(ref, part_state, stat word + err) from a receipt's TLVs or text; None if it is not one."""
    if receipted_id and message_state == 2:  # DELIVRD by the TLVs: the text has nothing more
        return receipted_id, "delivered", "receipt stat:DELIVRD"
    fields = parse_receipt_text(text) if text else {}
    ref = receipted_id or fields.get("id", "")
    stat = MESSAGE_STATES.get(message_state or 0) or fields.get("stat", "").upper()
    if not ref or stat not in STAT_TO_STATE:
        return None
    err = fields.get("err", "")
    detail = f"receipt stat:{stat}" + (f" err:{err}" if err and stat != "DELIVRD" else "")
    return ref, STAT_TO_STATE[stat], detail
