"""Configuration: YAML in, typed frozen objects out.

`load(path)` returns a `Config` or raises `ConfigError` whose `problems` list holds one
line per problem, each starting with its YAML path (`accounts.acme.max_parts: ...`).
Nothing else in the package reads YAML.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import phonenumbers
import yaml

DEFAULT_PATH = "/etc/sms-milter/sms-milter.yaml"
STYLES = ("aspsms", "telemessage")
NOTIFY_POLICIES = ("", "ALWAYS", "NONE", "FAILED")
# Devices of the telemessage style; only those with a delivery channel are accepted.
DEVICES = ("sms", "business", "mobile", "home", "fax")
CHANNEL_DEVICES = ("sms",)  # devices this build can deliver to

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SenderRule:
    """An authorized SMTP originator: an exact address (lowercased) or a whole domain."""

    address: str | None = None
    domain: str | None = None
    originator: str | None = None  # default SMS originator for this sender


# -- limits (abuse control): see policy/limits.py for the rules, INTERFACE.md "Limits" for the keys
LIMIT_MODES = ("enforce", "monitor")
# phonenumbers number types by their config name (PhoneNumberType values).
NUMBER_TYPES = {"fixed_line": 0, "mobile": 1, "fixed_line_or_mobile": 2, "toll_free": 3, "premium_rate": 4,
                "shared_cost": 5, "voip": 6, "personal": 7, "personal_number": 7, "pager": 8, "uan": 9,
                "voicemail": 10, "unknown": 99}
# Allowed when `number_types` is absent: premium-rate, shared-cost, UAN, personal, pager, voip and
# unknown are refused unless listed.
DEFAULT_NUMBER_TYPES = ("fixed_line", "mobile", "fixed_line_or_mobile", "toll_free", "voicemail")
CAP_KEYS = ("parts_per_minute", "parts_per_hour", "parts_per_day", "parts_per_month",
            "per_recipient_per_hour")
LIMIT_KEYS = ("mode", "recipients_per_message", *CAP_KEYS, "countries", "deny_prefixes", "number_types",
              "identical_seconds")


@dataclass(frozen=True)
class Limits:
    """One account's effective limits (None: no cap)."""

    mode: str = "enforce"
    recipients_per_message: int = 100
    parts_per_minute: int | None = None
    parts_per_hour: int | None = None
    parts_per_day: int | None = None
    parts_per_month: int | None = None
    per_recipient_per_hour: int | None = None
    countries: tuple[str, ...] | None = None  # ISO 3166 alpha-2, upper case; None = all
    deny_prefixes: tuple[str, ...] = ()  # E.164 with '+'
    number_types: tuple[str, ...] = DEFAULT_NUMBER_TYPES
    identical_seconds: int = 600  # the same text to the same number within this is one SMS; 0 = off

    @property
    def monitor(self) -> bool:
        return self.mode == "monitor"

    @property
    def counted(self) -> bool:
        """Does any rule need the usage counters?"""
        return any(getattr(self, k) is not None for k in CAP_KEYS)


@dataclass(frozen=True)
class BreakerConfig:
    """The circuit breaker on failing destinations (`limits.breaker`, off when absent)."""

    window: float = 3600.0  # seconds of finished jobs looked at
    min_jobs: int = 20  # fewer finished jobs to a prefix than this: never trips
    failure_rate: float = 0.5  # failed+expired / finished at or above this: trips
    cooldown: float = 1800.0  # seconds new mail to the prefix gets 451
    prefix_digits: int = 3  # destinations grouped by '+' and this many digits


