"""Limits (abuse control): the pure rules of policy/limits.py and the spool's counters, driven by
an injectable clock (the spool's `clock`, the gateway's `clock`): no sleeps.

The real-peer tests (Postfix + smtplib) are in tests/test_limits.py.
"""

from __future__ import annotations

import calendar
import threading
import time
from pathlib import Path

import pytest
from sms_milter import config, model
from sms_milter.gateway import Gateway, Message
from sms_milter.model import BreakerConfig
from sms_milter.policy import limits
from sms_milter.spool.base import AddRequest, LimitPlan, LimitUsage, NewJob
from sms_milter.spool.sqlite import SqliteSpool
from spool_helpers import add_jobs

T0 = float(calendar.timegm((2026, 12, 1, 10, 0, 0, 0, 0, 0)))  # a Tuesday, 10:00:00 UTC


# The sections every configuration needs (check-config refuses a file without them).
_SECTIONS = {"milter": {"socket": "inet:127.0.0.1:8894"}, "spool": {"path": "/nonexistent/spool.sqlite3"},
             "provider": {"smpp": {"host": "127.0.0.1", "port": 2775, "system_id": "gw", "password": "pw"}},
             "notify": {"smtp": "127.0.0.1:25", "from": "sms-gateway@example.com"}}


def _parse(data: dict) -> model.Config:
    return config.parse({**_SECTIONS, **data})



class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lim(**kw) -> model.Limits:
    return model.Limits(**kw)


def job(recipient: str = "+41791234567", parts: int = 1, account: str = "acme", text: str = "x") -> NewJob:
    return NewJob(recipient=recipient, originator="SMS", text=text, parts=parts, account=account)


# -- destination rules --------------------------------------------------------------------------
def test_deny_prefixes_names_the_rule_and_the_number():
    hit = limits.destination_hit(lim(deny_prefixes=("+882", "+4176")), "+41761234567")
    assert hit is not None and hit.rule == "deny_prefixes"
    assert (hit.refusal.code, hit.refusal.xcode) == ("550", "5.7.1")
    assert "+41761234567" in hit.refusal.text and "deny_prefixes" in hit.refusal.text
    assert limits.destination_hit(lim(deny_prefixes=("+882", "+4176")), "+41791234567") is None


def test_countries_allowlist():
    rule = lim(countries=("CH", "DE"))
    assert limits.destination_hit(rule, "+41791234567") is None
    assert limits.destination_hit(rule, "+4915112345678") is None
    hit = limits.destination_hit(rule, "+33612345678")
    assert hit is not None and hit.rule == "countries" and "FR" in hit.refusal.text
    assert hit.refusal.code == "550" and "+33612345678" in hit.refusal.text
    assert limits.destination_hit(lim(), "+33612345678") is None  # absent: every country


def test_number_types_refuse_premium_rate_unless_listed():
    premium = "+41900123456"  # Swiss 0900: premium rate
    hit = limits.destination_hit(lim(), premium)
    assert hit is not None and hit.rule == "number_types" and "premium_rate" in hit.refusal.text
    assert limits.destination_hit(lim(number_types=("mobile", "premium_rate")), premium) is None
    assert limits.destination_hit(lim(number_types=("mobile",)), "+41791234567") is None
    fixed = limits.destination_hit(lim(number_types=("mobile",)), "+41441234567")
    assert fixed is not None and "fixed_line" in fixed.refusal.text


def test_recipients_per_message_boundary():
    assert limits.recipients_hit(lim(recipients_per_message=3), 3) is None
    hit = limits.recipients_hit(lim(recipients_per_message=3), 4)
    assert hit is not None and (hit.refusal.code, hit.refusal.xcode) == ("550", "5.5.3")
    assert "recipients_per_message" in hit.refusal.text and "3" in hit.refusal.text


def test_smtp_auth_binding():
    acc = model.Account(name="acme", smtp_auth=("alice", "monitor"))
    assert limits.smtp_auth_hit(acc, "alice") is None
    for login in (None, "", "mallory"):
        hit = limits.smtp_auth_hit(acc, login)
        assert hit is not None and hit.rule == "smtp_auth"
        assert (hit.refusal.code, hit.refusal.xcode) == ("550", "5.7.1")
        assert "mallory" not in hit.refusal.text
    assert limits.smtp_auth_hit(model.Account(name="open"), None) is None


