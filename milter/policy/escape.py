"""Text a reply line may carry: printable ASCII as it is, every other character as U+XXXX with its
Unicode name (control characters included, which `unicodedata` does not name). Pure functions."""

from __future__ import annotations

import unicodedata

_C0_NAMES = ("NULL", "START OF HEADING", "START OF TEXT", "END OF TEXT", "END OF TRANSMISSION", "ENQUIRY",
             "ACKNOWLEDGE", "BELL", "BACKSPACE", "CHARACTER TABULATION", "LINE FEED", "LINE TABULATION",
             "FORM FEED", "CARRIAGE RETURN", "SHIFT OUT", "SHIFT IN", "DATA LINK ESCAPE",
             "DEVICE CONTROL ONE", "DEVICE CONTROL TWO", "DEVICE CONTROL THREE", "DEVICE CONTROL FOUR",
             "NEGATIVE ACKNOWLEDGE", "SYNCHRONOUS IDLE", "END OF TRANSMISSION BLOCK", "CANCEL",
             "END OF MEDIUM", "SUBSTITUTE", "ESCAPE", "INFORMATION SEPARATOR FOUR",
             "INFORMATION SEPARATOR THREE", "INFORMATION SEPARATOR TWO", "INFORMATION SEPARATOR ONE")


def char_name(ch: str) -> str:
    """The Unicode name of a character, control characters included."""
    code = ord(ch)
    if code < 0x20:
        return _C0_NAMES[code]
    if code == 0x7F:
        return "DELETE"
    if 0x80 <= code <= 0x9F:
        return f"C1 CONTROL 0x{code:02X}"
    if 0xD800 <= code <= 0xDFFF:
        return "SURROGATE"
    return unicodedata.name(ch, "unnamed character")


def ascii_escape(text: str, max_chars: int = 40) -> str:
    """`text` safe for one reply line: printable ASCII kept, anything else <U+00FC LATIN SMALL
    LETTER U WITH DIAERESIS>; at most `max_chars` characters of `text` shown (then "...")."""
    shown = text[:max_chars]
    out = "".join(ch if " " <= ch <= "~" else f"<U+{ord(ch):04X} {char_name(ch)}>" for ch in shown)
    return out + ("..." if len(text) > max_chars else "")
