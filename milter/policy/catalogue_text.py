"""Catalogue entries for damaged or non-text SMS text and hostile voice/fax attachments
(outside-probe hardening), kept here so
`catalogue.py` stays small. `catalogue` imports them: they are catalogue entries like any other
(`catalogue.CONTROL_CHARACTER`), in README's tables at their place."""

from __future__ import annotations

from .refusal import Reply

DAMAGED_TRANSFER_ENCODING = Reply(
    "550", "5.6.0", "eom",
    "The {where} is not valid {encoding} ({problem} at line {line}); send it again from a standard mail "
    "client.",
    "a base64 or quoted-printable part that does not decode (bad characters, a cut-short end, `=ZZ`)",
    {"where": "text part", "encoding": "base64", "problem": "'#' is not a base64 character", "line": 1})
CONTROL_CHARACTER = Reply(
    "550", "5.6.0", "eom",
    "Character U+{code:04X} ({name}) in the {where} at line {line}, column {column} is a control "
    "character; remove it from the SMS text.",
    "a C0 control character other than TAB, LF and CR, DEL or NUL in the text part or the Subject",
    {"code": 7, "name": "BELL", "where": "text part", "line": 1, "column": 5})
NOT_TEXT = Reply(
    "550", "5.6.0", "eom",
    "The {where} holds bytes that are not text (U+{code:04X}, a C1 control code, at line {line}: binary "
    "data or a wrong charset); send the SMS text as plain text and declare its charset.",
    "C1 control codes (U+0080-U+009F): binary data in a text part, or text in another charset than "
    "declared",
    {"where": "text part", "code": 0x89, "line": 1})


# voice/fax attachments: no reply echoes the sender's file name (it may hold control characters);
# an attachment is named by its position and declared type.
ATTACHMENT_NOT_ITS_TYPE = Reply(
    "550", "5.6.1", "eom",
    "Attachment {n} is declared {ctype} but is not a {kind} file{empty}; attach the document itself with "
    "its right type.",
    "voice/fax: an attachment whose bytes do not start as its declared type's do (a lying Content-Type, "
    "an empty file)",
    {"n": 1, "ctype": "application/pdf", "kind": "PDF", "empty": " (it is empty)"})
TOO_MANY_ATTACHMENTS = Reply(
    "552", "5.3.4", "eom",
    "The message has more than {limit} attachments; a voice call or fax takes at most {limit}.",
    "voice/fax: more MIME parts than a fax could carry (decided before decoding them)",
    {"limit": 100})
