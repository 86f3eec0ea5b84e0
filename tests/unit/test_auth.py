from __future__ import annotations

import ipaddress

import pytest
from sms_milter.model import Account, SenderRule
from sms_milter.policy.auth import (
    authorize_sender,
    authorize_userkey,
    find_userkey_account,
    hash_password,
    hash_problem,
    network_allowed,
    verify_password,
)
from sms_milter.policy.refusal import Refusal

EXACT = SenderRule(address="c4ca423@client.example", originator="+41760000000")
DOMAIN = SenderRule(domain="client.example")
ACME = Account(name="acme", userkey="ACME123", password="s3cret", senders=(EXACT, DOMAIN))
NETS = Account(name="nets", userkey="NET1", password="pw",
               senders=(SenderRule(address="ops@net.example"),),
               networks=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")))
ACCOUNTS = {"acme": ACME, "nets": NETS}


def test_hash_roundtrip() -> None:
    h = hash_password("s3cret")
    parts = h.split("$")
    assert parts[:4] == ["scrypt", "16384", "8", "1"]
    assert hash_problem(h) is None
    acc = Account(name="h", userkey="K", password_hash=h)
    assert verify_password(acc, "s3cret")
    assert not verify_password(acc, "s3cret ")
    assert hash_password("s3cret") != h  # random salt


@pytest.mark.parametrize("h", ["", "s3cret", "scrypt$16384$8$1$AAAA", "bcrypt$16384$8$1$AAAAAAAAAAA=$AAAA",
                               "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==",
                               "scrypt$16384$8$1$!!!$AAAAAAAAAAAAAAAAAAAAAA=="])
def test_hash_problem(h: str) -> None:
    assert hash_problem(h) is not None


def test_verify_password_plain_and_none() -> None:
    assert verify_password(ACME, "s3cret")
    assert not verify_password(ACME, "S3cret")
    assert not verify_password(Account(name="x"), "")
    assert not verify_password(Account(name="x", password_hash="broken"), "broken")


def test_find_userkey_account() -> None:
    assert find_userkey_account("ACME123", "s3cret", ACCOUNTS) is ACME
    assert find_userkey_account("ACME123", "wrong", ACCOUNTS) is None
    assert find_userkey_account("nobody", "s3cret", ACCOUNTS) is None


def test_network_allowed() -> None:
    assert network_allowed(ACME, None)
    assert network_allowed(NETS, "192.0.2.7")
    assert network_allowed(NETS, "::ffff:192.0.2.7")
    assert network_allowed(NETS, "2001:db8::1")
    assert network_allowed(NETS, "IPv6:2001:db8::1")
    assert not network_allowed(NETS, "198.51.100.1")
    assert not network_allowed(NETS, None)
    assert not network_allowed(NETS, "garbage")


def test_authorize_sender_exact_and_case() -> None:
    assert authorize_sender("C4CA423@Client.Example", None, ACCOUNTS, allow_domain=False) == (ACME, EXACT)


def test_authorize_sender_domain_only_when_allowed() -> None:
    assert authorize_sender("someone@CLIENT.example", None, ACCOUNTS, allow_domain=True) == (ACME, DOMAIN)
    assert authorize_sender("someone@client.example", None, ACCOUNTS, allow_domain=False) == Refusal(
        "550", "5.7.1", "This sender address is not authorized to send SMS through this gateway.")


def test_authorize_sender_null_and_network() -> None:
    assert authorize_sender("", None, ACCOUNTS, allow_domain=True) == Refusal(
        "550", "5.7.1", "Mail from the null sender <> cannot send SMS; use an authorized sender address.")
    assert authorize_sender("<>", None, ACCOUNTS, allow_domain=True) == Refusal(
        "550", "5.7.1", "Mail from the null sender <> cannot send SMS; use an authorized sender address.")
    r = authorize_sender("ops@net.example", "198.51.100.1", ACCOUNTS, allow_domain=False)
    assert r == Refusal("550", "5.7.1",
                        "Client address 198.51.100.1 is not allowed to send SMS for this sender.")
    assert "ops@net.example" not in r.text
    assert authorize_sender("ops@net.example", "192.0.2.1", ACCOUNTS, allow_domain=False)[0] is NETS


def test_authorize_userkey() -> None:
    wrong = Refusal("550", "5.7.8", "Userkey or Password in the Subject is wrong.")
    assert authorize_userkey("ACME123", "s3cret", "203.0.113.9", ACCOUNTS) is ACME
    assert authorize_userkey("ACME123", "nope", None, ACCOUNTS) == wrong
    assert authorize_userkey("NOPE", "s3cret", None, ACCOUNTS) == wrong
    assert authorize_userkey("NET1", "pw", "192.0.2.9", ACCOUNTS) is NETS
    assert authorize_userkey("NET1", "pw", "203.0.113.9", ACCOUNTS) == Refusal(
        "550", "5.7.1", "Client address 203.0.113.9 is not allowed to send SMS for this sender.")


def test_verified_hashes_are_cached_briefly_without_the_plaintext() -> None:
    """Issue 9 item 10: a verified scrypt password is remembered (VERIFIED_TTL), keyed by a
    hash, so that a stream of textsms@ mails pays the ~40 ms once; a wrong password, another
    account or a changed hash is never served from the cache."""
    import time

    from sms_milter.policy import auth

    h = hash_password("c4ched")
    acc = Account(name="cached", userkey="C", password_hash=h)
    started = time.perf_counter()
    assert verify_password(acc, "c4ched")
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(20):
        assert verify_password(acc, "c4ched")
    assert time.perf_counter() - started < first  # twenty cached checks cost less than one scrypt
    assert not verify_password(acc, "c4ched ")
    changed = Account(name="cached", userkey="C", password_hash=hash_password("x"))
    assert not verify_password(changed, "c4ched")
    assert not verify_password(Account(name="other", userkey="C", password_hash=hash_password("x")), "c4ched")
    assert all(b"c4ched" not in k for k in auth._verified)
    assert all(len(k) == 32 for k in auth._verified)
