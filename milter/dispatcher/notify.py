"""Notifications: delivery-status mails, xml@ URL callbacks, and the outbox of xml@ replies.

When a mail or URL callback is owed is a lifecycle rule (`spool/lifecycle.py`): a job that
reaches a state owes a mail to its envelope sender if its Notify policy lists that state
(`NOTIFY_STATES`: by default delivered, failed and expired; ALWAYS adds buffered; FAILED only
failed and expired; NONE nothing; never for the null sender), and an xml@ callback if it gave
a URL for that state (`owed_events`). The spool writes each owed notification as a row of its
events table in the same transaction as the job's state change; here each is sent, then marked
done. A crash between the two sends it again: at-least-once (a duplicate notification, never
a lost one). xml@ replies are ready-made mails from the spool's outbox table.

Every mail goes out with the null envelope sender (`MAIL FROM:<>`), as RFC 3834 asks of
automatic replies: a bounce of a notification can never loop back into the gateway.
The header From is `notify.from`. A mail that cannot be handed over is retried with
backoff (for up to 5 days); a URL callback is retried for up to 24 hours.
"""

from __future__ import annotations

import email.policy
import hashlib
import logging
import re
import smtplib
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formatdate, make_msgid

from ..model import Config
from ..spool.base import DispatchSpool, Event, Job, OutMail, SpoolError
from ..xmlapi import callback

log = logging.getLogger("sms_milter.dispatcher.notify")

STATUS_LABEL = {"delivered": "Delivered", "buffered": "Buffered", "failed": "Failed", "expired": "Failed"}
MAIL_GIVE_UP = 5 * 86400.0
URL_GIVE_UP = 24 * 3600.0


def backoff(attempts: int, base: float = 30.0, cap: float = 3600.0) -> float:
    return min(base * 2 ** attempts, cap)


def sender_alias(address: str, account: str | None = None) -> str:
    """How logs name a sender: the account and a hash prefix, never the address (the
    authorized sender address is the account's secret). Stable, so lines can be followed."""
    digest = hashlib.sha256(address.strip().lower().encode("utf-8", "replace")).hexdigest()[:10]
    return f"{account or 'sender'}/{digest}"


def _scrub(error: str, address: str, alias: str) -> str:
    """An SMTP error text with the address replaced by its alias (smtplib names the recipient)."""
    if not address:
        return error
    return re.sub(re.escape(address), alias, error, flags=re.IGNORECASE)


def _angle(mid: str) -> str:
    mid = mid.strip()
    if not mid:
        return ""
    return mid if mid.startswith("<") else f"<{mid}>"


def build_notification(job: Job, ev: Event, sender: str) -> EmailMessage:
    """The plain-text status mail for one event (never echoes a password: the job's subject is
    stored without credentials, and nothing else from the original mail is used)."""
    label = STATUS_LABEL.get(ev.status, ev.status.capitalize())
    what = {"voice": "voice call", "fax": "fax"}.get(job.channel, "SMS")
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = job.sender
    msg["Subject"] = f"{what[0].upper()}{what[1:]} to {job.recipient}: {label}"
    msg["Date"] = formatdate(localtime=True)
    domain = sender.rpartition("@")[2] or None
    msg["Message-ID"] = make_msgid("sms-status", domain=domain)
    orig = _angle(job.message_id)
    if orig:
        msg["In-Reply-To"] = orig
        msg["References"] = orig
    msg["Auto-Submitted"] = "auto-replied"
    when = format_datetime(datetime.fromtimestamp(ev.at, tz=UTC).astimezone())
    lines = [
        f"Your {what} to {job.recipient} has the status: {label}.",
        "",
        f"Recipient:  {job.recipient}",
        f"Status:     {label}",
    ]
    if ev.status == "expired":
        lines.append("Reason:     expired (validity period ended before delivery)")
    elif ev.status == "failed" and job.last_error:
        lines.append(f"Reason:     {job.last_error}")
    lines += [
        f"Time:       {when}",
        f"Reference:  {', '.join(job.provider_refs) or '-'} (job {job.id})",
        f"Subject:    {job.subject or '-'}",
    ]
    if job.trans_ref:
        lines.append(f"TransRef:   {job.trans_ref}")
    lines += ["", "This is an automatic message from the SMS gateway; do not reply."]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def callback_url(url: str, trans_ref: str | None) -> str:
    url = url.split("#", 1)[0]  # a fragment is never sent
    sep = "?" if "?" not in url else "" if url.endswith(("?", "&")) else "&"
    return f"{url}{sep}ID={urllib.parse.quote(trans_ref or '', safe='')}"


