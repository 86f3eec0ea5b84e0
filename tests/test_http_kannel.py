"""The HTTP provider against a real Kannel (bearerbox + smsbox, Debian `kannel`) bound over SMPP
to our SMSC simulator: jobs leave through Kannel's sendsms, the SMSC sees the submit_sm, the
delivery report comes back through Kannel's dlr-url into the dispatcher's callback listener,
the job turns delivered and the notification mail goes out. End to end also from SMTP:
Postfix + milter + dispatcher -> HTTP -> Kannel -> SMPP -> SMSC.
"""

from __future__ import annotations

import secrets
from collections import Counter

import bed
import pytest
from dispatcher_bed import DispatcherProc, Smsc, job, states, wait_states
from kannel_bed import Kannel, kannel_provider, kannel_ready, providers_config
from spool_helpers import add_jobs

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
        self.spool = bed.spool_at(base / "spool.sqlite3")
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
    ids = dict(zip(jobs, add_jobs(kb.spool, list(jobs.values())), strict=True))
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
    (jid,) = add_jobs(kb.spool, [job("+" + UNDELIV, "to a dead handset")])
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


def _numbers(start: int, n: int) -> list[str]:
    return [f"+4179{start + i:07d}" for i in range(n)]


def _accepted(smsc: Smsc) -> Counter:
    return Counter(s["destination_addr"] for s in smsc.submits())


def test_failover_between_kannel_and_the_smsc_and_back(tmp_path, nsink):
    """Route [kannel (HTTP), direct (SMPP)]: Kannel is killed mid-stream (SIGKILL, both boxes);
    the jobs not possibly at Kannel go out directly over SMPP, none through both; Kannel comes
    back (same ports, same store): the jobs that were on the wire to it wait for it, new
    traffic returns to it. Duplicate SMS (Kannel re-sending from its store what the SMSC had
    already taken when it died) are counted and reported."""
    behind_kannel, direct = Smsc(tmp_path).start(), Smsc(tmp_path).start()
    k = Kannel(tmp_path, behind_kannel.port)
    d = None
    spool = bed.spool_at(tmp_path / "spool.sqlite3")
    try:
        k.start()
        providers = {
            "kannel": {**kannel_provider(k, bed.free_port(), secrets.token_urlsafe(32)), "down_after": 3,
                       "cooldown": 2},
            "direct": {"smpp": {"host": "127.0.0.1", "port": direct.port, "system_id": "gw", "password": "pw",
                                "reconnect_min": 0.2, "reconnect_max": 1.0, "window": 10}},
        }
        config = providers_config(tmp_path, nsink.port, providers, [{"providers": ["kannel", "direct"]}],
                                  spool_path=tmp_path / "spool.sqlite3")
        d = DispatcherProc(config, tmp_path / "d.log").start()

        def detail() -> str:
            return d.log_tail(30) + k.logs(8)

        first = add_jobs(spool, [job(n, "before") for n in _numbers(0, 100)])
        wait_states(spool, first, {"delivered"}, timeout=60, detail=detail)
        assert set(_accepted(behind_kannel)) == {n[1:] for n in _numbers(0, 100)} and not direct.submits()

        burst_numbers = _numbers(10000, 1500)
        burst = add_jobs(spool, [job(n, "burst") for n in burst_numbers])
        bed.wait_until(lambda: len(behind_kannel.submits()) >= 100 + 300, 60, "Kannel mid-stream",
                       interval=0.01, detail=detail)
        k.kill()
        at_kannel_before = set(_accepted(behind_kannel))
        # Everything not possibly at Kannel goes out directly.
        bed.wait_until(lambda: len(direct.submits()) > 0, 30, "failover to the SMSC", detail=detail)
        bed.wait_until(lambda: len([j for j in states(spool, burst).values()
                                    if j.state in ("submitted", "delivered")]) >= 1500 - 8, 60,
                       "the burst through the SMSC", detail=detail)
        # Kannel comes back: what it held and the jobs that waited for it go out, then new traffic.
        k.start()
        wait_states(spool, burst, {"submitted", "delivered"}, timeout=60, detail=detail)
        after = add_jobs(spool, [job(n, "after") for n in _numbers(20000, 100)])
        wait_states(spool, after, {"delivered"}, timeout=60, detail=detail)
        assert {n[1:] for n in _numbers(20000, 100)} <= set(_accepted(behind_kannel))  # traffic returned
        via_kannel, via_direct = _accepted(behind_kannel), _accepted(direct)
        burst_set = {n[1:] for n in burst_numbers}
        both = set(via_kannel) & set(via_direct)
        assert not both, sorted(both)[:10]  # never sent by two providers
        assert burst_set <= set(via_kannel) | set(via_direct)  # every job went out
        dups = sum(c - 1 for c in (*via_kannel.values(), *via_direct.values()) if c > 1)
        delivered = sum(1 for j in states(spool, burst).values() if j.state == "delivered")
        print(f"\n[kannel failover] Kannel killed after {len(at_kannel_before & burst_set)} burst submits at "
              f"its SMSC; {len(set(via_direct) & burst_set)} went directly over SMPP, "
              f"{len(set(via_kannel) & burst_set)} through Kannel in all; {dups} duplicate SMS; 0 sent by "
              f"both providers; {delivered} of 1500 reported delivered ({1500 - delivered} submitted whose "
              f"report Kannel lost with its in-memory DLR table)")
        assert dups <= 50
    finally:
        if d is not None:
            d.stop()
        k.stop()
        behind_kannel.stop()
        direct.stop()
        spool.close()
