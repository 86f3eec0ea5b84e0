"""An `accounts.NAME` section: senders, networks, credentials, template, notify, limits."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ..model import NOTIFY_POLICIES, Account, IPNetwork, Limits, SenderRule
from ..policy.addresses import originator_problem
from ..policy.auth import hash_problem
from .limits import parse_limits
from .reader import Reader


def _sender(r: Reader, node: Any, path: str) -> SenderRule | None:
    # An authorized sender is a secret: no problem line holds the address or domain.
    if isinstance(node, str):
        node = {"address": node}
    elif not isinstance(node, dict):
        kind = "a list" if isinstance(node, list) else "nothing (null)" if node is None else "a scalar"
        r.bad(path, f"must be an e-mail address (quoted) or a mapping with address or domain, got {kind}")
        return None
    d = r.mapping(node, path, ("address", "domain", "originator"))
    address = r.secret(d, "address", path)
    domain = r.secret(d, "domain", path)
    if (address is None) == (domain is None):
        r.bad(path, "needs exactly one of address or domain")
        return None
    if address is not None and (address.count("@") != 1 or address.startswith("@") or address.endswith("@")):
        r.bad(f"{path}.address", "is not an e-mail address (local@domain; the value is not shown)")
    if domain is not None and ("@" in domain or "." not in domain):
        r.bad(f"{path}.domain", "is not a domain name such as client.example (the value is not shown)")
    orig = r.string(d, "originator", path)
    if orig is not None:
        _check_originator(r, orig, f"{path}.originator")
    return SenderRule(
        address=address.lower() if address else None,
        domain=domain.lower().lstrip("@") if domain else None,
        originator=orig,
    )


def _host_bits(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
        return False
    except ValueError:
        return True


_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{1,8})*$")
_FIELD = re.compile(r"\{\{|\}\}|\{(subject|body)\}")


def _template_problem(template: str) -> str | None:
    """Templates may name {subject} and {body} only (and {{ / }} for literal braces)."""
    rest = _FIELD.sub("", template)
    for ch in ("{", "}"):
        at = rest.find(ch)
        if at >= 0:
            m = re.search(r"\{[^{}]{0,40}\}?", rest[at:]) if ch == "{" else None
            what = f"'{m.group()}'" if m else f"a lone '{ch}'"
            return (f"may use only {{subject}} and {{body}} (and {{{{ or }}}} for a literal brace), "
                    f"found {what}")
    return None


def _check_originator(r: Reader, value: str, path: str) -> None:
    problem = originator_problem(value)
    if problem:
        r.bad(path, problem)


def _logins(r: Reader, node: Any, path: str) -> list[str] | None:
    """`smtp_auth`: SMTP AUTH login names, each a string as written (a login is a secret). None:
    absent, or an item already refused; []: not a non-empty list of non-empty names."""
    if node is None:
        return None
    if not isinstance(node, list) or not node:
        return []
    out = [r.secret_value(x, f"{path}[{i}]", "login") for i, x in enumerate(node)]
    if any(x is None and node[i] is not None for i, x in enumerate(out)):
        return None  # its item said why
    return [x for x in out if x] if all(out) else []


def parse_account(r: Reader, name: str, node: Any, limits: Limits | None = None) -> Account:
    path = f"accounts.{name}"
    d = r.mapping(node, path, ("userkey", "password", "password_hash", "senders", "networks",
                               "originator", "template", "max_parts", "notify", "credits",
                               "limits", "smtp_auth", "voice_recordings", "voice_language"))
    senders: list[SenderRule] = []
    raw_senders = d.get("senders") or []
    if not isinstance(raw_senders, list):
        r.bad(f"{path}.senders", "must be a list")
        raw_senders = []
    for i, s in enumerate(raw_senders):
        rule = _sender(r, s, f"{path}.senders[{i}]")
        if rule:
            senders.append(rule)
    networks: list[IPNetwork] = []
    raw_nets = d.get("networks") or []
    if not isinstance(raw_nets, list):
        r.bad(f"{path}.networks", "must be a list")
        raw_nets = []
    for i, n in enumerate(raw_nets):
        where = f"{path}.networks[{i}]"
        if not isinstance(n, str):
            r.bad(where, f"must be an IP network such as 192.0.2.0/24, got {r.got(n, where)}")
            continue
        try:
            net = ipaddress.ip_network(n, strict=False)
        except ValueError:
            r.bad(where, f"{n!r} is not an IP network")
            continue
        if _host_bits(n):
            r.bad(where, f"{n!r} has host bits set; write the network address {net} "
                         "(or a single address without /prefix)")
            continue
        networks.append(net)
    password = r.secret(d, "password", path)
    password_hash = r.secret(d, "password_hash", path)
    if password is not None and password_hash is not None:
        r.bad(path, "give password or password_hash, not both")
    if password_hash is not None:
        problem = hash_problem(password_hash)
        if problem:
            r.bad(f"{path}.password_hash", problem)
    userkey = r.secret(d, "userkey", path)
    if userkey is not None and d.get("password") is None and d.get("password_hash") is None:
        r.bad(path, "userkey needs a password or password_hash")
    originator = r.string(d, "originator", path, "SMS") or "SMS"
    _check_originator(r, originator, f"{path}.originator")
    template = r.string(d, "template", path, "{subject},{body}") or ""
    problem = _template_problem(template)
    if problem:
        r.bad(f"{path}.template", problem)
    notify = (r.string(d, "notify", path, "") or "").upper()
    if notify not in NOTIFY_POLICIES:
        r.bad(f"{path}.notify", f"must be one of \"\", ALWAYS, NONE, FAILED, got {notify!r}")
    credits = d.get("credits")
    if credits is not None and (isinstance(credits, bool) or not isinstance(credits, int) or credits < 0):
        r.bad(f"{path}.credits", f"must be a whole number >= 0, got {r.got(credits, f'{path}.credits')}")
        credits = None
    smtp_auth = _logins(r, d.get("smtp_auth"), f"{path}.smtp_auth")
    if smtp_auth == []:
        r.bad(f"{path}.smtp_auth", "must be a non-empty list of SMTP AUTH login names")
        smtp_auth = None
    recordings = d.get("voice_recordings", False)
    if not isinstance(recordings, bool):
        r.bad(f"{path}.voice_recordings", f"must be true or false, got {r.got(recordings, path)}")
        recordings = False
    language = (r.string(d, "voice_language", path, "") or "").strip().lower()
    if language and not _LANG.match(language):
        r.bad(f"{path}.voice_language", f"{language[:20]!r} is not an espeak-ng language such as en or fr-ch")
        language = ""
    return Account(
        name=name, userkey=userkey, password=password, password_hash=password_hash,
        senders=tuple(senders), networks=tuple(networks), originator=originator, template=template,
        max_parts=r.number(d, "max_parts", path, 6, 1, 255), notify=notify, credits=credits,
        limits=parse_limits(r, d.get("limits"), f"{path}.limits", limits or Limits()),
        smtp_auth=tuple(smtp_auth) if smtp_auth is not None else None,
        voice_recordings=recordings, voice_language=language,
    )
