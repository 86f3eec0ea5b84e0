"""What the milter decides, message by message: no sockets here.

The adapter feeds a `Message` with what the MTA reports (sender, recipients, headers,
body) and asks `Gateway.rcpt()` at RCPT time and `Gateway.end_of_message()` at the end.
Whatever can be decided at RCPT is decided there, so one bad recipient does not
spoil the others; the rest (Subject, text, charset, length) is decided at the end,
where a refusal refuses the whole transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .model import Account, BreakerConfig, Config, SenderRule
from .policy import addresses, auth, content, limits, smstext, subject
from .policy.refusal import INTERNAL_ERROR, SPOOL_UNAVAILABLE, Refusal
from .spool.base import (
    AddResult,
    LimitPlan,
    LimitUsage,
    MilterSpool,
    NewJob,
    OutMail,
    SpoolDataError,
    SpoolError,
)

log = logging.getLogger("sms_milter.gateway")


@dataclass
class SmsRecipient:
    raw: bytes  # exactly as the MTA gave it (needed to delete it)
    address: str
    target: addresses.SmsTarget
    account: Account | None = None  # known at RCPT for <number>@ addresses
    rule: SenderRule | None = None
    duplicate: bool = False  # the same target again in this message: deleted, no job of its own

    @property
    def target_key(self) -> tuple[str, str, str]:
        """One SMS per (number, device) per message, one textsms@/xml@ handling per domain."""
        t = self.target
        return (t.number or t.kind, t.device, "" if t.number else t.domain.name)


@dataclass
class Message:
    """One transaction's state, reset at MAIL FROM and after the end of message."""

    sender: str = ""
    queue_id: str = ""
    client_ip: str | None = None
    sms: list[SmsRecipient] = field(default_factory=list)
    others: int = 0  # recipients that are not SMS addresses
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    failed: Refusal | None = None  # an error in a no-reply callback, reported at the end
    targets: set[tuple[str, str, str]] = field(default_factory=set)  # SmsRecipient.target_key seen
    auth_login: str | None = None  # the SMTP AUTH login ({auth_authen}), None when not authenticated
    numbers: set[str] = field(default_factory=set)  # E.164 of the <number>@ recipients accepted so far

    def add_body(self, chunk: bytes, limit: int) -> None:
        self.size += len(chunk)
        room = limit + 1 - len(self.body)
        if room > 0:
            self.body += chunk[:room]

    def raw(self) -> bytes:
        head = b"".join(k + b": " + v.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
                        for k, v in self.headers)
        return head + b"\r\n" + bytes(self.body)

    def header(self, name: str) -> str | None:
        lname = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == lname:
                return v.decode("latin-1").strip()
        return None


