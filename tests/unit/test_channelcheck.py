"""Inline checks of voice and fax mail (policy/channelcheck.py) and the gateway's jobs for them:
pure functions and Gateway.decide, no spool (issue 15)."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from sms_milter import config
from sms_milter.gateway import Gateway, Message, split_message
from sms_milter.message import Commit, Outcome
from sms_milter.model import Account, FaxConfig, VoiceConfig
from sms_milter.policy import catalogue, channelcheck
from sms_milter.policy.channelcheck import Capabilities
from sms_milter.policy.refusal import Refusal
from sms_milter.spool.files import JobFile

SENDER = "ops@client.example"
_SECTIONS = {"milter": {"socket": "inet:127.0.0.1:8894"}, "spool": {"path": "/nonexistent/spool.sqlite3"},
             "provider": {"smpp": {"host": "127.0.0.1", "port": 2775, "system_id": "gw", "password": "pw"}},
             "notify": {"smtp": "127.0.0.1:25", "from": "sms-gateway@example.com"},
             "domains": {"tm.example.com": {"style": "telemessage"}},
             "accounts": {"acme": {"senders": [SENDER], "template": "{body}", "voice_language": "de"},
                          "rec": {"senders": ["rec@client.example"], "template": "{body}",
                                  "voice_recordings": True}},
             "voice": {"max_seconds": 10, "words_per_minute": 120}, "fax": {"max_bytes": 10000}}
CAPS = Capabilities(audio_formats=frozenset({"wav"}), office=False)


def _mail(body: str = "Hello there", attach: tuple[tuple[bytes, str, str], ...] = ()) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Message-ID"] = SENDER, "x@tm.example.com", "<m1@client.example>"
    m.set_content(body)
    for data, ctype, name in attach:
        main, sub = ctype.split("/")
        m.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return m.as_bytes().replace(b"\n", b"\r\n")


def _decide(raw: bytes, rcpt: str, sender: str = SENDER) -> Outcome | Commit:
    cfg = config.parse(_SECTIONS)
    gw = Gateway(cfg, None)  # type: ignore[arg-type]  # decide() needs no spool
    msg = Message(sender=sender, queue_id="Q1")
    assert gw.rcpt(msg, f"<{rcpt}>".encode(), rcpt) is None
    msg.headers, body = split_message(raw)
    msg.add_body(body, cfg.milter.max_message_bytes)
    return gw.decide(msg)


def test_split_mail_body_and_attachments():
    raw = _mail("Der Text", ((b"%PDF-1.4 x", "application/pdf", "a.pdf"), (b"RIFF", "audio/wav", "r.wav")))
    mail = channelcheck.split_mail(raw)
    assert not isinstance(mail, Refusal)
    assert mail.text.body == "Der Text"
    assert [(f.content_type, f.name, f.size) for f in mail.attachments] == [
        ("application/pdf", "a.pdf", 10), ("audio/wav", "r.wav", 4)]
    assert mail.attachments[0] == JobFile.of("application/pdf", "a.pdf", b"%PDF-1.4 x")


def test_speech_seconds_by_words_or_characters():
    assert channelcheck.speech_seconds("one two three four", 120) == 2
    assert channelcheck.speech_seconds("x" * 120, 120) == 10  # no spaces: 6 characters a word


def test_voice_checks():
    cfg, acme = VoiceConfig(max_seconds=10, words_per_minute=120), Account(name="acme")
    rec = Account(name="rec", voice_recordings=True)
    wav = JobFile.of("audio/wav", "r.wav", b"RIFF\x24\0\0\0WAVE")
    pdf = JobFile.of("application/pdf", "a.pdf", b"%PDF")
    assert channelcheck.check_voice("Hello", (), acme, cfg, CAPS) == ()
    r = channelcheck.check_voice("word " * 21, (), acme, cfg, CAPS)
    assert r == catalogue.VOICE_TOO_LONG(chars=105, seconds=11, max_seconds="10", max_chars=120)
    assert "11 seconds" in r.text and "at most 10 seconds" in r.text
    off = catalogue.VOICE_RECORDINGS_OFF(ctype="audio/wav")
    assert channelcheck.check_voice("", (wav,), acme, cfg, CAPS) == off
    assert channelcheck.check_voice("", (wav,), rec, cfg, CAPS) == (wav,)
    assert channelcheck.check_voice("", (pdf,), rec, cfg, CAPS) == catalogue.VOICE_ATTACHMENT(
        ctype="application/pdf", formats="WAV")
    mp3 = JobFile.of("audio/mpeg", "r.mp3", b"ID3")
    assert isinstance(channelcheck.check_voice("", (mp3,), rec, cfg, CAPS), Refusal)  # sox cannot decode it
    assert channelcheck.check_voice("", (mp3,), rec, cfg, Capabilities(frozenset({"wav", "mp3"}))) == (mp3,)
    assert channelcheck.check_voice("  ", (), acme, cfg, CAPS).xcode == "5.6.0"  # type: ignore[union-attr]


def test_fax_checks():
    cfg = FaxConfig(max_bytes=100)
    pdf, png = JobFile.of("application/pdf", "a.pdf", b"%PDF"), JobFile.of("image/png", "p.png", b"\x89PNG")
    doc = JobFile.of("application/msword", "a.doc", b"\xd0\xcf")
    assert channelcheck.check_fax("", (pdf, png), cfg, CAPS) == (pdf, png)
    assert channelcheck.check_fax("text only", (), cfg, CAPS) == ()
    assert channelcheck.check_fax("", (doc,), cfg, CAPS) == catalogue.FAX_NO_OFFICE(kind="Word",
                                                                                  ctype="application/msword")
    assert channelcheck.check_fax("", (doc,), cfg, Capabilities(office=True)) == (doc,)
    zip_ = JobFile.of("application/zip", "a.zip", b"PK")
    assert channelcheck.check_fax("", (zip_,), cfg, CAPS) == catalogue.FAX_ATTACHMENT(ctype="application/zip",
                                                                                    office="")
    big = JobFile.of("application/pdf", "b.pdf", b"x" * 101)
    r = channelcheck.check_fax("", (big,), cfg, CAPS)
    assert r == catalogue.FAX_TOO_BIG(size=101, limit=100) and "101" in r.text and "100" in r.text
    assert channelcheck.check_fax(" ", (), cfg, CAPS).xcode == "5.6.0"  # type: ignore[union-attr]


def test_gateway_voice_job_carries_channel_and_language():
    d = _decide(_mail("Ihr Termin ist morgen"), "41791234567@Mobile.tm.example.com")
    assert isinstance(d, Commit), d
    (job,) = d.jobs
    assert (job.device, job.channel, job.language, job.text, job.files) == (
        "mobile", "voice", "de", "Ihr Termin ist morgen", ())


def test_gateway_fax_job_carries_the_documents():
    pdf = b"%PDF-1.4\n" + b"0" * 100
    d = _decide(_mail("Cover", ((pdf, "application/pdf", "doc.pdf"),)), "41441234567@Fax.tm.example.com")
    assert isinstance(d, Commit), d
    (job,) = d.jobs
    assert (job.device, job.channel) == ("fax", "fax")
    assert [(f.content_type, f.name, f.data) for f in job.files] == [("application/pdf", "doc.pdf", pdf)]


@pytest.mark.parametrize("rcpt,attach,body,expect", [
    ("41791234567@Home.tm.example.com", ((b"%PDF", "application/pdf", "a.pdf"),), "Hi", "VOICE_ATTACHMENT"),
    ("41791234567@Home.tm.example.com", (), "word " * 30, "VOICE_TOO_LONG"),
    ("41791234567@Business.tm.example.com", ((b"RIFF", "audio/wav", "r.wav"),), "", "VOICE_RECORDINGS_OFF"),
    ("41441234567@Fax.tm.example.com", ((b"x" * 12000, "application/pdf", "a.pdf"),), "", "FAX_TOO_BIG"),
    ("41441234567@Fax.tm.example.com", ((b"\xd0\xcf", "application/msword", "a.doc"),), "", "FAX_NO_OFFICE"),
    # SMS keeps refusing attachments exactly as before
    ("41791234567@tm.example.com", ((b"%PDF", "application/pdf", "a.pdf"),), "Hi", "SMS_ATTACHMENT"),
])
def test_gateway_refusals(rcpt, attach, body, expect, monkeypatch):
    from sms_milter.channels import capabilities

    monkeypatch.setattr(capabilities, "detect", lambda: CAPS)
    d = _decide(_mail(body, attach), rcpt)
    assert isinstance(d, Outcome) and d.refusal is not None, d
    entry = getattr(catalogue, expect)
    assert (d.refusal.code, d.refusal.xcode) == (entry.code, entry.xcode)
    assert d.refusal.text.split("(")[0] == entry.sample().text.split("(")[0] or expect in (
        "VOICE_TOO_LONG", "FAX_TOO_BIG", "FAX_NO_OFFICE")


def test_without_the_sections_the_devices_stay_closed():
    cfg = config.parse({k: v for k, v in _SECTIONS.items() if k not in ("voice", "fax")})
    gw = Gateway(cfg, None)  # type: ignore[arg-type]
    for rcpt in ("41791234567@Mobile.tm.example.com", "41441234567@Fax.tm.example.com"):
        r = gw.rcpt(Message(sender=SENDER), f"<{rcpt}>".encode(), rcpt)
        assert isinstance(r, Refusal) and r.xcode == "5.3.3"


@pytest.mark.parametrize("ctype,data,refused", [
    ("audio/wav", b"RIFF\x24\0\0\0WAVEfmt ", False), ("audio/x-wav", b"RIFF\x24\0\0\0AVI LIST", True),
    ("audio/wav", b"RIFF", True), ("audio/mpeg", b"ID3\x04", False), ("audio/mpeg", b"\xff\xfb\x90", False),
    ("audio/mp3", b"<html>", True), ("audio/ogg", b"OggS\0", False),
    ("application/pdf", b"junk\n%PDF-1.7", False), ("application/pdf", b"", True),
    ("image/jpeg", b"\xff\xd8\xff\xe0", False), ("image/gif", b"GIF88a", True),
    ("image/tiff", b"MM\0*\0\0\0\x08", False), ("text/plain", b"", False), ("application/msword", b"", False),
])
def test_not_its_type(ctype, data, refused):
    r = channelcheck.not_its_type((JobFile.of("text/plain", "a.txt", b"x"), JobFile.of(ctype, "f", data)))
    if refused:
        assert r is not None and r.text.startswith(f"Attachment 2 is declared {ctype} but is not a ")
    else:
        assert r is None
