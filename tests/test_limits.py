"""Limits (abuse control) through the real peers: a private Postfix, the sms-milter process,
smtplib. Every rule with its reply class: 5xx names the rule, 4xx says when to retry.

The pure rules with an injected clock (rolling windows freeing up, month rollover) are in
tests/unit/test_limit_rules.py; SMTP AUTH binding with a real SASL Postfix in tests/test_limits_sasl.py.
"""

from __future__ import annotations

import json
import threading
import time

import bed
import pytest
from conftest import Gateway
from sms_milter.spool.base import NewJob
from sms_milter.spool.sqlite import SqliteSpool
from spool_helpers import add_jobs

pytestmark = pytest.mark.bed


def acct(name: str, **limits) -> dict:
    return {"senders": [{"address": f"{name}@client.example"}], "limits": limits}


LIMITS = {
    "limits": {"breaker": {"window": 3600, "min_jobs": 3, "failure_rate": 0.5, "cooldown": 600,
                           "prefix_digits": 5}},
    "accounts": {
        "dest": acct("dest", countries=["CH", "DE"], deny_prefixes=["+4176"]),
        "minute": acct("minute", parts_per_minute=3),
        "hour": acct("hour", parts_per_hour=3),
        "day": acct("day", parts_per_day=2),
        "month": acct("month", parts_per_month=2),
        "flood": acct("flood", per_recipient_per_hour=2),
        "rcpts": {**acct("rcpts", recipients_per_message=2), "userkey": "RC1", "password": "rcpw"},
        "ts": {**acct("ts", countries=["CH"]), "userkey": "TS1", "password": "tspw"},
        "mon": acct("mon", mode="monitor", parts_per_minute=1, countries=["CH"]),
        "dup": acct("dup"),
    },
}


@pytest.fixture(scope="module")
def lgw(tmp_path_factory, sink, notify_sink):
    g = Gateway(tmp_path_factory.mktemp("limits"), sink, notify_sink)
    g.config = bed.write_config(g.base, g.milter_port, notify_sink.port, spool_path=g.spool_path,
                                extra=LIMITS)
    g.milter = bed.Milter(g.config, g.base / "milter.log")
    with g.running():
        yield g


def msg(body: str | None = None, subject: str = "") -> bytes:
    return bed.make_message(subject, body or f"limits {bed.unique()}")


def addr(number: str) -> str:
    return f"{number}@sms.example.com"


def test_destination_rules_at_rcpt_name_the_rule_and_the_number(lgw):
    ok, ok_e164 = bed.unique_number()
    rcpts = [addr("0033612345678"), addr("0041761234567"), addr("0041900123456"), addr(ok)]
    token = bed.unique()
    r = lgw.send("dest@client.example", rcpts, msg(f"dest {token}"))
    fr, prefix, premium, good = (r["rcpt"][a] for a in rcpts)
    assert fr[0] == 550 and fr[1].startswith("5.7.1") and "countries" in fr[1] and "+33612345678" in fr[1]
    assert prefix[0] == 550 and prefix[1].startswith("5.7.1") and "deny_prefixes" in prefix[1]
    assert "+41761234567" in prefix[1]
    assert premium[0] == 550 and "number_types" in premium[1] and "premium_rate" in premium[1]
    assert good[0] == 250 and r["data"][0] == 250
    assert [j["recipient"] for j in lgw.jobs(text_contains=token)] == [ok_e164]
    log = lgw.milter.log()
    for rule in ("countries", "deny_prefixes", "number_types"):
        assert f"limit {rule} refused" in log
    assert "dest@client.example" not in log  # the secret sender address is never logged


@pytest.mark.parametrize("account,rule,cap", [("minute", "parts_per_minute", 3),
                                              ("hour", "parts_per_hour", 3), ("day", "parts_per_day", 2)])
def test_velocity_windows_exact_boundary_then_451_with_when(lgw, account, rule, cap):
    number, _ = bed.unique_number()
    sender = f"{account}@client.example"
    token = bed.unique()
    if cap == 3:  # parts, not messages: a 2-part SMS and a 1-part SMS fill the cap exactly
        bodies = [f"{token} long " + "x" * 200, f"{token} one"]
    else:
        bodies = [f"{token} a", f"{token} b"]
    for body in bodies:
        r = lgw.send(sender, [addr(number)], msg(body))
        assert r["data"][0] == 250, r
    r = lgw.send(sender, [addr(number)], msg(f"{token} over"))
    code, text = r["data"]
    assert code == 451 and text.startswith("4.7.1"), r
    assert rule in text and "frees up at" in text and "UTC" in text
    assert sum(j["parts"] for j in lgw.jobs(text_contains=token)) == cap
    assert f"limit {rule} refused" in lgw.milter.log()


