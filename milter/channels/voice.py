"""The voice channel as a dispatcher Provider: each job becomes one phone call.

Per job, on its own thread: render the audio (the job's recording if it has one, else the
job's text through espeak-ng, in the job's language), optionally twice with a pause, call the
number through the SIP trunk with baresip (`sipcall.place_call`), and report:

- answered and played to the end: the SubmitResult (ref `call-<job>-<n>`) and at once a
  `delivered` receipt for it (the call itself is the delivery);
- busy, no answer, hung up early, the confirmation digit not pressed (`confirm_digit`), other
  SIP failures: a temporary failure (the engine retries
  with backoff) until the job's attempt `max_attempts`, then failed;
- a number the trunk does not know (404/484/604): failed at once;
- the trunk unreachable: temporary, no attempt counted against max_attempts, and the provider
  says it is not ready for `trunk_retry` seconds (the queue waits instead of every job failing);
- content that cannot be rendered (no voice for the language, speech too long, unreadable
  audio): failed with the reason; a missing tool: temporary.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..dispatcher.provider import Receipt, ReceiptCallback, ResultCallback, SubmitResult
from ..model import VoiceConfig
from ..spool.base import Job
from . import audio
from .sipcall import CallOutcome, Trunk, place_call
from .tools import Attachment, ChannelError

log = logging.getLogger("sms_milter.channels.voice")


AttachmentsFor = Callable[[Job], list[Attachment]]
LanguageFor = Callable[[Job], str]
TEMPORARY_OUTCOMES = ("busy", "no_answer", "hung_up", "failed")


def trunk_of(cfg: VoiceConfig) -> Trunk:
    host, _, port = cfg.trunk.rpartition(":")
    return Trunk(host=host or cfg.trunk, port=int(port) if host else 5060, user=cfg.user,
                 domain=cfg.domain, auth_user=cfg.auth_user, password=cfg.password,
                 register=cfg.register, codec=cfg.codec, listen=cfg.listen, rtp_ports=cfg.rtp_ports)


class VoiceProvider:
    name = "voice"

    def __init__(self, cfg: VoiceConfig, attachments: AttachmentsFor | None = None,
                 language_for: LanguageFor | None = None):
        self.cfg = cfg
        self.trunk = trunk_of(cfg)
        self.attachments = attachments or (lambda job: [])
        self.language_for = language_for or (lambda job: cfg.language)
        self._on_result: ResultCallback = lambda r: None
        self._on_receipt: ReceiptCallback = lambda r: None
        self._on_change: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._active: dict[int, threading.Thread] = {}
        self._stop = threading.Event()  # close(): calls in progress hang up
        self._closing = False
        self._paused_until = 0.0
        self._seq = 0
        self.outcomes: list[tuple[int, CallOutcome]] = []  # recent calls (job id, outcome), for logs/tests

    # -- Provider protocol -------------------------------------------------------------------------
    def start(self, on_result: ResultCallback, on_receipt: ReceiptCallback,
              on_change: Callable[[], None]) -> None:
        self._on_result, self._on_receipt, self._on_change = on_result, on_receipt, on_change
        Path(self.cfg.work_dir).mkdir(parents=True, exist_ok=True)
        on_change()

    def ready(self) -> bool:
        return not self._closing and time.monotonic() >= self._paused_until

    def capacity(self) -> int:
        if not self.ready():
            return 0
        with self._lock:
            return max(0, self.cfg.calls - len(self._active))

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            if self._closing:
                self._on_result(SubmitResult(job.id, error="voice channel stopping", temporary=True,
                                             count_attempt=False))
                continue
            t = threading.Thread(target=self._run, args=(job,), name=f"voice-{job.id}", daemon=True)
            with self._lock:
                self._active[job.id] = t
            t.start()

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        """Nothing to acknowledge: the receipt is the call's own outcome."""

    def drain(self, timeout: float) -> None:
        self._closing = True
        self._join(timeout)

    def close(self, timeout: float) -> None:
        self._closing = True
        self._join(timeout)
        self._stop.set()  # calls still going hang up and report a temporary failure
        self._join(10.0)

    def _join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._active.values())
            if not threads or time.monotonic() >= end:
                return
            threads[0].join(max(0.0, min(0.5, end - time.monotonic())))

    # -- one job --------------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        result: SubmitResult | None = None
        receipt: Receipt | None = None
        try:
            result, receipt = self._deliver(job)
        except ChannelError as e:
            log.warning("job %d: no call to %s: %s", job.id, job.recipient, e)
            result = SubmitResult(job.id, error=str(e), temporary=e.temporary)
        except Exception as e:  # never lose the job's one result
            log.exception("job %d: voice call failed unexpectedly", job.id)
            result = SubmitResult(job.id, error=f"voice channel error: {type(e).__name__}", temporary=True)
        finally:
            with self._lock:
                self._active.pop(job.id, None)
            if result is not None:
                self._on_result(result)
            if receipt is not None:  # after the result: the engine stores the ref, then the receipt
                self._on_receipt(receipt)
            self._on_change()

    def _deliver(self, job: Job) -> tuple[SubmitResult, Receipt | None]:
        with self._lock:
            self._seq += 1
            ref = f"call-{job.id}-{self._seq}"
        work = Path(self.cfg.work_dir) / ref
        work.mkdir(parents=True, exist_ok=True)
        try:
            sound = self.render(job, work)
            play = audio.linear(sound, work / "play.wav")
            number = self.cfg.dial_prefix + job.recipient.lstrip("+")
            log.info("job %d: calling %s (%.1fs of audio)", job.id, job.recipient, sound.seconds)
            out = place_call(self.trunk, number, play, sound.seconds, work / "baresip",
                             ring_timeout=self.cfg.ring_timeout, stop=self._stop,
                             confirm=self.cfg.confirm_digit)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.outcomes.append((job.id, out))
        del self.outcomes[:-100]
        log.info("job %d: call to %s: %s (%s)%s", job.id, job.recipient, out.outcome, out.detail,
                 f", {out.played:.1f}s played" if out.answered else "")
        return self._result(job, ref, out)

    def render(self, job: Job, work: Path) -> audio.Audio:
        """The job's audio as telephony WAV: its recording, else its text spoken."""
        enc = "alaw" if self.cfg.codec.upper() == "PCMA" else "ulaw"
        recordings = [a for a in self.attachments(job) if a.content_type.lower().startswith("audio/")]
        if recordings:
            sound = audio.convert(recordings[0].path, recordings[0].content_type, work / "message.wav", enc)
        else:
            sound = audio.speak(job.text, self.language_for(job), work / "message.wav", enc,
                                self.cfg.words_per_minute)
        if sound.seconds > self.cfg.max_seconds:
            raise ChannelError(f"the message lasts {sound.seconds:.0f}s, more than the "
                               f"{self.cfg.max_seconds:g}s a call may play")
        if self.cfg.repeat:
            sound = audio.repeated(sound, work / "twice.wav")
        if self.cfg.confirm_digit:  # the prompt after the message, in the same voice
            prompt = audio.speak(self.cfg.confirm_prompt.format(digit=self.cfg.confirm_digit),
                                 self.language_for(job), work / "prompt.wav", enc, self.cfg.words_per_minute)
            sound = audio.joined(sound, prompt, work / "with-prompt.wav")
        return sound

    def _result(self, job: Job, ref: str, out: CallOutcome) -> tuple[SubmitResult, Receipt | None]:
        if out.outcome == "played":
            return (SubmitResult(job.id, refs=(ref,)),
                    Receipt(ref=ref, state="delivered", error="", source=job.recipient))
        return self._failure(job, out), None

    def _failure(self, job: Job, out: CallOutcome) -> SubmitResult:
        if out.detail == "stopped":
            return SubmitResult(job.id, error="call stopped (dispatcher stopping)", temporary=True,
                                count_attempt=False)
        if out.outcome == "wrong_number":
            return SubmitResult(job.id, error=f"call refused: {out.detail}")
        if out.outcome == "unreachable":
            self._paused_until = time.monotonic() + self.cfg.trunk_retry
            timer = threading.Timer(self.cfg.trunk_retry, self._on_change)
            timer.daemon = True
            timer.start()
            return SubmitResult(job.id, error=f"SIP trunk unreachable: {out.detail}", temporary=True)
        words = {"busy": "busy", "no_answer": "no answer", "hung_up": "hung up early",
                 "unconfirmed": "not confirmed"}
        what = words.get(out.outcome, "failed")
        error = f"call {what}: {out.detail}" if what not in out.detail else f"call: {out.detail}"
        if job.attempts >= self.cfg.max_attempts:
            return SubmitResult(job.id, error=f"{error} (attempt {job.attempts} of {self.cfg.max_attempts})")
        return SubmitResult(job.id, error=error, temporary=True)
