"""The dispatcher against a misbehaving SMSC (issue 9, items 12-15): tests/smsc/server.js
(npm smpp 0.5.1) with the options that make it misbehave, `sms-milter dispatcher` as a
subprocess, jobs put into the spool directly; every condition is polled with a timeout.
"""

from __future__ import annotations

import pytest
from bed import MailSink, wait_until
from dispatcher_bed import job, node_ready, states, wait_states
from test_dispatcher import Bed


@pytest.fixture(scope="module", autouse=True)
def _node() -> None:
    why = node_ready()
    if why:
        pytest.fail(f"the SMSC simulator cannot run: {why}", pytrace=False)


@pytest.fixture(scope="module")
def nsink():
    with MailSink() as s:
        yield s


@pytest.fixture
def tb(tmp_path, nsink):
    b = Bed(tmp_path, nsink.port)
    yield b
    b.close()


# --------------------------------------------------------------------------- 12: receipts


def test_restarted_smsc_reuses_message_ids_and_receipts_find_the_right_job(tb):
    """Ids 1 and 2 go to X and Y; the SMSC restarts and hands out 1 and 2 again, now both to Y.
    Each new receipt must reach the new job (by number: 1 was X's; by state: 2 was Y's and is
    final), and a late repeat of an old receipt must change nothing."""
    smsc = tb.start_smsc("--first-id", "1")
    port = smsc.port
    old = tb.spool.add_jobs([job("+41791330001", "old to X"), job("+41791330002", "old to Y")])
    d = tb.dispatcher()
    done = wait_states(tb.spool, old, {"delivered"}, timeout=20, detail=tb.detail)
    assert [done[i].provider_refs for i in old] == [("1",), ("2",)]
    smsc.stop()
    smsc = tb.start_smsc("--first-id", "1", "--receipt-delay", "300", port=port)
    new = tb.spool.add_jobs([job("+41791330002", "new to Y 1"), job("+41791330002", "new to Y 2")])
    done = wait_states(tb.spool, new, {"delivered"}, timeout=30, detail=tb.detail)
    assert [done[i].provider_refs for i in new] == [("1",), ("2",)]
    # A repeat of X's old receipt for id 1: only X's finished job has that id and number.
    smsc.control(command="receipt", id="1", dest="41791330001", stat="UNDELIV")
    wait_until(lambda: "matches only a finished part" in d.log(), 10, "the stale receipt logged",
               detail=tb.detail)
    assert {j.state for j in states(tb.spool, old + new).values()} == {"delivered"}
    wait_until(lambda: any(a.get("receipt") == "1" and a["status"] == 0 and a["stat"] == "UNDELIV"
                           for a in smsc.records("deliver_sm_resp")), 5, "the stale receipt acknowledged")
