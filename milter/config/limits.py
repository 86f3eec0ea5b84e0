"""The `limits:` sections (top level and per account) and `limits.breaker`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import phonenumbers

from ..model import CAP_KEYS, LIMIT_KEYS, LIMIT_MODES, NUMBER_TYPES, BreakerConfig, Limits
from .reader import Reader

# Codes operators write by mistake for a real one (ISO 3166 says otherwise).
_COUNTRY_HINTS = {"UK": "the United Kingdom is GB", "EL": "Greece is GR", "EU": "list the member states",
                  "KS": "Kosovo is XK"}


def _country(r: Reader, value: Any, path: str) -> str | None:
    """An ISO 3166 alpha-2 region code phonenumbers knows, upper case (`ch` is accepted as CH);
    None after one problem line."""
    if not isinstance(value, str) or isinstance(value, bool):
        r.bad(path, f"must be an ISO 3166 alpha-2 code such as CH, got {r.got(value, path)}")
        return None
    code = value.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        hint = _COUNTRY_HINTS.get(code)
        r.bad(path, f"{value!r} is not an ISO 3166 alpha-2 region code known to phonenumbers"
                    + (f" ({hint})" if hint else ""))
        return None
    return code


def parse_limits(r: Reader, node: Any, path: str, base: Limits, top: bool = False) -> Limits:
    d = r.mapping(node, path, (*LIMIT_KEYS, "breaker") if top else LIMIT_KEYS)
    values: dict[str, Any] = {}
    mode = r.string(d, "mode", path)
    if mode is not None:
        if mode not in LIMIT_MODES:
            r.bad(f"{path}.mode", f"must be enforce or monitor, got {mode!r}")
        else:
            values["mode"] = mode
    if "recipients_per_message" in d:
        values["recipients_per_message"] = r.number(d, "recipients_per_message", path,
                                                    base.recipients_per_message, 1, 1000)
    for key in CAP_KEYS:
        if key in d:
            values[key] = r.number(d, key, path, None, 0, 1 << 40)
    if "identical_seconds" in d:
        values["identical_seconds"] = r.number(d, "identical_seconds", path, base.identical_seconds, 0,
                                               7 * 86400)
    if "countries" in d:
        c = d["countries"]
        if c is None:
            values["countries"] = None
        elif not isinstance(c, list):
            r.bad(f"{path}.countries", "must be a list of ISO 3166 alpha-2 codes such as [CH, DE]")
        elif not c:
            r.bad(f"{path}.countries", "an empty list refuses every destination; leave countries out "
                                       "to allow all")
        else:
            codes = [_country(r, x, f"{path}.countries[{i}]") for i, x in enumerate(c)]
            if all(codes):
                values["countries"] = tuple(x for x in codes if x)
    if "deny_prefixes" in d:
        p = d["deny_prefixes"] or []
        if not isinstance(p, list) or not all(isinstance(x, str) and x.startswith("+") and x[1:].isdigit()
                                              and x[1:].isascii() for x in p):
            r.bad(f"{path}.deny_prefixes", 'must be a list of E.164 prefixes such as ["+882"] (quoted)')
        else:
            values["deny_prefixes"] = tuple(p)
    if "number_types" in d:
        t = d["number_types"]
        if t is None or not isinstance(t, list) or not all(isinstance(x, str) for x in t):
            r.bad(f"{path}.number_types", f"must be a list of: {', '.join(NUMBER_TYPES)}")
        elif not t:
            r.bad(f"{path}.number_types", "an empty list refuses every destination; leave number_types "
                                          "out for the default types")
        else:
            unknown = [x for x in t if x.lower() not in NUMBER_TYPES]
            if unknown:
                r.bad(f"{path}.number_types", f"unknown type(s) {', '.join(map(str, unknown))} "
                                              f"(known: {', '.join(NUMBER_TYPES)})")
            else:
                values["number_types"] = tuple(x.lower() for x in t)
    return replace(base, **values)


def parse_breaker(r: Reader, node: Any) -> BreakerConfig | None:
    if node is None or node is False:
        return None
    path = "limits.breaker"
    d = r.mapping(node, path, ("window", "min_jobs", "failure_rate", "cooldown", "prefix_digits"))
    b = BreakerConfig()
    return BreakerConfig(
        window=r.number(d, "window", path, b.window, 10, 30 * 86400, integer=False),
        min_jobs=r.number(d, "min_jobs", path, b.min_jobs, 1, 1 << 30),
        failure_rate=r.number(d, "failure_rate", path, b.failure_rate, 0.01, 1.0, integer=False),
        cooldown=r.number(d, "cooldown", path, b.cooldown, 1, 30 * 86400, integer=False),
        prefix_digits=r.number(d, "prefix_digits", path, b.prefix_digits, 1, 15),
    )
