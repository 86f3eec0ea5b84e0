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
from collections.abc import Callable, Sequence

from . import metrics
from .limiting import Limiter
from .message import Commit, Message, Outcome, SmsRecipient, split_message
from .model import Account, Config
from .policy import auth as policy_auth
from .policy import catalogue as replies
from .policy import channelcheck, content, devices
from .policy.jobs import Envelope, Prepared, build, prepare, prepare_call
from .policy.limits import Hit
from .policy.refusal import Refusal
from .policy.styles import STYLES, aspsms, classify_recipient
from .spool.base import AddResult, LimitPlan, MilterSpool, NewJob, OutMail, SpoolDataError, SpoolError
from .spool.files import JobFile

# voice/fax files checked per message: (channel, account, text) -> the job's files or the refusal
Checked = dict[tuple[str, str, str], tuple[JobFile, ...] | Refusal]

__all__ = ["Commit", "Gateway", "Message", "Outcome", "SmsRecipient", "split_message"]

log = logging.getLogger("sms_milter.gateway")


def _channel(r: SmsRecipient) -> str:
    """The channel of a recipient (rcpt() only lets through devices whose channel is configured)."""
    return devices.channel_of(r.target.device, r.target.domain.channels) or "sms"


class Gateway:
    def __init__(self, cfg: Config, spool: MilterSpool, clock: Callable[[], float] = time.time):
        self.cfg = cfg  # replaced on reload
        self.spool = spool
        self.limits = Limiter(lambda: self.cfg, spool, clock)

    # -- RCPT ------------------------------------------------------------------------------
    def rcpt(self, msg: Message, raw: bytes, address: str) -> Refusal | None:
        found = classify_recipient(address, self.cfg.domains)
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
            allow_domain = STYLES[found.domain.style].sender_domains
            who = policy_auth.authorize_sender(msg.sender, msg.client_ip, self.cfg.accounts, allow_domain)
            if isinstance(who, Refusal):
                return self._refused(msg, who, address)
            rcpt.account, rcpt.rule = who
            hit = self.limits.rcpt(msg, rcpt.account, found.number or "")
            if hit is not None:
                return hit
            msg.numbers.add(found.number or "")
        msg.targets.add(rcpt.target_key)
        msg.sms.append(rcpt)
        return None

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
            decided = replies.INTERNAL_ERROR()
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
            refusal = replies.CANNOT_STORE(what=result.what)
            log.info("%s: refused: %s", qid, refusal)
            return Outcome(refusal=refusal)
        if isinstance(result, SpoolError):
            log.error("%s: spool unavailable, answering 451: %s", qid, result)
            return Outcome(refusal=replies.SPOOL_UNAVAILABLE())
        if result.refused is not None:  # a velocity/month cap, decided inside the commit
            hit = result.refused
            assert isinstance(hit, Hit)
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
            return replies.MESSAGE_TOO_BIG(size=msg.size, limit=limit)
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
            # SMS takes plain text only (content.py); voice and fax take attachments (channelcheck.py).
            sms_text: content.MessageText | None = None
            mail: channelcheck.ChannelMail | None = None
            if any(_channel(r) == "sms" for r in text_rcpts):
                found = content.extract_text(raw)
                if isinstance(found, Refusal):
                    return found
                sms_text = found
            if any(_channel(r) != "sms" for r in text_rcpts):
                split = channelcheck.split_mail(raw)
                if isinstance(split, Refusal):
                    return split
                mail = split
            text = sms_text if sms_text is not None else mail.text if mail is not None else None
            assert text is not None
            memo: dict[tuple[str, str, int, str], Prepared | Refusal] = {}
            checked: Checked = {}
            seen: set[tuple[str, str]] = set()  # (number, device): a number@ RCPT and an R= are one SMS
            envelope = Envelope(sender=msg.sender, message_id=text.message_id or "", queue_id=msg.queue_id)
            for r in text_rcpts:
                made = self._jobs_for(msg, r, text, envelope, memo, mail, checked)
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
        plan = self.limits.eom(msg, jobs, late, xml_jobs)
        if isinstance(plan, Refusal):
            return plan
        return jobs, mails, notes, plan

    def _jobs_for(self, msg: Message, r: SmsRecipient, mt: content.MessageText, envelope: Envelope,
                  memo: dict[tuple[str, str, int, str], Prepared | Refusal],
                  mail: channelcheck.ChannelMail | None, checked: Checked) -> Refusal | list[NewJob]:
        """The jobs of one SMS recipient (textsms@: of its Subject's R= values)."""
        if r.target.kind == "textsms":
            most = max([self.cfg.limits.recipients_per_message,
                        *(a.limits.recipients_per_message for a in self.cfg.accounts.values())])
            found = aspsms.textsms(mt, self.cfg.accounts, msg.client_ip, most)
            if isinstance(found, Refusal):
                return found
            prepared, numbers = found
            return build(prepared, numbers, r.target.device, envelope)
        account, rule = r.account, r.rule
        assert account is not None and r.target.number is not None
        # Everything but the number is the same for every recipient of one account, rule and
        # style: worked out once per message (per recipient it was O(recipients x text)).
        style = STYLES[r.target.domain.style]
        channel = _channel(r)
        key = (style.name, account.name, id(rule), channel)
        ready = memo.get(key)
        if ready is None:
            check = prepare if channel == "sms" else prepare_call
            ready = memo[key] = check(style.draft(mt, account, rule), account)
        if isinstance(ready, Refusal):
            return ready
        if channel == "sms":
            return build(ready, (r.target.number,), r.target.device, envelope)
        assert mail is not None
        return self._call_jobs(r, ready, account, envelope, channel, mail, checked)

    def _call_jobs(self, r: SmsRecipient, ready: Prepared, account: Account, envelope: Envelope, channel: str,
                   mail: channelcheck.ChannelMail,
                   checked: Checked) -> Refusal | list[NewJob]:
        """A voice or fax job: its files and language checked by policy/channelcheck.py, once per
        channel, account and text of a message (100 fax recipients do not scan a PDF 100 times)."""
        from .channels import capabilities  # the first voice/fax message looks up what the host decodes

        caps, language = capabilities.detect(), ""
        key = (channel, account.name, ready.text)
        files = checked.get(key)
        if channel == "voice":
            assert self.cfg.voice is not None
            if files is None:
                files = checked[key] = channelcheck.check_voice(ready.text, mail.attachments, account,
                                                                self.cfg.voice, caps)
            language = channelcheck.voice_language(account, self.cfg.voice)
        elif files is None:
            assert self.cfg.fax is not None
            files = checked[key] = channelcheck.check_fax(ready.text, mail.attachments, self.cfg.fax, caps)
        if isinstance(files, Refusal):
            return files
        assert r.target.number is not None
        return build(ready, (r.target.number,), r.target.device, envelope, channel, language, files)

    def _idempotency_key(self, msg: Message, jobs: Sequence[NewJob] = ()) -> tuple[str, float]:
        """The same message sent again (a client that lost our 250) must not add jobs twice.

        A Message-ID the client wrote identifies the message (with its SMS recipients,
        originators, Notify policies and texts) for `dedupe_seconds`; without
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
        # So is one from another originator or with another Notify policy (O=, N= in the
        # Subject): what the recipient sees and what the sender is told differ.
        for originator, notify in sorted({(j.originator, j.notify) for j in jobs}):
            h.update(f"from\0{originator}\0{notify}\0".encode("utf-8", "surrogatepass"))
        # So is a message with another text under the same Message-ID (a client that reuses
        # ids, or one the MTA cut short at a NUL): a true resend has the same text.
        for text in sorted({j.text for j in jobs}):
            h.update(b"text\0" + text.encode("utf-8", "surrogatepass") + b"\0")
        for sha in sorted({f.sha256 for j in jobs for f in j.files}):  # voice/fax: another document
            h.update(f"file\0{sha}\0".encode())
        mid = msg.header("Message-ID")
        if mid and not (msg.queue_id and msg.queue_id in mid):
            h.update(b"mid\0" + mid.encode())
            return h.hexdigest(), float(self.cfg.milter.dedupe_seconds)
        h.update(b"content\0" + (msg.header("Subject") or "").encode() + b"\0" + bytes(msg.body))
        return h.hexdigest(), float(self.cfg.milter.dedupe_anonymous_seconds)
