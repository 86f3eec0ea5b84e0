"""The dispatcher against a misbehaving SMSC (issue 9, items 12-15): tests/smsc/server.js
(npm smpp 0.5.1) with the options that make it misbehave, `sms-milter dispatcher` as a
subprocess, jobs put into the spool directly; every condition is polled with a timeout.
"""

from __future__ import annotations

import time

import pytest
from bed import wait_until
from dispatcher_bed import job, states, wait_states
from spool_helpers import add_jobs
from test_dispatcher import Bed

# The SMSC simulator must be able to run; nsink (a mailbox for notifications) is in conftest.py.
pytestmark = pytest.mark.usefixtures("smsc_node")


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
    old = add_jobs(tb.spool, [job("+41791330001", "old to X"), job("+41791330002", "old to Y")])
    d = tb.dispatcher()
    done = wait_states(tb.spool, old, {"delivered"}, timeout=20, detail=tb.detail)
    assert [done[i].provider_refs for i in old] == [("1",), ("2",)]
    smsc.stop()
    smsc = tb.start_smsc("--first-id", "1", "--receipt-delay", "300", port=port)
    new = add_jobs(tb.spool, [job("+41791330002", "new to Y 1"), job("+41791330002", "new to Y 2")])
    done = wait_states(tb.spool, new, {"delivered"}, timeout=30, detail=tb.detail)
    assert [done[i].provider_refs for i in new] == [("1",), ("2",)]
    # A repeat of X's old receipt for id 1: only X's finished job has that id and number.
    smsc.control(command="receipt", id="1", dest="41791330001", stat="UNDELIV")
    wait_until(lambda: "matches only a finished part" in d.log(), 10, "the stale receipt logged",
               detail=tb.detail)
    assert {j.state for j in states(tb.spool, old + new).values()} == {"delivered"}
    wait_until(lambda: any(a.get("receipt") == "1" and a["status"] == 0 and a["stat"] == "UNDELIV"
                           for a in smsc.records("deliver_sm_resp")), 5, "the stale receipt acknowledged")


# --------------------------------------------------------------------------- 13: silent SMSC


def test_silent_smsc_times_out_submits_reconnects_and_says_why(tb):
    """Binds, answers enquire_link, never answers submit_sm: after submit_timeout the jobs go
    back to the queue with last_error saying so, a log line says it, and the bind is made
    again; once the SMSC answers, they are delivered."""
    smsc = tb.start_smsc("--silent")
    ids = add_jobs(tb.spool, [job(f"+4179134{i:04d}", f"silent {i}") for i in range(5)])
    d = tb.dispatcher(tb.config(submit_timeout=1, enquire_link=1))

    def all_told() -> bool:
        js = states(tb.spool, ids).values()
        return all(j.state == "queued" and "no answer from the SMSC to submit_sm within 1s" in j.last_error
                   for j in js)

    wait_until(all_told, 20, "every job back in the queue with the timeout as last_error", detail=tb.detail)
    assert "did not answer 5 submit_sm within 1.0s" in d.log()
    wait_until(lambda: len(smsc.records("bind_transceiver")) >= 2, 10, "a new bind after the timeouts",
               detail=tb.detail)
    smsc.control(silent=False)
    wait_states(tb.spool, ids, {"delivered"}, timeout=30, detail=tb.detail)


# --------------------------------------------------------------------------- 14: reconnect storm


def test_reconnect_storm_backs_off_and_logs_little(tb):
    """An SMSC that closes every connection right after the bind: binds back off exponentially
    (with jitter) to reconnect_max, and the log says so a few times, not once per cycle."""
    smsc = tb.start_smsc("--close-after-bind")
    add_jobs(tb.spool, [job(f"+4179135{i:04d}", f"storm {i}") for i in range(20)])
    d = tb.dispatcher(tb.config(reconnect_min=0.1, reconnect_max=1.0))
    wait_until(lambda: len(smsc.records("bind_transceiver")) >= 3, 15, "three binds", detail=tb.detail)
    first = smsc.records("bind_transceiver")[0]["t"] / 1000
    wait_until(lambda: time.time() - first >= 6, 15, "six seconds of storm")
    binds = [r["t"] / 1000 for r in smsc.records("bind_transceiver") if r["t"] / 1000 - first <= 6]
    # Immediate reconnects made hundreds; with backoff 0.1, 0.2, 0.4, 0.8, 1, 1, ... (x 0.5-1) about 12.
    assert 3 <= len(binds) <= 20, len(binds)
    gaps = [b - a for a, b in zip(binds, binds[1:], strict=False)]
    assert all(g >= 0.4 for g in gaps[-3:]), gaps  # at reconnect_max (jitter 0.5-1)
    assert gaps[-1] > gaps[0], gaps
    d.stop()
    lines = d.log().splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert sum("SMSC connection closed" in ln for ln in lines) <= 2, "\n".join(lines)


