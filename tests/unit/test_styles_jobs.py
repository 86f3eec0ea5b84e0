"""Address styles behind one protocol (policy/styles/), the device table (policy/devices.py), the
one job builder (policy/jobs.py) and the ordered decision rules (policy/rules.py)."""

from __future__ import annotations

import pytest
from sms_milter import config
from sms_milter.gateway import Gateway, Message
from sms_milter.model import Account, Domain, Limits, SenderRule
from sms_milter.policy import catalogue, devices, jobs, limits, rules, styles
from sms_milter.policy.addresses import SmsTarget
from sms_milter.policy.content import MessageText
from sms_milter.policy.refusal import Refusal

_SECTIONS = {"milter": {"socket": "inet:127.0.0.1:8894"}, "spool": {"path": "/nonexistent/spool.sqlite3"},
             "provider": {"smpp": {"host": "127.0.0.1", "port": 2775, "system_id": "gw", "password": "pw"}},
             "notify": {"smtp": "127.0.0.1:25", "from": "sms-gateway@example.com"}}
TM = Domain("tm.example.com", "telemessage")
ASP = Domain("sms.example.com", "aspsms")
DOMAINS = {TM.name: TM, ASP.name: ASP}


def test_every_style_is_registered_under_its_name_and_speaks_the_protocol():
    assert set(styles.STYLES) == {"aspsms", "telemessage"}
    for name, style in styles.STYLES.items():
        assert style.name == name
        assert isinstance(style.usage("d.example"), str) and "d.example" in style.usage("d.example")
        for flag in (style.device_labels, style.sender_domains, style.latin1_only):
            assert isinstance(flag, bool)


def test_config_checks_style_against_the_registry():
    problems = []
    try:
        config.parse({**_SECTIONS, "domains": {"x.example.com": {"style": "kannel"}}})
    except config.ConfigError as e:
        problems = e.problems
    assert problems == ["domains.x.example.com.style: must be one of aspsms, telemessage, got 'kannel'"]
    for name in styles.STYLES:
        cfg = config.parse({**_SECTIONS, "domains": {"x.example.com": {"style": name}}})
        assert styles.style_of(cfg.domains["x.example.com"]) is styles.STYLES[name]


def test_devices_one_table_and_only_channels_are_accepted():
    assert list(devices.DEVICES) == ["sms", "business", "mobile", "home", "fax"]
    assert [d for d in devices.DEVICES if devices.channel_of(d)] == ["sms"]
    for name, dev in devices.DEVICES.items():
        r = styles.classify_recipient(f"41791234567@{dev.label}.tm.example.com", DOMAINS)
        if name != "sms":
            assert isinstance(r, Refusal) and r.xcode == "5.3.3" and f"the {dev.label} device" in r.text
        else:
            assert r == SmsTarget(kind="number", domain=TM, device=name, number="+41791234567")


@pytest.mark.parametrize("voice,fax,open_", [
    (False, False, {"sms"}), (True, False, {"sms", "business", "mobile", "home"}),
    (False, True, {"sms", "fax"}), (True, True, {"sms", "business", "mobile", "home", "fax"})])
def test_devices_open_by_configured_channel(voice, fax, open_):
    channels = devices.configured_channels(voice, fax)
    tm = Domain("tm.example.com", "telemessage", channels=channels)
    for name, dev in devices.DEVICES.items():
        r = styles.classify_recipient(f"41791234567@{dev.label}.tm.example.com", {tm.name: tm})
        if name in open_:
            assert r == SmsTarget(kind="number", domain=tm, device=name, number="+41791234567")
        else:
            assert isinstance(r, Refusal) and r.xcode == "5.3.3", (name, r)


def test_config_sections_open_the_channels():
    sections = {**_SECTIONS, "domains": {"tm.example.com": {"style": "telemessage"}}}
    assert config.parse(sections).domains["tm.example.com"].channels == {"sms"}
    cfg = config.parse({**sections, "voice": {}, "fax": {}})
    assert cfg.domains["tm.example.com"].channels == {"sms", "voice", "fax"}


def test_device_labels_only_where_the_style_takes_them():
    r = styles.classify_recipient("0041791234567@SMS.sms.example.com", DOMAINS)
    assert isinstance(r, Refusal) and r.xcode == "5.1.2"
    assert r.text.endswith("use 00<international number>@sms.example.com, textsms@sms.example.com or "
                           "xml@sms.example.com.")


ACME = Account(name="acme", originator="Acme", template="{subject}: {body}", max_parts=2, notify="FAILED")


