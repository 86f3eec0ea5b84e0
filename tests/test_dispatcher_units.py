"""Dispatcher pieces without peers: hand-coded PDUs against smpplib, receipts, notification mail."""

from __future__ import annotations

import smpplib.client
import smpplib.smpp
from sms_milter.dispatcher.notify import build_notification, callback_url
from sms_milter.dispatcher.pdus import HEADER, SUBMIT_SM, job_parts, parse_deliver_sm, submit_sm_body
from sms_milter.dispatcher.provider import Receipt, SubmitResult
from sms_milter.dispatcher.receipts import interpret, parse_receipt_text
from sms_milter.dispatcher.smpp import status_text
from sms_milter.spool.base import Event, Job, NewJob
from spool_helpers import add_jobs, mark_submitted, orphan_count, record_receipt

CLIENT = smpplib.client.Client("127.0.0.1", 1, allow_unknown_opt_params=True)


def _job(text: str, originator: str = "+41760000000", flash: bool = False) -> Job:
    return Job(recipient="+41791234567", originator=originator, text=text, parts=1, account="a", id=9,
               flash=flash)


def test_submit_sm_octets_equal_smpplibs():
    for text, orig, flash in [("hi", "SMS", False), ("x" * 400, "+41760000000", False),
                              ("é€" * 50, "ALERTS", True), ("€[]", "+41760000000", False)]:
        for p in job_parts(_job(text, orig, flash)):
            pdu = smpplib.smpp.make_pdu(
                "submit_sm", client=CLIENT, service_type="", source_addr_ton=p.source[0],
                source_addr_npi=p.source[1], source_addr=p.source[2], dest_addr_ton=1, dest_addr_npi=1,
                destination_addr=p.destination, esm_class=p.esm_class, data_coding=p.data_coding,
                registered_delivery=1, short_message=p.short_message)
            pdu.sequence = 42
            body = submit_sm_body(p)
            assert HEADER.pack(16 + len(body), SUBMIT_SM, 0, 42) + body == pdu.generate()


def test_parts_wire_fields():
    (p,) = job_parts(_job("hi", "SMS"))
    assert p.source == (5, 0, "SMS") and p.destination == "41791234567" and p.esm_class == 0
    parts = job_parts(_job("y" * 200))
    assert [x.esm_class for x in parts] == [0x40, 0x40]
    assert parts[0].short_message[:3] == b"\x05\x00\x03" and parts[0].short_message[4:6] == b"\x02\x01"
    assert parts[1].short_message[3] == parts[0].short_message[3]  # same reference
    assert job_parts(_job("flash", flash=True))[0].data_coding == 0x10
    assert job_parts(_job("Привет", flash=True))[0].data_coding == 0x18


def test_deliver_sm_parse_equals_smpplibs():
    text = (b"id:1234567 sub:001 dlvrd:001 submit date:2401011200 done date:2401011201 stat:DELIVRD"
            b" err:000 text:hi")
    for tlvs in ({}, {"receipted_message_id": "12d687", "message_state": 2}):
        pdu = smpplib.smpp.make_pdu("deliver_sm", client=CLIENT, source_addr="41791234567",
                                    destination_addr="SMS", esm_class=4, short_message=text, **tlvs)
        raw = pdu.generate()
        mine = parse_deliver_sm(raw)
        theirs = smpplib.smpp.parse_pdu(raw, client=CLIENT, allow_unknown_opt_params=True)
        assert mine.esm_class == theirs.esm_class == 4
        assert mine.short_message == theirs.short_message
        rid = theirs.receipted_message_id
        assert mine.receipted_message_id == (rid.decode() if rid else None)
        assert mine.message_state == theirs.message_state


def test_receipt_interpretation():
    t = ("id:0A1B sub:001 dlvrd:000 submit date:2401011200 done date:2401011201 stat:UNDELIV err:012"
         " text:x stat:DELIVRD")
    assert parse_receipt_text(t)["stat"] == "UNDELIV"  # text: is ignored
    assert interpret(None, None, t) == ("0A1B", "failed", "receipt stat:UNDELIV err:012")
    assert interpret("77", 2, "") == ("77", "delivered", "receipt stat:DELIVRD")
    assert interpret("77", 6, "")[1] == "buffered"
    assert interpret("77", 1, "")[1] == "buffered"
    assert interpret("77", 3, "")[1] == "expired"
    for state in (4, 5, 7, 8):
        assert interpret("77", state, "")[1] == "failed"
    assert interpret(None, None, "hello, this is an MO message") is None


def test_status_text_names_the_status():
    assert status_text(0x0B).startswith("ESME_RINVDSTADR (0x0000000B)")
    assert status_text(0x58).startswith("ESME_RTHROTTLED (0x00000058)")


