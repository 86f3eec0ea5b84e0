"""A flapping SMSC (binds, answers a few submits, drops the TCP connection, again and again),
found by an outside hostile probe: tests/smsc/server.js with --flap / --close-after-bind,
`sms-milter dispatcher` as a subprocess, its /metrics scraped over HTTP.

5. a submit left unanswered by a dropped connection "may have been sent": it counts an
   attempt (the job's backoff grows: never resent at once forever), last_error says so, and
   the provider that may have it is pinned in the spool, so a restarted dispatcher does not
   send it through another provider;
6. binds_total counts every bind attempt by result; a job no provider could take is counted
   as submits_total{result="unavailable"} under the real provider's name (never "routes");
7. an SMSC that drops every connection right after the bind gets reconnects with a growing
   (capped) pause, and rate-limited log lines, not a tight loop.
"""
from __future__ import annotations

import re
import time

import pytest
from bed import wait_until
from dispatcher_bed import job, states, wait_states
from test_providers import Bed, add, metric, smpp

pytestmark = pytest.mark.usefixtures("smsc_node")


@pytest.fixture
def pb(tmp_path, nsink):
    b = Bed(tmp_path, nsink.port)
    yield b
    b.close()


def test_flapping_smsc_counts_may_have_been_sent_as_attempts(pb):
    smsc = pb.smsc("--flap", "2")  # every session: 2 submits answered, the 3rd dropped with the connection
    numbers = [f"+4179555{i:04d}" for i in range(8)]
    ids = add(pb.spool, [job(n, f"flap {n}") for n in numbers])
    cfg = pb.config({"a": smpp(smsc)})
    d = pb.dispatcher(cfg)
    seen: dict[int, tuple[int, str]] = {}

    def watch() -> bool:  # last_error of a job back in the queue, before it is delivered
        for j in states(pb.spool, ids).values():
            if j.state == "queued" and j.last_error:
                seen.setdefault(j.id, (j.attempts, j.last_error))
        return all(j.state == "delivered" for j in states(pb.spool, ids).values())

    wait_until(watch, 90, "every job delivered through the flapping SMSC", interval=0.02, detail=pb.detail)
    done = states(pb.spool, ids)
    dropped = {r["destination_addr"] for r in smsc.records("submit_sm") if r.get("dropped")}
    assert dropped, smsc.records("submit_sm")
    for j in done.values():
        if j.recipient.lstrip("+") in dropped:
            assert j.attempts >= 2, (j, dropped)  # the unanswered submit was an attempt
    assert seen, "no job was seen back in the queue"
    for attempts, error in seen.values():
        assert "may have been sent" in error and attempts >= 1, seen
    text = pb.scrape()
    binds = len(smsc.records("bind_transceiver"))
    assert binds >= 3
    assert metric(text, "sms_milter_binds_total", provider="a", result="ok") == binds
    assert metric(text, "sms_milter_submits_total", provider="a", result="temporary") >= len(dropped)
    assert metric(text, "sms_milter_submits_total", provider="a", result="ok") == len(ids)
    # one line per cause a minute, not one per connection (quietlog)
    assert d.log().count("SMSC connection closed") <= 2, d.log()


def test_the_provider_that_may_have_a_job_is_kept_across_a_restart(pb):
    sa = pb.smsc("--flap", "0")  # a: binds, never answers a submit, drops the connection
    sb = pb.smsc()
    number = "+41795560001"
    (jid,) = add(pb.spool, [job(number, "pinned")])
    cfg = pb.config({"a": smpp(sa), "b": smpp(sb)}, routes=[{"providers": ["a", "b"]}])
    d = pb.dispatcher(cfg)

    def pinned() -> bool:
        j = states(pb.spool, [jid])[jid]
        return j.state == "queued" and j.provider == "a" and "may have been sent" in j.last_error

    wait_until(pinned, 30, "the job back in the queue, pinned to a", detail=pb.detail)
    assert d.stop() == 0
    port_a = sa.port
    sa.stop()  # a is down now: the route alone would take b
    j = states(pb.spool, [jid])[jid]
    assert j.provider == "a" and j.attempts >= 1, j
    d2 = pb.dispatcher(cfg)
    wait_until(lambda: "waiting for provider a" in states(pb.spool, [jid])[jid].last_error, 30,
               "the job waiting for a after the restart", detail=pb.detail)
    assert sb.submits(accepted_only=False) == []  # never handed to a second provider
    text = pb.scrape()
    assert metric(text, "sms_milter_submits_total", provider="a", result="unavailable") >= 1
    assert 'provider="routes"' not in text
    sa2 = pb.smsc(port=port_a)  # a is back and answers
    done = wait_states(pb.spool, [jid], {"delivered"}, timeout=60, detail=pb.detail)
    assert done[jid].provider == "a"
    assert [r["destination_addr"] for r in sa2.submits()] == [number.lstrip("+")]
    assert sb.submits(accepted_only=False) == []
    assert d2.stop() == 0


def test_smsc_dropping_every_connection_after_bind_gets_a_growing_pause(pb):
    smsc = pb.smsc("--close-after-bind")
    cfg = pb.config({"a": smpp(smsc, reconnect_min=0.2, reconnect_max=1.6)})
    d = pb.dispatcher(cfg)
    wait_until(lambda: len(smsc.records("bind_transceiver")) >= 7, 30, "seven binds", detail=pb.detail)
    time.sleep(1.0)  # let a connect that was in progress finish before the scrape
    at = [r["t"] / 1000 for r in smsc.records("bind_transceiver")]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    # 0.2 s doubling with jitter (x0.5..1) up to 1.6 s: a tight loop would show ~0 s gaps.
    assert gaps[0] < 0.5 and min(gaps[4:6]) >= 0.5, gaps
    assert max(gaps) < 3.0, gaps  # capped at reconnect_max
    text = pb.scrape()
    assert metric(text, "sms_milter_binds_total", provider="a", result="ok") >= 7
    said = r"SMSC connection closed|bound to SMSC|cool-down"
    lines = [ln for ln in d.log().splitlines() if re.search(said, ln)]
    assert len(lines) <= 6, lines  # one of each a minute (quietlog), not one per connection
    assert "dropped the connection" in d.log() and "cool-down, reconnecting in" in d.log()


def test_the_pin_is_stored_and_kept_by_both_spool_backends(spool_factory):
    """release(pin=...) keeps the provider that may have the job in its row (on the SQLite file
    and on PostgreSQL); a release without a pin keeps it; a new claim shows it."""
    s = spool_factory()
    (jid,) = add(s, [job("+41795570001", "pin")])
    (j,) = s.claim("o", 10, 60)
    assert j.provider == ""
    s.release([jid], "o", 0.0, "connection lost before the SMSC answered, may have been sent: x",
              count_attempt=True, pin="a")
    (j,) = s.claim("o", 10, 60)
    assert (j.provider, j.attempts) == ("a", 2) and "may have been sent" in j.last_error
    s.release([jid], "o", 0.0, "waiting for provider a", pin="")
    (j,) = s.claim("o", 10, 60)
    assert (j.provider, j.attempts) == ("a", 2)
    s.close()
