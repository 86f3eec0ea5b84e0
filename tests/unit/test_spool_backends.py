"""The spool's contract on both backends (issue 14): every test here runs on the SQLite file and
on a private PostgreSQL cluster (tests/spool_backends.py, tests/pgbed.py: a database per test)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from sms_milter.spool.base import AddRequest, LimitPlan, NewJob, OutMail, SpoolDataError
from spool_helpers import add_jobs, orphan_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _job(recipient: str, text: str = "x", **kw) -> NewJob:
    kw.setdefault("account", "acme")
    return NewJob(recipient=recipient, originator="SMS", text=text, parts=kw.pop("parts", 1), **kw)


@pytest.fixture
def spool(spool_factory):
    """A fresh spool of each backend (tests/spool_backends.py); `spool.reopen()` gives a second
    handle on the same one (another process's view)."""
    s = spool_factory()
    s.reopen = lambda: spool_factory()
    return s


def _sent(s, recipient: str, ref: str, provider: str = "smpp") -> int:
    (jid,) = add_jobs(s, [_job(recipient)])
    (j,) = s.claim("o", 10, 60)
    assert j.id == jid
    s.mark_submitted_many([(jid, [ref], provider)])
    return jid


def test_order_per_recipient_and_one_in_flight(spool):
    s = spool
    a = add_jobs(s, [_job("+41791", f"a{i}") for i in range(4)])
    b = add_jobs(s, [_job("+41792", "b0")])
    assert [j.id for j in s.claim("o", 10, 60)] == [a[0], b[0]]
    assert s.claim("o", 10, 60) == []  # a[1] waits behind a[0] in flight
    s.release([a[0]], "o", 0.0)
    assert [j.id for j in s.claim("o", 10, 60)] == [a[0]]
    s.mark_submitted_many([(a[0], ["1"])])
    assert [j.id for j in s.claim("o", 10, 60)] == [a[1]]
    s.fail(a[1], "permanent")
    assert [j.id for j in s.claim("o", 10, 60)] == [a[2]]
    s.mark_submitted_many([(a[2], ["2"])])
    assert [c.after for c in s.retry_jobs([a[1]])] == ["queued"]  # the old job goes first again
    assert [j.id for j in s.claim("o", 10, 60)] == [a[1]]
    s.release([a[1]], "o", 0.0)
    assert [c.after for c in s.delete_jobs([a[1]])] == ["deleted"]
    assert [j.id for j in s.claim("o", 10, 60)] == [a[3]]


def test_deferred_jobs_do_not_block_and_wait_for_their_time(spool):
    later = add_jobs(spool, [_job("+41793", "later", not_before=time.time() + 3600)])
    now = add_jobs(spool, [_job("+41793", "now")])
    assert [j.id for j in spool.claim("o", 10, 60)] == now
    assert spool.get(later[0]).state == "queued"


def test_same_key_adds_nothing_and_a_batch_dedupes_within_itself(spool):
    first = spool.add_message("k1", [_job("+41794", "a"), _job("+41795", "b")], 60)
    again = spool.add_message("k1", [_job("+41794", "a")], 60)
    assert not first.duplicate and again.duplicate and again.job_ids == first.job_ids
    batch = [AddRequest("k2", [_job("+41796")], 60, []), AddRequest("k2", [_job("+41796")], 60, []),
             AddRequest("k1", [_job("+41794")], 60, [])]
    spool.commit_now(batch)
    assert [r.result.duplicate for r in batch] == [False, True, True]
    assert batch[0].result.job_ids == batch[1].result.job_ids
    assert len(spool.list_jobs()) == 3


def test_text_with_nul_and_marker_round_trips(spool):
    odd = ["a\x00b", "\ue000x", "\ue000\x00", "plain"]
    ids = add_jobs(spool, [_job("+41797", t, subject=t, message_id=t, sender="s@x") for t in odd])
    got = [spool.get(i) for i in ids]
    assert [(j.text, j.subject, j.message_id) for j in got] == [(t, t, t) for t in odd]


def test_a_message_whose_values_cannot_be_stored_fails_alone(spool):
    good, bad = AddRequest(None, [_job("+41798", "fine")], 0, []), AddRequest(
        None, [_job("+41798", "x", subject="bad \udcff")], 0, [])
    spool.commit_now([good, bad])
    assert good.result is not None and not good.result.duplicate
    assert isinstance(bad.error, SpoolDataError) and "Subject" in str(bad.error)
    assert [j.text for j in spool.list_jobs()] == ["fine"]


def test_reused_id_matches_by_number_and_by_state(spool):
    s = spool
    x_old = _sent(s, "+41791000001", "1")
    assert s.record_receipts([("1", "delivered", "", "41791000001", "smpp")])[0].changed
    y_new = _sent(s, "+41791000002", "1")
    x_new = _sent(s, "+41791000001", "1")
    out = s.record_receipts([("0001", "delivered", "", "0041791000002", "smpp")])
    assert (out[0].job_id, out[0].changed) == (y_new, True)
    out = s.record_receipts([("1", "failed", "UNDELIV", "41791000001", "smpp")])
    assert (out[0].job_id, out[0].state) == (x_new, "failed")
    out = s.record_receipts([("1", "failed", "repeat", "41791000001", "smpp")])
    assert out[0].stale and not out[0].changed
    assert [s.get(i).state for i in (x_old, y_new, x_new)] == ["delivered", "delivered", "failed"]


def test_orphan_receipt_waits_for_its_part(spool):
    s = spool
    a = _sent(s, "+41791000003", "77")
    assert s.record_receipts([("77", "delivered", "", "41791000004", "smpp")]) == [None]
    assert s.record_receipts([("77", "delivered", "", "41791000003", "kannel")]) == [None]
    assert s.get(a).state == "submitted" and orphan_count(s) == 2
    b = _sent(s, "+41791000004", "77")
    assert s.get(b).state == "delivered" and s.get(a).state == "submitted"
    assert orphan_count(s) == 1
    assert s.prune_orphans(-1) and orphan_count(s) == 0


def test_final_state_owes_events_and_outbox_mails_are_handed_over(spool):
    (jid,) = add_jobs(spool, [_job("+41799", sender="who@client.example", notify="ALWAYS",
                                  urls={"delivered": "http://h/cb"})])
    spool.claim("o", 10, 60)
    spool.mark_submitted_many([(jid, ["ab"])])
    spool.record_receipts([("ab", "delivered", "")])
    events = spool.due_events(10)
    assert sorted(e.kind for e in events) == ["mail", "url"] and {e.status for e in events} == {"delivered"}
    spool.event_retry(events[0].id, "smtp down", 3600)
    spool.event_done(events[1].id)
    assert [n.last_error for n in spool.detail(jid).notifications] == ["smtp down"]
    spool.add_message(None, [], 0, mails=[OutMail("r@x", b"Subject: hi\r\n\r\nbody\x00\r\n")])
    (mid, mail, attempts), = spool.due_outbox(10)
    assert mail.content.endswith(b"body\x00\r\n") and attempts == 0
    spool.outbox_done(mid)
    assert spool.due_outbox(10) == []


def test_queue_tools_and_stats(spool):
    ids = add_jobs(spool, [_job(f"+4179900{i}") for i in range(4)])
    assert [c.after for c in spool.hold_jobs([ids[0], 999])] == ["held", None]
    assert [j.id for j in spool.claim("o", 10, 60)] == ids[1:]
    assert spool.hold_jobs([ids[1]])[0].reason.startswith("is being submitted")
    spool.mark_submitted_many([(ids[1], ["f1"]), (ids[2], ["f2"])])
    assert spool.delete_jobs([ids[1]])[0].reason.startswith("is submitted")
    spool.record_receipts([("f2", "delivered", "")])
    st = spool.stats(0, 0)
    assert [st.states[k] for k in ("held", "submitted", "delivered", "queued")] == [1, 1, 1, 1]
    assert st.accounts["acme"].parts_today == 2
    assert spool.release_held([ids[0]])[0].after == "queued"
    assert spool.purge(time.time() + 1) == [(ids[2], "delivered")]
    assert spool.get(ids[2]) is None
    assert [p.ref for p in spool.detail(ids[1]).parts] == ["f1"]


def test_expired_jobs_and_limits_counted_in_the_commit(spool):
    (old,) = add_jobs(spool, [_job("+41790001", expires_at=time.time() - 1)])
    assert spool.expire_due() == [old] and spool.get(old).state == "expired"
    seen = []

    def decide(account, usage, parts, per):
        seen.append(sum(p for _, p in usage.short))
        return "refused" if sum(p for _, p in usage.short) + parts > 3 else None

    plan = LimitPlan(decide=decide)
    results = [spool.add_message(None, [_job("+41790002", f"t{i}", parts=2)], 0, limits=plan)
               for i in range(3)]
    assert [r.refused for r in results] == [None, "refused", "refused"] and seen == [0, 2, 2]
    other = spool.reopen()  # another milter on the same spool sees the same counters
    assert other.add_message(None, [_job("+41790003", parts=1)], 0, limits=plan).refused is None
    assert spool.add_message(None, [_job("+41790004", parts=1)], 0, limits=plan).refused == "refused"
    assert [(u.account, u.today) for u in spool.account_usage()] == [("acme", 3)]


def test_one_batch_counts_and_dedupes_its_own_messages(spool):
    """Limits and identical-SMS keys see the messages earlier in the same group commit."""
    seen = []

    def decide(account, usage, parts, per):
        used = sum(p for _, p in usage.short)
        seen.append((used, sum(p for _, p in usage.recipients.get("+41795550001", ()))))
        return "refused" if used + parts > 3 else None

    plan = LimitPlan(decide=decide, dedupe_keys=("same",), dedupe_ttl=60)
    other = LimitPlan(decide=decide, dedupe_keys=("k2",), dedupe_ttl=60)
    batch = [AddRequest(None, [_job("+41795550001", "a")], 0, [], limits=plan),
             AddRequest(None, [_job("+41795550001", "a")], 0, [], limits=plan),
             AddRequest("key", [_job("+41795550001", "b", parts=2)], 60, [], limits=other),
             AddRequest("key", [_job("+41795550001", "b", parts=2)], 60, [], limits=other),
             AddRequest(None, [_job("+41795550002", "c")], 0, [], limits=LimitPlan(decide=decide))]
    spool.commit_now(batch)
    res = [r.result for r in batch]
    assert [r.duplicate for r in res] == [False, True, False, True, False]
    assert res[1].job_ids == res[0].job_ids and res[3].job_ids == res[2].job_ids
    assert res[4].refused == "refused" and seen == [(0, 0), (1, 1), (3, 3)]
    assert len(spool.list_jobs()) == 2
    again = spool.add_message(None, [_job("+41795550001", "a")], 0, limits=LimitPlan(dedupe_keys=("same",),
                                                                                       dedupe_ttl=60))
    assert again.duplicate and again.job_ids == res[0].job_ids


def test_a_backlog_to_one_number_does_not_hide_the_others(spool):
    """More queued jobs to one number than the claim walks in id order (PostgreSQL: 500):
    the other numbers' jobs and the backlog's head are still claimed, one in flight per number."""
    storm = add_jobs(spool, [_job("+41790000000", f"storm {i}") for i in range(1200)])
    later = spool.add_message(None, [_job("+41790000000", "due", not_before=time.time() - 1)], 0).job_ids
    others = add_jobs(spool, [_job(f"+4179100{i:04d}", "other") for i in range(5)])
    got = [j.id for j in spool.claim("o", 10, 60)]
    assert got == [storm[0], *others]  # `later` is not deferred (due at once): it waits its turn
    spool.mark_submitted_many([(i, [f"{i:x}"]) for i in got])
    assert [j.id for j in spool.claim("o", 10, 60)] == [storm[1]]
    assert later[0] not in got


def test_jobs_keep_channel_language_and_files(spool):
    """Voice/fax (issue 15): the files are stored with the commit, content-addressed (one copy
    for two jobs), and come back by hash; the job reads back its channel and language."""
    from sms_milter.spool.files import JobFile

    pdf = JobFile.of("application/pdf", "doc.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 40)
    wav = JobFile.of("audio/wav", "r.wav", b"RIFF....WAVE")
    key_jobs = [_job("+41441234567", "cover", device="fax", channel="fax", files=(pdf,)),
                _job("+41441234568", "cover", device="fax", channel="fax", files=(pdf,)),
                _job("+41791234567", "", device="mobile", channel="voice", language="de", files=(wav,))]
    ids = spool.add_message("k-files", key_jobs).job_ids
    by_id = {j.id: j for j in spool.list_jobs()}
    fax, voice = by_id[ids[0]], by_id[ids[2]]
    assert (fax.channel, fax.device, fax.language) == ("fax", "fax", "")
    assert fax.files == (JobFile(pdf.sha256, "application/pdf", "doc.pdf", pdf.size),)
    assert (voice.channel, voice.language, [f.sha256 for f in voice.files]) == ("voice", "de", [wav.sha256])
    other = spool.reopen()  # another process (the dispatcher) reads the content by hash
    assert other.file_data(pdf.sha256) == pdf.data and other.file_data(wav.sha256) == wav.data
    with pytest.raises(KeyError):
        other.file_data("0" * 64)
    (sms,) = [j for j in (spool.get(i) for i in add_jobs(spool, [_job("+41790000000")]))]
    assert (sms.channel, sms.files) == ("sms", ())


def test_claim_by_channel_lets_sms_pass_a_voice_backlog(spool):
    """A backlog of older voice jobs (other numbers) does not hold up an SMS: the engine claims
    each channel's jobs as that channel has room (claim(..., channel=))."""
    voice = [_job(f"+4179123{i:04d}", "call", device="mobile", channel="voice") for i in range(30)]
    add_jobs(spool, voice)
    (sms_id,) = add_jobs(spool, [_job("+41790000001", "sms")])
    assert [j.id for j in spool.claim("o", 1, 60, channel="sms")] == [sms_id]
    got = spool.claim("o", 2, 60, channel="voice")
    assert len(got) == 2 and {j.channel for j in got} == {"voice"}
    assert spool.claim("o", 5, 60, channel="fax") == []
    assert len(spool.claim("o", 100, 60)) == 28  # no channel: every due job, as before


def test_trains_hand_out_one_numbers_jobs_in_order_to_one_owner(spool):
    """Issue 16: per_number > 1 claims a head and the jobs behind it (a train); nothing of that
    number is claimable by anyone else meanwhile; a job released with a delay stops the train
    and keeps its place."""
    s = spool
    a = add_jobs(s, [_job("+41794", f"a{i}") for i in range(7)])
    b = add_jobs(s, [_job("+41795", "b0")])
    got = [j.id for j in s.claim("o", 10, 60, per_number=3)]
    assert got == sorted([a[0], a[1], a[2], b[0]])  # head + 2 behind it; b's head
    assert s.reopen().claim("other", 10, 60, per_number=3) == []  # a[3] waits behind the train
    s.mark_submitted_many([(a[0], ["1"]), (a[1], ["2"])])
    assert s.claim("o", 10, 60, per_number=3) == []  # a[2] still in flight
    s.release([a[2]], "o", 3600.0, "throttled")  # back, due later: it blocks the rest
    assert s.claim("o", 10, 60, per_number=3) == []
    s.release([a[2]], "o", 0.0)
    assert [j.id for j in s.claim("o", 10, 60, per_number=3)] == [a[2], a[3], a[4]]
    s.mark_submitted_many([(a[2], ["3"]), (a[3], ["4"]), (a[4], ["5"])])
    assert [j.id for j in s.claim("o", 1, 60, per_number=3)] == [a[5]]  # the claim's limit holds
    s.mark_submitted_many([(a[5], ["6"])])
    later = add_jobs(s, [_job("+41794", "later", not_before=time.time() + 3600)])
    tail = add_jobs(s, [_job("+41794", "tail")])
    # A deferred job that is not due is left out and does not block the one behind it.
    assert [j.id for j in s.claim("o", 10, 60, per_number=5)] == [a[6], tail[0]]
    assert s.get(later[0]).state == "queued"