def test_callback_url():
    assert callback_url("http://h/p", "T 1") == "http://h/p?ID=T%201"
    assert callback_url("http://h/p?a=1", "X") == "http://h/p?a=1&ID=X"


def test_notification_mail_headers():
    job = Job(recipient="+41791234567", originator="SMS", text="secret text", parts=1, account="a", id=5,
              sender="u@client.example", subject="Disk full", message_id="<abc@client.example>",
              state="expired", provider_refs=("a1", "a2"))
    msg = build_notification(job, Event(1, 5, "mail", "expired", 1700000000.0, 0), "gw@example.com")
    assert msg["Subject"] == "SMS to +41791234567: Failed"
    assert msg["In-Reply-To"] == msg["References"] == "<abc@client.example>"
    assert msg["Auto-Submitted"] == "auto-replied" and msg["From"] == "gw@example.com"
    body = msg.get_content()
    assert "expired" in body and "a1, a2" in body and "Disk full" in body
    assert "secret text" not in body  # the SMS text is not echoed


# --------------------------------------------------------------------------- receipts before ids


def _spool(tmp_path):
    from sms_milter.spool.sqlite import SqliteSpool

    return SqliteSpool(tmp_path / "spool.sqlite3")


def _new(recipient: str, parts: int, **kw) -> NewJob:
    text = "x" * (160 if parts == 1 else 153 * parts)
    return NewJob(recipient=recipient, originator="+41760000000", text=text, parts=parts, account="acme",
                  **kw)


def test_receipt_before_its_message_id_is_kept_and_applied(tmp_path):
    """The race, at the spool: the receipt (decimal id) is recorded before the submit response
    (hex id) is stored; it is kept durably (across a reopen) and applied when the id is stored."""
    s = _spool(tmp_path)
    (jid,) = add_jobs(s, [_new("+41791110001", 1)])
    (claimed,) = s.claim("me", 10, 45)
    assert s.record_receipts([(str(0xABC123), "delivered", "")]) == [None]
    s.close()
    s = _spool(tmp_path)  # the orphan is on disk, not in memory
    assert orphan_count(s) == 1
    applied = s.mark_submitted_many([(claimed.id, ["00ABC123"])])
    assert [(a.receipt.ref, a.outcome.job_id, a.outcome.state, a.outcome.changed) for a in applied] == [
        (str(0xABC123), jid, "delivered", True)]
    assert s.get(jid).state == "delivered" and orphan_count(s) == 0
    s.close()


def test_orphans_of_a_multipart_job_pass_through_every_state(tmp_path):
    """First part's ENROUTE and DELIVRD came before the ids were stored, the others after: the
    job still goes buffered (notification owed under ALWAYS) and then delivered."""
    s = _spool(tmp_path)
    (jid,) = add_jobs(s, [_new("+41791110002", 3, sender="a@client.example", notify="ALWAYS")])
    s.claim("me", 10, 45)
    assert s.record_receipts([("7001", "buffered", "receipt stat:ENROUTE"), ("7001", "delivered", "")]) == [
        None, None]
    applied = mark_submitted(s, jid, "me", ["7001", "7002", "7003"])
    assert [a.outcome.state for a in applied] == ["buffered", "buffered"]
    assert s.get(jid).state == "buffered"
    out = s.record_receipts([("7002", "delivered", ""), ("7003", "delivered", "")])
    assert [o.state for o in out] == ["buffered", "delivered"]
    assert [e.status for e in s.due_events(10)] == ["buffered", "delivered"]
    s.close()


def test_unmatched_receipts_are_pruned_after_max_age(tmp_path):
    s = _spool(tmp_path)
    assert record_receipt(s, "999", "delivered") is None
    assert s.prune_orphans(max_age=3600) == []
    with s._lock:  # noqa: SLF001 (age it)
        s._db.execute("UPDATE orphan_receipts SET at=at-7200")  # noqa: SLF001
    gone = s.prune_orphans(max_age=3600)
    assert [(o.ref, o.part_state) for o in gone] == [("999", "delivered")] and orphan_count(s) == 0
    s.close()