# -- velocity and month caps through the spool's commit (clock driven) -------------------------
class Counted:
    """A spool whose commits carry a LimitPlan deciding with `rule` for every account."""

    def __init__(self, path: Path, rule: model.Limits):
        self.clock = Clock()
        self.spool = SqliteSpool(path / "spool.sqlite3")
        self.spool.clock = self.clock
        self.rule = rule

    def decide(self, account: str, usage: LimitUsage, parts: int, per: dict[str, int]):
        return limits.usage_hit(self.rule, usage, parts, per)

    def send(self, parts: int = 1, recipient: str = "+41791234567", text: str | None = None):
        req = AddRequest(None, [job(recipient, parts, text=text or f"t{self.clock.t}")], 0.0, [],
                         limits=LimitPlan(decide=self.decide))
        self.spool.commit_now([req])
        assert req.error is None
        assert req.result is not None
        return req.result.refused  # None: committed

    def jobs(self) -> int:
        return len(self.spool.list_jobs())


@pytest.mark.parametrize("key,window", [("parts_per_minute", 60), ("parts_per_hour", 3600),
                                        ("parts_per_day", 86400)])
def test_rolling_window_boundary_and_freeing_up(tmp_path, key, window):
    width = 3600 if key == "parts_per_day" else 10  # counter slots: 10 s (minute, hour), 1 h (day)
    c = Counted(tmp_path, lim(**{key: 5}))
    assert c.send(parts=2) is None
    c.clock.t += width
    assert c.send(parts=3) is None  # exactly 5: allowed
    c.clock.t += 1
    hit = c.send(parts=1)  # the 6th part
    assert hit is not None and hit.rule == key
    assert (hit.refusal.code, hit.refusal.xcode) == ("451", "4.7.1")
    assert key in hit.refusal.text and "frees up at" in hit.refusal.text and "UTC" in hit.refusal.text
    assert c.jobs() == 2  # nothing of the refused message was written
    # Still closed shortly before the first commit leaves the window ...
    c.clock.t = T0 + window - 1
    assert c.send(parts=1) is not None
    # ... the first commit's 2 parts free up once its slot has left the window.
    c.clock.t = T0 + window + width
    assert c.send(parts=2) is None
    assert c.send(parts=1) is not None  # full again: 3 + 2
    assert c.jobs() == 3


def test_frees_up_time_is_when_enough_parts_leave(tmp_path):
    c = Counted(tmp_path, lim(parts_per_hour=3))
    for _ in range(3):
        assert c.send() is None
        c.clock.t += 600
    hit = c.send()
    # The first part (slot T0) leaves the window at T0 + 10 + 3600.
    assert hit is not None and "2026-12-01 11:00:10 UTC" in hit.refusal.text


def test_message_larger_than_the_cap_is_552(tmp_path):
    c = Counted(tmp_path, lim(parts_per_minute=3))
    hit = c.send(parts=4)
    assert hit is not None and (hit.refusal.code, hit.refusal.xcode) == ("552", "5.2.2")


def test_month_cap_552_and_resets_next_month(tmp_path):
    c = Counted(tmp_path, lim(parts_per_month=4))
    c.clock.t = float(calendar.timegm((2026, 12, 30, 12, 0, 0, 0, 0, 0)))
    assert c.send(parts=4) is None
    hit = c.send(parts=1)
    assert hit is not None and hit.rule == "parts_per_month"
    assert (hit.refusal.code, hit.refusal.xcode) == ("552", "5.2.2")
    assert "2027-01-01 00:00:00 UTC" in hit.refusal.text
    c.clock.t = float(calendar.timegm((2027, 1, 1, 0, 0, 1, 0, 0, 0)))
    assert c.send(parts=4) is None


def test_per_recipient_per_hour(tmp_path):
    c = Counted(tmp_path, lim(per_recipient_per_hour=2))
    assert c.send(recipient="+41791111111") is None
    assert c.send(recipient="+41791111111") is None
    hit = c.send(recipient="+41791111111")
    assert hit is not None and hit.rule == "per_recipient_per_hour" and "+41791111111" in hit.refusal.text
    assert hit.refusal.code == "451"
    assert c.send(recipient="+41792222222") is None  # another handset is not flooded
    c.clock.t += 3600 + 60
    assert c.send(recipient="+41791111111") is None


