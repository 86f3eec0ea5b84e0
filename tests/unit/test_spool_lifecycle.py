"""Every spool backend (the `spool_factory` parameters) stores what the lifecycle rules decide
(spool/lifecycle.py), and records which provider took a job (issue 10)."""

from __future__ import annotations

import itertools

import pytest
from sms_milter.spool import lifecycle
from sms_milter.spool.base import NewJob, Spool, SubmittedItem
from spool_helpers import add_jobs


def _job(n: int, parts: int = 1, notify: str = "", sender: str = "alice@example.org",
         urls: dict[str, str] | None = None) -> NewJob:
    return NewJob(recipient=f"+4179200{n:04d}", originator="SMS", text=f"t{n}", parts=parts, account="acme",
                  notify=notify, sender=sender, urls=urls or {})


def _submit(s: Spool, jobs: list[NewJob], provider: str = "smpp") -> list[int]:
    ids = add_jobs(s, jobs)
    claimed = s.claim("o", len(ids), 60)
    assert sorted(j.id for j in claimed) == sorted(ids)
    s.store_round([SubmittedItem(jid, [f"{jid:x}{k}" for k in range(j.parts)], provider)
                   for jid, j in zip(ids, jobs, strict=True)], [])
    return ids


CASES = list(itertools.product(["", "ALWAYS", "FAILED", "NONE"], ["delivered", "buffered", "failed"]))


@pytest.mark.parametrize(("notify", "state"), CASES)
def test_receipt_state_and_owed_notifications_are_the_lifecycles(spool_factory, notify: str, state: str):
    s = spool_factory()
    urls = {"delivered": "http://127.0.0.1:9/d", "failed": "http://127.0.0.1:9/f"}
    (jid,) = _submit(s, [_job(1, notify=notify, urls=urls)])
    (out,) = s.record_receipts([(f"{jid:x}0", state, "" if state == "delivered" else "ERR")])
    assert out is not None and (out.job_id, out.state, out.changed) == (jid, state, True)
    owed = lifecycle.owed_events(state, notify, "alice@example.org", urls)
    assert out.notify is bool(owed)
    assert sorted(e.kind for e in s.due_events(100) if e.job_id == jid) == sorted(owed)
    assert (s.get(jid).done_at is not None) is lifecycle.is_final(state)


def test_a_job_of_two_parts_moves_as_job_state_says(spool_factory):
    s = spool_factory()
    (jid,) = _submit(s, [_job(2, parts=2, notify="ALWAYS")])
    seen = []
    for seq, part_state in ((0, "buffered"), (0, "delivered"), (1, "delivered")):
        (out,) = s.record_receipts([(f"{jid:x}{seq}", part_state, "")])
        seen.append(out.state)
    assert seen == ["buffered", "buffered", "delivered"]  # one part of two delivered: still buffered
    assert [e.status for e in s.due_events(100)] == ["buffered", "delivered"]
    (late,) = s.record_receipts([(f"{jid:x}1", "failed", "late")])  # final is final
    assert late.stale and s.get(jid).state == "delivered"


def test_failed_and_expired_by_the_dispatcher_owe_what_lifecycle_says(spool_factory):
    s = spool_factory()
    a, b = add_jobs(s, [_job(3, notify="FAILED"), _job(4, notify="NONE")])
    s.fail(a, "refused by the SMSC")
    s.fail(b, "refused by the SMSC")
    s.fail(a, "again", state="expired")  # already final: nothing changes, nothing more is owed
    assert [(e.job_id, e.kind, e.status) for e in s.due_events(100)] == [(a, "mail", "failed")]
    assert s.get(a).state == "failed" and s.get(a).last_error == "refused by the SMSC"


def test_the_provider_that_took_a_job_is_recorded(spool_factory):
    s = spool_factory()
    (waiting,) = add_jobs(s, [_job(5)])
    assert s.get(waiting).provider == ""  # not taken yet
    s.hold_jobs([waiting])
    a, b = _submit(s, [_job(6), _job(7)], provider="kannel")
    (c,) = add_jobs(s, [_job(8)])
    s.claim("o", 10, 60)
    s.mark_submitted_many([(c, ["c0"])])  # the plain tuple without a provider: unknown
    assert [s.get(i).provider for i in (a, b, c)] == ["kannel", "kannel", ""]
    assert s.detail(a).job.provider == "kannel"
    assert {j.id: j.provider for j in s.list_jobs()}[b] == "kannel"
    s.fail(a, "bad")
    s.retry_jobs([a])  # queued again: no provider has it until it is submitted again
    assert s.get(a).provider == ""
    (again,) = s.claim("o", 10, 60)
    s.store_round([SubmittedItem(again.id, ["a1"], "main-smsc")], [])
    assert s.get(a).provider == "main-smsc"


def test_train_stops_at_a_blocking_job_and_skips_a_deferred_one():
    from sms_milter.spool.lifecycle import train

    now = 1000.0
    f = [(2, False, 0.0, None), (3, True, now + 60, None), (4, False, 0.0, now - 1),
         (5, False, now + 5, None), (6, False, 0.0, None)]
    assert train(1, f, now, 10) == [2, 4]  # 3 deferred (skipped), 4's lease ran out, 5 not due blocks
    assert train(1, f, now, 1) == [2]
    assert train(1, [(2, False, 0.0, now + 30)], now, 10) == []  # leased elsewhere: blocks
    assert train(3, f, now, 10) == [4]
