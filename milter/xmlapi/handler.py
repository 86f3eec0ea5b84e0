"""xml@: execute one ASPSMS XML request mailed to the gateway and prepare its reply mail.

The milter calls `handle` at end of message. Mail that is not an XML request at all is
refused (a `Refusal`); every XML request, good or bad, is accepted and answered by mail
with its ErrorCode (or the ParserError form for a document that is not well-formed).

Decisions (documented for operators and client authors):
- Credentials: a missing/empty Userkey is ErrorCode 8, a missing/empty Password 9; a
  Userkey/Password pair that matches no account is 3 (never saying which one was wrong).
  A client address outside the account's `networks` is 25.
- An Action this gateway does not offer (or none, or several, or a root element other
  than <aspsms>) is ErrorCode 25 "User access denied." with an <ErrorDetail> naming it.
- Every error reply carries an extra <ErrorDetail> sentence saying what exactly to fix;
  ErrorCode and ErrorDescription stay as the specification has them.
- SendTextSMS is all-or-nothing: one bad recipient refuses the whole request, no job
  is created. An invalid or missing PhoneNumber, or more than 1000 recipients, is 20.
  A numeric Originator must be the account's originator or one of its senders'
  originators (else 10, as for a malformed one); alphanumeric ones are free.
  MessageData may hold any Unicode character (as a numeric reference): text outside
  GSM 03.38 goes out as UCS-2. Empty, or more parts than the account's max_parts, is 11.
  Jobs get notify NONE: xml@ clients learn states by URL callbacks or inquiries, not mail.
  DeferredDeliveryTime in the past by less than a day sends at once; older, malformed,
  with a bad TimeZone, more than a year ahead, or a LifeTime that is not a number is 22.
  LifeTime outside 3-1440 minutes is clamped.
- ShowCredits: <Credits> holds account.credits minus the parts spooled and not failed;
  an account without a credits limit answers <Credits>unlimited</Credits>.
- CheckOriginatorAuthorization answers 31 (authorized) or 30 (not authorized); an
  invalid or missing originator is 10.
- InquireDeliveryNotifications: one <DeliveryNotification> per job carrying a requested
  TransRefNumber (unknown references are left out, as ASPSMS does); dates are
  ddmmyyyyhhmmss in the request's TimeZone (default GMT+1).
- No reply goes to the null sender, to an autoresponder (Auto-Submitted: auto-replied) or
  to the gateway's own notification address.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model import Account, Config
from ..policy.addresses import normalize_originator, originator_problem, parse_number
from ..policy.auth import find_userkey_account, network_allowed
from ..policy.content import extract_xml
from ..policy.refusal import SPOOL_UNAVAILABLE, Refusal
from ..policy.smstext import count_parts
from ..spool.base import Job, NewJob, OutMail, ReadSpool, SpoolError
from . import codes, reply
from .request import (
    DEFERRED_MAX_AHEAD,
    DEFERRED_PAST_GRACE,
    MAX_RECIPIENTS,
    MAX_TRANS_REF_LEN,
    MAX_TRANS_REFS,
    ParserFailure,
    XmlRequest,
    format_aspsms_time,
    parse_aspsms_time,
    parse_flag,
    parse_lifetime,
    parse_request,
    parse_timezone,
    url_problem,
)

ACTIONS = ("SendTextSMS", "InquireDeliveryNotifications", "ShowCredits", "CheckOriginatorAuthorization")
URL_FIELDS = (  # element, urls key (job state), ErrorCode
    ("URLBufferedMessageNotification", "buffered", codes.INVALID_URL_BUFFERED),
    ("URLDeliveryNotification", "delivered", codes.INVALID_URL_DELIVERY),
    ("URLNonDeliveryNotification", "failed", codes.INVALID_URL_NON_DELIVERY),
)


@dataclass(frozen=True)
class XmlOutcome:
    jobs: list[NewJob]  # to commit (SendTextSMS), possibly empty
    reply: OutMail | None  # the reply mail (None for the null sender)
    log: str  # one short log phrase: action + ErrorCode, never a password


@dataclass
class _Answer:
    code: int
    nodes: list[reply.Node] = field(default_factory=list)  # after ErrorCode/ErrorDescription
    detail: str = ""
    jobs: list[NewJob] = field(default_factory=list)
    log_extra: str = ""


def _error(code: int, detail: str) -> _Answer:
    return _Answer(code=code, detail=detail)


@dataclass(frozen=True)
class _Ctx:
    cfg: Config
    spool: ReadSpool
    sender: str
    queue_id: str
    message_id: str
    now: float


def handle(raw_message: bytes, sender: str, client_ip: str | None, cfg: Config, spool: ReadSpool,
           queue_id: str, now: float) -> XmlOutcome | Refusal:
    mail = extract_xml(raw_message)
    if isinstance(mail, Refusal):
        return mail
    parsed = parse_request(mail.body, mail.charset)
    ctx = _Ctx(cfg=cfg, spool=spool, sender=sender, queue_id=queue_id, message_id=mail.message_id, now=now)
    action: str | None = None
    if isinstance(parsed, ParserFailure):
        xml = reply.document(reply.parser_error_nodes(parsed))
        log = (f"xml@ parser error {parsed.code} at line {parsed.line} pos {parsed.linepos}: "
               f"{parsed.description}")
        jobs: list[NewJob] = []
    else:
        action = parsed.action
        try:
            account, answer = _execute(parsed, client_ip, ctx)
        except SpoolError:
            return SPOOL_UNAVAILABLE
        nodes: list[reply.Node] = [("ErrorCode", str(answer.code)),
                                   ("ErrorDescription", codes.description(answer.code))]
        if answer.detail:
            nodes.append(("ErrorDetail", answer.detail))
        nodes.extend(answer.nodes)
        xml = reply.document(nodes)
        jobs = answer.jobs
        name = action if action in ACTIONS else "(other action)"
        who = f" account={account.name}" if account else ""
        log = f"xml@ {name}{who} ErrorCode={answer.code}{answer.log_extra}"
    out: OutMail | None = None
    if _should_reply(sender, cfg, mail.auto_replied):
        out = OutMail(rcpt=sender, content=reply.mail(xml, sender=cfg.notify.sender, rcpt=sender,
                                                      action=action, in_reply_to=mail.message_id, now=now))
    else:
        log += " (no reply mail)"
    return XmlOutcome(jobs=jobs, reply=out, log=log)


def _should_reply(sender: str, cfg: Config, auto_replied: bool) -> bool:
    s = sender.strip().strip("<>").strip()
    # A non-ASCII (SMTPUTF8) address cannot be written into the reply's 7-bit header: no reply.
    return bool(s) and s.isascii() and not auto_replied and s.lower() != cfg.notify.sender.lower()


def _execute(req: XmlRequest, client_ip: str | None, ctx: _Ctx) -> tuple[Account | None, _Answer]:
    if req.root != "aspsms":
        return None, _error(codes.USER_ACCESS_DENIED, f"The root element must be <aspsms>, not <{req.root}>.")
    userkey = req.get("Userkey")
    password = req.fields.get("Password", "")
    if not userkey:
        return None, _error(codes.INVALID_USERKEY, "The request has no <Userkey>.")
    if not password:
        return None, _error(codes.INVALID_PASSWORD, "The request has no <Password>.")
    account = find_userkey_account(userkey, password, ctx.cfg.accounts)
    if account is None and password != password.strip():
        account = find_userkey_account(userkey, password.strip(), ctx.cfg.accounts)
    if account is None:
        return None, _error(codes.AUTHORIZATION_FAILED, "Userkey or Password is wrong.")
    if not network_allowed(account, client_ip):
        return account, _error(codes.USER_ACCESS_DENIED,
                               "Your mail server's address is not allowed to use this account.")
    if len(req.actions) != 1:
        what = "no <Action>" if not req.actions else f"{len(req.actions)} <Action> elements"
        return account, _error(codes.USER_ACCESS_DENIED, f"The request has {what}; give exactly one.")
    action = req.actions[0]
    if action not in ACTIONS:
        return account, _error(codes.USER_ACCESS_DENIED,
                               f"Action '{action[:64]}' is not offered by this gateway; use one of "
                               f"{', '.join(ACTIONS)} (names are case-sensitive).")
    if action == "SendTextSMS":
        return account, _send(req, account, ctx)
    if action == "InquireDeliveryNotifications":
        return account, _inquire(req, account, ctx)
    if action == "ShowCredits":
        return account, _credits(account, ctx)
    return account, _check_originator(req, account)


# -- originators -----------------------------------------------------------------------

def _authorized_numbers(account: Account) -> set[str]:
    values = [account.originator] + [s.originator for s in account.senders if s.originator]
    return {normalize_originator(v) for v in values}


def _originator(value: str, account: Account) -> tuple[str | None, int, str]:
    """(normalized originator, ErrorCode, detail): the code is OK, INVALID_ORIGINATOR (malformed)
    or ORIGINATOR_NOT_AUTHORIZED (a number this account may not use). No value: the default."""
    if not value:
        return normalize_originator(account.originator), codes.OK, ""
    problem = originator_problem(value)
    if problem:
        return None, codes.INVALID_ORIGINATOR, problem[:1].upper() + problem[1:] + "."
    orig = normalize_originator(value)
    if orig.startswith("+") and orig not in _authorized_numbers(account):
        return None, codes.ORIGINATOR_NOT_AUTHORIZED, (f"The number {orig} is not an authorized originator "
                                                       "of this account.")
    return orig, codes.OK, ""


def _check_originator(req: XmlRequest, account: Account) -> _Answer:
    value = req.get("Originator")
    if not value:
        return _error(codes.INVALID_ORIGINATOR, "The request has no <Originator> to check.")
    _, code, detail = _originator(value, account)
    return _Answer(code=codes.ORIGINATOR_AUTHORIZED if code == codes.OK else code, detail=detail)


# -- ShowCredits -----------------------------------------------------------------------

def _remaining(account: Account, spool: ReadSpool) -> int | None:
    if account.credits is None:
        return None
    return max(0, account.credits - spool.parts_used(account.name))


def _credits(account: Account, ctx: _Ctx) -> _Answer:
    left = _remaining(account, ctx.spool)
    return _Answer(code=codes.OK, nodes=[("Credits", "unlimited" if left is None else str(left))],
                   log_extra=f" credits={'unlimited' if left is None else left}")


# -- SendTextSMS -----------------------------------------------------------------------

def _recipients(req: XmlRequest) -> list[tuple[str, str | None]] | _Answer:
    if req.recipient_count == 0:
        return _error(codes.MISSING_RECIPIENT, "The request has no <Recipient>.")
    if req.recipient_count > MAX_RECIPIENTS:
        return _error(codes.MISSING_RECIPIENT, f"The request has {req.recipient_count} recipients; at most "
                                               f"{MAX_RECIPIENTS} are accepted per request.")
    out: list[tuple[str, str | None]] = []
    for i, r in enumerate(req.recipients, 1):
        if not r.phone:
            return _error(codes.MISSING_RECIPIENT, f"Recipient {i} has no <PhoneNumber>.")
        number = parse_number(r.phone)
        if number is None:
            return _error(codes.MISSING_RECIPIENT, f"Recipient {i}: '{r.phone[:40]}' is not a valid "
                                                   "international phone number (write 0041... or +41...).")
        if r.trans_ref is not None and len(r.trans_ref) > MAX_TRANS_REF_LEN:
            return _error(codes.MISSING_TRANS_REF, f"Recipient {i}: the TransRefNumber is longer than "
                                                   f"{MAX_TRANS_REF_LEN} characters.")
        out.append((number, r.trans_ref))
    # One SMS per number per request: 0041..., +41... and '0041 79 ...' are one recipient (the
    # first one's TransRefNumber is kept); credits are counted for the unique numbers only.
    unique: dict[str, str | None] = {}
    for number, ref in out:
        unique.setdefault(number, ref)
    return list(unique.items())


def _schedule(req: XmlRequest, now: float) -> tuple[float | None, float] | _Answer:
    """(not_before, expires_at) from DeferredDeliveryTime, TimeZone and LifeTime."""
    tz = parse_timezone(req.get("TimeZone"))
    if tz is None:
        return _error(codes.INVALID_DEFERRED_TIME, "TimeZone must be hours from GMT such as +1 or -5.")
    lifetime = parse_lifetime(req.get("LifeTime"))
    if lifetime is None:
        return _error(codes.INVALID_DEFERRED_TIME, "LifeTime must be a number of minutes (3-1440).")
    not_before: float | None = None
    deferred = req.get("DeferredDeliveryTime")
    if deferred:
        at = parse_aspsms_time(deferred, tz)
        if at is None:
            return _error(codes.INVALID_DEFERRED_TIME,
                          f"DeferredDeliveryTime '{deferred[:20]}' is not a date written ddmmyyyyhhmmss.")
        if at < now - DEFERRED_PAST_GRACE:
            return _error(codes.INVALID_DEFERRED_TIME,
                          "DeferredDeliveryTime lies more than a day in the past.")
        if at > now + DEFERRED_MAX_AHEAD:
            return _error(codes.INVALID_DEFERRED_TIME, "DeferredDeliveryTime lies more than a year ahead.")
        if at > now:
            not_before = at
    return not_before, (not_before or now) + lifetime * 60


def _urls(req: XmlRequest, allowed: tuple[str, ...]) -> dict[str, str] | _Answer:
    urls: dict[str, str] = {}
    for element, key, code in URL_FIELDS:
        value = req.get(element)
        if not value:
            continue
        problem = url_problem(value, allowed)
        if problem:
            return _error(code, f"{element}: {problem}.")
        urls[key] = value
    return urls


def _send(req: XmlRequest, account: Account, ctx: _Ctx) -> _Answer:
    recipients = _recipients(req)
    if isinstance(recipients, _Answer):
        return recipients
    originator, code, detail = _originator(req.get("Originator"), account)
    if originator is None:
        # 30 would read as success to clients that treat it as an answer to a check.
        return _error(codes.INVALID_ORIGINATOR, detail)
    text = req.fields.get("MessageData", "")
    if not text.strip():
        return _error(codes.INVALID_MESSAGE_DATA, "The request has no <MessageData> (the SMS text).")
    parts = count_parts(text)
    if parts > account.max_parts:
        return _error(codes.INVALID_MESSAGE_DATA, f"The text needs {parts} SMS parts; this account allows at "
                                                  f"most {account.max_parts}.")
    schedule = _schedule(req, ctx.now)
    if isinstance(schedule, _Answer):
        return schedule
    not_before, expires_at = schedule
    urls = _urls(req, ctx.cfg.xml.allowed_url_hosts)
    if isinstance(urls, _Answer):
        return urls
    total = parts * len(recipients)
    left = _remaining(account, ctx.spool)
    if left is not None and total > left:
        return _error(codes.NOT_ENOUGH_CREDITS, f"The request needs {total} credits; {left} are left.")
    flash = parse_flag(req.get("FlashingSMS"))
    jobs = [
        NewJob(recipient=number, originator=originator, text=text, parts=parts, account=account.name,
               sender=ctx.sender, message_id=ctx.message_id, notify="NONE", queue_id=ctx.queue_id,
               not_before=not_before, expires_at=expires_at, trans_ref=ref, flash=flash, urls=dict(urls))
        for number, ref in recipients
    ]
    return _Answer(code=codes.OK, nodes=[("CreditsUsed", str(total))], jobs=jobs,
                   log_extra=f" recipients={len(jobs)} parts={total}")


# -- InquireDeliveryNotifications ------------------------------------------------------

_ERR = re.compile(r"\berr:(\d{3})\b", re.IGNORECASE)


def _reason(job: Job) -> str:
    if job.state in ("failed", "expired"):
        m = _ERR.search(job.last_error or "")
        return m.group(1) if m else codes.REASON_DELIVERY_FAIL
    return codes.REASON_NONE


def _notification(ref: str, job: Job, tz: float) -> reply.Node:
    children: list[reply.Node] = [
        ("TransRefNumber", ref),
        ("DeliveryStatus", str(codes.JOB_STATE_STATUS.get(job.state, codes.STATUS_NOT_YET))),
        ("SubmissionDate", format_aspsms_time(job.created_at, tz)),
    ]
    notified = job.done_at if job.done_at else (job.submitted_at if job.state == "buffered" else None)
    if notified:
        children.append(("NotificationDate", format_aspsms_time(notified, tz)))
    children.append(("ReasonCode", _reason(job)))
    return ("DeliveryNotification", children)


def _inquire(req: XmlRequest, account: Account, ctx: _Ctx) -> _Answer:
    if not req.trans_refs:
        return _error(codes.MISSING_TRANS_REF, "Give the <TransRefNumber> of each SMS to inquire about.")
    if req.trans_ref_count > MAX_TRANS_REFS:
        return _error(codes.MISSING_TRANS_REF, f"At most {MAX_TRANS_REFS} TransRefNumbers per request.")
    tz = parse_timezone(req.get("TimeZone"))
    if tz is None:
        return _error(codes.INVALID_DEFERRED_TIME, "TimeZone must be hours from GMT such as +1 or -5.")
    refs = list(dict.fromkeys(req.trans_refs))
    found = ctx.spool.find_by_trans_ref(account.name, refs)
    nodes: Sequence[reply.Node] = [_notification(ref, job, tz) for ref in refs for job in found.get(ref, [])]
    return _Answer(code=codes.OK, nodes=list(nodes), log_extra=f" refs={len(refs)} found={len(nodes)}")