def test_month_cap_is_552(lgw):
    number, _ = bed.unique_number()
    token = bed.unique()
    for i in range(2):
        assert lgw.send("month@client.example", [addr(number)], msg(f"{token} {i}"))["data"][0] == 250
    code, text = lgw.send("month@client.example", [addr(number)], msg(f"{token} over"))["data"]
    assert code == 552 and text.startswith("5.2.2") and "parts_per_month" in text
    assert len(lgw.jobs(text_contains=token)) == 2
    # stats shows the account's counted parts against its caps
    r = bed.run_cli(lgw.config, "stats", "--json")
    assert r.returncode == 0, r.stderr
    month = json.loads(r.stdout)["accounts"]["month"]
    assert month["counted_month"] == 2 and month["parts_per_month"] == 2 and month["parts_per_day"] is None
    r = bed.run_cli(lgw.config, "stats")
    assert r.returncode == 0 and "2/2" in r.stdout, r.stdout


def test_per_recipient_per_hour_floods_one_handset_only(lgw):
    number, _ = bed.unique_number()
    other, other_e164 = bed.unique_number()
    token = bed.unique()
    for i in range(2):
        assert lgw.send("flood@client.example", [addr(number)], msg(f"{token} {i}"))["data"][0] == 250
    code, text = lgw.send("flood@client.example", [addr(number)], msg(f"{token} 3"))["data"]
    assert code == 451 and text.startswith("4.7.1")
    assert "per_recipient_per_hour" in text and "frees up at" in text
    assert lgw.send("flood@client.example", [addr(other)], msg(f"{token} other"))["data"][0] == 250
    assert len(lgw.jobs(text_contains=token)) == 3


def test_recipients_per_message_at_rcpt_and_in_the_subject(lgw):
    numbers = [bed.unique_number()[0] for _ in range(3)]
    token = bed.unique()
    r = lgw.send("rcpts@client.example", [addr(n) for n in numbers], msg(f"{token} rcpt"))
    replies = [r["rcpt"][addr(n)] for n in numbers]
    assert [c for c, _ in replies] == [250, 250, 550]
    assert replies[2][1].startswith("5.5.3") and "recipients_per_message" in replies[2][1]
    assert r["data"][0] == 250 and len(lgw.jobs(text_contains=token)) == 2
    subject = "U=RC1 P=rcpw " + " ".join(f"R={n}" for n in numbers)
    r = lgw.send("rcpts@client.example", ["textsms@sms.example.com"], msg(f"{token} textsms", subject))
    assert r["data"][0] == 550 and r["data"][1].startswith("5.5.3")
    assert "recipients_per_message" in r["data"][1]
    assert "rcpw" not in r["data"][1]
    assert len(lgw.jobs(text_contains=token)) == 2


def test_textsms_destination_decided_at_end_of_message(lgw):
    token = bed.unique()
    r = lgw.send("anyone@client.example", ["textsms@sms.example.com"],
                 msg(f"{token}", "U=TS1 P=tspw R=0033612345678"))
    code, text = r["data"]
    assert code == 550 and text.startswith("5.7.1") and "countries" in text and "+33612345678" in text
    assert "tspw" not in text and "TS1" not in text
    assert lgw.jobs(text_contains=token) == []


def test_monitor_mode_refuses_nothing_and_logs_what_it_would_have_done(lgw):
    token = bed.unique()
    ch, _ = bed.unique_number()
    for n in ("0033612345678", ch, ch):
        r = lgw.send("mon@client.example", [addr(n)], msg(f"{token} {n} {bed.unique()}"))
        assert r["rcpt"][addr(n)][0] == 250 and r["data"][0] == 250, r
    assert len(lgw.jobs(text_contains=token)) == 3
    log = lgw.milter.log()
    assert "limit countries (monitor mode, not enforced) would refuse" in log
    assert "limit parts_per_minute (monitor mode, not enforced) would refuse" in log


def test_identical_text_to_the_same_number_is_one_sms(lgw):
    """A resend that differs only in Message-ID (a script's retry) is one SMS, not two."""
    number, e164 = bed.unique_number()
    body = f"disk full {bed.unique()}"
    for _ in range(2):
        r = lgw.send("dup@client.example", [addr(number)], bed.make_message("", body))  # a new Message-ID
        assert r["data"][0] == 250
    assert len(lgw.jobs(recipient=e164)) == 1
    other, other_e164 = bed.unique_number()
    assert lgw.send("dup@client.example", [addr(other)], bed.make_message("", body))["data"][0] == 250
    assert len(lgw.jobs(recipient=other_e164)) == 1  # another number still gets it


def test_circuit_breaker_pauses_a_failing_prefix(lgw):
    # The dispatcher records outcomes in the spool: 3 of 4 recent SMS to +41774... failed.
    spool = SqliteSpool(lgw.spool_path)
    try:
        ids = add_jobs(spool, [NewJob(recipient=f"+417741234{i:02d}", originator="SMS", text="x", parts=1,
                                     account="dup") for i in range(4)])
        for jid in ids[:3]:
            spool.fail(jid, "unknown subscriber")
        spool.fail(ids[3], "", state="delivered")
    finally:
        spool.close()
    token = bed.unique()

    def paused():
        r = lgw.send("dup@client.example", [addr("0041774123499")], msg(f"{token} {bed.unique()}"))
        return r["rcpt"][addr("0041774123499")]

    # The milter re-reads finished jobs every few seconds: poll until it has seen them.
    code, text = bed.wait_until(lambda: (lambda r: r if r[0] != 250 else None)(paused()), 30,
                                "the breaker to open")
    assert code == 451 and text.startswith("4.7.1") and "circuit breaker" in text and "reopens at" in text
    ok, _ = bed.unique_number()  # +4179...: another prefix is not paused
    assert lgw.send("dup@client.example", [addr(ok)], msg(f"{token} ok"))["data"][0] == 250
    assert "limit breaker: circuit breaker open for +41774" in lgw.milter.log()