# --------------------------------------------------------------------------- 15: receipt never comes


def test_missing_receipt_is_asked_for_with_query_sm_and_applied(tb):
    """The SMSC sends no receipts but answers query_sm: after receipt_timeout each job is asked
    about and ends as the SMSC says (delivered, or failed for an undeliverable number)."""
    smsc = tb.start_smsc("--no-receipts", "--query-sm", "--undeliv", "41791360002")
    ids = add_jobs(tb.spool, [job("+41791360001", "query me"), job("+41791360002", "query me too"),
                             job("+41791360003", "x" * 300)])  # 2 parts: each is asked about
    d = tb.dispatcher(tb.config(receipt_timeout=2))
    wait_states(tb.spool, ids, {"submitted"}, timeout=20, detail=tb.detail)
    done = wait_states(tb.spool, ids, timeout=30, detail=tb.detail)
    assert [done[i].state for i in ids] == ["delivered", "failed", "delivered"]
    assert "query_sm stat:UNDELIV" in done[ids[1]].last_error
    refs = sorted(ref for i in ids for ref in done[i].provider_refs)

    def asked() -> list[str]:  # the simulator's log is written asynchronously: poll it
        return sorted(r["message_id"] for r in smsc.records("query_sm") if r["status"] == 0)

    wait_until(lambda: len(asked()) >= len(refs), 10, "every query_sm in the SMSC's log", detail=tb.detail)
    assert asked() == refs
    assert "the SMSC says query_sm stat:DELIVRD" in d.log()


def test_buffered_job_whose_final_receipt_never_comes_is_asked_about_too(tb):
    tb.start_smsc("--no-receipts", "--enroute", "--query-sm")
    ids = add_jobs(tb.spool, [job("+41791390001", "enroute only")])
    tb.dispatcher(tb.config(receipt_timeout=2))
    wait_states(tb.spool, ids, {"buffered", "delivered"}, timeout=20, detail=tb.detail)
    done = wait_states(tb.spool, ids, {"delivered"}, timeout=30, detail=tb.detail)
    assert done[ids[0]].state == "delivered"


def test_missing_receipt_the_smsc_cannot_tell_is_shown_in_queue_list(tb):
    """No receipts and query_sm answered ESME_RQUERYFAIL: the job stays submitted (it may still
    come), and `queue list` shows why in last_error."""
    from bed import queue_list

    smsc = tb.start_smsc("--no-receipts")
    ids = add_jobs(tb.spool, [job("+41791370001", "lost receipt")])
    cfg = tb.config(receipt_timeout=2)
    tb.dispatcher(cfg)
    wait_until(lambda: smsc.records("query_sm"), 20, "a query_sm", detail=tb.detail)

    def shown() -> dict | None:
        rows = [r for r in queue_list(cfg) if r["id"] == ids[0]]
        return rows[0] if rows and "no delivery receipt after 2s" in rows[0]["last_error"] else None

    row = wait_until(shown, 15, "last_error in queue list", detail=tb.detail)
    assert row["state"] == "submitted"
    assert "ESME_RQUERYFAIL" in row["last_error"]


# --------------------------------------------------------------------------- the new keys


def test_check_config_accepts_and_checks_the_timeouts(tmp_path):
    from bed import run_cli
    from dispatcher_bed import dispatcher_config

    ok = dispatcher_config(tmp_path, 2775, 25, smpp={"submit_timeout": 5, "receipt_timeout": 120.5},
                           name="ok.yaml")
    r = run_cli(ok, "check-config")
    assert r.returncode == 0, r.stderr
    bad = dispatcher_config(tmp_path, 2775, 25, smpp={"submit_timeout": 0, "receipt_timeout": "soon"},
                            name="bad.yaml")
    r = run_cli(bad, "check-config")
    assert r.returncode == 2
    assert "provider.smpp.submit_timeout:" in r.stderr and "provider.smpp.receipt_timeout:" in r.stderr
    assert "Traceback" not in r.stderr