def test_one_batch_counts_its_own_messages(tmp_path):
    """Several messages in ONE transaction (group commit): the later ones see the earlier ones."""
    c = Counted(tmp_path, lim(parts_per_hour=3))
    reqs = [AddRequest(None, [job(text=f"b{i}")], 0.0, [], limits=LimitPlan(decide=c.decide))
            for i in range(5)]
    c.spool.commit_now(reqs)
    assert [r.result.refused is None for r in reqs] == [True, True, True, False, False]
    assert c.jobs() == 3


def test_two_spool_connections_racing_for_the_last_slot(tmp_path):
    """Two processes' spools on one file (here two connections, threads): exactly the cap passes."""
    rule = lim(parts_per_hour=10)
    a, b = Counted(tmp_path, rule), Counted(tmp_path, rule)
    results: list[object] = []
    lock = threading.Lock()

    def run(c: Counted, n: int) -> None:
        for i in range(n):
            r = c.send(text=f"{id(c)}-{i}")
            with lock:
                results.append(r)

    ts = [threading.Thread(target=run, args=(x, 8)) for x in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(r is None for r in results) == 10
    assert a.jobs() == 10


def test_identical_sms_within_the_window_is_one_job(tmp_path):
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    clock = Clock()
    spool.clock = clock

    def send(text: str, numbers: tuple[str, ...]):
        jobs = [job(n, text=text) for n in numbers]
        plan = LimitPlan(dedupe_keys=tuple(f"{n}|{text}" for n in numbers), dedupe_ttl=600)
        req = AddRequest(None, jobs, 0.0, [], limits=plan)
        spool.commit_now([req])
        return req.result

    first = send("disk full", ("+41791111111",))
    again = send("disk full", ("+41791111111",))
    assert again.duplicate and again.job_ids == first.job_ids
    mixed = send("disk full", ("+41791111111", "+41792222222"))  # one new number: only it is added
    assert not mixed.duplicate and len(mixed.job_ids) == 1
    clock.t += 601
    assert not send("disk full", ("+41791111111",)).duplicate  # the window is over
    assert len(spool.list_jobs()) == 3


def test_account_usage_for_stats(tmp_path):
    c = Counted(tmp_path, lim())
    c.send(parts=3)
    c.clock.t += 86400  # tomorrow, same month
    c.send(parts=2)
    (u,) = c.spool.account_usage(c.clock.t)
    assert (u.account, u.today, u.month) == ("acme", 2, 5)


# -- the circuit breaker -------------------------------------------------------------------------
def test_breaker_trips_on_failure_rate_and_reopens_after_cooldown():
    cfg = BreakerConfig(window=3600, min_jobs=4, failure_rate=0.5, cooldown=600, prefix_digits=3)
    state, tripped = limits.breaker_update(cfg, limits.EMPTY_BREAKER, {"+882": (3, 3), "+417": (10, 1)}, T0)
    assert tripped == [] and limits.breaker_hit(state, "+88212345678", T0) is None  # too few jobs
    state, tripped = limits.breaker_update(cfg, state, {"+882": (4, 2), "+417": (10, 1)}, T0)
    assert tripped == ["+882"]
    hit = limits.breaker_hit(state, "+88212345678", T0 + 1)
    assert hit is not None and hit.rule == "breaker"
    assert (hit.refusal.code, hit.refusal.xcode) == ("451", "4.7.1")
    assert "reopens at" in hit.refusal.text
    assert limits.breaker_hit(state, "+41791234567", T0 + 1) is None
    assert limits.breaker_hit(state, "+88212345678", T0 + 601) is None  # cool-down over
    state, _ = limits.breaker_update(cfg, state, {}, T0 + 601)
    assert state.closed_at["+882"] == T0 + 600 and not state.open


def test_gateway_breaker_reads_finished_jobs_from_the_spool(tmp_path):
    cfg = _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                        "accounts": {"acme": {"senders": ["a@client.example"]}},
                        "limits": {"breaker": {"min_jobs": 3, "failure_rate": 0.6, "cooldown": 300,
                                               "prefix_digits": 4}}})
    spool = SqliteSpool(tmp_path / "spool.sqlite3")
    t0 = time.time()  # the spool stamps done_at with the real time
    clock = Clock(t0)
    gw = Gateway(cfg, spool, clock=clock)
    msg = Message(sender="a@client.example")
    assert gw.rcpt(msg, b"<0041781234567@sms.example.com>", "0041781234567@sms.example.com") is None
    # The dispatcher records outcomes: 3 of 4 to +4178 failed.
    ids = add_jobs(spool, [job(f"+417812345{i:02d}") for i in range(4)])
    for jid in ids[:3]:
        spool.fail(jid, "unknown subscriber")
    spool.fail(ids[3], "", state="delivered")
    clock.t = t0 + 5  # the breaker's next look at the spool
    msg = Message(sender="a@client.example")
    refusal = gw.rcpt(msg, b"<0041781234599@sms.example.com>", "0041781234599@sms.example.com")
    assert refusal is not None and refusal.code == "451" and "circuit breaker" in refusal.text
    assert gw.rcpt(msg, b"<0041791234599@sms.example.com>", "0041791234599@sms.example.com") is None
    clock.t = t0 + 5 + 301  # cool-down over; the old failures count no more
    assert gw.rcpt(msg, b"<0041781234598@sms.example.com>", "0041781234598@sms.example.com") is None


