"""Receipt matching at the spool (issue 9, item 12): message id AND handset number AND
provider; the newest unfinished part first; a receipt matching only finished parts is stale."""

from __future__ import annotations

from sms_milter.spool.base import NewJob, Spool
from spool_helpers import add_jobs, orphan_count


def _job(recipient: str) -> NewJob:
    return NewJob(recipient=recipient, originator="SMS", text="x", parts=1, account="acme")


def _sent(s: Spool, recipient: str, ref: str, provider: str = "smpp") -> int:
    (jid,) = add_jobs(s, [_job(recipient)])
    (j,) = s.claim("o", 10, 60)
    assert j.id == jid
    s.mark_submitted_many([(jid, [ref], provider)])
    return jid


def test_reused_id_matches_by_number_and_by_state(spool_factory):
    s = spool_factory()
    x_old = _sent(s, "+41791000001", "1")
    assert s.record_receipts([("1", "delivered", "", "41791000001", "smpp")])[0].changed
    y_new = _sent(s, "+41791000002", "1")  # the SMSC restarted: id 1 again, another number
    x_new = _sent(s, "+41791000001", "1")  # and again, the first number
    out = s.record_receipts([("0001", "delivered", "", "0041791000002", "smpp")])  # other writings
    assert (out[0].job_id, out[0].changed) == (y_new, True)
    out = s.record_receipts([("1", "failed", "UNDELIV", "41791000001", "smpp")])
    assert (out[0].job_id, out[0].state) == (x_new, "failed")  # not the finished x_old
    out = s.record_receipts([("1", "failed", "repeat", "41791000001", "smpp")])
    assert out[0].stale and not out[0].changed
    assert [s.get(i).state for i in (x_old, y_new, x_new)] == ["delivered", "delivered", "failed"]
    s.close()


def test_other_number_or_provider_is_kept_as_orphan_until_its_part_comes(spool_factory):
    s = spool_factory()
    a = _sent(s, "+41791000003", "77")
    assert s.record_receipts([("77", "delivered", "", "41791000004", "smpp")]) == [None]
    assert s.record_receipts([("77", "delivered", "", "41791000003", "kannel")]) == [None]
    assert s.get(a).state == "submitted" and orphan_count(s) == 2
    b = _sent(s, "+41791000004", "77")  # the part the first orphan belongs to
    assert s.get(b).state == "delivered" and s.get(a).state == "submitted"
    assert orphan_count(s) == 1  # the other provider's receipt still waits
    s.close()
