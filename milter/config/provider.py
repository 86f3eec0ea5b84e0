"""The `providers:` and `routes:` sections (or the old `provider:` with one `smpp:`): how the
dispatcher reaches the SMS providers, and which provider takes which destination.

`provider: {smpp: {...}}` is one provider named `smpp` with a catch-all route. `providers:`
names several, each with one kind key (`smpp:` or `http:`); `routes:` (first match wins)
lists providers in failover order. Without `routes:`, one catch-all route lists every
provider in the order written. The `http:` settings are read by `parse_http`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..model import LEGACY_PROVIDER, PROVIDER_KINDS, ProviderSpec, Route, SmppConfig
from . import http
from .reader import Reader, host_ok

SMPP_KEYS = ("host", "port", "system_id", "password", "system_type", "window", "window_max", "rate",
             "enquire_link", "reconnect_min", "reconnect_max", "validity", "submit_timeout",
             "receipt_timeout", "binds", "pipeline_per_number")
PROVIDER_KEYS = (*PROVIDER_KINDS, "down_after", "cooldown")
ROUTE_KEYS = ("prefixes", "accounts", "providers")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_PREFIX = re.compile(r"\+[0-9]{1,15}")


# The reader of an `http:` provider's settings: (reader, node, YAML path) -> settings or None.
parse_http: Callable[[Reader, Any, str], object | None] = http.parse_http


def parse_smpp(r: Reader, node: Any, p: str) -> SmppConfig:
    s = r.mapping(node, p, SMPP_KEYS)
    b = SmppConfig()
    host = r.string(s, "host", p, b.host)
    if host is not None and not host_ok(host.strip()):
        r.bad(f"{p}.host", f"{host!r} is not a host name or IP address")
        host = None
    return SmppConfig(
        host=host.strip() if host else b.host,
        port=r.number(s, "port", p, b.port, 1, 65535),
        # SMPP 3.4 (5.2.1-5.2.3): C-Octet Strings of at most 16/9/13 octets with the NUL.
        system_id=r.secret(s, "system_id", p, "", max_octets=15, what="SMPP 3.4 system_id") or "",
        password=r.secret(s, "password", p, "", max_octets=8, what="SMPP 3.4 password") or "",
        system_type=r.secret(s, "system_type", p, "", max_octets=12, what="SMPP 3.4 system_type") or "",
        window=r.number(s, "window", p, b.window, 1, 1000),
        window_max=r.number(s, "window_max", p, b.window_max, 1, 1000),
        rate=r.number(s, "rate", p, b.rate, 0, 100000, integer=False),
        enquire_link=r.number(s, "enquire_link", p, b.enquire_link, 1, 3600, integer=False),
        reconnect_min=r.number(s, "reconnect_min", p, b.reconnect_min, 0.01, 3600, integer=False),
        reconnect_max=r.number(s, "reconnect_max", p, b.reconnect_max, 0.01, 86400, integer=False),
        validity=r.number(s, "validity", p, b.validity, 60, 30 * 86400),
        submit_timeout=r.number(s, "submit_timeout", p, b.submit_timeout, 0.1, 3600, integer=False),
        receipt_timeout=r.number(s, "receipt_timeout", p, b.receipt_timeout, 1, 30 * 86400, integer=False),
        binds=r.number(s, "binds", p, b.binds, 1, 64),
        pipeline_per_number=r.number(s, "pipeline_per_number", p, b.pipeline_per_number, 1, 10000),
    )


def _provider(r: Reader, name: str, node: Any, path: str) -> ProviderSpec | None:
    if not isinstance(node, dict):
        r.bad(path, f"must be a mapping with one of {', '.join(PROVIDER_KINDS)}, got {r.got(node, path)}")
        return None
    r.mapping(node, path, PROVIDER_KEYS)  # an unknown kind (sip:) is named as an unknown key
    kinds = [k for k in node if k in PROVIDER_KINDS]
    if len(kinds) != 1:
        r.bad(path, f"needs exactly one kind ({', '.join(PROVIDER_KINDS)}), got "
                    f"{', '.join(kinds) if kinds else 'none'}")
        return None
    kind = kinds[0]
    smpp = parse_smpp(r, node[kind], f"{path}.smpp") if kind == "smpp" else None
    http = parse_http(r, node[kind], f"{path}.http") if kind == "http" else None
    b = ProviderSpec(name, kind)
    return ProviderSpec(name, kind, smpp=smpp, http=http,
                        down_after=r.number(node, "down_after", path, b.down_after, 1, 1000),
                        cooldown=r.number(node, "cooldown", path, b.cooldown, 0.1, 86400, integer=False))


_WHAT = {"providers": "provider names", "accounts": "account names", "prefixes": "E.164 prefixes"}
_ONE = {"providers": "a provider name", "accounts": "an account name",
        "prefixes": "a quoted E.164 prefix such as \"+41\""}


def _strings(r: Reader, d: dict, key: str, path: str) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        got = "an empty list" if v == [] else r.got(v, f"{path}.{key}")
        r.bad(f"{path}.{key}", f"must be a non-empty list of {_WHAT.get(key, 'strings')}, got {got}")
        return ()
    out = []
    for i, item in enumerate(v):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            r.bad(f"{path}.{key}[{i}]", f"must be {_ONE.get(key, 'a string')}, got "
                                        f"{r.got(item, f'{path}.{key}[{i}]')}")
        else:
            out.append(str(item))
    return tuple(out)


def _routes(r: Reader, node: Any, providers: dict[str, ProviderSpec]) -> tuple[Route, ...]:
    if node is None:
        return (Route(providers=tuple(providers)),)
    if not isinstance(node, list) or not node:
        r.bad("routes", f"must be a non-empty list of routes, got {r.got(node, 'routes')}")
        return ()
    out: list[Route] = []
    for i, item in enumerate(node):
        path = f"routes[{i}]"
        d = r.mapping(item, path, ROUTE_KEYS)
        if not isinstance(item, dict):
            continue
        prefixes = _strings(r, d, "prefixes", path)
        for j, pfx in enumerate(prefixes):
            if not _PREFIX.fullmatch(pfx):
                r.bad(f"{path}.prefixes[{j}]", f"{pfx!r} must be '+' and digits (E.164), e.g. \"+41\"")
        accounts = _strings(r, d, "accounts", path)
        names = _strings(r, d, "providers", path)
        if d.get("providers") is None:
            r.bad(f"{path}.providers", "is required: a non-empty list of provider names (the providers to "
                                       "try, in order)")
        for j, name in enumerate(names):
            if name not in providers:
                r.bad(f"{path}.providers[{j}]", f"no provider named {name!r} (providers: "
                                                f"{', '.join(providers) or 'none'})")
        if len(set(names)) != len(names):
            r.bad(f"{path}.providers", "lists a provider twice")
        out.append(Route(prefixes, accounts, names))
    if out and (out[-1].prefixes or out[-1].accounts):
        r.bad(f"routes[{len(out) - 1}]", "the last route must match every destination (no prefixes, no "
                                         "accounts): jobs no route matches could never be sent")
    used = {n for rt in out for n in rt.providers}
    for name in providers:
        if out and name not in used:
            r.bad(f"providers.{name}", "not used by any route")
    return tuple(out)


def parse_providers(r: Reader, top: dict[str, Any]) -> tuple[dict[str, ProviderSpec], tuple[Route, ...]]:
    """`providers:` + `routes:`, or the old `provider:`; exactly one of the two forms."""
    if "providers" in top and "provider" in top:
        r.bad("providers", "write either provider: (one SMPP provider) or providers: (several), not both")
    if "providers" not in top:
        d = r.mapping(top.get("provider"), "provider", ("smpp",))
        spec = ProviderSpec(LEGACY_PROVIDER, "smpp", parse_smpp(r, d.get("smpp"), "provider.smpp"))
        if "routes" in top:
            r.bad("routes", "routes: need providers: (named providers), not provider:")
            _routes(r, top["routes"], {LEGACY_PROVIDER: spec})  # and their own problems
        return {LEGACY_PROVIDER: spec}, (Route(providers=(LEGACY_PROVIDER,)),)
    node = top["providers"]
    providers: dict[str, ProviderSpec] = {}
    if not isinstance(node, dict) or not node:
        r.bad("providers", f"must be a mapping of named providers, got {r.got(node, 'providers')}")
        return {}, ()
    for name, spec_node in node.items():
        path = f"providers.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            r.bad(path, "a provider name is letters, digits, '_', '.', '-' (at most 40, first a letter or "
                        "digit)")
            continue
        made = _provider(r, name, spec_node, path)
        if made is not None:
            providers[name] = made
    return providers, _routes(r, top.get("routes"), providers)