def test_config_keys_and_problems():
    cfg = _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                        "limits": {"parts_per_hour": 5, "countries": ["ch", "DE"], "deny_prefixes": ["+882"]},
                        "accounts": {"acme": {"smtp_auth": ["alice"], "limits": {"parts_per_hour": 7,
                                                                                  "mode": "monitor"}},
                                     "other": {}}})
    assert cfg.accounts["acme"].limits.parts_per_hour == 7 and cfg.accounts["acme"].limits.monitor
    assert cfg.accounts["acme"].limits.countries == ("CH", "DE")  # the defaults underneath
    assert cfg.accounts["other"].limits.parts_per_hour == 5 and cfg.accounts["acme"].smtp_auth == ("alice",)
    assert cfg.breaker is None  # off by default
    with pytest.raises(config.ConfigError) as e:
        _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                      "limits": {"mode": "off", "countries": ["CHE"], "number_types": ["cheap"],
                                 "deny_prefixes": [882]},
                      "accounts": {"acme": {"smtp_auth": "alice", "limits": {"parts_per_day": -1}}}})
    text = str(e.value)
    for path in ("limits.mode", "limits.countries", "limits.number_types", "limits.deny_prefixes",
                 "accounts.acme.smtp_auth", "accounts.acme.limits.parts_per_day"):
        assert path in text


def test_smtp_auth_login_with_a_realm():
    """Cyrus SASL reports the login as alice@realm: a bound entry without a realm matches it."""
    assert limits.login_bound("alice@mx.example", ("alice",))
    assert limits.login_bound("alice@mx.example", ("alice@mx.example",))
    assert not limits.login_bound("alice@mx.example", ("alice@other.example",))
    assert not limits.login_bound("alicex", ("alice",)) and not limits.login_bound("Alice", ("alice",))


def _gateway(tmp_path: Path, **account_limits) -> Gateway:
    cfg = _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                        "accounts": {"acme": {"senders": ["a@client.example"], "limits": account_limits}}})
    return Gateway(cfg, SqliteSpool(tmp_path / "spool.sqlite3"))


def test_xml_keeps_its_own_recipient_limit_textsms_does_not(tmp_path):
    gw = _gateway(tmp_path, recipients_per_message=2)
    jobs = [job(f"+4179123450{i}") for i in range(3)]
    plan = gw.limits.eom(Message(), jobs, [0, 1, 2], xml_jobs=3)  # three xml@ recipients
    assert isinstance(plan, LimitPlan)
    refused = gw.limits.eom(Message(), jobs, [0, 1, 2], xml_jobs=0)  # three textsms@ R=
    assert not isinstance(refused, LimitPlan) and refused is not None and refused.xcode == "5.5.3"


