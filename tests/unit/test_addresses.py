from __future__ import annotations

import pytest
from sms_milter.model import Domain
from sms_milter.policy.addresses import (
    SmsTarget,
    normalize_originator,
    originator_problem,
    originator_wire,
    parse_number,
)
from sms_milter.policy.refusal import Refusal
from sms_milter.policy.styles import classify_recipient

ASP = Domain(name="sms.example.com", style="aspsms")
TM = Domain(name="tm.example.com", style="telemessage")
DOMAINS = {ASP.name: ASP, TM.name: TM}


@pytest.mark.parametrize("value", ["SMS", "ACME Corp", "a", "Bank-1_2.x", "ABCDEFGHIJK", "+41760000000",
                                   "0041760000000", "41760000000", "123", "+123456789012345"])
def test_valid_originators(value: str) -> None:
    assert originator_problem(value) is None


@pytest.mark.parametrize("value", ["", "ABCDEFGHIJKL", "12", "   ", "._-", "Zürich", "+1234567890123456",
                                   "+41 76 000", "a@b", "+ABC"])
def test_invalid_originators(value: str) -> None:
    problem = originator_problem(value)
    shown = value.replace("ü", "<U+00FC LATIN SMALL LETTER U WITH DIAERESIS>")  # never raw non-ASCII
    assert problem is not None and problem.startswith(f"'{shown}' is not a valid originator")


def test_originator_problem_message() -> None:
    assert originator_problem("ABCDEFGHIJKL") == (
        "'ABCDEFGHIJKL' is not a valid originator: use at most 11 letters/digits (at least one letter) "
        "or a phone number")


def test_normalize_and_wire() -> None:
    assert normalize_originator("0041760000000") == "+41760000000"
    assert normalize_originator("+41760000000") == "+41760000000"
    assert normalize_originator("ACME") == "ACME"
    assert originator_wire("+41760000000") == (1, 1, "41760000000")
    assert originator_wire("0041760000000") == (1, 1, "41760000000")
    assert originator_wire("ACME Corp") == (5, 0, "ACME Corp")


def test_not_sms_domain() -> None:
    assert classify_recipient("joe@example.com", DOMAINS) is None
    assert classify_recipient("joe@notsms.example.com", DOMAINS) is None  # a suffix, not a label
    assert classify_recipient("joe@sms.example.com.evil", DOMAINS) is None
    assert classify_recipient("no-at-sign", DOMAINS) is None


@pytest.mark.parametrize("address", [
    "@sms.example.com", "0041791234567@other.sms.example.com", "0041791234567@sub.SMS.example.com.",
    '""@sms.example.com', '"0041791234567"@sms.example.com', "0041791234567.@sms.example.com",
    "17816170123@x.SMS.tm.example.com", "@tm.example.com", "17816170123@a.b.tm.example.com..",
    " @sms.example.com", "0041791234567@sms.example.com..",
])
def test_odd_addresses_at_an_sms_domain_are_never_mail(address: str) -> None:
    """Issue 9 item 5: any address whose domain is, or ends in, an SMS domain is an SMS
    address: valid or refused with a 550 naming it, never None (relayed as mail)."""
    got = classify_recipient(address, DOMAINS)
    assert got is not None
    if isinstance(got, Refusal):
        assert got.code == "550" and address.strip() in got.text
    else:  # the trailing dots are only spelling
        assert got.number == "+41791234567"


def test_aspsms_number_case_and_trailing_dot() -> None:
    assert classify_recipient("0041791234567@SMS.Example.COM.", DOMAINS) == SmsTarget(
        kind="number", domain=ASP, device="sms", number="+41791234567")


@pytest.mark.parametrize("local,kind", [("textsms", "textsms"), ("TextSMS", "textsms"), ("XML", "xml")])
def test_aspsms_special(local: str, kind: str) -> None:
    assert classify_recipient(f"{local}@sms.example.com", DOMAINS) == SmsTarget(kind=kind, domain=ASP)


def test_aspsms_plus_refused() -> None:
    assert classify_recipient("+41791234567@sms.example.com", DOMAINS) == Refusal(
        "550", "5.1.3", "Recipient +41791234567@sms.example.com: write the number with 00 instead of + "
                        "(0041791234567@sms.example.com).")


def test_aspsms_other_local_part() -> None:
    assert classify_recipient("joe@sms.example.com", DOMAINS) == Refusal(
        "550", "5.1.3", "Recipient joe@sms.example.com is not an SMS address of sms.example.com: use "
                        "00<international number>@sms.example.com, textsms@sms.example.com or "
                        "xml@sms.example.com.")
    r = classify_recipient("41791234567@sms.example.com", DOMAINS)
    assert isinstance(r, Refusal) and r.xcode == "5.1.3"


def test_aspsms_invalid_number() -> None:
    assert classify_recipient("0041790@sms.example.com", DOMAINS) == Refusal(
        "550", "5.1.1", "Recipient 0041790@sms.example.com: 41790 is not a valid international phone number.")
    r = classify_recipient("000041791234567@sms.example.com", DOMAINS)
    assert isinstance(r, Refusal) and r.xcode == "5.1.1"


def test_telemessage_plain_and_devices() -> None:
    expected = SmsTarget(kind="number", domain=TM, device="sms", number="+17816170000")
    assert classify_recipient("1-781-6170000@tm.example.com", DOMAINS) == expected
    assert classify_recipient("17816170000@SMS.tm.example.com", DOMAINS) == expected
    assert classify_recipient("0017816170000@sms.TM.example.com", DOMAINS) == expected


def test_telemessage_unknown_device() -> None:
    assert classify_recipient("17816170000@Pager.tm.example.com", DOMAINS) == Refusal(
        "550", "5.1.1", "Recipient 17816170000@Pager.tm.example.com: unknown device 'Pager'; use SMS, "
                        "Business, Mobile, Home or Fax, or no device for SMS.")


@pytest.mark.parametrize("label,canonical", [("Fax", "Fax"), ("business", "Business"), ("MOBILE", "Mobile"),
                                             ("home", "Home")])
def test_telemessage_device_without_channel(label: str, canonical: str) -> None:
    addr = f"1-781-6170000@{label}.tm.example.com"
    assert classify_recipient(addr, DOMAINS) == Refusal(
        "550", "5.3.3", f"Recipient {addr}: the {canonical} device has no delivery channel on this gateway; "
                        "send to 1-781-6170000@SMS.tm.example.com instead.")


def test_telemessage_bad_local_part() -> None:
    r = classify_recipient("+17816170000@tm.example.com", DOMAINS)
    assert isinstance(r, Refusal) and (r.code, r.xcode) == ("550", "5.1.3")
    assert "<international number>@[<Device>.]tm.example.com" in r.text
    r = classify_recipient("-1781@tm.example.com", DOMAINS)
    assert isinstance(r, Refusal) and r.xcode == "5.1.3"


def test_telemessage_invalid_number() -> None:
    assert classify_recipient("1-781@tm.example.com", DOMAINS) == Refusal(
        "550", "5.1.1", "Recipient 1-781@tm.example.com: 1781 is not a valid international phone number.")


@pytest.mark.parametrize("text,expected", [
    ("0041791234567", "+41791234567"), ("+41791234567", "+41791234567"), ("+44 7911 123456", "+447911123456"),
    ("1-781-6170000", "+17816170000"), (" 00447911123456 ", "+447911123456"),
    ("0041790", None), ("abc", None), ("", None), ("+", None),
])
def test_parse_number(text: str, expected: str | None) -> None:
    assert parse_number(text) == expected