def test_drafts_of_each_style():
    mt = MessageText(subject="Originator=Shop Notify=ALWAYS", body="Hello", message_id="<m@x>")
    rule = SenderRule(address="a@b.example", originator="+41760000000")
    asp = styles.STYLES["aspsms"].draft(mt, ACME, rule)
    assert asp == jobs.Draft(text="Hello", originator="Shop", notify="ALWAYS",
                             subject="Originator=Shop Notify=ALWAYS", latin1_only=True)
    tm = styles.STYLES["telemessage"].draft(MessageText("Hi", "there", None), ACME,
                                            SenderRule(domain="b.example", originator="+41760000000"))
    assert tm == jobs.Draft(text="Hi: there", originator="+41760000000", notify="FAILED", subject="Hi",
                            latin1_only=False)


def test_prepare_checks_in_one_order_then_build_makes_one_job_per_number():
    def draft(text="ok", originator="Acme", latin1_only=True):
        return jobs.Draft(text=text, originator=originator, notify="", subject="s", latin1_only=latin1_only)

    both = jobs.prepare(draft(text="\u0416" * 200, originator="not a valid originator!"), ACME)
    assert isinstance(both, Refusal) and both.xcode == "5.6.0"  # ISO-8859-1 first
    bad = jobs.prepare(draft(text="x" * 400, originator="not a valid originator!"), ACME)
    assert isinstance(bad, Refusal) and bad.xcode == "5.5.4"  # then the originator
    long = jobs.prepare(draft(text="\u0416" * 200, latin1_only=False), ACME)
    assert long == catalogue.TOO_MANY_PARTS(parts=3, max_parts=2)  # the part count
    assert jobs.prepare(draft(text="  "), ACME) == catalogue.NO_TEXT()
    ready = jobs.prepare(draft(originator="0041760000000"), ACME)
    assert isinstance(ready, jobs.Prepared) and ready.originator == "+41760000000" and ready.parts == 1
    envelope = jobs.Envelope("a@b.example", "<m>", "Q1")
    made = jobs.build(ready, ["+41791234567", "+41791234568"], "sms", envelope)
    assert [(j.recipient, j.originator, j.account, j.sender, j.message_id, j.queue_id, j.device)
            for j in made] == [("+41791234567", "+41760000000", "acme", "a@b.example", "<m>", "Q1", "sms"),
                               ("+41791234568", "+41760000000", "acme", "a@b.example", "<m>", "Q1", "sms")]


def _ask(account: Account, numbers=("+41791234567",), **kw) -> rules.Ask:
    kw.setdefault("breaker", lambda n: None)
    return rules.Ask(account=account, login=None, recipients=1, numbers=numbers, **kw)


def test_rules_are_decided_in_list_order_and_lazily():
    acc = Account(name="a", smtp_auth=("alice",), limits=Limits(deny_prefixes=("+4179",)))
    seen = [(hit.rule if hit else None, what) for hit, what in rules.hits(_ask(acc, where="recipient x"))]
    assert seen == [("smtp_auth", "recipient x"), (None, "recipient x"),
                    ("deny_prefixes", "recipient +41791234567"), (None, "recipient +41791234567")]
    called = []
    lazy = rules.hits(_ask(acc, breaker=lambda n: called.append(n)))
    next(lazy)
    assert not called  # a caller that stops at the first hit decides nothing more


def test_a_new_rule_is_one_entry_and_the_gateway_applies_it(monkeypatch):
    cfg = config.parse({**_SECTIONS, "domains": {"sms.example.com": {"style": "aspsms"}},
                        "accounts": {"acme": {"senders": ["a@client.example"]}}})

    def night(ask: rules.Ask, number: str) -> limits.Hit | None:
        return limits.Hit("night", catalogue.DENIED_PREFIX(number=number, prefix="+4179"))

    monkeypatch.setattr(rules, "NUMBER_RULES", (*rules.NUMBER_RULES, night))
    gw = Gateway(cfg, None)  # type: ignore[arg-type]  # RCPT rules need no spool
    refusal = gw.rcpt(Message(sender="a@client.example"), b"<0041791234567@sms.example.com>",
                      "0041791234567@sms.example.com")
    assert refusal == catalogue.DENIED_PREFIX(number="+41791234567", prefix="+4179")


@pytest.mark.parametrize("style", sorted(styles.STYLES))
def test_gateway_senders_by_domain_follow_the_style(style):
    cfg = config.parse({**_SECTIONS, "domains": {"d.example.com": {"style": style}},
                        "accounts": {"acme": {"senders": [{"domain": "client.example"}]}}})
    gw = Gateway(cfg, None)  # type: ignore[arg-type]
    local = "0041791234567" if style == "aspsms" else "41791234567"
    r = gw.rcpt(Message(sender="x@client.example"), b"<r>", f"{local}@d.example.com")
    assert (r is None) == styles.STYLES[style].sender_domains