# -- two milters on one spool ---------------------------------------------------------------
def test_two_milters_on_one_spool_share_the_counters(tmp_path_factory, sink, notify_sink):
    """Two milter processes (each behind its own Postfix) race for the last slots of one account:
    exactly the cap is accepted, the rest gets 451, and the spool holds exactly the cap."""
    base = tmp_path_factory.mktemp("race")
    spool_path = base / "spool.sqlite3"
    # A generous spool_timeout: on a loaded machine a commit waiting for the other milter's lock
    # must not turn into "spool unavailable" (that 451 is not the limit's).
    extra = {"accounts": {"race": acct("race", parts_per_hour=12)}, "milter": {"spool_timeout": 20}}
    gws = []
    try:
        for i in range(2):
            port = bed.free_port()
            cfg = bed.write_config(base / f"m{i}", port, notify_sink.port, spool_path=spool_path, extra=extra)
            m = bed.Milter(cfg, base / f"m{i}" / "milter.log").start()
            pf = bed.Postfix(None, sink.port, f"inet:127.0.0.1:{port}").start()
            gws.append((m, pf))
        token = bed.unique()
        results: list[tuple[int, str]] = []
        lock = threading.Lock()

        def client(pf: bed.Postfix, k: int) -> None:
            for j in range(5):
                number, _ = bed.unique_number()
                r = bed.smtp_send(pf.port, "race@client.example", [addr(number)], msg(f"{token} {k} {j}"))
                with lock:
                    results.append(r["data"] if r["data"] else r["rcpt"][addr(number)])

        threads = [threading.Thread(target=client, args=(gws[k % 2][1], k)) for k in range(4)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert time.monotonic() - start < 120
        assert sorted(c for c, _ in results) == [250] * 12 + [451] * 8, results
        assert all("parts_per_hour" in t for c, t in results if c == 451), results
        jobs = bed.queue_list(base / "m0" / "sms-milter.yaml")
        assert len([j for j in jobs if token in j["text"]]) == 12
        # Both milters answered (each took part in the race).
        assert all("accepted" in m.log() for m, _ in gws)
    finally:
        for m, pf in gws:
            pf.stop()
            m.stop()


def test_recipients_per_message_counts_rcpts_and_subject_together(lgw):
    """number@ RCPTs and textsms@ R= are one message: their unique numbers count against one limit."""
    (n1, _), (n2, _), (n3, _), (n4, _) = (bed.unique_number() for _ in range(4))
    token = bed.unique()
    rcpts = ["textsms@sms.example.com", addr(n1), addr(n2)]
    r = lgw.send("rcpts@client.example", rcpts, msg(f"{token} sum", f"U=RC1 P=rcpw R={n3} R={n4}"))
    assert [r["rcpt"][a][0] for a in rcpts] == [250, 250, 250]
    assert r["data"][0] == 550 and r["data"][1].startswith("5.5.3"), r
    assert "recipients_per_message allows 2" in r["data"][1] and "rcpw" not in r["data"][1]
    assert lgw.jobs(text_contains=token) == []
    # The same numbers in both places are one SMS each: 2 unique, within the limit.
    r = lgw.send("rcpts@client.example", rcpts, msg(f"{token} same", f"U=RC1 P=rcpw R={n1} R=+{n2[2:]}"))
    assert r["data"][0] == 250, r
    assert len(lgw.jobs(text_contains=token)) == 2


def _xml_send(numbers: list[str], token: str) -> bytes:
    recips = "".join(f"<Recipient><PhoneNumber>{n}</PhoneNumber></Recipient>" for n in numbers)
    body = ('<?xml version="1.0" encoding="ISO-8859-1"?>\r\n<aspsms>\r\n<Userkey>RC1</Userkey>\r\n'
            f"<Password>rcpw</Password>\r\n{recips}<MessageData>{token}</MessageData>\r\n"
            "<Action>SendTextSMS</Action>\r\n</aspsms>\r\n")
    return bed.make_message("", body)


def test_recipients_per_message_xml_alone_keeps_its_own_limit(lgw):
    """xml@ alone: its own 1,000, not the account's recipients_per_message (2). (Beside number@
    or textsms@ the XML body is refused as markup in the SMS text before any limit.)"""
    (n1, _), (n2, _), (n3, _) = (bed.unique_number() for _ in range(3))
    token = bed.unique()
    r = lgw.send("rcpts@client.example", ["xml@sms.example.com"], _xml_send([n1, n2, n3], token))
    assert r["data"][0] == 250, r
    assert len(lgw.jobs(text_contains=token)) == 3