@dataclass(frozen=True)
class Account:
    name: str
    userkey: str | None = None
    password: str | None = None
    password_hash: str | None = None
    senders: tuple[SenderRule, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    originator: str = "SMS"
    template: str = "{subject},{body}"
    max_parts: int = 6
    notify: str = ""
    credits: int | None = None  # remaining allowance (xml@ ShowCredits); None = unlimited
    limits: Limits = field(default_factory=Limits)  # top-level `limits:` merged with its own
    smtp_auth: tuple[str, ...] | None = None  # SMTP AUTH logins bound to the account; None = any/none


@dataclass(frozen=True)
class Domain:
    name: str  # lowercased
    style: str  # "aspsms" | "telemessage"


@dataclass(frozen=True)
class MilterConfig:
    socket: str = "inet:127.0.0.1:8894"
    max_message_bytes: int = 262144
    # How long a resend of the same message (same Message-ID) is recognised as a duplicate.
    dedupe_seconds: int = 7 * 24 * 3600
    # Mail with no Message-ID of its own is recognised by sender, recipients and content
    # for this much shorter window.
    dedupe_anonymous_seconds: int = 600
    spool_timeout: float = 5.0  # seconds to wait for the spool before answering 451


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "/var/lib/sms-milter/spool.sqlite3"
    url: str | None = None


@dataclass(frozen=True)
class SmppConfig:
    host: str = "127.0.0.1"
    port: int = 2775
    system_id: str = ""
    password: str = ""
    system_type: str = ""
    window: int = 10  # unacknowledged submit_sm at most
    rate: float = 0.0  # submits per second at most; 0 = no cap
    enquire_link: float = 30.0  # seconds between keep-alives
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    validity: int = 48 * 3600  # seconds a job may wait before it expires
    submit_timeout: float = 30.0  # seconds to wait for a submit_sm_resp before the job goes back
    receipt_timeout: float = 3600.0  # seconds without a receipt before the SMSC is asked (query_sm)


@dataclass(frozen=True)
class NotifyConfig:
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    sender: str = "sms-gateway@localhost"


@dataclass(frozen=True)
class XmlConfig:
    # Hosts (exact, lowercased) that URL delivery notifications may call.
    allowed_url_hosts: tuple[str, ...] = ()
    url_timeout: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    """Where each daemon serves Prometheus /metrics ("host:port"); None = not served."""

    milter: str | None = None
    dispatcher: str | None = None


@dataclass(frozen=True)
class Config:
    milter: MilterConfig = field(default_factory=MilterConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    domains: dict[str, Domain] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    smpp: SmppConfig = field(default_factory=SmppConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    xml: XmlConfig = field(default_factory=XmlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: Limits = field(default_factory=Limits)  # the top-level defaults
    breaker: BreakerConfig | None = None
    source: str = ""

    def summary(self) -> str:
        return (
            f"{self.source}: OK: {len(self.domains)} domain(s), {len(self.accounts)} account(s), "
            f"milter on {self.milter.socket}, spool {self.spool.url or self.spool.path}"
        )


_KINDS = ((bool, "a boolean"), (int, "a number"), (float, "a decimal number"), (str, "a string"),
          (list, "a list"), (dict, "a mapping"))


def _num(x: float) -> str:
    """A bound as an operator writes it: 1099511627776, not 1.09951e+12; 0.1 stays 0.1."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Reader:
    """Collects problems instead of stopping at the first one."""

    def __init__(self, words: dict[str, str] | None = None) -> None:
        self.problems: list[str] = []
        self.words = words or {}  # YAML path -> the scalar as written in the file

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def got(self, value: Any, path: str) -> str:
        """`value` in YAML's words: `a boolean (yes)`, `a list`, `a number (7)`."""
        if value is None:
            return "nothing (null)"
        kind = next((k for t, k in _KINDS if isinstance(value, t)), "a value")
        if isinstance(value, (list, dict)):
            return kind
        text = self.words.get(path)
        if text is None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"{kind} ({text})"

    def mapping(self, node: Any, path: str, known: tuple[str, ...] | None = None) -> dict[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.bad(path, f"must be a mapping, got {self.got(node, path)}")
            return {}
        for key in node:
            if not isinstance(key, str):
                self.bad(path, f"key {key!r} must be a string")
            elif known is not None and key not in known:
                self.bad(f"{path}.{key}" if path else key, f"unknown key (known: {', '.join(known)})")
        return node

    def string(self, d: dict, key: str, path: str, default: str | None = None,
               required: bool = False) -> str | None:
        if key not in d or d[key] is None:
            if required:
                self.bad(f"{path}.{key}", "is required")
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            self.bad(f"{path}.{key}", f"must be a string, got {self.got(v, f'{path}.{key}')}")
            return default
        return str(v)

    def number(self, d: dict, key: str, path: str, default: float | None, lo: float, hi: float,
               integer: bool = True) -> Any:
        if key not in d or d[key] is None:
            return default
        v = d[key]
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            self.bad(f"{path}.{key}", f"must be {'an integer' if integer else 'a number'}, got "
                                      f"{self.got(v, f'{path}.{key}')}")
            return default
        if not lo <= v <= hi:
            self.bad(f"{path}.{key}", f"must be between {_num(lo)} and {_num(hi)}, got "
                                      f"{self.got(v, f'{path}.{key}')}")
            return default
        return v


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host)) and not host.replace(".", "").isdigit()


def _host_port(r: _Reader, value: str, path: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of `HOST:PORT` / `[IPv6]:PORT` / `HOST`; None (after one problem line) if bad."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, ""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        r.bad(path, f"port {port!r} in {value!r} must be a number from 1 to 65535")
        return None
    if not host or not _host_ok(host):
        r.bad(path, f"{host!r} in {value!r} is not a host name or IP address")
        return None
    return host, int(port) if port else default_port


def _socket_spec(r: _Reader, value: str, path: str) -> str:
    if value.startswith("unix:"):
        where = value[5:]
        if not where.startswith("/"):
            r.bad(path, f"{value!r}: a unix socket needs an absolute path, e.g. "
                        "unix:/run/sms-milter/milter.sock")
        return value
    if value.startswith(("inet:", "inet6:")):
        rest = value.partition(":")[2]
        # Both Postfix (inet:host:port) and Sendmail (inet:port@host) spellings.
        if "@" in rest:
            sm_port, _, sm_host = rest.partition("@")
            rest = f"{sm_host}:{sm_port}"
        found = _host_port(r, rest, path, 0)
        if found is None:
            return value
        host, port = found
        if not port:
            r.bad(path, f"{value!r} needs a host and a port, e.g. inet:127.0.0.1:8894")
            return value
        return f"inet:{host}:{port}"
    r.bad(path, f"{value!r} must be inet:HOST:PORT, inet:[IPv6]:PORT or unix:/PATH")
    return value


def _milter(r: _Reader, node: Any) -> MilterConfig:
    d = r.mapping(node, "milter", ("socket", "max_message_bytes", "dedupe_seconds",
                                   "dedupe_anonymous_seconds", "spool_timeout"))
    base = MilterConfig()
    sock = r.string(d, "socket", "milter", base.socket) or base.socket
    return MilterConfig(
        socket=_socket_spec(r, sock, "milter.socket"),
        max_message_bytes=r.number(d, "max_message_bytes", "milter", base.max_message_bytes, 1024, 1 << 30),
        dedupe_seconds=r.number(d, "dedupe_seconds", "milter", base.dedupe_seconds, 0, 366 * 86400),
        dedupe_anonymous_seconds=r.number(d, "dedupe_anonymous_seconds", "milter",
                                          base.dedupe_anonymous_seconds, 0, 86400),
        spool_timeout=r.number(d, "spool_timeout", "milter", base.spool_timeout, 0.1, 120, integer=False),
    )


def _spool(r: _Reader, node: Any) -> SpoolConfig:
    d = r.mapping(node, "spool", ("path", "url"))
    url = r.string(d, "url", "spool")
    if url is not None:
        r.bad("spool.url", "PostgreSQL spools are not supported by this version; use spool.path")
    path = r.string(d, "path", "spool", SpoolConfig.path)
    if path is not None and not path.startswith("/"):
        r.bad("spool.path", f"{path!r}: the spool needs an absolute path, e.g. "
                            f"{SpoolConfig.path}")
        path = None
    return SpoolConfig(path=path or SpoolConfig.path, url=None)


def _domains(r: _Reader, node: Any) -> dict[str, Domain]:
    d = r.mapping(node, "domains")
    out: dict[str, Domain] = {}
    for name, spec in d.items():
        if not isinstance(name, str):
            continue
        path = f"domains.{name}"
        if "@" in name or "." not in name or name.strip() != name:
            r.bad(path, "must be a domain name such as sms.example.com")
        sd = r.mapping(spec, path, ("style",))
        style = r.string(sd, "style", path, required=True)
        if style is not None and style not in STYLES:
            r.bad(f"{path}.style", f"must be one of {', '.join(STYLES)}, got {style!r}")
        lname = name.lower().rstrip(".")
        if lname in out:
            r.bad(path, "listed twice (domain names are case-insensitive)")
        out[lname] = Domain(name=lname, style=style or "aspsms")
    if not out:
        r.bad("domains", "at least one SMS domain is required")
    return out


def _sender(r: _Reader, node: Any, path: str) -> SenderRule | None:
    if isinstance(node, str):
        node = {"address": node}
    d = r.mapping(node, path, ("address", "domain", "originator"))
    address = r.string(d, "address", path)
    domain = r.string(d, "domain", path)
    if (address is None) == (domain is None):
        r.bad(path, "needs exactly one of address or domain")
        return None
    if address is not None and (address.count("@") != 1 or address.startswith("@") or address.endswith("@")):
        r.bad(f"{path}.address", f"{address!r} is not an e-mail address")
    if domain is not None and ("@" in domain or "." not in domain):
        r.bad(f"{path}.domain", f"{domain!r} is not a domain name")
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


def _check_originator(r: _Reader, value: str, path: str) -> None:
    from .policy.addresses import originator_problem  # local: policy imports config types

    problem = originator_problem(value)
    if problem:
        r.bad(path, problem)


# Codes operators write by mistake for a real one (ISO 3166 says otherwise).
_COUNTRY_HINTS = {"UK": "the United Kingdom is GB", "EL": "Greece is GR", "EU": "list the member states",
                  "KS": "Kosovo is XK"}


def _country(r: _Reader, value: Any, path: str) -> str | None:
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


def _limits(r: _Reader, node: Any, path: str, base: Limits, top: bool = False) -> Limits:
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


def _breaker(r: _Reader, node: Any) -> BreakerConfig | None:
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


def _account(r: _Reader, name: str, node: Any, limits: Limits | None = None) -> Account:
    path = f"accounts.{name}"
    d = r.mapping(node, path, ("userkey", "password", "password_hash", "senders", "networks",
                               "originator", "template", "max_parts", "notify", "credits",
                               "limits", "smtp_auth"))
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
    password = r.string(d, "password", path)
    password_hash = r.string(d, "password_hash", path)
    if password is not None and password_hash is not None:
        r.bad(path, "give password or password_hash, not both")
    if password_hash is not None:
        from .policy.auth import hash_problem

        problem = hash_problem(password_hash)
        if problem:
            r.bad(f"{path}.password_hash", problem)
    userkey = r.string(d, "userkey", path)
    if userkey is not None and password is None and password_hash is None:
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
    smtp_auth = d.get("smtp_auth")
    if smtp_auth is not None and (not isinstance(smtp_auth, list) or not smtp_auth
                                  or not all(isinstance(x, str) and x for x in smtp_auth)):
        r.bad(f"{path}.smtp_auth", "must be a non-empty list of SMTP AUTH login names")
        smtp_auth = None
    return Account(
        name=name, userkey=userkey, password=password, password_hash=password_hash,
        senders=tuple(senders), networks=tuple(networks), originator=originator, template=template,
        max_parts=r.number(d, "max_parts", path, 6, 1, 255), notify=notify, credits=credits,
        limits=_limits(r, d.get("limits"), f"{path}.limits", limits or Limits()),
        smtp_auth=tuple(smtp_auth) if smtp_auth is not None else None,
    )


def _smpp(r: _Reader, node: Any) -> SmppConfig:
    d = r.mapping(node, "provider", ("smpp",))
    s = r.mapping(d.get("smpp"), "provider.smpp", (
        "host", "port", "system_id", "password", "system_type", "window", "rate", "enquire_link",
        "reconnect_min", "reconnect_max", "validity", "submit_timeout", "receipt_timeout"))
    b = SmppConfig()
    p = "provider.smpp"
    host = r.string(s, "host", p, b.host)
    if host is not None and not _host_ok(host.strip()):
        r.bad(f"{p}.host", f"{host!r} is not a host name or IP address")
        host = None
    return SmppConfig(
        host=host.strip() if host else b.host,
        port=r.number(s, "port", p, b.port, 1, 65535),
        system_id=r.string(s, "system_id", p, "") or "",
        password=r.string(s, "password", p, "") or "",
        system_type=r.string(s, "system_type", p, "") or "",
        window=r.number(s, "window", p, b.window, 1, 1000),
        rate=r.number(s, "rate", p, b.rate, 0, 100000, integer=False),
        enquire_link=r.number(s, "enquire_link", p, b.enquire_link, 1, 3600, integer=False),
        reconnect_min=r.number(s, "reconnect_min", p, b.reconnect_min, 0.01, 3600, integer=False),
        reconnect_max=r.number(s, "reconnect_max", p, b.reconnect_max, 0.01, 86400, integer=False),
        validity=r.number(s, "validity", p, b.validity, 60, 30 * 86400),
        submit_timeout=r.number(s, "submit_timeout", p, b.submit_timeout, 0.1, 3600, integer=False),
        receipt_timeout=r.number(s, "receipt_timeout", p, b.receipt_timeout, 1, 30 * 86400, integer=False),
    )


def _notify(r: _Reader, node: Any) -> NotifyConfig:
    d = r.mapping(node, "notify", ("smtp", "from"))
    host, port = _host_port(r, r.string(d, "smtp", "notify", "127.0.0.1:25") or "127.0.0.1:25",
                            "notify.smtp", 25) or ("127.0.0.1", 25)
    sender = r.string(d, "from", "notify", NotifyConfig.sender) or NotifyConfig.sender
    if "@" not in sender:
        r.bad("notify.from", f"{sender!r} is not an e-mail address")
    return NotifyConfig(smtp_host=host, smtp_port=port, sender=sender)


def _xml(r: _Reader, node: Any) -> XmlConfig:
    d = r.mapping(node, "xml", ("allowed_url_hosts", "url_timeout"))
    hosts = d.get("allowed_url_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        r.bad("xml.allowed_url_hosts", "must be a list of host names")
        hosts = []
    return XmlConfig(
        allowed_url_hosts=tuple(h.lower() for h in hosts),
        url_timeout=r.number(d, "url_timeout", "xml", 5.0, 0.1, 60, integer=False),
    )


def _metrics(r: _Reader, node: Any) -> MetricsConfig:
    d = r.mapping(node, "metrics", ("milter", "dispatcher"))
    out: dict[str, str | None] = {}
    for key in ("milter", "dispatcher"):
        value = r.string(d, key, "metrics")
        if value is not None:
            found = _host_port(r, value, f"metrics.{key}", 0)  # a bad host or port: one line already
            if found is None:
                value = None
            elif not found[1]:
                r.bad(f"metrics.{key}", f"{value!r} needs a host and a port, e.g. 127.0.0.1:9894")
                value = None
            else:
                host, port = found
                value = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out[key] = value
    if out["milter"] and out["milter"] == out["dispatcher"]:
        r.bad("metrics.dispatcher", "must differ from metrics.milter (both daemons listen)")
    return MetricsConfig(**out)


REQUIRED_SECTIONS = ("milter", "spool", "domains", "accounts", "provider", "notify")


def parse(data: Any, source: str = "<config>", words: dict[str, str] | None = None,
          complete: bool = False) -> Config:
    """`complete`: a whole configuration file (load), whose missing sections are problems;
    partial dicts (tests, tools) get the defaults."""
    r = _Reader(words)
    if data is None:
        raise ConfigError([f"{source}: the file is empty; a configuration needs the sections "
                           f"{', '.join(REQUIRED_SECTIONS)} (see README)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections "
                           f"({', '.join(REQUIRED_SECTIONS)}), got {r.got(data, '')}"])
    top = r.mapping(data, "", ("milter", "spool", "domains", "accounts", "provider", "notify", "xml",
                                  "metrics", "limits"))
    for section in REQUIRED_SECTIONS if complete else ():
        present = section in top or (section == "provider" and "providers" in top)
        if not present and section not in ("domains", "accounts"):  # those two say so themselves
            r.bad(section, "the section is missing (see the example in README)")
    limits = _limits(r, top.get("limits"), "limits", Limits(), top=True)
    limits_node = top.get("limits")
    breaker = _breaker(r, limits_node.get("breaker")) if isinstance(limits_node, dict) else None
    accounts_node = r.mapping(top.get("accounts"), "accounts")
    accounts = {str(n): _account(r, str(n), spec, limits) for n, spec in accounts_node.items()}
    cfg = Config(
        milter=_milter(r, top.get("milter")),
        spool=_spool(r, top.get("spool")),
        domains=_domains(r, top.get("domains")),
        accounts=accounts,
        smpp=_smpp(r, top.get("provider")),
        notify=_notify(r, top.get("notify")),
        xml=_xml(r, top.get("xml")),
        metrics=_metrics(r, top.get("metrics")),
        limits=limits,
        breaker=breaker,
        source=source,
    )
    _cross_checks(r, cfg)
    if r.problems:
        raise ConfigError(r.problems)
    return cfg


def _cross_checks(r: _Reader, cfg: Config) -> None:
    seen_addr: dict[str, str] = {}
    seen_key: dict[str, str] = {}
    for acc in cfg.accounts.values():
        for i, s in enumerate(acc.senders):
            if s.address:
                other = seen_addr.setdefault(s.address, acc.name)
                if other != acc.name:
                    r.bad(f"accounts.{acc.name}.senders[{i}].address",
                          f"also authorized for account {other}: a sender address must belong to one account")
        if acc.userkey:
            other = seen_key.setdefault(acc.userkey, acc.name)
            if other != acc.name:
                r.bad(f"accounts.{acc.name}.userkey", f"same userkey as account {other}")


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        words = _scalar_words(root)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    except RecursionError:
        raise ConfigError([f"{p}: not valid YAML: nested too deeply"]) from None
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise ConfigError(duplicates)
    return parse(data, str(p), words, complete=True)


def _child(path: str, key: Any) -> str:
    name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
    return f"{path}.{name}" if path else name


def _nodes(node: Any, path: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """Every node of the document with the YAML path problems are reported with. A collection
    reached again through an alias is not walked (nor yielded) again: no blow-up, no loop."""
    seen = set() if seen is None else seen
    if not isinstance(node, yaml.ScalarNode):
        if id(node) in seen:
            return
        seen.add(id(node))
    yield path, node
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _nodes(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _nodes(value, _child(path, key), seen)


def _duplicate_keys(root: Any) -> list[str]:
    """One line per key written twice in one mapping (YAML would let the last one win silently).
    `<<` merge keys may override."""
    out: list[str] = []
    for path, node in _nodes(root):
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                name, line = str(key.value), key.start_mark.line + 1
                if (key.tag, name) in first:
                    out.append(f"{_child(path, key)}: duplicate key {name!r} at line {line} (first at line "
                               f"{first[key.tag, name]}; write each key once)")
                else:
                    first[key.tag, name] = line
    return out


def _scalar_words(root: Any) -> dict[str, str]:
    """Every scalar of the document as written, by its YAML path (the first one written there)."""
    out: dict[str, str] = {}
    for path, node in _nodes(root):
        if isinstance(node, yaml.ScalarNode):
            out.setdefault(path, str(node.value))
    return out
