"""HTTP SMS provider: any HTTP SMS API described by configuration (`HttpConfig`), no code per vendor.

Each job is one request built from templates of its fields (recipient as +E.164, 00... or
bare digits, text, originator, our reference, the callback URL); the answer is read by
status code class, a regex or a JSON path: success (with the provider's message id, or our
reference when the API returns none), a temporary error (the job goes back to the queue) or
a permanent one (the job fails). One pooled `httpx.Client` per provider, at most
`concurrency` requests at once.

Delivery reports come back through `callbacks.CallbackServer` (the provider's calls to
/dlr/<token>/<reference>/<parts>) or by asking a status URL (`poll`). Either way they go
the engine's receipt path: stored in the spool (matched by message id, handset number and
provider; unmatched ones kept as orphans) before the provider's callback is answered.

A message of several SMS parts is one request and one report: its parts all get the same
message id and one report is handed in once per part.

Secrets (header values, basic-auth, query and body values of keys that look like secrets)
are never logged: the URL is logged without its query, answers are cut short and cleaned of
every configured secret value.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx

from ..model import HTTP_POLL_FIELDS, HttpConfig
from ..spool.base import Job, OverduePart
from .http_templates import in_ranges, job_values, json_at, render, safe_url, scalar, secrets_of
from .provider import QueryAnswer, Receipt, ReceiptCallback, ResultCallback, SubmitResult
from .quietlog import QuietLog
from .receipts import parse_receipt_text

log = logging.getLogger("sms_milter.dispatcher.http")
# httpx logs every request with its whole URL (query secrets included) at INFO: never let it.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

MAX_ANSWER = 1 << 20  # bytes of an answer read at most
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


class HttpProvider:
    def __init__(self, cfg: HttpConfig, name: str = "http"):
        self.cfg = cfg
        self.name = name
        self._secrets = secrets_of(cfg)
        self._client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout), follow_redirects=False,
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            auth=cfg.auth, headers=dict(cfg.headers))
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix=f"http-{name}")
        self._lock = threading.Lock()
        self._open: dict[int, Future] = {}  # job id -> its request, until its result is reported
        self._stopping = False
        self._down_until = 0.0  # monotonic: after a connection failure, no claims until then
        self._backoff = 0.0
        self._on_result: ResultCallback = lambda r: None
        self._on_receipt: ReceiptCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None
        self._polled: dict[str, tuple[int, str, int, float]] = {}  # ref -> (job id, recipient, parts, next)
        self._stop = threading.Event()
        self._server: Any = None
        self.quiet = QuietLog(logger=log)

    # -- Provider ------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_receipt, self._on_change = on_result, on_receipt, on_change
        if self.cfg.callback is not None:
            from .callbacks import CallbackServer

            self._server = CallbackServer.attach(self.cfg.callback.listen, self.cfg.callback.token, self)
        if self.cfg.poll is not None:
            threading.Thread(target=self._poll_loop, name=f"http-poll-{self.name}", daemon=True).start()
        log.info("%s: HTTP provider %s %s, %d at once%s", self.name, self.cfg.method, safe_url(self.cfg.url),
                 self.cfg.concurrency, f", receipts at {safe_url(self.cfg.callback.url)}/dlr/..."
                 if self.cfg.callback else "")
        on_change()

    def ready(self) -> bool:
        return not self._stopping and time.monotonic() >= self._down_until

    def capacity(self) -> int:
        with self._lock:
            return max(0, 2 * self.cfg.concurrency - len(self._open))

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            with self._lock:
                if self._stopping:
                    stopped = True
                else:
                    stopped = False
                    self._open[job.id] = self._pool.submit(self._send, job)
            if stopped:
                self._on_result(SubmitResult(job.id, error="dispatcher stopping", temporary=True,
                                             count_attempt=False, provider=self.name))

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        for r in receipts:
            done = getattr(r.token, "done_one", None)
            if done is not None:
                done()

    def drain(self, timeout: float) -> None:
        with self._lock:
            self._stopping = True
            waiting = dict(self._open)
        for jid, fut in waiting.items():
            if fut.cancel():
                self._report(SubmitResult(jid, error="dispatcher stopping", temporary=True,
                                          count_attempt=False))
        deadline = time.monotonic() + timeout
        for fut in waiting.values():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                fut.exception(left)
            except Exception:  # noqa: BLE001 (cancelled or timed out: reported below or by close)
                pass

    def close(self, timeout: float) -> None:
        self.drain(timeout)
        self._stop.set()
        with self._lock:
            left = list(self._open)
        for jid in left:
            self._report(SubmitResult(jid, error="dispatcher stopped before the provider answered",
                                      temporary=True, count_attempt=False))
        if self._server is not None and self.cfg.callback is not None:
            self._server.detach(self.cfg.callback.token)
            self._server = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- sending -------------------------------------------------------------------------
    def _report(self, r: SubmitResult) -> None:
        """Exactly one result per job: the first one wins (close may race a late answer)."""
        with self._lock:
            if self._open.pop(r.job_id, None) is None:
                return
        self._on_result(r if r.provider else replace(r, provider=self.name))

    def clean(self, text: str, limit: int = 200) -> str:
        """Provider text for logs and last_error: one line, short, no configured secret."""
        text = " ".join(text.split())
        for s in self._secrets:
            text = text.replace(s, "***")
        return text if len(text) <= limit else text[:limit - 3] + "..."

    def callback_url(self, reference: str, parts: int) -> str:
        cb = self.cfg.callback
        if cb is None:
            return ""
        return f"{cb.url}/dlr/{cb.token}/{reference}/{parts}{cb.suffix}"

    def request_for(self, job: Job, reference: str) -> httpx.Request:
        cfg = self.cfg
        values = job_values(job, reference, self.callback_url(reference, job.parts))
        url = render(cfg.url, values, quote_values=True)
        params = [(k, render(v, values)) for k, v in cfg.query]
        kw: dict[str, Any] = {}
        if cfg.body == "json":
            kw["content"] = json.dumps(render(cfg.fields, values), ensure_ascii=False).encode()
            kw["headers"] = {"Content-Type": "application/json"}
        elif cfg.body == "form" and isinstance(cfg.fields, dict):
            kw["data"] = {k: "" if v is None else str(v) for k, v in render(cfg.fields, values).items()}
        return self._client.build_request(cfg.method, url, params=params or None, **kw)

    def _send(self, job: Job) -> None:
        reference = f"{job.id}-{secrets.token_hex(4)}"
        try:
            result = self._exchange(job, reference)
        except Exception as e:  # noqa: BLE001 (a bug must not lose the job: it goes back to the queue)
            log.exception("%s: job %d: unexpected error", self.name, job.id)
            result = SubmitResult(job.id, error=f"HTTP provider error: {type(e).__name__}", temporary=True)
        self._report(result)

    def _exchange(self, job: Job, reference: str) -> SubmitResult:
        cfg = self.cfg
        where = safe_url(cfg.url)
        try:
            request = self.request_for(job, reference)
            where = safe_url(str(request.url))
            deadline = time.monotonic() + cfg.timeout  # for the whole exchange, not per read
            with self._client.stream(request.method, request.url, headers=request.headers,
                                     content=request.content) as resp:
                body = b""
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        break
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("answer too slow", request=request)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
                httpx.LocalProtocolError, httpx.InvalidURL, ValueError) as e:
            # Never written: not at the provider.
            self._down(f"cannot reach {where}: {self.clean(str(e)) or type(e).__name__}")
            return SubmitResult(job.id, error=f"cannot reach {where}: {type(e).__name__}", temporary=True,
                                count_attempt=False, provider=self.name)
        except httpx.TimeoutException:
            # The request may have been taken: at-least-once, as an unanswered submit_sm.
            return SubmitResult(job.id, error=f"no answer from {where} within {cfg.timeout:g}s",
                                temporary=True, maybe_sent=True, provider=self.name)
        except httpx.TransportError as e:
            # Written, then the connection broke: the provider may have it (the job stays its).
            self._down(f"connection to {where} lost: {self.clean(str(e)) or type(e).__name__}")
            return SubmitResult(job.id, error=f"connection to {where} lost before the answer: "
                                f"{type(e).__name__}", temporary=True, count_attempt=False, maybe_sent=True,
                                provider=self.name)
        if self._backoff:
            self._backoff = 0.0
            log.info("%s: %s answers again", self.name, where)
        return self.classify(job, reference, resp.status_code, body.decode("utf-8", "replace"))

    def _down(self, why: str) -> None:
        """No claims for a while (doubling, one step per outage, not per request that failed)."""
        with self._lock:
            now = time.monotonic()
            if now < self._down_until:
                return
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
            self._down_until = now + self._backoff
        self.quiet.log(logging.WARNING, f"down {why}", "%s: %s; next try in %.0fs", self.name, why,
                       self._backoff)
        self._on_change()

    def classify(self, job: Job, reference: str, status: int, text: str) -> SubmitResult:
        """The provider's answer -> accepted (with the message id) / temporary / permanent."""
        cfg = self.cfg
        data: Any = None
        if cfg.success_json or cfg.message_id_json:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        why = ""
        if not in_ranges(status, cfg.success_status):
            why = f"HTTP {status}"
        elif cfg.success_regex and not re.search(cfg.success_regex, text):
            why = f"HTTP {status}, answer does not match success_regex"
        elif cfg.success_json and scalar(json_at(data, cfg.success_json)) not in cfg.success_values:
            got = scalar(json_at(data, cfg.success_json))
            why = f"HTTP {status}, {cfg.success_json}={self.clean(got or 'missing', 40)}"
        if why:
            temporary = in_ranges(status, cfg.temporary_status) or bool(
                cfg.temporary_regex and re.search(cfg.temporary_regex, text))
            return SubmitResult(job.id, error=f"{why}: {self.clean(text) or '(empty answer)'}",
                                temporary=temporary, provider=self.name)
        ref = reference
        if cfg.message_id_json:
            ref = scalar(json_at(data, cfg.message_id_json)) or ""
        elif cfg.message_id_regex:
            m = re.search(cfg.message_id_regex, text)
            ref = m.group(1) if m else ""
        ref = ref.strip()
        if not ref or len(ref) > 128:
            log.warning("%s: job %d accepted (HTTP %d) but no message id found in the answer; its receipt "
                        "is matched by our reference %s", self.name, job.id, status, reference)
            ref = reference
        if cfg.poll is not None:
            with self._lock:
                self._polled[ref] = (job.id, job.recipient, job.parts, time.monotonic() + cfg.poll.interval)
        return SubmitResult(job.id, refs=(ref,) * max(job.parts, 1), provider=self.name)

    # -- delivery reports ----------------------------------------------------------------
    def receipts_for(self, fields: Mapping[str, str], reference: str, parts: int) -> list[Receipt] | str:
        """A callback's fields -> the receipts to store (one per part; [] = acknowledged only),
        or why it is refused (a 400 answer)."""
        cb = self.cfg.callback
        assert cb is not None
        value = fields.get(cb.state_field)
        if value is None:
            return f"no {cb.state_field!r} field"
        state = dict(cb.states).get(value.strip())
        if state is None:
            return f"unknown {cb.state_field} value {self.clean(value, 20)!r}"
        ref = fields.get(cb.ref_field, "").strip() if cb.ref_field else reference
        if not ref or len(ref) > 128:
            return f"no message id in {cb.ref_field!r}" if cb.ref_field else "no reference"
        number = ""
        if cb.number_field:
            raw = fields.get(cb.number_field, "")
            number = re.sub(r"[\s\-./()]", "", raw)
            if number and not re.fullmatch(r"\+?\d{3,20}", number):
                return f"{cb.number_field!r} is not a phone number"
        if state == "ignore":
            return []
        detail = f"{cb.state_field}={self.clean(value, 20)}"
        if cb.error_field and fields.get(cb.error_field):
            err = fields[cb.error_field]
            if "stat:" in err.lower():  # an SMPP receipt text: its state words only, never its text
                f = parse_receipt_text(err)
                err = " ".join(f"{k}:{f[k]}" for k in ("stat", "err") if k in f)
            detail += f" {self.clean(err, 80)}"
        r = Receipt(ref, state, detail, None, number, provider=self.name)
        if state in ("delivered", "failed", "expired"):
            with self._lock:
                self._polled.pop(ref, None)
        return [r] * max(1, min(parts, 255))

    def hand_in(self, receipts: list[Receipt]) -> None:
        for r in receipts:
            self._on_receipt(r)

    def _ask(self, ref: str, job_id: int, recipient: str) -> tuple[str, str]:
        """(part state or '', detail) from the poll URL."""
        poll = self.cfg.poll
        assert poll is not None
        digits = recipient.lstrip("+")
        values = dict.fromkeys(HTTP_POLL_FIELDS, "")
        values.update(message_id=ref, reference=ref, recipient=recipient, recipient_00="00" + digits,
                      recipient_digits=digits, job_id=str(job_id))
        url = render(poll.url, values, quote_values=True)
        try:
            resp = self._client.get(url)
        except httpx.HTTPError as e:
            return "", f"status URL {safe_url(url)}: {type(e).__name__}"
        text = resp.text[:MAX_ANSWER]
        if not 200 <= resp.status_code < 300:
            return "", f"status URL answered HTTP {resp.status_code}"
        value: str | None = None
        if poll.state_json:
            try:
                value = scalar(json_at(json.loads(text), poll.state_json))
            except ValueError:
                value = None
        elif poll.state_regex:
            m = re.search(poll.state_regex, text)
            value = m.group(1) if m else None
        if value is None:
            return "", "status URL answer holds no state"
        state = dict(poll.states).get(value.strip(), "")
        return ("" if state == "ignore" else state), f"status {self.clean(value, 30)}"

    def _poll_loop(self) -> None:
        poll = self.cfg.poll
        assert poll is not None
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                due = [(ref, v) for ref, v in self._polled.items() if v[3] <= now][:100]
            for ref, (jid, recipient, parts, _) in due:
                state, detail = self._ask(ref, jid, recipient)
                with self._lock:
                    if state in ("delivered", "failed", "expired"):
                        self._polled.pop(ref, None)
                    elif ref in self._polled:
                        self._polled[ref] = (jid, recipient, parts, time.monotonic() + poll.interval)
                if state:
                    self.hand_in([Receipt(ref, state, detail, None, recipient, provider=self.name)]
                                 * max(parts, 1))

    def query(self, parts: list[OverduePart], on_answer: Callable[[QueryAnswer], None]) -> None:
        """Parts whose report did not come (the engine asks after receipt_timeout)."""
        def run() -> None:
            for p in parts:
                if self.cfg.poll is None:
                    on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, "", "the HTTP provider has no status "
                                          "URL (poll) to ask"))
                    continue
                state, detail = self._ask(p.ref, p.job_id, p.recipient)
                on_answer(QueryAnswer(p.job_id, p.ref, p.recipient, state, detail))

        threading.Thread(target=run, name=f"http-query-{self.name}", daemon=True).start()