def test_identical_seconds_zero_turns_the_identical_sms_rule_off(tmp_path):
    on = _gateway(tmp_path / "on").limits.eom(Message(), [job()], [0])
    off = _gateway(tmp_path / "off", identical_seconds=0).limits.eom(Message(), [job()], [0])
    assert isinstance(on, LimitPlan) and isinstance(off, LimitPlan)
    assert on.dedupe_keys and on.dedupe_keys[0].startswith("600:")
    assert off.dedupe_keys == ()


def test_usage_report_for_stats(tmp_path):
    cfg = _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                        "limits": {"parts_per_month": 1000},
                        "accounts": {"acme": {"limits": {"parts_per_day": 200}}, "idle": {}}})
    c = Counted(tmp_path, lim())
    c.send(parts=3)
    rows = limits.usage_report(cfg.accounts, c.spool.account_usage(c.clock.t))
    assert rows == [
        {"account": "acme", "parts_today": 3, "parts_month": 3, "parts_per_day": 200, "parts_per_month": 1000,
         "mode": "enforce"},
        {"account": "idle", "parts_today": 0, "parts_month": 0, "parts_per_day": None,
         "parts_per_month": 1000, "mode": "enforce"},
    ]


def test_one_batch_per_recipient_and_requests_without_a_decision(tmp_path):
    """In one transaction: a request counted without a decision (an account with no caps, say)
    still counts for a later request's per-recipient and hourly check."""
    c = Counted(tmp_path, lim(per_recipient_per_hour=3, parts_per_hour=5))
    assert c.send(recipient="+41791111111") is None  # one part there from an earlier commit
    one, two = "+41791111111", "+41792222222"
    decided = LimitPlan(decide=c.decide)
    reqs = [AddRequest(None, [job(n, text=f"b{i}")], 0.0, [], limits=LimitPlan() if i == 1 else decided)
            for i, n in enumerate((one, one, one, two, two, two))]
    c.spool.commit_now(reqs)
    # +41791111111: 1 earlier + b0 + b1 (undecided, still counted) = 3, so b2 is refused;
    # the hour: 3 + b3 + b4 = 5, so b5 is refused.
    assert [r.result.refused is None for r in reqs] == [True, True, False, True, True, False]
    refused = [r.result.refused.rule for r in reqs if r.result.refused is not None]
    assert refused == ["per_recipient_per_hour", "parts_per_hour"]


def test_global_monitor_mode_applies_to_every_account_unless_overridden():
    cfg = _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                        "limits": {"mode": "monitor", "countries": ["CH"]},
                        "accounts": {"a": {}, "b": {"limits": {"mode": "enforce"}}}})
    assert cfg.accounts["a"].limits.monitor and not cfg.accounts["b"].limits.monitor
    gw = Gateway(cfg, None)  # type: ignore[arg-type]  # RCPT rules need no spool
    assert gw.limits.hit(Message(), cfg.accounts["a"], limits.destination_hit(cfg.accounts["a"].limits,
                                                                               "+33612345678")) is None
    refusal = gw.limits.hit(Message(), cfg.accounts["b"], limits.destination_hit(cfg.accounts["b"].limits,
                                                                                  "+33612345678"))
    assert refusal is not None and refusal.code == "550"


def test_metrics_count_refusals_and_monitor_hits():
    from sms_milter import metrics

    def value(rule: str, mode: str) -> float:
        labels = {"rule": rule, "mode": mode}
        return metrics.REGISTRY.get_sample_value("sms_milter_limit_hits_total", labels) or 0

    cfg = _parse({"domains": {"sms.example.com": {"style": "aspsms"}},
                        "accounts": {"m": {"limits": {"mode": "monitor", "countries": ["CH"]}},
                                     "e": {"limits": {"countries": ["CH"]}}}})
    gw = Gateway(cfg, None)  # type: ignore[arg-type]
    before = value("countries", "monitor"), value("countries", "enforce")
    for name in ("m", "e"):
        acc = cfg.accounts[name]
        gw.limits.hit(Message(), acc, limits.destination_hit(acc.limits, "+33612345678"))
    assert (value("countries", "monitor"), value("countries", "enforce")) == (before[0] + 1, before[1] + 1)