class Notifier:
    def __init__(self, spool: DispatchSpool, cfg: Config):
        self.spool = spool
        self.cfg = cfg
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def kick(self) -> None:
        self._kick.set()

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._loop, args=(stop,), name="notify", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except SpoolError as e:
                log.error("spool: %s", e)
                busy = False
            except Exception:  # noqa: BLE001 (a bug here must not stop the dispatcher)
                log.exception("notifier")
                busy = False
            if not busy:
                self._kick.wait(1.0)
                self._kick.clear()

    def run_once(self) -> bool:
        """Hand over what is due; True if there may be more right away."""
        events = self.spool.due_events(100)
        mails = self.spool.due_outbox(50)
        if not events and not mails:
            return False
        smtp = _Smtp(self.cfg)
        try:
            for ev in events:
                self._event(ev, smtp)
            for mail_id, mail, attempts in mails:
                self._outbox(mail_id, mail, attempts, smtp)
        finally:
            smtp.close()
        return len(events) == 100 or len(mails) == 50

    def _event(self, ev: Event, smtp: _Smtp) -> None:
        job = self.spool.get(ev.job_id)
        if job is None:
            self.spool.event_done(ev.id)
            return
        if ev.kind == "mail":
            self._mail(ev, job, smtp)
        elif ev.kind == "url":
            self._url(ev, job)
        else:
            log.warning("event %d of unknown kind %r dropped", ev.id, ev.kind)
            self.spool.event_done(ev.id)

    def _mail(self, ev: Event, job: Job, smtp: _Smtp) -> None:
        if not job.sender or job.sender == "<>":
            self.spool.event_done(ev.id)
            return
        msg = build_notification(job, ev, self.cfg.notify.sender)
        alias = sender_alias(job.sender, job.account)
        try:
            smtp.send(job.sender, msg.as_bytes(policy=email.policy.SMTP))
        except (OSError, smtplib.SMTPException) as e:
            self._retry(ev, _scrub(f"{type(e).__name__}: {e}", job.sender, alias), MAIL_GIVE_UP,
                        f"notification mail to {alias}")
            return
        self.spool.event_done(ev.id)
        self.sent += 1
        log.info("job %d: %s notification mailed to %s", job.id, STATUS_LABEL.get(ev.status, ev.status),
                 alias)

    def _url(self, ev: Event, job: Job) -> None:
        key = "failed" if ev.status == "expired" else ev.status
        base = job.urls.get(key)
        if not base:
            self.spool.event_done(ev.id)
            return
        url = callback_url(base, job.trans_ref)
        parsed = callback.parse_url(url)
        host = parsed if isinstance(parsed, str) else parsed.host
        try:
            # The parser of the allowlist check, every redirect hop checked again (no urllib).
            host = callback.call(url, self.cfg.xml.allowed_url_hosts or None, self.cfg.xml.url_timeout)
        except callback.CallbackRefused as e:
            log.warning("job %d: %s callback to %s not allowed (%s); dropped", job.id, key, host, e)
            self.spool.event_done(ev.id)
            return
        except callback.CallbackError as e:
            self._retry(ev, str(e), URL_GIVE_UP, f"URL callback to {host}")
            return
        self.spool.event_done(ev.id)
        log.info("job %d: %s URL callback to %s done", job.id, key, host)

    def _retry(self, ev: Event, error: str, give_up: float, what: str) -> None:
        if time.time() - ev.at >= give_up:
            log.error("job %d: %s given up after %d attempt(s): %s", ev.job_id, what, ev.attempts + 1, error)
            self.spool.event_done(ev.id)
            return
        delay = backoff(ev.attempts)
        log.warning("job %d: %s failed (%s); retry in %.0fs", ev.job_id, what, error, delay)
        self.spool.event_retry(ev.id, error, delay)

    def _outbox(self, mail_id: int, mail: OutMail, attempts: int, smtp: _Smtp) -> None:
        alias = sender_alias(mail.rcpt)
        try:
            smtp.send(mail.rcpt, mail.content)
        except (OSError, smtplib.SMTPException) as e:
            delay = backoff(attempts)
            error = _scrub(f"{type(e).__name__}: {e}", mail.rcpt, alias)
            if attempts >= 40:
                log.error("reply mail %d to %s given up: %s", mail_id, alias, error)
                self.spool.outbox_done(mail_id)
                return
            log.warning("reply mail %d to %s failed (%s); retry in %.0fs", mail_id, alias, error, delay)
            self.spool.outbox_retry(mail_id, error, delay)
            return
        self.spool.outbox_done(mail_id)
        log.info("reply mail %d handed over for %s", mail_id, alias)


class _Smtp:
    """One SMTP connection per round, opened on first use; null envelope sender."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.conn: smtplib.SMTP | None = None

    def send(self, rcpt: str, content: bytes) -> None:
        if self.conn is None:
            n = self.cfg.notify
            self.conn = smtplib.SMTP(n.smtp_host, n.smtp_port, timeout=30)
            self.conn.ehlo_or_helo_if_needed()
        try:
            self.conn.sendmail("", [rcpt], re.sub(rb"(?<!\r)\n", b"\r\n", content))
        except smtplib.SMTPServerDisconnected:
            self.conn = None
            raise
        except smtplib.SMTPRecipientsRefused:
            self.conn.rset()
            raise

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.quit()
            except (OSError, smtplib.SMTPException):
                pass
            self.conn = None
