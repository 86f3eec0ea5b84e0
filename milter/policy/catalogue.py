"""Every refusal the gateway answers, in one place (aiosmtpd's `testing/statuscodes.py` is the model).

An entry has a name, the SMTP reply code, the enhanced status code (RFC 3463), a text template
(`str.format` fields, named) and what README's table says about it. Calling an entry with the
template's fields gives the `Refusal`; nothing else in the package builds one (a test greps for
it). README's "Every refusal" tables are generated from this module
(`python -m sms_milter.policy.catalogue`) and a test compares them.

A 5xx always has a 5.x.x enhanced code and a 4xx a 4.x.x one (a test checks every entry); a 4xx
means the gateway's own trouble or a limit that frees up by itself: the client tries again.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .refusal import Reply

# Where a refusal is decided (README's tables, one per stage).
STAGES = {
    "rcpt": "Decided at RCPT (only that recipient is refused; the others of the message go on):",
    "eom": "Decided at end of message (the whole transaction is refused):",
    "limit": "Decided by a limit (see [Limits](#limits-abuse-control)), at RCPT, end of message or in the "
             "commit:",
    "submit": "Only from the pipe transport (`sms-milter submit`, written into the bounce):",
}


_R = Reply
_DEVICE_NAMES = "SMS, Business, Mobile, Home or Fax"
_ASPSMS_USAGE = "00<international number>@sms.example.com, textsms@sms.example.com or xml@sms.example.com"

# -- RCPT: the address ------------------------------------------------------------------------
NO_LOCAL_PART = _R("550", "5.1.3", "rcpt",
                   "Recipient {address} has no local part; use {usage}.",
                   "empty local part at an SMS domain (quoted local parts get the \"is not an SMS address\" "
                   "reply)",
                   {"address": "@sms.example.com", "usage": _ASPSMS_USAGE})
NOT_SMS_DOMAIN = _R("550", "5.1.2", "rcpt",
                    "Recipient {address}: {host} is not an SMS domain of this gateway; use {usage}.",
                    "any address whose domain ends in an SMS domain is an SMS address: valid or refused, "
                    "never relayed as mail (`x.SMS.tm.example.com`, `sub.sms.example.com`)",
                    {"address": "0041...@sub.sms.example.com", "host": "sub.sms.example.com",
                     "usage": _ASPSMS_USAGE})
PLUS_NUMBER = _R("550", "5.1.3", "rcpt",
                 "Recipient {address}: write the number with 00 instead of + ({suggested}@{domain}).",
                 "aspsms number written with `+`",
                 {"address": "+41...@sms.example.com", "suggested": "0041...", "domain": "sms.example.com"})
NOT_ASPSMS_ADDRESS = _R("550", "5.1.3", "rcpt",
                        "Recipient {address} is not an SMS address of {domain}: use 00<international "
                        "number>@{domain}, textsms@{domain} or xml@{domain}.",
                        "aspsms local part is none of those",
                        {"address": "hello@sms.example.com", "domain": "sms.example.com"})
INVALID_NUMBER = _R("550", "5.1.1", "rcpt",
                    "Recipient {address}: {digits} is not a valid international phone number.",
                    "impossible number (phonenumbers)",
                    {"address": "0099912345@sms.example.com", "digits": "99912345"})
UNKNOWN_DEVICE = _R("550", "5.1.1", "rcpt",
                    "Recipient {address}: unknown device '{label}'; use SMS, Business, Mobile, Home or "
                    "Fax, or no device for SMS.",
                    "telemessage, unknown device",
                    {"address": "...@Pager.tm.example.com", "label": "Pager"})
NO_CHANNEL = _R("550", "5.3.3", "rcpt",
                "Recipient {address}: the {device} device has no delivery channel on this gateway; send "
                "to {local}@SMS.{domain} instead.",
                "a device whose channel is not configured (Business, Mobile, Home need `voice:`, Fax needs "
                "`fax:`; `policy/devices.py`)",
                {"address": "...@Fax.tm.example.com", "device": "Fax", "local": "...",
                 "domain": "tm.example.com"})
NOT_TELEMESSAGE_ADDRESS = _R("550", "5.1.3", "rcpt",
                             "Recipient {address} is not an SMS address of {domain}: use <international "
                             "number>@[<Device>.]{domain} with digits and dashes only and no + (e.g. "
                             "1-781-6170000@{domain}).",
                             "telemessage local part not a number",
                             {"address": "...", "domain": "tm.example.com"})
# -- RCPT: the sender -------------------------------------------------------------------------
SENDER_NOT_AUTHORIZED = _R("550", "5.7.1", "rcpt",
                           "This sender address is not authorized to send SMS through this gateway.",
                           "envelope sender not an authorized sender (the address is never echoed: it is "
                           "the secret)")
NULL_SENDER = _R("550", "5.7.1", "rcpt",
                 "Mail from the null sender <> cannot send SMS; use an authorized sender address.",
                 "`MAIL FROM:<>` to a number")
CLIENT_NOT_ALLOWED = _R("550", "5.7.1", "rcpt",
                        "Client address {ip} is not allowed to send SMS for this sender.",
                        "account has `networks` and the client is outside them (textsms@: at end of "
                        "message)",
                        {"ip": "203.0.113.9"})
# -- end of message: size and MIME ------------------------------------------------------------
MESSAGE_TOO_BIG = _R("552", "5.3.4", "eom",
                     "The message is {size} bytes; mail for SMS may be at most {limit} bytes.",
                     "larger than `max_message_bytes`",
                     {"size": "N", "limit": "M"})
HTML_PART = _R("550", "5.6.1", "eom",
               "The message contains an HTML part; send {what} as plain text only (text/plain).",
               "text/html (alone or in multipart/alternative); for xml@ it says the XML request",
               {"what": "the SMS text"})
SMS_ATTACHMENT = _R("550", "5.6.1", "eom",
                    "The message contains an attachment ({ctype}); SMS mail must be plain text only.",
                    "any non-text part",
                    {"ctype": "application/pdf"})
XML_ATTACHMENT = _R("550", "5.6.1", "eom",
                    "The message contains an attachment ({ctype}); mail to xml@ must carry {what} as its "
                    "only part.",
                    "xml@: any part that is not the request",
                    {"ctype": "application/pdf", "what": "the XML request"})
HTML_MARKUP = _R("550", "5.6.1", "eom",
                 "The text contains HTML markup ({tag} at line {line}); send plain text only.",
                 "tags inside text/plain",
                 {"tag": "<b>", "line": 2})
NO_TEXT_PART = _R("550", "5.6.1", "eom",
                  "The message contains no text part; send {what} as plain text (text/plain).",
                  "no text part",
                  {"what": "the SMS text"})
MANY_TEXT_PARTS = _R("550", "5.6.1", "eom",
                     "The message contains {count} text parts; send {what} as one plain text part without "
                     "attachments.",
                     "more than one text part",
                     {"count": "N", "what": "the SMS text"})
MULTIPART_EMPTY = _R("550", "5.6.1", "eom",
                     "The message is declared {ctype} but has no valid MIME parts; send the SMS text as "
                     "plain text only (text/plain).",
                     "a multipart without parts",
                     {"ctype": "multipart/mixed"})
MULTIPART_OTHER = _R("550", "5.6.1", "eom",
                     "The message is {ctype}; SMS mail must be plain text only (one text/plain part).",
                     "multipart other than mixed or alternative",
                     {"ctype": "multipart/related"})
PART_UNREADABLE = _R("550", "5.6.1", "eom",
                     "The text part could not be read; send the SMS text as plain text only (text/plain).",
                     "a text part whose payload cannot be read")
XML_NOT_REQUEST = _R("550", "5.6.1", "eom",
                     "Mail to xml@ must carry the XML request as its only, plain-text part (text/plain or "
                     "text/xml); {what}.",
                     "xml@ mail that is not a request at all (a well-formed request with bad fields is "
                     "accepted and answered with its ASPSMS ErrorCode by mail)",
                     {"what": "this message has no body"})
# -- end of message: text ---------------------------------------------------------------------
MIME_UNPARSABLE = _R("550", "5.6.0", "eom",
                     "The message could not be parsed as MIME; send the SMS text as plain text only "
                     "(text/plain).",
                     "the MIME parser gave up on the message")
XML_MIME_UNPARSABLE = _R("550", "5.6.0", "eom",
                         "The message could not be parsed as MIME; send the XML request as plain text "
                         "only (text/plain or text/xml).",
                         "the same, for xml@")
NOT_LATIN1 = _R("550", "5.6.0", "eom",
                "Character U+{code:04X} ({name}) in the {where} at line {line}, column {column} cannot be "
                "written in ISO-8859-1; this SMS domain accepts ISO-8859-1 text only.",
                "aspsms domains only",
                {"code": 1046, "name": "CYRILLIC CAPITAL LETTER ZHE", "where": "body", "line": 1,
                 "column": 7})
UNKNOWN_CHARSET = _R("550", "5.6.0", "eom",
                     "Unknown charset '{charset}' in the {where}; use ISO-8859-1 or UTF-8.",
                     "undecodable text; also every codec that is not a mail charset (`punycode`, "
                     "`undefined`, `idna`, `rot13`, `base64`, `hex`, `zlib`, `uu`, `quopri`, `bz2`, the "
                     "escape codecs), in the text part, a Subject encoded word or an xml@ request",
                     {"charset": "x-foo", "where": "text part"})
INVALID_TEXT_AT = _R("550", "5.6.0", "eom",
                     "The {where} is not valid {charset} ({byte}); declare the right charset or fix the "
                     "text.",
                     "bytes that are not in the declared charset",
                     {"where": "text part", "charset": "utf-8", "byte": "byte 0xFF at line 3"})
INVALID_TEXT = _R("550", "5.6.0", "eom",
                  "The {where} is not valid {charset}; declare the right charset or fix the text.",
                  "a codec's own complaint",
                  {"where": "text part", "charset": "utf-7"})
UNKNOWN_TRANSFER_ENCODING = _R("550", "5.6.0", "eom",
                               "Unknown Content-Transfer-Encoding '{cte}' in the text part; use 7bit, "
                               "8bit, quoted-printable or base64.",
                               "an unknown transfer encoding",
                               {"cte": "x-uuencode"})
DAMAGED_ENCODED_WORD = _R("550", "5.6.0", "eom",
                          "The Subject holds a damaged {encoding} encoded word (word {index}: {problem}); "
                          "send it again from a standard mail client.",
                          "an RFC 2047 word that does not decode",
                          {"encoding": "base64 (B)", "index": 1, "problem": "'#' is not a base64 character"})
NO_TEXT = _R("550", "5.6.0", "eom",
             "The message has no text to send as SMS.",
             "empty body (and empty template result)")
# Damaged transfer encodings, control characters, binary data (split out for length)
from .catalogue_text import CONTROL_CHARACTER, DAMAGED_TRANSFER_ENCODING, NOT_TEXT  # noqa: E402, F401, I001
TOO_MANY_PARTS = _R("552", "5.3.4", "eom",
                    "The text needs {parts} SMS parts but this account allows at most {max_parts}; "
                    "shorten the text.",
                    "longer than `max_parts` (GSM-7 153/160, UCS-2 67/70)",
                    {"parts": 9, "max_parts": 6})
# -- end of message: voice and fax (policy/channelcheck.py) ---------------------------------------
VOICE_TOO_LONG = _R("552", "5.3.4", "eom",
                    "The text is {chars} characters, about {seconds} seconds of speech; a voice call plays "
                    "at most {max_seconds} seconds (about {max_chars} characters).",
                    "longer than `voice.max_seconds` at `voice.words_per_minute`",
                    {"chars": 2400, "seconds": 300, "max_seconds": 120, "max_chars": 1920})
VOICE_ATTACHMENT = _R("550", "5.6.1", "eom",
                      "The message contains an attachment ({ctype}); a voice call speaks the text, or plays "
                      "one recording ({formats}) where the account allows it.",
                      "voice: any attachment but one recording in a format sox decodes here",
                      {"ctype": "application/pdf", "formats": "WAV, MP3, OGG"})
VOICE_RECORDINGS_OFF = _R("550", "5.7.1", "eom",
                          "This account does not send recordings ({ctype}) as voice calls; send the text "
                          "to be spoken instead.",
                          "voice: audio attachment, account without `voice_recordings: true`",
                          {"ctype": "audio/wav"})
FAX_ATTACHMENT = _R("550", "5.6.1", "eom",
                    "The message contains an attachment ({ctype}) that cannot be faxed; send text, PDF, PNG, "
                    "JPEG, GIF or TIFF{office}.",
                    "fax: an attachment of another type", {"ctype": "video/mp4", "office": ""})
FAX_NO_OFFICE = _R("550", "5.6.1", "eom",
                   "{kind} documents ({ctype}) cannot be faxed here: LibreOffice is not installed; send "
                   "a PDF.",
                   "fax: an office document without `soffice` on the gateway",
                   {"kind": "Word", "ctype": "application/msword"})
FAX_TOO_BIG = _R("552", "5.3.4", "eom",
                 "The documents are {size} bytes; a fax may carry at most {limit} bytes.",
                 "fax: attachments larger than `fax.max_bytes`", {"size": "N", "limit": "M"})
FAX_TOO_MANY_PAGES = _R("552", "5.3.4", "eom",
                        "The fax would have {pages} pages; a fax may have at most {limit}.",
                        "fax: text and documents over `fax.max_pages` (counted where it is reliable)",
                        {"pages": 21, "limit": 20})
CHANNEL_EMPTY = _R("550", "5.6.0", "eom", "The message is empty: a {channel} needs {needs}.",
                   "voice/fax: no text (and no recording or document)",
                   {"channel": "fax", "needs": "text or a document (PDF, PNG, JPEG, TIFF)"})
from .catalogue_text import ATTACHMENT_NOT_ITS_TYPE, TOO_MANY_ATTACHMENTS  # noqa: E402, F401, I001
# -- end of message: the textsms@ Subject -----------------------------------------------------
SUBJECT_MISSING = _R("550", "5.5.4", "eom",
                     "The Subject has no {label}= (or {short}=) keyword; textsms@ needs Userkey, Password "
                     "and at least one Recipient.",
                     "textsms@ Subject incomplete (Userkey, Password, Recipient)",
                     {"label": "Userkey", "short": "U"})
UNKNOWN_KEYWORD = _R("550", "5.5.4", "eom",
                     "Unknown keyword {where}; use Userkey, Password, Recipient, Originator or Notify.",
                     "textsms@ Subject syntax (a key that is not a plain word is named by its position: "
                     "`in word 3 of the Subject`)",
                     {"where": "'Foo' in the Subject"})
KEYWORD_TWICE = _R("550", "5.5.4", "eom",
                   "The Subject gives {label}= twice; give each keyword once (only Recipient may repeat).",
                   "a keyword given twice",
                   {"label": "Userkey"})
EMPTY_VALUE = _R("550", "5.5.4", "eom",
                 "The Subject has an empty {label}= value; write {label}=<value> without blanks.",
                 "an empty Userkey or Password",
                 {"label": "Password"})
EMPTY_RECIPIENT = _R("550", "5.5.4", "eom",
                     "The Subject has an empty Recipient= value; write Recipient=<international number> "
                     "such as Recipient=0041791234567.",
                     "an empty Recipient")
CREDENTIAL_WORD = _R("550", "5.5.4", "eom",
                     "Word {n} of the Subject starts with {label} but is not a {label}=<value> pair; "
                     "write {label}=<value> with '=' and no blanks.",
                     "a word without `=`: named by its position, never echoed (it may be a password)",
                     {"n": 2, "label": "Password"})
NOT_A_PAIR = _R("550", "5.5.4", "eom",
                "Word {n} of the Subject is not a keyword=value pair; write pairs such as "
                "Recipient=0041791234567 separated by blanks, commas or semicolons.",
                "the same, a word that does not look like a credential",
                {"n": 3})
AFTER_PASSWORD = _R("550", "5.5.4", "eom",
                    "The Password value in the Subject is followed by text that is not a keyword=value "
                    "pair; a value may not contain blanks, commas or semicolons.",
                    "a Password value written with blanks (never echoed)")
BAD_NOTIFY = _R("550", "5.5.4", "eom",
                "The Notify= value in word {n} of the Subject is not allowed; use Notify=ALWAYS, "
                "Notify=NONE, Notify=FAILED or an empty Notify=.",
                "bad Notify",
                {"n": 4})
SUBJECT_TOO_LONG = _R("550", "5.5.4", "eom",
                      "The Subject is {length} characters long; textsms@ takes at most {limit} (mail "
                      "systems may cut a longer header without saying so); write fewer or shorter pairs, "
                      "or split the message.",
                      "textsms@ Subject over 8,000 decoded characters, refused before it is parsed "
                      "(Postfix hands the milter a header cut at about 60 KB: a cut `R=` value could be "
                      "another valid number; 100 `R=` fit in about 2,000)",
                      {"length": "N", "limit": 8000})
SUBJECT_TOO_MANY_RECIPIENTS = _R("550", "5.5.3", "eom",
                                 "Too many SMS recipients: the Subject gives at least {count} Recipient= "
                                 "values; limit recipients_per_message allows at most {limit} per "
                                 "message; split the message.",
                                 "the same, with more `R=` than any account's `recipients_per_message`",
                                 {"count": "N", "limit": 100})
WRONG_CREDENTIALS = _R("550", "5.7.8", "eom",
                       "Userkey or Password in the Subject is wrong.",
                       "textsms@ credentials (same text for both: it does not tell which)")
BAD_SUBJECT_NUMBER = _R("550", "5.1.1", "eom",
                        "{label} in the Subject is not a valid international phone number; write it as "
                        "00<country code><number>.",
                        "textsms@ recipient (a value that does not look like a number is not echoed: `A "
                        "Recipient= value in the Subject ...`)",
                        {"label": "Recipient=..."})
BAD_ORIGINATOR = _R("550", "5.5.4", "eom",
                    "Originator {problem}.",
                    "bad originator",
                    {"problem": "'...' is not a valid originator: use at most 11 letters/digits (at least "
                                "one letter) or a phone number"})
# -- the commit and the gateway's own trouble -------------------------------------------------
CANNOT_STORE = _R("550", "5.6.0", "eom",
                  "The message cannot be stored: {what}; write it as plain ASCII or UTF-8 text.",
                  "a value of this message that SQLite refuses: this message alone is refused, the others "
                  "committed with it are not affected",
                  {"what": "the Message-ID header (it is not valid text)"})
SPOOL_UNAVAILABLE = _R("451", "4.3.0", "eom",
                       "The SMS spool is unavailable right now; please try again later.",
                       "spool locked past `spool_timeout`, unwritable, or its file deleted/replaced under "
                       "the running milter: never 250")
TOO_SLOW = _R("451", "4.3.0", "eom",
              "The SMS gateway could not decide this message in time; please try again later.",
              "its decision took longer than `spool_timeout`: nothing is committed for it")
INTERNAL_ERROR = _R("451", "4.3.0", "eom",
                    "The SMS gateway hit an internal error; please try again later.",
                    "a bug: logged with its traceback, the client retries")
# -- limits (policy/limits.py) ----------------------------------------------------------------
AUTH_REQUIRED = _R("550", "5.7.1", "limit",
                   "This SMS account requires SMTP authentication (rule smtp_auth): log in with a login "
                   "bound to the account before sending.",
                   "`smtp_auth`, no login")
AUTH_NOT_BOUND = _R("550", "5.7.1", "limit",
                    "The SMTP AUTH login used is not bound to this SMS account (rule smtp_auth).",
                    "`smtp_auth`, another login")
TOO_MANY_RECIPIENTS = _R("550", "5.5.3", "limit",
                         "Too many SMS recipients: limit recipients_per_message allows {limit} per "
                         "message; split the message.",
                         "`recipients_per_message`",
                         {"limit": 100})
DENIED_PREFIX = _R("550", "5.7.1", "limit",
                   "SMS to {number} is refused by rule deny_prefixes (prefix {prefix} is not served by "
                   "this gateway).",
                   "`deny_prefixes`",
                   {"number": "+88212345678", "prefix": "+882"})
DENIED_COUNTRY = _R("550", "5.7.1", "limit",
                    "SMS to {number} is refused by rule countries: destination country {region} is not "
                    "allowed for this account (allowed: {allowed}).",
                    "`countries`",
                    {"number": "+33612345678", "region": "FR", "allowed": "CH, DE"})
DENIED_NUMBER_TYPE = _R("550", "5.7.1", "limit",
                        "SMS to {number} is refused by rule number_types: it is a {kind} number, which "
                        "this account may not send to.",
                        "`number_types`",
                        {"number": "+41900000000", "kind": "premium_rate"})
BREAKER_OPEN = _R("451", "4.7.1", "limit",
                  "SMS to {prefix}... is paused by the circuit breaker ({failed} of {finished} recent SMS "
                  "there failed); it reopens at {when}; please try again later.",
                  "`breaker`",
                  {"prefix": "+882", "failed": 12, "finished": 20,
                   "when": "2026-12-01 04:12:30 UTC (in 30 min)"})
WINDOW_FULL = _R("451", "4.7.1", "limit",
                 "Limit {rule} ({cap} SMS parts {what}) reached for {whom}; it frees up at {when}; please "
                 "try again later.",
                 "`parts_per_minute`, `parts_per_hour`, `parts_per_day`, `per_recipient_per_hour`",
                 {"rule": "parts_per_hour", "cap": 1000, "what": "per hour", "whom": "this account",
                  "when": "2026-12-01 04:12:30 UTC (in 35 min)"})
MONTH_FULL = _R("552", "5.2.2", "limit",
                "Limit parts_per_month ({cap} SMS parts per calendar month) reached for this account; it "
                "resets at {when}.",
                "`parts_per_month`",
                {"cap": 50000, "when": "2027-01-01 00:00:00 UTC (in 31 days)"})
OVER_CAP = _R("552", "5.2.2", "limit",
              "The message needs {parts} SMS parts for {whom}; limit {rule} allows {cap} {what}.",
              "any window, a message larger than the cap",
              {"parts": 9, "whom": "this account", "rule": "parts_per_minute", "cap": 5,
               "what": "per minute"})
# -- the pipe transport -----------------------------------------------------------------------
SUBMIT_NOT_SMS = _R("550", "5.1.1", "submit",
                    "sms-milter submit only takes SMS addresses; check transport_maps",
                    "a recipient that is not an SMS address (transport_maps sends it the wrong mail); "
                    "exit 65")
SUBMIT_NO_SPOOL = _R("451", "4.3.0", "submit",
                     "{error}",
                     "the spool cannot be opened; exit 75 (Postfix retries)",
                     {"error": "cannot open the spool ..."})
def _entries() -> dict[str, Reply]:
    found: dict[str, Reply] = {}
    for key, value in globals().items():
        if isinstance(value, Reply):
            object.__setattr__(value, "name", key)
            found[key] = value
    return found


ENTRIES: Mapping[str, Reply] = MappingProxyType(_entries())


def markdown() -> str:
    """README's tables of every refusal, one per stage, in catalogue order."""
    out: list[str] = []
    for stage, title in STAGES.items():
        out += ["", title, "", "| reply | when |", "| --- | --- |"]
        for e in ENTRIES.values():
            if e.stage == stage:
                out.append(f"| `{e.sample()}` | {e.when} |".replace("\n", " "))
    return "\n".join(out[1:]) + "\n"


if __name__ == "__main__":  # python -m sms_milter.policy.catalogue: README's tables
    print(markdown(), end="")
