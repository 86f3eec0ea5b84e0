"""The dispatcher against a real SMPP peer (tests/smsc/server.js, npm smpp 0.5.1) and a real
SMTP sink, run as `sms-milter dispatcher -c FILE` in a subprocess. Jobs go into the spool
directly; every condition is polled with a timeout.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter
from pathlib import Path

import bed
import pytest
from bed import MailSink, free_port, wait_until
from dispatcher_bed import (
    DispatcherProc,
    Smsc,
    dispatcher_config,
    job,
    states,
    wait_states,
)
from sms_milter.spool.base import OutMail
from spool_helpers import add_jobs

SMPP_PASSWORD = "Pw-77sec"  # SMPP 3.4 passwords have at most 8 characters
ACCOUNT_PASSWORD = "s3cret"  # the acme account's password in bed.write_config


# The SMSC simulator must be able to run; nsink (a mailbox for notifications) is in conftest.py.
pytestmark = pytest.mark.usefixtures("smsc_node")


class Bed:
    """One test's SMSC + spool + dispatcher(s)."""

    def __init__(self, base: Path, notify_port: int):
        self.base = base
        self.notify_port = notify_port
        self.smsc: Smsc | None = None
        self.spool = bed.spool_at(base / "spool.sqlite3")
        self.procs: list[DispatcherProc] = []

    def start_smsc(self, *options: str, port: int = 0) -> Smsc:
        self.smsc = Smsc(self.base, port=port, password=SMPP_PASSWORD).start(*options)
        return self.smsc

    def config(self, port: int | None = None, **smpp: object) -> Path:
        return dispatcher_config(self.base, port or (self.smsc.port if self.smsc else 0), self.notify_port,
                                 spool_path=self.base / "spool.sqlite3",
                                 smpp={"password": SMPP_PASSWORD, **smpp})

    def dispatcher(self, cfg: Path | None = None, name: str = "d") -> DispatcherProc:
        p = DispatcherProc(cfg or self.config(), self.base / f"{name}.log").start()
        self.procs.append(p)
        return p

    def detail(self) -> str:
        return "\n".join(f"--- {p.logfile.name}\n{p.log_tail(25)}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stop()
            except AssertionError:
                pass
        if self.smsc:
            self.smsc.stop()
        self.spool.close()


@pytest.fixture
def tb(tmp_path, nsink):
    b = Bed(tmp_path, nsink.port)
    yield b
    b.close()


def _ids_in_order(recs: list[dict], dest: str) -> list[str]:
    return [r["body_hex"] for r in recs if r["destination_addr"] == dest]


# --------------------------------------------------------------------------- encoding & receipts


def test_encoding_on_the_wire_and_receipts_for_every_part(tb):
    smsc = tb.start_smsc("--hex-ids")  # ids hex in submit_sm_resp, decimal in the receipts
    long_gsm = "".join(chr(ord("a") + i % 26) for i in range(400))  # 3 parts: 153+153+94
    ucs = "Привет " * 12  # 84 UCS-2 units: 2 parts (67 + 17)
    emoji = "a" * 66 + "😀" + "b" * 10  # the surrogate pair would straddle unit 67: it moves to part 2
    jobs = {
        "short": job("+41791230001", "Hello world"),
        "ext": job("+41791230002", "€ [x] ~", originator="ALERTS"),
        "long": job("+41791230003", long_gsm),
        "ucs": job("+41791230004", ucs),
        "emoji": job("+41791230005", emoji),
        "flash": job("+41791230006", "flash!", flash=True),
        "flashucs": job("+41791230007", "Grüße ça", flash=True),
    }
    ids = dict(zip(jobs, add_jobs(tb.spool, list(jobs.values())), strict=True))
    tb.dispatcher()
    done = wait_states(tb.spool, list(ids.values()), {"delivered"}, timeout=20, detail=tb.detail)
    recs = smsc.submits()
    by = {k: [r for r in recs if r["destination_addr"] == jobs[k].recipient[1:]] for k in jobs}
    for k, rs in by.items():
        assert len(rs) == jobs[k].parts, k
        for r in rs:
            assert r["registered_delivery"] == 1
            assert (r["dest_addr_ton"], r["dest_addr_npi"]) == (1, 1)
            assert r["schedule_delivery_time"] == "" and r["validity_period"] == ""
        assert len(done[ids[k]].provider_refs) == jobs[k].parts
    s = by["short"][0]
    assert (s["source_addr_ton"], s["source_addr_npi"], s["source_addr"]) == (1, 1, "41760000000")
    assert s["data_coding"] == 0 and s["esm_class"] == 0 and s["udh_hex"] == ""
    assert bytes.fromhex(s["short_message_hex"]) == b"Hello world"
    e = by["ext"][0]
    assert (e["source_addr_ton"], e["source_addr_npi"], e["source_addr"]) == (5, 0, "ALERTS")
    assert e["data_coding"] == 0
    assert bytes.fromhex(e["short_message_hex"]) == b"\x1b\x65 \x1b\x3cx\x1b\x3e \x1b\x3d"
    parts = by["long"]
    assert [p["esm_class"] for p in parts] == [0x40] * 3
    udhs = [bytes.fromhex(p["udh_hex"]) for p in parts]
    assert all(u[:3] == b"\x05\x00\x03" and u[4] == 3 for u in udhs)
    assert [u[5] for u in udhs] == [1, 2, 3] and len({u[3] for u in udhs}) == 1
    assert b"".join(bytes.fromhex(p["body_hex"]) for p in parts) == long_gsm.encode()
    assert [len(bytes.fromhex(p["body_hex"])) for p in parts] == [153, 153, 94]
    u = by["ucs"]
    assert [p["data_coding"] for p in u] == [8, 8] and [p["esm_class"] for p in u] == [0x40, 0x40]
    assert b"".join(bytes.fromhex(p["body_hex"]) for p in u).decode("utf-16-be") == ucs
    em = by["emoji"]
    first, second = (bytes.fromhex(p["body_hex"]) for p in em)
    assert len(first) == 66 * 2 and first.decode("utf-16-be") == "a" * 66
    assert second.decode("utf-16-be") == "😀" + "b" * 10
    assert by["flash"][0]["data_coding"] == 0x10
    assert by["flashucs"][0]["data_coding"] == 0x18
    # Every receipt was acknowledged with ROK (the acknowledgement follows the commit that made
    # the job delivered: give it a moment to reach the simulator's log).
    total = sum(j.parts for j in jobs.values())
    wait_until(lambda: len(smsc.records("deliver_sm_resp")) >= total, 5, "every receipt acknowledged",
               detail=tb.detail)
    acks = smsc.records("deliver_sm_resp")
    assert len(acks) == total and all(a["status"] == 0 for a in acks)


def test_text_only_receipts_arriving_before_the_submit_resp(tb):
    """Receipts without TLVs, each sent before its submit_sm_resp: still all land."""
    tb.start_smsc("--receipt-mode", "text", "--receipt-first", "--enroute")
    ids = add_jobs(tb.spool, [job(f"+4179124{i:04d}", f"text receipts {i}" * (1 + i % 12))
                             for i in range(40)])
    tb.dispatcher()
    wait_states(tb.spool, ids, {"delivered"}, timeout=20, detail=tb.detail)


def test_receipts_before_ids_are_stored_and_a_stale_backlog_lose_nothing(tb):
    """The race the drain benchmark found: on bind the SMSC first resends a backlog of 3,000 stale
    receipts (ids we never got), then sends each receipt before its submit_sm_resp, which comes
    6 s later (longer than any in-memory hold). Every receipt is kept in the spool until its
    message id is stored: every multi-part job ends delivered, only the stale ones are left."""
    stale = 3000
    smsc = tb.start_smsc("--hex-ids", "--receipt-first", "--resp-delay", "6000",
                         "--stale-receipts", str(stale))
    batch = [job(f"+4179127{i:04d}", f"early receipt {i} " + "x" * (150 + 150 * (i % 2))) for i in range(30)]
    assert {j.parts for j in batch} == {2, 3}
    parts = sum(j.parts for j in batch)
    ids = add_jobs(tb.spool, batch)
    d = tb.dispatcher(tb.config(window=100))  # every part in flight at once: one 6 s wait
    wait_states(tb.spool, ids, {"delivered"}, timeout=60, detail=tb.detail)
    wait_until(lambda: len([a for a in smsc.records("deliver_sm_resp") if a["status"] == 0]) >= stale + parts,
               20, "every receipt acknowledged", detail=tb.detail)
    assert d.stop() == 0
    log = d.log()
    assert "acknowledged and dropped" not in log
    assert log.count("before its message id was stored): delivered") == len(batch)  # the early path
    assert f"'orphans': {stale + parts}" in log  # every receipt went through the orphan table
    rows = tb.spool._read("SELECT ref FROM orphan_receipts")  # noqa: SLF001
    assert sorted(r["ref"] for r in rows) == sorted(str(900000000000000 + k) for k in range(stale))
    assert all(len(j.provider_refs) == j.parts for j in states(tb.spool, ids).values())


# --------------------------------------------------------------------------- flow control & failures


def test_throttling_neither_fails_nor_reorders(tb):
    smsc = tb.start_smsc("--throttle", "6", "--qfull", "6")
    texts = [f"order {i}" for i in range(12)]
    # Two recipients with 12 ordered jobs each, plus 20 others.
    batch = [job(f"+4179125000{n}", t) for t in texts for n in (1, 2)]
    batch += [job(f"+417912510{i:02d}", "other") for i in range(20)]
    ids = add_jobs(tb.spool, batch)
    d = tb.dispatcher()
    done = wait_states(tb.spool, ids, {"delivered"}, timeout=30, detail=tb.detail)
    assert all(j.attempts == 1 for j in done.values()), {j.id: j.attempts for j in done.values()}
    refused = [r for r in smsc.records("submit_sm") if r["status"] in (0x58, 0x14)]
    assert len(refused) == 12
    recs = smsc.submits()
    for n in (1, 2):
        got = [bytes.fromhex(h).decode() for h in _ids_in_order(recs, f"4179125000{n}")]
        assert got == texts
    assert "SMSC throttling" in d.log()


def test_a_train_to_one_number_keeps_its_order_under_throttling(tb):
    """Issue 16: a burst to one number is pipelined on one bind (a train from the claim) and
    the SMSC throttles it again and again (each episode refuses every submit until the client
    backs off). Every job ends delivered with one attempt, in order, none sent twice."""
    smsc = tb.start_smsc("--throttle-every", "40", "--throttle-quiet", "60")
    texts = [f"storm {i:03d}" for i in range(300)]
    batch = [job("+41791270001", t) for t in texts] + [job(f"+417912710{i:02d}", "other") for i in range(20)]
    ids = add_jobs(tb.spool, batch)
    d = tb.dispatcher()
    done = wait_states(tb.spool, ids, {"delivered"}, timeout=90, detail=tb.detail)
    assert all(j.attempts == 1 for j in done.values()), {j.id: j.attempts for j in done.values()}
    refused = [r for r in smsc.records("submit_sm") if r["status"] == 0x58]
    assert len(refused) >= 5, len(refused)  # it did throttle, several times
    got = [bytes.fromhex(h).decode() for h in _ids_in_order(smsc.submits(), "41791270001")]
    assert got == texts  # in order, each once
    assert "SMSC throttling" in d.log()


def test_temporary_error_retries_with_backoff(tb):
    tb.start_smsc("--syserr", "2")
    ids = add_jobs(tb.spool, [job("+41791260001", "retry me")])
    tb.dispatcher()
    done = wait_states(tb.spool, ids, {"delivered"}, timeout=20, detail=tb.detail)
    assert done[ids[0]].attempts == 3


def test_permanent_error_fails_job_with_status(tb, nsink):
    tb.start_smsc("--fail-dest", "41791270001")
    ids = add_jobs(tb.spool, [job("+41791270001", "nope", sender="perm@client.example", notify="FAILED"),
                             job("+41791270002", "fine")])
    tb.dispatcher()
    done = wait_states(tb.spool, ids, timeout=20, detail=tb.detail)
    bad, good = done[ids[0]], done[ids[1]]
    assert bad.state == "failed" and good.state == "delivered"
    assert "ESME_RINVDSTADR" in bad.last_error and "0x0000000B" in bad.last_error
    assert bad.attempts == 1
    m = nsink.wait_for(lambda m: m.rcpt_tos == ["perm@client.example"], timeout=10)[0]
    assert m.subject == "SMS to +41791270001: Failed" and "ESME_RINVDSTADR" in m.text()


def test_expired_jobs(tb, nsink):
    tb.start_smsc("--expired-dest", "41791280002")
    now = time.time()
    ids = add_jobs(tb.spool, [
        job("+41791280001", "too late", expires_at=now - 1, sender="exp1@client.example"),
        job("+41791280002", "expires at the SMSC", sender="exp2@client.example"),
    ])
    tb.dispatcher()
    done = wait_states(tb.spool, ids, timeout=20, detail=tb.detail)
    assert [done[i].state for i in ids] == ["expired", "expired"]
    assert not [r for r in tb.smsc.submits() if r["destination_addr"] == "41791280001"]
    for rcpt, number in (("exp1@client.example", "+41791280001"), ("exp2@client.example", "+41791280002")):
        m = nsink.wait_for(lambda m, r=rcpt: m.rcpt_tos == [r], timeout=10)[0]
        assert m.subject == f"SMS to {number}: Failed"
        assert "expired" in m.text()


def test_smsc_down_at_start_comes_up_later(tb):
    port = free_port()
    ids = add_jobs(tb.spool, [job(f"+4179129{i:04d}", "later") for i in range(5)])
    d = tb.dispatcher(tb.config(port=port))
    wait_until(lambda: "connect/bind failed" in d.log(), 10, "a failed connect in the log", detail=d.log_tail)
    assert {j.state for j in states(tb.spool, ids).values()} == {"queued"}
    tb.start_smsc(port=port)
    wait_states(tb.spool, ids, {"delivered"}, timeout=20, detail=tb.detail)


def test_smsc_drops_connection_mid_window(tb):
    smsc = tb.start_smsc("--drop-after", "25", "--receipt-delay", "20")
    ids = add_jobs(tb.spool, [job(f"+4179130{i:04d}", f"drop {i}") for i in range(120)])
    d = tb.dispatcher()
    wait_states(tb.spool, ids, {"delivered"}, timeout=30, detail=tb.detail)
    assert any(r.get("dropped") for r in smsc.records("submit_sm"))
    assert "go back to the queue" in d.log()
    assert len({r["session"] for r in smsc.records("bind_transceiver")}) >= 2


def test_wrong_password_is_retried_and_never_logged(tb):
    tb.start_smsc()
    ids = add_jobs(tb.spool, [job("+41791310001", "auth")])
    d = tb.dispatcher(tb.config(password="wrong-99"))
    wait_until(lambda: "ESME_RINVPASWD" in d.log(), 10, "bind refusal in the log", detail=d.log_tail)
    assert states(tb.spool, ids)[ids[0]].state == "queued"
    d.stop()
    assert "wrong-99" not in d.log()


def test_rate_cap_keepalive_and_clean_unbind(tb):
    smsc = tb.start_smsc()
    ids = add_jobs(tb.spool, [job(f"+4179132{i:04d}", f"rate {i}") for i in range(30)])
    d = tb.dispatcher(tb.config(rate=40, enquire_link=1))
    wait_states(tb.spool, ids, {"delivered"}, timeout=20, detail=tb.detail)
    ts = sorted(r["t"] / 1000 for r in smsc.submits())
    assert ts[-1] - ts[0] >= 29 / 40 * 0.8  # at most ~40 submits per second
    wait_until(lambda: smsc.records("enquire_link"), 5, "an enquire_link while idle", detail=tb.detail)
    assert d.stop() == 0
    assert smsc.records("unbind")


# --------------------------------------------------------------------------- crash & concurrency


def test_kill9_mid_batch_then_restart_loses_nothing(tb, monkeypatch):
    monkeypatch.setenv("SMS_MILTER_LEASE_SECONDS", "3")
    smsc = tb.start_smsc("--receipt-delay", "5")
    n = 1000
    ids = add_jobs(tb.spool, [job(f"+4179140{i:04d}", f"kill {i}") for i in range(n)])
    cfg = tb.config(window=10, window_max=10)  # a fixed window of 10 (the bound below is made of it)
    d1 = tb.dispatcher(cfg, "d1")
    wait_until(lambda: len(smsc.submits()) >= 300, 20, "300 submits before the kill", detail=tb.detail)
    d1.kill9()
    at_kill = len(smsc.submits())
    assert at_kill < n
    tb.dispatcher(cfg, "d2")
    done = wait_states(tb.spool, ids, {"delivered"}, timeout=60, detail=tb.detail)
    assert len(done) == n
    per_dest = Counter(r["destination_addr"] for r in smsc.submits())
    assert set(per_dest) == {f"4179140{i:04d}" for i in range(n)}  # none missing
    dups = [k for k, c in per_dest.items() if c > 1]
    # Only jobs in flight at the kill (leased, not yet recorded as submitted) may go twice: the
    # provider's capacity (window 10: max(2 * 10, 10 + 64) jobs). On PostgreSQL the recording of
    # submits (its own commit, a round trip and a WAL flush) was seen to lag up to one more
    # capacity behind the SMSC's responses, so twice that there.
    in_flight = 10 + 64
    assert len(dups) <= (2 * in_flight if bed.on_postgres() else in_flight), dups


def test_two_dispatchers_never_send_a_job_twice(tb):
    smsc = tb.start_smsc()
    n = 600
    cfg = tb.config(window=10)
    a, b = tb.dispatcher(cfg, "a"), tb.dispatcher(cfg, "b")
    # Both bound before the jobs come: one alone could drain 600 jobs before the other starts.
    wait_until(lambda: "bound to SMSC" in a.log() and "bound to SMSC" in b.log(), 15, "both binds",
               detail=tb.detail)
    ids = add_jobs(tb.spool, [job(f"+4179150{i:04d}", f"two {i}") for i in range(n)])
    wait_states(tb.spool, ids, {"delivered"}, timeout=60, detail=tb.detail)
    per_dest = Counter(r["destination_addr"] for r in smsc.submits())
    assert len(per_dest) == n and max(per_dest.values()) == 1
    assert "submitted to" in a.log() and "submitted to" in b.log()  # both took part


def test_rude_smsc_smpp34_reorders_and_queue_full(tb):
    """PyPI smpp34's server: answers out of order, ESME_RMSGQFUL when its small inbound queue is
    full under our pipelined window. Every job still ends delivered, in order per recipient,
    without a counted extra attempt."""
    import json
    import subprocess
    import sys

    pytest.importorskip("smpp34", reason="PyPI smpp34 is not installed (pip install smpp34)")
    log = tb.base / "rude.jsonl"
    script = Path(__file__).parent / "smsc" / "rude_smsc.py"
    rude = subprocess.Popen([sys.executable, str(script), "--port", "0",
                             "--log", str(log), "--inbound-capacity", "4", "--handle-delay", "0.001"],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(rude.stdout.readline().split()[1])
        batch = [job(f"+4179200{i % 40:04d}", f"rude {i:03d} " * (1 + i % 25)) for i in range(320)]
        ids = add_jobs(tb.spool, batch)
        # An SMSC that refuses single submits at random while accepting the ones around them:
        # strict order needs one job per number on the wire (pipeline_per_number 1, ADR 0003).
        d = tb.dispatcher(tb.config(port=port, window=50, pipeline_per_number=1))
        done = wait_states(tb.spool, ids, {"delivered"}, timeout=60, detail=tb.detail)
        assert all(j.attempts == 1 for j in done.values())
        d.stop()
        assert "ESME_RMSGQFUL" in d.log()  # it did push back
        subs = [json.loads(line) for line in log.read_text().splitlines()]
        subs = [r for r in subs if r["command"] == "submit_sm"]
        assert len(subs) == sum(j.parts for j in batch)  # nothing sent twice
        for n in range(40):  # order per recipient: first part of each job, in job order
            firsts = [r["short_message_hex"] for r in subs if r["destination_addr"] == f"4179200{n:04d}"
                      and (r["esm_class"] == 0 or bytes.fromhex(r["short_message_hex"])[5] == 1)]
            seqs = [bytes.fromhex(h).decode("latin-1").split("rude ")[1][:3] for h in firsts]
            assert seqs == sorted(seqs), n
    finally:
        rude.terminate()
        rude.wait(5)


# --------------------------------------------------------------------------- notifications


def test_notification_mail_per_notify_policy(tb, nsink):
    tb.start_smsc("--enroute", "--undeliv", "41791600002,41791600004,41791600006,41791600008")
    cases = {"ALWAYS": ("41791600001", "41791600002"), "": ("41791600003", "41791600004"),
             "FAILED": ("41791600005", "41791600006"), "NONE": ("41791600007", "41791600008")}
    batch, meta = [], []
    for policy, (ok, bad) in cases.items():
        for number in (ok, bad):
            sender = f"n{number}@client.example"
            batch.append(job("+" + number, "notify me", sender=sender, notify=policy,
                             subject="Server down", message_id=f"<orig-{number}@client.example>"))
            meta.append((policy, number, sender))
    ids = add_jobs(tb.spool, batch)
    d = tb.dispatcher()
    wait_states(tb.spool, ids, timeout=20, detail=tb.detail)
    expected = {  # (policy, delivered-job?) -> statuses mailed
        ("ALWAYS", True): {"Buffered", "Delivered"}, ("ALWAYS", False): {"Buffered", "Failed"},
        ("", True): {"Delivered"}, ("", False): {"Failed"},
        ("FAILED", True): set(), ("FAILED", False): {"Failed"},
        ("NONE", True): set(), ("NONE", False): set(),
    }
    total = sum(len(v) for v in expected.values())
    mine = {s for _, _, s in meta}
    nsink.wait_for(lambda m: m.rcpt_tos[0] in mine, count=total, timeout=15)
    time.sleep(0.3)  # would-be extra mails (none expected) get a moment to show up
    got = [m for m in nsink.messages if m.rcpt_tos[0] in mine]
    assert len(got) == total
    for policy, number, sender in meta:
        mails = [m for m in got if m.rcpt_tos == [sender]]
        status = {m.subject.rsplit(": ", 1)[1] for m in mails}
        assert status == expected[(policy, number in {v[0] for v in cases.values()})], (policy, number)
        for m in mails:
            msg = m.message
            assert m.mail_from in ("<>", "")
            assert msg["From"] == "sms-gateway@example.com" and msg["To"] == sender
            assert msg["Subject"].startswith(f"SMS to +{number}: ")
            assert msg["Auto-Submitted"] == "auto-replied"
            assert msg["In-Reply-To"] == msg["References"] == f"<orig-{number}@client.example>"
            assert msg["Message-ID"] and msg["Message-ID"] != msg["In-Reply-To"] and msg["Date"]
            body = msg.get_content()
            assert f"+{number}" in body and "Server down" in body and "Reference:" in body
            assert ACCOUNT_PASSWORD not in m.text() and SMPP_PASSWORD not in m.text()
    d.stop()
    assert SMPP_PASSWORD not in d.log() and ACCOUNT_PASSWORD not in d.log()
    # the sender address is the account's secret: logs name a stable alias instead
    from sms_milter.dispatcher.notify import sender_alias

    for _, _, sender in meta:
        assert sender not in d.log()
    delivered_sender = meta[0][2]  # ALWAYS, delivered: two mails, two log lines with the same alias
    assert d.log().count(f"notification mailed to {sender_alias(delivered_sender, 'acme')}") == 2


def test_notification_retried_when_smtp_is_down(tb, tmp_path):
    port = free_port()
    tb.notify_port = port
    tb.start_smsc()
    ids = add_jobs(tb.spool, [job("+41791610001", "later mail", sender="late@client.example")])
    d = tb.dispatcher()
    wait_states(tb.spool, ids, {"delivered"}, timeout=20, detail=tb.detail)
    from sms_milter.dispatcher.notify import sender_alias

    alias = sender_alias("late@client.example", "acme")
    wait_until(lambda: f"notification mail to {alias} failed" in d.log(), 10, "a failed hand-over",
               detail=d.log_tail)
    bed.spool_sql(tb.base / "spool.sqlite3", "UPDATE events SET next_at=0")  # the retry due now, not in 30 s
    with MailSink(port) as late:
        late.wait_for(lambda m: m.rcpt_tos == ["late@client.example"], timeout=10)
        wait_until(lambda: f"notification mailed to {alias}" in d.log(), 10, "the hand-over logged",
                   detail=d.log_tail)
    assert "late@client.example" not in d.log()


def test_url_callbacks_and_outbox(tb, nsink):
    hits: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_port}"
        tb.start_smsc("--undeliv", "41791620002")
        ids = add_jobs(tb.spool, [
            job("+41791620001", "cb", trans_ref="T-1", urls={"delivered": f"{base}/ok?x=1"}),
            job("+41791620002", "cb", trans_ref="T 2", urls={"failed": f"{base}/bad"}),
        ])
        reply = b"From: sms-gateway@example.com\r\nTo: xml@client.example\r\nSubject: reply\r\n\r\n<xml/>\r\n"
        tb.spool.add_message(None, [], 0, mails=[OutMail("xmlreply@client.example", reply)])
        tb.dispatcher()
        wait_states(tb.spool, ids, timeout=20, detail=tb.detail)
        wait_until(lambda: len(hits) >= 2, 10, "two URL callbacks", detail=tb.detail)
        assert sorted(hits) == ["/bad?ID=T%202", "/ok?x=1&ID=T-1"]
        m = nsink.wait_for(lambda m: m.rcpt_tos == ["xmlreply@client.example"], timeout=10)[0]
        assert m.mail_from in ("<>", "") and m.message.get_content().strip() == "<xml/>"
    finally:
        srv.shutdown()


# --------------------------------------------------------------------------- throughput


def test_throughput_and_latency(tmp_path, capsys):
    """3,000 single-part jobs drained with receipts (window 200), and 200 jobs committed one by
    one into an idle dispatcher; prints SMS/s and the commit -> submit_sm delays."""
    import dispatcher_bench

    r = dispatcher_bench.run(tmp_path / "bench", jobs=3000, window=200, trickle=200)
    with capsys.disabled():
        print(f"\n[bench] drain: {r['jobs']} jobs with receipts in {r['seconds']:.2f}s = "
              f"{r['sms_per_s']:.0f} SMS/s; commit->submit_sm {r['drain_delay']}\n"
              f"[bench] trickle: commit->submit_sm {r['trickle_delay']}")
    assert r["sms_per_s"] > 500
