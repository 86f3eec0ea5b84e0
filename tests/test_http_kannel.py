"""The HTTP provider against a real Kannel (bearerbox + smsbox, Debian `kannel`) bound over SMPP
to our SMSC simulator: jobs leave through Kannel's sendsms, the SMSC sees the submit_sm, the
delivery report comes back through Kannel's dlr-url into the dispatcher's callback listener,
the job turns delivered and the notification mail goes out. End to end also from SMTP:
Postfix + milter + dispatcher -> HTTP -> Kannel -> SMPP -> SMSC.
"""

from __future__ import annotations

import secrets

import bed
import pytest
from dispatcher_bed import DispatcherProc, Smsc, job, wait_states
from kannel_bed import Kannel, kannel_provider, kannel_ready, providers_config
from sms_milter.spool.sqlite import SqliteSpool

pytestmark = pytest.mark.usefixtures("smsc_node")
UNDELIV = "41791239999"


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    why = kannel_ready()
    if why:
        pytest.fail(why, pytrace=False)
    base = tmp_path_factory.mktemp("kannel")
    smsc = Smsc(base).start("--undeliv", UNDELIV)
    k = Kannel(base, smsc.port)
    try:
        k.start()
    except BaseException:
        smsc.stop()
        raise
    yield smsc, k
    k.stop()
    smsc.stop()


class Bed:
    def __init__(self, base, notify_port, k: Kannel):
        self.base = base
        self.token = secrets.token_urlsafe(32)
        self.cb_port = bed.free_port()
        self.spool = SqliteSpool(base / "spool.sqlite3")
        providers = {"kannel": kannel_provider(k, self.cb_port, self.token)}
        self.config = providers_config(base, notify_port, providers, spool_path=base / "spool.sqlite3")
        self.d = DispatcherProc(self.config, base / "d.log").start()

    def close(self):
        self.d.stop()
        self.spool.close()


@pytest.fixture
def kb(tmp_path, nsink, peers):
    b = Bed(tmp_path, nsink.port, peers[1])
    yield b
    b.close()


def test_jobs_go_out_through_kannel_and_their_reports_come_back(kb, peers, nsink):
    smsc, k = peers
    long_text = "".join(chr(ord("a") + i % 26) for i in range(400))  # 3 GSM parts
    jobs = {
        "short": job("+41791230101", "Hello through Kannel", sender="c4ca423@client.example"),
        "long": job("+41791230102", long_text),
        "ucs": job("+41791230103", "Grüße, Привет"),
        "alpha": job("+41791230104", "from an alphanumeric originator", originator="ALERTS"),
    }
    ids = dict(zip(jobs, kb.spool.add_jobs(list(jobs.values())), strict=True))
    done = wait_states(kb.spool, list(ids.values()), {"delivered"}, timeout=60,
                       detail=lambda: kb.d.log_tail() + k.logs(10))
    subs = smsc.submits()
    by = {name: [s for s in subs if s["destination_addr"] == jobs[name].recipient[1:]] for name in jobs}
    assert len(by["short"]) == 1
    assert bytes.fromhex(by["short"][0]["short_message_hex"]) == b"Hello through Kannel"
    assert by["short"][0]["source_addr"] == "41760000000"
    assert len(by["long"]) == 3 and all(s["udh_hex"] for s in by["long"])  # concatenated by Kannel
    assert [s["data_coding"] for s in by["ucs"]] == [8]
    assert bytes.fromhex(by["ucs"][0]["short_message_hex"]).decode("utf-16-be") == "Grüße, Привет"
    assert by["alpha"][0]["source_addr"] == "ALERTS"
    # One reference per job (Kannel returns no message id): every part of the long job has it.
    assert len(set(done[ids["long"]].provider_refs)) == 1 and len(done[ids["long"]].provider_refs) == 3
    mail = nsink.wait_for(lambda m: "+41791230101" in m.text(), timeout=30)[0]
    assert mail.rcpt_tos == ["c4ca423@client.example"] and "delivered" in mail.text().lower()
    log = kb.d.log()
    assert k.password not in log and kb.token not in log  # secrets never logged
    assert "receipt for" in log and "is now delivered" in log


def test_undeliverable_report_through_kannel_fails_the_job(kb, peers):
    (jid,) = kb.spool.add_jobs([job("+" + UNDELIV, "to a dead handset")])
    done = wait_states(kb.spool, [jid], {"failed"}, timeout=60, detail=kb.d.log_tail)
    assert "type=2" in done[jid].last_error and "stat:UNDELIV" in done[jid].last_error
    assert "to a dead handset" not in done[jid].last_error  # the receipt's text: excerpt never kept


def test_mail_through_postfix_milter_dispatcher_and_kannel(tmp_path, sink, nsink, peers):
    """SMTP -> Postfix -> milter -> spool -> dispatcher -> HTTP -> Kannel -> SMPP -> SMSC, and the
    report back: SMSC -> Kannel dlr-url -> dispatcher -> spool -> notification mail."""
    smsc, k = peers
    token = secrets.token_urlsafe(32)
    milter_port = bed.free_port()
    config = providers_config(tmp_path, nsink.port, {"kannel": kannel_provider(k, bed.free_port(), token)},
                              spool_path=tmp_path / "spool.sqlite3", milter_port=milter_port)
    milter = bed.Milter(config, tmp_path / "milter.log").start()
    postfix = bed.Postfix(None, sink.port, f"inet:127.0.0.1:{milter_port}")
    d = DispatcherProc(config, tmp_path / "d.log").start()
    try:
        postfix.start()
        word = bed.unique("kn")
        msg = bed.make_message("kannel", f"via kannel {word}", sender="c4ca423@client.example")
        reply = bed.smtp_send(postfix.port, "c4ca423@client.example", ["0041791230201@sms.example.com"], msg)
        assert reply["data"][0] == 250, reply
        sub = bed.wait_until(lambda: [s for s in smsc.submits() if s["destination_addr"] == "41791230201"
                                      and word.encode().hex() in s["short_message_hex"]], 60,
                             "the submit_sm at the SMSC", interval=0.2,
                             detail=lambda: d.log_tail() + k.logs(10))
        assert len(sub) == 1
        jobs = bed.wait_until(lambda: [j for j in bed.queue_list(config) if word in j["text"]
                                       and j["state"] == "delivered"], 60, "the job delivered", interval=0.3,
                              detail=d.log_tail)
        assert jobs[0]["recipient"] == "+41791230201"
        mail = nsink.wait_for(lambda m: "+41791230201" in m.text() and "deliver" in m.text().lower(),
                              timeout=30)[0]
        assert mail.rcpt_tos == ["c4ca423@client.example"]
    finally:
        d.stop()
        postfix.stop()
        milter.stop()
