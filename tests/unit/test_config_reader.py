"""The configuration reader on secrets, SMPP field lengths and routes (pure: dicts in, problems out)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from sms_milter.config import ConfigError, parse
from sms_milter.config.reader import Reader

SECRET = "Zq9-secret-VALUE"


def base() -> dict[str, Any]:
    return {
        "domains": {"sms.example.com": {"style": "aspsms"}},
        "accounts": {"acme": {"userkey": "ACME123", "password": "s3cret",
                              "senders": [{"address": "boss@client.example"}]}},
        "provider": {"smpp": {"host": "127.0.0.1", "system_id": "gw", "password": "pw"}},
    }


def problems(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(cfg)
    return e.value.problems


def from_yaml(text: str) -> Any:
    return yaml.safe_load(text)["v"]


@pytest.mark.parametrize("written, kind", [
    ("12345678", "a number"), ("0x1F", "a number"), ("0755", "a number"), ("yes", "a boolean"),
    ("off", "a boolean"), ("1.5e+3", "a decimal number"), ("3.14", "a decimal number"),
])
def test_unquoted_secret_is_refused_with_quote_it(written: str, kind: str) -> None:
    r = Reader()
    assert r.secret({"password": from_yaml(f"v: {written}")}, "password", "accounts.a") is None
    assert r.problems == [f"accounts.a.password: YAML reads this unquoted value as {kind}, which would "
                          "change it (leading zeros, 0x.., 1e3, yes/no); quote it (password: \"...\"); the "
                          "value is not shown"]
    assert written not in r.problems[0].split(";")[1]


def test_quoted_secret_is_kept_as_written() -> None:
    r = Reader()
    assert r.secret({"k": from_yaml('v: "0x1F"')}, "k", "p") == "0x1F"
    assert r.secret({"k": from_yaml("v: 1e3")}, "k", "p") == "1e3"  # YAML 1.1: no dot, a string
    assert r.secret({}, "k", "p", "dflt") == "dflt" and r.problems == []
    assert r.secret({}, "k", "p", required=True) is None and r.problems == ["p.k: is required"]


@pytest.mark.parametrize("where", ["password", "userkey", "password_hash"])
def test_account_secrets_must_be_strings(where: str) -> None:
    cfg = base()
    cfg["accounts"]["acme"][where] = 12345678
    got = problems(cfg)
    want = f"accounts.acme.{where}: YAML reads this unquoted value as a number"
    assert any(p.startswith(want) for p in got)
    assert not any("12345678" in p for p in got)


def test_userkey_with_leading_zeros_is_not_silently_changed() -> None:
    cfg = base()
    cfg["accounts"]["acme"]["userkey"] = from_yaml("v: 000123")
    assert problems(cfg)[0].startswith("accounts.acme.userkey: YAML reads this unquoted value as a number")


def test_smtp_auth_login_numbers_are_refused_by_item() -> None:
    cfg = base()
    cfg["accounts"]["acme"]["smtp_auth"] = ["alice", 7]
    got = problems(cfg)
    assert got == ["accounts.acme.smtp_auth[1]: YAML reads this unquoted value as a number, which would "
                   "change it (leading zeros, 0x.., 1e3, yes/no); quote it (login: \"...\"); the value is "
                   "not shown"]


def test_sender_address_is_never_echoed() -> None:
    cfg = base()
    cfg["accounts"]["acme"]["senders"] = [{"address": SECRET}, {"domain": SECRET}, 4711]
    got = problems(cfg)
    assert got == [
        "accounts.acme.senders[0].address: is not an e-mail address (local@domain; the value is not shown)",
        "accounts.acme.senders[1].domain: is not a domain name such as client.example (the value is not "
        "shown)",
        "accounts.acme.senders[2]: must be an e-mail address (quoted) or a mapping with address or domain, "
        "got a scalar",
    ]
    assert not any(SECRET in p or "4711" in p for p in got)


@pytest.mark.parametrize("key, limit", [("system_id", 15), ("password", 8), ("system_type", 12)])
def test_smpp_field_lengths(key: str, limit: int) -> None:
    cfg = base()
    cfg["provider"]["smpp"][key] = "x" * limit
    parse(cfg)  # at the limit: fine
    cfg["provider"]["smpp"][key] = "é" * limit  # two octets each in UTF-8
    assert problems(cfg) == [f"provider.smpp.{key}: is {2 * limit} octets long; SMPP 3.4 {key} allows at "
                             f"most {limit} octets"]


def test_smpp_password_value_is_not_in_the_problem() -> None:
    cfg = base()
    cfg["provider"]["smpp"]["password"] = SECRET
    got = problems(cfg)
    assert len(got) == 1 and SECRET not in got[0] and "16 octets" in got[0]


def named(routes: Any) -> dict[str, Any]:
    cfg = base()
    del cfg["provider"]
    cfg["providers"] = {"a": {"smpp": {"host": "h"}}, "b": {"smpp": {"host": "h"}}}
    cfg["routes"] = routes
    return cfg


def test_route_with_empty_providers() -> None:
    got = problems(named([{"prefixes": ["+41"], "providers": ["a"]}, {"providers": []}]))
    assert got == ["routes[1].providers: must be a non-empty list of provider names, got an empty list",
                   "providers.b: not used by any route"]


def test_route_with_null_providers_is_required() -> None:
    got = problems(named([{"providers": ["a", "b"]}, {"providers": None}]))
    assert "routes[1].providers: is required: a non-empty list of provider names (the providers to try, in " \
           "order)" in got


def test_route_unknown_provider_and_wrong_types() -> None:
    got = problems(named([{"prefixes": "+41", "providers": ["zz", "a"]},
                          {"providers": ["b", ["x"]]}, {"providers": {"a": 1}}]))
    assert "routes[0].providers[0]: no provider named 'zz' (providers: a, b)" in got
    assert "routes[1].providers[1]: must be a provider name, got a list" in got
    assert "routes[2].providers: must be a non-empty list of provider names, got a mapping" in got


def test_route_that_is_no_mapping() -> None:
    got = problems(named([7, {"providers": ["a", "b"]}]))
    assert got[0] == "routes[0]: must be a mapping, got a number (7)"
