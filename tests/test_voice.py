"""The voice channel (issue 15): rendering with espeak-ng + sox, calls by baresip to a SIPp far end.

Real peers only: espeak-ng and sox render; baresip (driven over ctrl_tcp) places the call; SIPp
(`tests/voice_bed.py`) answers, rejects busy (486) or rings without answering; the RTP the
call carries is counted on a UDP socket the answer's SDP announces.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from sms_milter.channels import audio
from sms_milter.channels.tools import ChannelError
from sms_milter.channels.voice import Attachment, VoiceProvider
from sms_milter.dispatcher.provider import Receipt, SubmitResult
from sms_milter.model import VoiceConfig
from sms_milter.spool.base import Job
from voice_bed import RtpCounter, Sipp, free_port

TEXT = ("Hello. This is the gateway calling with a message for you. Your parcel will arrive "
        "tomorrow between nine and eleven in the morning. Thank you.")


def soxi(path: Path) -> dict[str, str]:
    out = subprocess.run(["soxi", str(path)], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def job(jid: int = 1, text: str = TEXT, attempts: int = 1, recipient: str = "+41791234567") -> Job:
    return Job(recipient=recipient, originator="+41440000000", text=text, parts=1, account="acme",
               device="mobile", id=jid, attempts=attempts)


class Collector:
    def __init__(self) -> None:
        self.results: list[SubmitResult] = []
        self.receipts: list[Receipt] = []
        self.order: list[str] = []
        self.done = threading.Event()

    def on_result(self, r: SubmitResult) -> None:
        self.results.append(r)
        self.order.append("result")
        self.done.set()

    def on_receipt(self, r: Receipt) -> None:
        self.receipts.append(r)
        self.order.append("receipt")

    def wait(self, timeout: float = 60) -> SubmitResult:
        assert self.done.wait(timeout), "no SubmitResult"
        time.sleep(0.05)  # the receipt follows its result in the same thread, at once
        return self.results[0]


def provider(tmp: Path, sipp_port: int, **kw) -> tuple[VoiceProvider, Collector]:
    cfg = VoiceConfig(trunk=f"127.0.0.1:{sipp_port}", work_dir=str(tmp / "voice"),
                      rtp_ports="30000-39999", **kw)
    p = VoiceProvider(cfg)
    c = Collector()
    p.start(c.on_result, c.on_receipt, lambda: None)
    return p, c


# -- rendering -----------------------------------------------------------------------------------
def test_speech_is_telephony_audio_and_lasts_as_long_as_the_text(tmp_path):
    short = audio.speak("Hello, a short message.", "en", tmp_path / "short.wav")
    long = audio.speak(TEXT, "en", tmp_path / "long.wav")
    info = soxi(long.path)
    assert info["Sample Rate"] == "8000" and info["Channels"] == "1"
    assert info["Sample Encoding"] == "8-bit u-law"
    words = len(TEXT.split())
    # 160 words per minute, plus pauses at the full stops: within a generous band.
    assert words / 160 * 60 * 0.6 < long.seconds < words / 160 * 60 * 1.8, long.seconds
    assert long.seconds > 3 * short.seconds
    assert abs(audio.seconds(long.path) - float(info["Duration"].split("=")[1].split()[0]) / 8000) < 0.01
    alaw = audio.speak("Guten Tag, eine Nachricht für Sie.", "de", tmp_path / "de.wav", "alaw")
    assert soxi(alaw.path)["Sample Encoding"] == "8-bit A-law" and 1.0 < alaw.seconds < 6.0


def test_speech_refuses_what_it_cannot_say(tmp_path):
    with pytest.raises(ChannelError, match="no text-to-speech voice for language 'xx-nope'") as e:
        audio.speak("hello", "xx-nope", tmp_path / "a.wav")
    assert not e.value.temporary
    with pytest.raises(ChannelError, match="no text to speak"):
        audio.speak("  \n", "en", tmp_path / "b.wav")
    # A text that begins like an option is spoken, not taken as one (it goes in on stdin).
    assert audio.speak("-w /tmp/x --help", "en", tmp_path / "c.wav").seconds > 0.5


@pytest.mark.parametrize("kind,ctype", [("wav", "audio/wav"), ("ogg", "audio/ogg"), ("mp3", "audio/mpeg")])
def test_recordings_are_converted_to_telephony_audio(tmp_path, kind, ctype):
    src = tmp_path / f"in.{kind}"
    subprocess.run(["sox", "-n", "-r", "44100", "-c", "2", str(src), "synth", "2.5", "sine", "440"],
                   check=True)
    out = audio.convert(src, ctype, tmp_path / "out.wav")
    info = soxi(out.path)
    assert (info["Sample Rate"], info["Channels"], info["Sample Encoding"]) == ("8000", "1", "8-bit u-law")
    assert abs(out.seconds - 2.5) < 0.1  # mp3 adds a few ms of encoder delay


def test_unreadable_or_foreign_audio_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not a RIFF file at all")
    with pytest.raises(ChannelError, match="the WAV audio cannot be read") as e:
        audio.convert(bad, "audio/wav", tmp_path / "o.wav")
    assert not e.value.temporary
    with pytest.raises(ChannelError, match="application/pdf is not a playable audio type"):
        audio.convert(bad, "application/pdf", tmp_path / "o.wav")


def test_repeat_plays_the_message_twice_with_a_pause(tmp_path):
    one = audio.speak("One message.", "en", tmp_path / "one.wav")
    two = audio.repeated(one, tmp_path / "two.wav", pause=1.5)
    assert abs(two.seconds - (2 * one.seconds + 1.5)) < 0.05


# -- calls to the SIPp far end ----------------------------------------------------------------------
def test_answered_call_plays_the_speech_and_is_delivered(tmp_path):
    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "answer", rtp.port)
    p, c = provider(tmp_path, sipp.port)
    try:
        expected = audio.speak(TEXT, "en", tmp_path / "expected.wav").seconds
        p.submit([job(7)])
        r = c.wait(90)
        assert r.ok and r.refs and r.refs[0].startswith("call-7-"), r
        assert c.order == ["result", "receipt"]
        assert c.receipts[0] == Receipt(ref=r.refs[0], state="delivered", error="", source="+41791234567")
        assert sipp.wait(15) == 0, sipp.errors()  # INVITE, ACK, BYE: the whole scenario
        packets = rtp.packets
        # 20 ms PCMU packets: 50 per second of audio (+ up to ~1 s of jitter-buffer padding).
        assert expected * 50 * 0.95 <= packets <= (expected + 1.5) * 50, (packets, expected)
        assert rtp.types == {0}  # PCMU
        assert rtp.payload == packets * 160
        _, outcome = p.outcomes[-1]
        assert outcome.answered and outcome.outcome == "played" and outcome.played >= expected * 0.95
        print(f"\nvoice: {expected:.2f}s of speech -> {packets} RTP packets ({packets / expected:.1f}/s), "
              f"call {outcome.played:.2f}s")
    finally:
        p.close(5)
        sipp.stop()
        rtp.close()
    assert not list((tmp_path / "voice").iterdir())  # the call's scratch files are gone


def test_repeat_once_sends_twice_the_audio(tmp_path):
    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "answer", rtp.port)
    p, c = provider(tmp_path, sipp.port, repeat=True, codec="PCMA")
    try:
        one = audio.speak("Your code is four two seven.", "en", tmp_path / "one.wav").seconds
        p.submit([job(8, "Your code is four two seven.")])
        assert c.wait(60).ok
        assert sipp.wait(15) == 0, sipp.errors()
        assert (2 * one + 1.5) * 50 * 0.95 <= rtp.packets <= (2 * one + 1.5 + 1.5) * 50, (rtp.packets, one)
        assert rtp.types == {8}  # PCMA
    finally:
        p.close(5)
        sipp.stop()
        rtp.close()


def test_busy_is_retried_then_fails_at_the_last_attempt(tmp_path):
    sipp = Sipp(tmp_path, "busy", calls=2)
    p, c = provider(tmp_path, sipp.port, max_attempts=3)
    try:
        p.submit([job(9, attempts=1)])
        r = c.wait(30)
        assert not r.ok and r.temporary and r.count_attempt, r
        assert r.error == "call busy: 486 Busy Here", r.error
        c2 = Collector()
        p.start(c2.on_result, c2.on_receipt, lambda: None)
        p.submit([job(9, attempts=3)])
        r2 = c2.wait(30)
        assert not r2.temporary and r2.error == "call busy: 486 Busy Here (attempt 3 of 3)", r2
        assert sipp.wait(15) == 0, sipp.errors()
        assert not c.receipts and not c2.receipts
    finally:
        p.close(5)
        sipp.stop()


def test_no_answer_hangs_up_after_the_ring_timeout(tmp_path):
    sipp = Sipp(tmp_path, "ring")
    p, c = provider(tmp_path, sipp.port, ring_timeout=2.0)
    try:
        t0 = time.monotonic()
        p.submit([job(10)])
        r = c.wait(30)
        took = time.monotonic() - t0
        assert not r.ok and r.temporary and r.error == "call: no answer within 2s", r
        assert 2.0 <= took < 20, took
        assert p.outcomes[-1][1].ringing  # it did ring (180) before we gave up
        assert sipp.wait(15) == 0, sipp.errors()  # CANCEL, 487, ACK: the far end saw the hang-up
    finally:
        p.close(5)
        sipp.stop()


def test_unreachable_trunk_is_temporary_and_pauses_the_channel(tmp_path):
    p, c = provider(tmp_path, free_port(), trunk_retry=60.0, ring_timeout=3.0)
    try:
        p.submit([job(11, attempts=5)])  # beyond max_attempts: still temporary (not the job's fault)
        r = c.wait(60)
        assert not r.ok and r.temporary and r.error == "SIP trunk unreachable: no ringing within 3s", r
        assert not p.ready() and p.capacity() == 0
    finally:
        p.close(5)


def test_content_errors_fail_without_a_call(tmp_path):
    cfg = VoiceConfig(trunk=f"127.0.0.1:{free_port()}", work_dir=str(tmp_path / "v"), max_seconds=3)
    bad = tmp_path / "x.pdf"
    bad.write_bytes(b"%PDF-1.4")
    p = VoiceProvider(cfg, attachments=lambda j: [Attachment(bad, "audio/mpeg")] if j.id == 2 else [],
                      language_for=lambda j: "tlh" if j.id == 3 else "en")
    c = Collector()
    p.start(c.on_result, c.on_receipt, lambda: None)
    p.submit([job(1)])  # far more than 3 s of speech
    assert c.wait(30).error.startswith("the message lasts ")
    assert "more than the 3s a call may play" in c.results[0].error and not c.results[0].temporary
    for jid, want in ((2, "the MP3 audio cannot be read"), (3, "no text-to-speech voice for language 'tlh'")):
        c2 = Collector()
        p.start(c2.on_result, c2.on_receipt, lambda: None)
        p.submit([job(jid)])
        r = c2.wait(30)
        assert r.error.startswith(want) and not r.temporary, r
    assert p.outcomes == []  # no call was placed
    p.close(1)


def test_close_hangs_up_a_call_in_progress_without_counting_an_attempt(tmp_path):
    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "answer", rtp.port)
    p, c = provider(tmp_path, sipp.port)
    try:
        p.submit([job(12)])
        deadline = time.monotonic() + 30
        while rtp.packets < 25 and time.monotonic() < deadline:  # half a second of audio arrived
            time.sleep(0.05)
        assert rtp.packets >= 25
        p.close(0.1)
        r = c.wait(15)
        assert r.temporary and not r.count_attempt and "stopping" in r.error, r
        assert sipp.wait(15) == 0, sipp.errors()  # our BYE ended the call
    finally:
        sipp.stop()
        rtp.close()



def test_confirmation_digit_ends_the_call_as_delivered(tmp_path):
    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "confirm", rtp.port)
    p, c = provider(tmp_path, sipp.port, confirm_digit="1")
    try:
        p.submit([job(13)])
        r = c.wait(90)
        assert r.ok and c.receipts[0].state == "delivered", r
        out = p.outcomes[-1][1]
        assert out.outcome == "played" and out.detail.startswith("confirmed with 1 after "), out
        assert out.played < 6  # we hung up when the digit came (the message and prompt last far longer)
        assert sipp.wait(15) == 0, sipp.errors()  # INFO answered 200, then our BYE
    finally:
        p.close(5)
        sipp.stop()
        rtp.close()


def test_no_confirmation_digit_is_retried(tmp_path):
    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "answer", rtp.port)  # listens to everything, presses nothing
    p, c = provider(tmp_path, sipp.port, confirm_digit="1", max_attempts=3)
    try:
        p.submit([job(14, text="Hello.")])
        r = c.wait(90)
        assert not r.ok and r.temporary and r.error.startswith("call not confirmed: 1 not pressed"), r
        assert not c.receipts
        assert sipp.wait(15) == 0, sipp.errors()
    finally:
        p.close(5)
        sipp.stop()
        rtp.close()