def split_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A whole message as (headers as the milter protocol gives them, body)."""
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    if not sep and not head.startswith((b" ", b"\t")) and b":" not in head.split(b"\n", 1)[0]:
        head, body = b"", data
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.lstrip(b" ")))
    return headers, body.replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class Commit:
    """What the spool must commit, in one transaction, before the message may be accepted."""

    key: str
    key_ttl: float
    jobs: list[NewJob]
    mails: list[OutMail]
    notes: list[str]
    limits: LimitPlan | None = None  # checked and counted by the spool inside the commit


@dataclass(frozen=True)
class Outcome:
    refusal: Refusal | None = None
    delete: tuple[bytes, ...] = ()  # recipients to remove from the message
    discard: bool = False  # no recipient left: drop the message (the client still sees 250)


def _sms_text_problem(text: str, parts: int, account: Account) -> Refusal | None:
    if not text.strip():
        return Refusal("550", "5.6.0", "The message has no text to send as SMS.")
    if parts > account.max_parts:
        return Refusal("552", "5.3.4", f"The text needs {parts} SMS parts but this account allows at most "
                                       f"{account.max_parts}; shorten the text.")
    return None


class Gateway:
    def __init__(self, cfg: Config, spool: MilterSpool, clock=time.time):
        self.cfg = cfg
        self.spool = spool
        self.clock = clock  # for the circuit breaker; the spool's counters use the spool's clock
        self._breaker = limits.EMPTY_BREAKER
        self._breaker_due = 0.0

    # -- RCPT ------------------------------------------------------------------------------
    def rcpt(self, msg: Message, raw: bytes, address: str) -> Refusal | None:
        found = addresses.classify_recipient(address, self.cfg.domains)
        if found is None:
            msg.others += 1
            return None
        if isinstance(found, Refusal):
            return self._refused(msg, found, address)
        rcpt = SmsRecipient(raw=raw, address=address, target=found)
        if rcpt.target_key in msg.targets:
            # The same number (other case, trailing dot, 00 or dashes) or the same textsms@/
            # xml@ again: one SMS, but every raw form is still deleted from the message.
            rcpt.duplicate = True
            msg.sms.append(rcpt)
            return None
        if found.kind == "number":
            allow_domain = found.domain.style == "telemessage"
            who = auth.authorize_sender(msg.sender, msg.client_ip, self.cfg.accounts, allow_domain)
            if isinstance(who, Refusal):
                return self._refused(msg, who, address)
            rcpt.account, rcpt.rule = who
            hit = self._rcpt_limits(msg, rcpt.account, found.number or "")
            if hit is not None:
                return hit
            msg.numbers.add(found.number or "")
        msg.targets.add(rcpt.target_key)
        msg.sms.append(rcpt)
        return None

    # -- limits (abuse control; rules in policy/limits.py) ----------------------------------
    def _limit_hit(self, msg: Message, account: Account, hit: limits.Hit | None,
                   what: str = "") -> Refusal | None:
        """One log line per refusal by a limit, with the rule's name; in monitor mode the line
        says what would have happened and nothing is refused."""
        if hit is None:
            return None
        qid = msg.queue_id or "NOQUEUE"
        where = f" {what}" if what else ""
        metrics.limit_hit(hit.rule, account.limits.mode)
        if account.limits.monitor:
            log.info("%s: limit %s (monitor mode, not enforced) would refuse%s for account %s: %s",
                     qid, hit.rule, where, account.name, hit.refusal)
            return None
        log.info("%s: limit %s refused%s for account %s: %s", qid, hit.rule, where, account.name, hit.refusal)
        return hit.refusal

    def _rcpt_limits(self, msg: Message, account: Account, number: str) -> Refusal | None:
        """The rules decided at RCPT for a <number>@ recipient: smtp_auth, recipients_per_message,
        destination (deny_prefixes, countries, number_types) and the circuit breaker."""
        lim = account.limits
        count = len(msg.numbers) + (number not in msg.numbers)
        for hit in (lambda: limits.smtp_auth_hit(account, msg.auth_login),
                    lambda: limits.recipients_hit(lim, count),
                    lambda: limits.destination_hit(lim, number),
                    lambda: self._breaker_hit(number)):
            refusal = self._limit_hit(msg, account, hit(), f"recipient {number}")
            if refusal is not None:
                return refusal
        return None

    def _breaker_hit(self, number: str) -> limits.Hit | None:
        cfg = self.cfg.breaker
        if cfg is None:
            return None
        now = self.clock()
        if now >= self._breaker_due:  # re-read the finished jobs now and then, not per message
            self._breaker_due = now + min(5.0, cfg.cooldown)
            self._breaker_refresh(cfg, now)
        return limits.breaker_hit(self._breaker, number, now)

    def _breaker_refresh(self, cfg: BreakerConfig, now: float) -> None:
        state = limits.breaker_expire(self._breaker, now)
        try:
            stats = self.spool.finished_by_prefix(now - cfg.window, cfg.prefix_digits)
            # After a cool-down only what finished since it ended counts.
            for p, closed in state.closed_at.items():
                if p in stats and closed > now - cfg.window:
                    stats[p] = self.spool.finished_by_prefix(closed, cfg.prefix_digits).get(p, (0, 0))
        except SpoolError as e:
            log.warning("circuit breaker: cannot read the spool (%s); keeping its state", e)
            return
        self._breaker, tripped = limits.breaker_update(cfg, state, stats, now)
        for p in tripped:
            metrics.limit_hit("breaker", "tripped")
            _until, finished, failed = self._breaker.open[p]
            log.warning("limit breaker: circuit breaker open for %s...: %d of %d SMS finished in the last "
                        "%gs failed; new mail there gets 451 for %gs", p, failed, finished, cfg.window,
                        cfg.cooldown)

    def _eom_limits(self, msg: Message, jobs: list[NewJob], late: list[int],
                    xml_jobs: int = 0) -> Refusal | LimitPlan:
        """The rules decided at the end of the message for jobs[i] for i in `late` (textsms@, xml@:
        their recipients and account are known only now): smtp_auth, recipients_per_message,
        the destination rules and the breaker; then the plan the spool runs in its commit."""
        by_account: dict[str, set[str]] = {}
        for i in late:
            by_account.setdefault(jobs[i].account, set()).add(jobs[i].recipient)
        # recipients_per_message: the unique (number, device) of the whole message, number@ RCPTs
        # and textsms@ R= together (each alone was checked, the sum was not); xml@'s recipients
        # count too when the message has others, a message to xml@ alone keeps its own 1,000.
        whole: dict[str, set[tuple[str, str]]] = {}
        for j in jobs if len(jobs) > xml_jobs else ():
            whole.setdefault(j.account, set()).add((j.recipient, j.device))
        for name in dict.fromkeys([*by_account, *whole]):
            account = self.cfg.accounts.get(name)
            if account is None:
                continue
            lim = account.limits
            found = None
            if name in by_account:
                found = self._limit_hit(msg, account, limits.smtp_auth_hit(account, msg.auth_login))
            many = limits.recipients_hit(lim, len(whole.get(name, ())))
            found = found or self._limit_hit(msg, account, many)
            for number in sorted(by_account.get(name, ())):
                what = f"recipient {number}"
                found = found or self._limit_hit(msg, account, limits.destination_hit(lim, number), what)
                found = found or self._limit_hit(msg, account, self._breaker_hit(number), what)
            if found is not None:
                return found
        counted = any((a := self.cfg.accounts.get(j.account)) is not None and a.limits.counted for j in jobs)
        keys = tuple(self._sms_key(j, self._identical_seconds(j.account))
                     if j.trans_ref is None and not j.urls else "" for j in jobs)
        return LimitPlan(decide=self._decide_usage(msg) if counted else None,
                         dedupe_keys=keys if any(keys) else (), dedupe_ttl=1.0)

    def _identical_seconds(self, name: str) -> int:
        account = self.cfg.accounts.get(name)
        return account.limits.identical_seconds if account is not None else self.cfg.limits.identical_seconds

    @staticmethod
    def _sms_key(j: NewJob, seconds: int) -> str:
        """Identical SMS: same account, number, device, originator and text; "" = not deduplicated.
        The window is part of the key: `<seconds>:<hash>` (the spool keeps it that long)."""
        if seconds <= 0:
            return ""
        fields = ("sms", j.account, j.recipient, j.device, j.originator, j.text)
        return f"{seconds}:" + hashlib.sha256("\0".join(fields).encode()).hexdigest()

    def _decide_usage(self, msg: Message):
        def decide(account_name: str, usage: LimitUsage, parts: int,
                   per: dict[str, int]) -> limits.Hit | None:
            account = self.cfg.accounts.get(account_name)
            if account is None or not account.limits.counted:
                return None
            hit = limits.usage_hit(account.limits, usage, parts, per)
            if hit is None or account.limits.monitor:
                self._limit_hit(msg, account, hit)  # the monitor-mode line (nothing when None)
                return None
            return hit  # logged by committed(), once the transaction is over

        return decide

    def _refused(self, msg: Message, r: Refusal, what: str) -> Refusal:
        log.info("%s: refused recipient %s: %s", msg.queue_id or "NOQUEUE", what, r)
        return r

    # -- end of message -----------------------------------------------------------------
    def decide(self, msg: Message) -> Outcome | Commit:
        """Everything but the spool: an Outcome (refusal, or nothing to do) or a Commit to make."""
        qid = msg.queue_id or "NOQUEUE"
        if not msg.sms:
            return Outcome()
        try:
            decided = self._decide(msg)
        except Exception:
            log.exception("%s: internal error while deciding", qid)
            decided = INTERNAL_ERROR
        if isinstance(decided, Refusal):
            log.info("%s: refused: %s", qid, decided)
            return Outcome(refusal=decided)
        jobs, mails, notes, plan = decided
        key, ttl = self._idempotency_key(msg, jobs)
        return Commit(key=key, key_ttl=ttl, jobs=jobs, mails=mails, notes=notes, limits=plan)

    def committed(self, msg: Message, commit: Commit, result: AddResult | SpoolError) -> Outcome:
        """The Outcome once the spool answered: 250 with the SMS recipients removed, or 451."""
        qid = msg.queue_id or "NOQUEUE"
        if isinstance(result, SpoolDataError):  # this message's own values: a 5xx for it alone
            refusal = Refusal("550", "5.6.0", f"The message cannot be stored: {result.what}; write it as "
                                              "plain ASCII or UTF-8 text.")
            log.info("%s: refused: %s", qid, refusal)
            return Outcome(refusal=refusal)
        if isinstance(result, SpoolError):
            log.error("%s: spool unavailable, answering 451: %s", qid, result)
            return Outcome(refusal=SPOOL_UNAVAILABLE)
        if result.refused is not None:  # a velocity/month cap, decided inside the commit
            hit = result.refused
            assert isinstance(hit, limits.Hit)
            log.info("%s: limit %s refused: %s", qid, hit.rule, hit.refusal)
            metrics.limit_hit(hit.rule, "enforce")
            return Outcome(refusal=hit.refusal)
        shown = result.job_ids if len(result.job_ids) <= 10 else (*result.job_ids[:10], "...")
        ids = ",".join(str(i) for i in shown) or "-"
        what = "duplicate of an accepted message, nothing added" if result.duplicate else "accepted"
        log.info("%s: %s: %d job(s) [%s] %s", qid, what, len(commit.jobs), ids, "; ".join(commit.notes))
        return Outcome(delete=tuple(r.raw for r in msg.sms), discard=msg.others == 0)

    def end_of_message(self, msg: Message) -> Outcome:
        """decide, commit and wait: for callers that may block (the pipe transport)."""
        decided = self.decide(msg)
        if isinstance(decided, Outcome):
            return decided
        return self.commit_and_wait(msg, decided)

    @staticmethod
    def slow(msg: Message) -> bool:
        """May deciding this message take long (a password hash, many R=, many recipients,
        a large body)? The milter's event loop then decides it on a worker thread."""
        if len(msg.sms) > 20 or len(msg.body) > 16384:
            return True
        return any(r.target.kind != "number" for r in msg.sms)

    def commit_and_wait(self, msg: Message, decided: Commit) -> Outcome:
        try:
            result: AddResult | SpoolError = self.spool.add_message(
                decided.key, decided.jobs, key_ttl=decided.key_ttl, mails=decided.mails,
                limits=decided.limits)
        except SpoolError as e:
            result = e
        return self.committed(msg, decided, result)

    def _decide(self, msg: Message) -> Refusal | tuple[list[NewJob], list[OutMail], list[str], LimitPlan]:
        limit = self.cfg.milter.max_message_bytes
        # Stored as given: nothing a client sends may make the spool's INSERT fail.
        msg.sender, msg.queue_id = content.safe_text(msg.sender), content.safe_text(msg.queue_id)
        if msg.failed is not None:
            return msg.failed
        if msg.size > limit:
            return Refusal("552", "5.3.4", f"The message is {msg.size} bytes; mail for SMS may be at most "
                                           f"{limit} bytes.")
        raw = msg.raw()
        jobs: list[NewJob] = []
        mails: list[OutMail] = []
        notes: list[str] = []
        unique = [r for r in msg.sms if not r.duplicate]
        text_rcpts = [r for r in unique if r.target.kind != "xml"]
        for r in unique:
            if r.target.kind == "xml":
                from .xmlapi import handler  # xml@ is rare: import on first use

                out = handler.handle(raw, msg.sender, msg.client_ip, self.cfg, self.spool, msg.queue_id,
                                     time.time())
                if isinstance(out, Refusal):
                    return out
                jobs += out.jobs
                if out.reply is not None:
                    mails.append(out.reply)
                notes.append(f"xml@: {out.log}")
        xml_jobs = len(jobs)  # xml@ alone keeps its own recipient limit (1,000), not recipients_per_message
        late = list(range(len(jobs)))  # jobs whose limits were not decided at RCPT (xml@, textsms@)
        if text_rcpts:
            text = content.extract_text(raw)
            if isinstance(text, Refusal):
                return text
            memo: dict[tuple, Refusal | dict[str, Any]] = {}
            seen: set[tuple[str, str]] = set()  # (number, device): a number@ RCPT and an R= are one SMS
            for r in text_rcpts:
                made = self._jobs_for(msg, r, text, memo)
                if isinstance(made, Refusal):
                    return made
                fresh = [j for j in made if (j.recipient, j.device) not in seen]
                seen.update((j.recipient, j.device) for j in fresh)
                if r.target.kind != "number":
                    late += range(len(jobs), len(jobs) + len(fresh))
                jobs += fresh
                if made:
                    notes.append(f"{r.target.kind} for account {made[0].account}")
                else:
                    notes.append(r.target.kind)
        plan = self._eom_limits(msg, jobs, late, xml_jobs)
        if isinstance(plan, Refusal):
            return plan
        return jobs, mails, notes, plan

    def _jobs_for(self, msg: Message, r: SmsRecipient, mt: content.MessageText,
                  memo: dict[tuple, Refusal | dict[str, Any]]) -> Refusal | list[NewJob]:
        style = r.target.domain.style
        common: dict[str, Any] = dict(sender=msg.sender, message_id=mt.message_id or "",
                                      queue_id=msg.queue_id, device=r.target.device)
        if r.target.kind == "textsms":
            return self._textsms_jobs(msg, mt, common)
        account, rule = r.account, r.rule
        assert account is not None and r.target.number is not None
        # Everything but the number is the same for every recipient of one account, rule and
        # style: worked out once per message (per recipient it was O(recipients x text)).
        key = (style, account.name, id(rule))
        fields = memo.get(key)
        if fields is None:
            fields = memo[key] = self._number_job_fields(mt, style, account, rule)
        if isinstance(fields, Refusal):
            return fields
        return [NewJob(recipient=r.target.number, **fields, **common)]

    def _number_job_fields(self, mt: content.MessageText, style: str, account: Account,
                           rule: SenderRule | None) -> Refusal | dict[str, Any]:
        if style == "telemessage":
            text = content.render_template(account.template, mt.subject, mt.body)
            originator, notify = account.originator, account.notify
            if rule is not None and rule.originator:
                originator = rule.originator
            subj = mt.subject
        else:
            problem = content.latin1_problem(mt.body, "body")
            if problem:
                return problem
            text = mt.body
            given, given_notify = subject.parse_optional_originator(mt.subject)
            originator = given or (rule.originator if rule and rule.originator else account.originator)
            notify = given_notify if given_notify is not None else account.notify
            subj = subject.strip_credentials(mt.subject)
            bad = self._originator_refusal(originator)
            if bad:
                return bad
        parts = smstext.count_parts(text)
        problem = _sms_text_problem(text, parts, account)
        if problem:
            return problem
        return dict(originator=addresses.normalize_originator(originator), text=text, parts=parts,
                    account=account.name, subject=subj, notify=notify)

    def _textsms_jobs(self, msg: Message, mt: content.MessageText, common: dict) -> Refusal | list[NewJob]:
        # Decided before parsing: a longer Subject may have been cut on its way (by Postfix at
        # ~60 KB), and a cut R= value can be another number. Before the account is known, the
        # highest recipients_per_message of any account bounds the R= count.
        most = max([self.cfg.limits.recipients_per_message,
                    *(a.limits.recipients_per_message for a in self.cfg.accounts.values())])
        too_long = subject.textsms_length_problem(mt.subject, most)
        if too_long is not None:
            return too_long
        fields = subject.parse_subject(mt.subject)
        if isinstance(fields, Refusal):
            return fields
        problem = subject.textsms_problem(fields)
        if problem:
            return problem
        assert fields.userkey is not None and fields.password is not None
        account = auth.authorize_userkey(fields.userkey, fields.password, msg.client_ip, self.cfg.accounts)
        if isinstance(account, Refusal):
            return account
        latin = content.latin1_problem(mt.body, "body")
        if latin:
            return latin
        originator = fields.originator or account.originator
        bad = self._originator_refusal(originator)
        if bad:
            return bad
        parts = smstext.count_parts(mt.body)
        problem = _sms_text_problem(mt.body, parts, account)
        if problem:
            return problem
        notify = fields.notify if fields.notify is not None else account.notify
        jobs = []
        numbers: set[str] = set()
        orig = addresses.normalize_originator(originator)
        # Once, and without the R= list: per recipient it was quadratic in time and in size.
        subj = subject.strip_credentials(mt.subject, drop_recipients=True)
        for value in dict.fromkeys(fields.recipients):
            number = addresses.parse_number(value)
            if number is None:
                return Refusal("550", "5.1.1", f"{subject.recipient_label(value)} in the Subject is not a "
                                               "valid international phone number; write it as 00<country "
                                               "code><number>.")
            if number in numbers:  # R=0041..., R=+41... and R=0041-... are one SMS
                continue
            numbers.add(number)
            jobs.append(NewJob(recipient=number, originator=orig, text=mt.body, parts=parts,
                               account=account.name, subject=subj, notify=notify, **common))
        return jobs

    @staticmethod
    def _originator_refusal(originator: str) -> Refusal | None:
        problem = addresses.originator_problem(originator)
        if problem:
            return Refusal("550", "5.5.4", f"Originator {problem}.")
        return None

    def _idempotency_key(self, msg: Message, jobs: Sequence[NewJob] = ()) -> tuple[str, float]:
        """The same message sent again (a client that lost our 250) must not add jobs twice.

        A Message-ID the client wrote identifies the message (with its SMS recipients and
        texts) for `dedupe_seconds`; without
        one (or with one the MTA generated, which carries its queue id) sender, recipients,
        Subject and body do, for the much shorter `dedupe_anonymous_seconds`.
        """
        h = hashlib.sha256()
        h.update(msg.sender.lower().encode() + b"\0")
        for addr in sorted(r.address.lower() for r in msg.sms):
            h.update(addr.encode() + b"\0")
        # textsms@ and xml@ carry their numbers inside the message: a resend to a new number
        # is a new message, not a duplicate.
        for number, device in sorted({(j.recipient, j.device) for j in jobs}):
            h.update(f"to\0{number}\0{device}\0".encode())
        # So is a message with another text under the same Message-ID (a client that reuses
        # ids, or one the MTA cut short at a NUL): a true resend has the same text.
        for text in sorted({j.text for j in jobs}):
            h.update(b"text\0" + text.encode("utf-8", "surrogatepass") + b"\0")
        mid = msg.header("Message-ID")
        if mid and not (msg.queue_id and msg.queue_id in mid):
            h.update(b"mid\0" + mid.encode())
            return h.hexdigest(), float(self.cfg.milter.dedupe_seconds)
        h.update(b"content\0" + (msg.header("Subject") or "").encode() + b"\0" + bytes(msg.body))
        return h.hexdigest(), float(self.cfg.milter.dedupe_anonymous_seconds)