class _FakeProvider:
    """A provider driven by the test: results and receipts are handed in when the test says."""

    name = "fake"

    def __init__(self) -> None:
        self.submitted: list[Job] = []
        self.acked: list[Receipt] = []

    def start(self, on_result, on_receipt, on_change) -> None:
        self.on_result, self.on_receipt = on_result, on_receipt

    def ready(self) -> bool:
        return True

    def capacity(self) -> int:
        return 100

    def submit(self, jobs: list[Job]) -> None:
        self.submitted += jobs

    def ack_receipts(self, receipts: list[Receipt]) -> None:
        self.acked += receipts

    def drain(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


def test_engine_acknowledges_an_early_receipt_only_once_stored_and_applies_it_later(tmp_path):
    """The race, deterministically, through the engine: the receipt of a 2-part job's first part
    is processed (stored, acknowledged) while the job's submit result has not come yet; when the
    result is stored however much later, the job ends delivered."""
    from sms_milter.dispatcher.engine import Engine
    from sms_milter.model import Config

    s = _spool(tmp_path)
    (jid,) = add_jobs(s, [_new("+41791110003", 2)])
    prov = _FakeProvider()
    eng = Engine(s, prov, Config(), "me")  # type: ignore[arg-type]
    prov.start(eng._on_result, eng._on_receipt, lambda: None)  # noqa: SLF001
    eng._claim()  # noqa: SLF001
    assert [j.id for j in prov.submitted] == [jid]
    early = Receipt("123456789", "delivered", "", token=1)
    prov.on_receipt(early)
    eng._process()  # noqa: SLF001
    assert prov.acked == [early] and orphan_count(s) == 1  # acknowledged after it was stored
    assert s.get(jid).state == "queued"
    prov.on_result(SubmitResult(jid, refs=(format(123456789, "x"), "abcdef")))
    eng._process()  # noqa: SLF001
    assert s.get(jid).state == "submitted" and orphan_count(s) == 0
    prov.on_receipt(Receipt("abcdef", "delivered", "", token=2))
    eng._process()  # noqa: SLF001
    assert s.get(jid).state == "delivered" and len(prov.acked) == 2
    assert eng.stats["orphans"] == 1 and eng.stats["receipts"] == 2
    s.close()


def test_engine_prunes_expired_idempotency_keys_until_none_is_left(tmp_path, monkeypatch):
    from sms_milter.dispatcher import engine
    from sms_milter.dispatcher.engine import Engine
    from sms_milter.model import Config

    monkeypatch.setattr(engine, "KEYS_PRUNED_AT_ONCE", 2)
    s = _spool(tmp_path)
    for n in range(3):
        s.add_message(f"old-{n}", [_new(f"+4179111000{n}", 1)], key_ttl=0.0)
    s.add_message("live", [_new("+41791110009", 1)], key_ttl=600)
    eng = Engine(s, _FakeProvider(), Config(), "me")  # type: ignore[arg-type]
    assert eng._prune() is True  # noqa: SLF001 (a full batch: look again soon)
    assert eng._prune() is False  # noqa: SLF001
    left = [r[0] for r in s._read("SELECT key FROM messages")]  # noqa: SLF001
    assert left == ["live"]
    s.close()


def test_fast_text_encoding_equals_smstext():
    """pdus.encode_text's C fast paths give exactly smstext.encode's parts, at every boundary."""
    import random

    from sms_milter.dispatcher.pdus import encode_text
    from sms_milter.policy.smstext import encode

    rnd = random.Random(7)
    alphabets = ["abc XYZ 019.,!?@£$_\n", "abc€[]^{}|~\\", "Привет ça é", "a😀b", "ç€", "ÄÖÜäöüß§¿¡"]
    texts = ["", "x", "€", "😀"]
    for n in (69, 70, 71, 133, 134, 135, 152, 153, 154, 159, 160, 161, 201, 305, 306, 307, 459, 460, 461):
        for alphabet in alphabets:
            texts.append("".join(rnd.choice(alphabet) for _ in range(n)))
    for t in texts:
        enc = encode(t)
        assert encode_text(t) == (enc.data_coding, list(enc.parts)), t


def test_bind_and_query_octets_equal_smpplibs():
    """The bind and query_sm are ours (no smpplib at run time); smpplib is the oracle."""
    from sms_milter.dispatcher import pdus

    for sid, pw, st in [("gw", "pw", ""), ("a-very-long-system-id", "longpassword", "VMA-system-type")]:
        theirs = smpplib.smpp.make_pdu("bind_transceiver", client=CLIENT, system_id=sid[:15], password=pw[:8],
                                       system_type=st[:12])
        theirs.sequence = 7
        assert pdus.bind_transceiver(7, sid, pw, st) == theirs.generate()
    q = smpplib.smpp.make_pdu("query_sm", client=CLIENT, message_id="12d687", source_addr_ton=5,
                              source_addr_npi=0, source_addr="SMS")
    q.sequence = 9
    assert pdus.query_sm(9, "12d687", (5, 0, "SMS")) == q.generate()
    raw = pdus.pdu(pdus.QUERY_SM_RESP, 9, 0, b"12d687\0\0\x02\x00")
    assert pdus.parse_query_sm_resp(raw) == (2, 0)
    whole, rest = pdus.split_pdus(raw + raw[:5])
    assert whole == [raw] and rest == raw[:5]
