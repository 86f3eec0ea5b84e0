"""The voice and fax providers behind the dispatcher's real Engine and SQLite spool (issue 15):
the job states as the spool records them, with SIPp and a private HylaFAX as the far ends.

(Here the jobs are added to the spool directly, as the milter adds them; through Postfix:
tests/test_channels_postfix.py.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fax_bed import HylaFax
from sms_milter.channels.fax import FaxProvider
from sms_milter.channels.router import CHANNEL_OF_DEVICE, ChannelRouter
from sms_milter.channels.voice import VoiceProvider
from sms_milter.dispatcher.engine import Engine
from sms_milter.model import Config, FaxConfig, ProviderSpec, SmppConfig, VoiceConfig
from sms_milter.spool.base import NewJob
from sms_milter.spool.sqlite import SqliteSpool
from spool_helpers import add_jobs
from voice_bed import RtpCounter, Sipp


def new_job(recipient: str, device: str, text: str) -> NewJob:
    return NewJob(recipient=recipient, originator="+41440000000", text=text, parts=1, account="acme",
                  device=device, channel=CHANNEL_OF_DEVICE[device])


def wait_state(spool: SqliteSpool, jid: int, states: tuple[str, ...], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = spool.get(jid).state
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {jid} is {spool.get(jid).state}, not {states}")


class Running:
    def __init__(self, spool: SqliteSpool, provider, cfg: Config):
        self.stop = threading.Event()
        self.engine = Engine(spool, provider, cfg, "test-dispatcher")
        self.thread = threading.Thread(target=self.engine.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def test_voice_job_is_called_and_delivered_through_the_engine(tmp_path):
    rtp = RtpCounter()
    sipp = Sipp(tmp_path, "answer", rtp.port)
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    provider = VoiceProvider(VoiceConfig(trunk=f"127.0.0.1:{sipp.port}", work_dir=str(tmp_path / "v"),
                                         rtp_ports="40000-44999"))
    run = Running(spool, ChannelRouter({"voice": provider}), Config())
    try:
        (jid,) = add_jobs(spool, [new_job("+41791234567", "mobile", "Your table is ready. See you soon.")])
        assert wait_state(spool, jid, ("delivered", "failed")) == "delivered"
        job = spool.get(jid)
        assert job.provider_refs[0].startswith(f"call-{jid}-") and job.attempts == 1
        assert sipp.wait(15) == 0, sipp.errors()
        assert rtp.packets >= 50  # over a second of speech reached the far end
    finally:
        run.close()
        sipp.stop()
        rtp.close()
        spool.close()


def test_busy_voice_job_is_retried_with_backoff_then_failed(tmp_path):
    sipp = Sipp(tmp_path, "busy", calls=2)
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    provider = VoiceProvider(VoiceConfig(trunk=f"127.0.0.1:{sipp.port}", work_dir=str(tmp_path / "v"),
                                         max_attempts=2, rtp_ports="40000-44999"))
    backoff = SmppConfig(reconnect_min=1.0)
    run = Running(spool, ChannelRouter({"voice": provider}),
                  Config(providers={"smpp": ProviderSpec("smpp", "smpp", backoff)}))
    try:
        (jid,) = add_jobs(spool, [new_job("+41791234568", "home", "Call me back.")])
        t0 = time.monotonic()
        assert wait_state(spool, jid, ("delivered", "failed")) == "failed"
        job = spool.get(jid)
        assert job.attempts == 2 and job.last_error == "call busy: 486 Busy Here (attempt 2 of 2)", job
        assert time.monotonic() - t0 >= 1.0  # the second call waited for the engine's backoff
        assert sipp.wait(15) == 0, sipp.errors()  # two INVITEs, two 486
    finally:
        run.close()
        sipp.stop()
        spool.close()


def test_fax_job_is_queued_in_hylafax_and_delivered_through_the_engine(tmp_path):
    hf = HylaFax(tmp_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    provider = FaxProvider(FaxConfig(server=hf.server, work_dir=str(tmp_path / "f"), poll=0.3))
    run = Running(spool, ChannelRouter({"fax": provider}), Config())
    try:
        (jid,) = add_jobs(spool, [new_job("+41441234567", "fax", "Order 4711 confirmed.\nRegards")])
        assert wait_state(spool, jid, ("submitted", "failed")) == "submitted"
        ref = spool.get(jid).provider_refs[0]
        assert ref.startswith("hylafax:")
        hf.announce_modem()
        assert wait_state(spool, jid, ("delivered", "failed")) == "delivered"
        q = hf.qfile(ref.removeprefix("hylafax:"))
        assert (q["state"], q["number"], q["npages"]) == ("7", "0041441234567", "1")
    finally:
        run.close()
        hf.stop()
        spool.close()


def test_spool_keeps_the_device(tmp_path: Path):
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    (jid,) = add_jobs(spool, [new_job("+41441234567", "fax", "x")])
    assert spool.get(jid).device == "fax"
    spool.close()
