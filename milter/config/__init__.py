"""Configuration: YAML in, typed frozen objects (`model`) out.

`load(path)` returns a `Config` or raises `ConfigError` whose `problems` list holds one
line per problem, each starting with its YAML path (`accounts.acme.max_parts: ...`).
Nothing else in the package reads YAML. The sections are read in `accounts`, `limits` and
`provider`; `reader` collects the problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..model import (
    Config,
    Domain,
    Limits,
    MetricsConfig,
    MilterConfig,
    NotifyConfig,
    SpoolConfig,
    XmlConfig,
)
from ..policy.devices import configured_channels
from ..policy.styles import STYLES
from .accounts import parse_account
from .channels import parse_fax, parse_voice
from .limits import parse_breaker, parse_limits
from .provider import parse_providers
from .reader import Reader, duplicate_keys, host_port, scalar_words, socket_spec

DEFAULT_PATH = "/etc/sms-milter/sms-milter.yaml"


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _milter(r: Reader, node: Any) -> MilterConfig:
    d = r.mapping(node, "milter", ("socket", "max_message_bytes", "dedupe_seconds",
                                   "dedupe_anonymous_seconds", "spool_timeout"))
    base = MilterConfig()
    sock = r.string(d, "socket", "milter", base.socket) or base.socket
    return MilterConfig(
        socket=socket_spec(r, sock, "milter.socket"),
        max_message_bytes=r.number(d, "max_message_bytes", "milter", base.max_message_bytes, 1024, 1 << 30),
        dedupe_seconds=r.number(d, "dedupe_seconds", "milter", base.dedupe_seconds, 0, 366 * 86400),
        dedupe_anonymous_seconds=r.number(d, "dedupe_anonymous_seconds", "milter",
                                          base.dedupe_anonymous_seconds, 0, 86400),
        spool_timeout=r.number(d, "spool_timeout", "milter", base.spool_timeout, 0.1, 120, integer=False),
    )


def _spool(r: Reader, node: Any) -> SpoolConfig:
    d = r.mapping(node, "spool", ("path", "url"))
    url = r.string(d, "url", "spool")
    if url is not None:
        if "path" in d:
            r.bad("spool", "give either path (SQLite) or url (PostgreSQL), not both")
        why = _pg_url_problem(url)
        if why:
            r.bad("spool.url", why)
            url = None
        return SpoolConfig(url=url or None)
    path = r.string(d, "path", "spool", SpoolConfig.path)
    if path is not None and not path.startswith("/"):
        r.bad("spool.path", f"{path!r}: the spool needs an absolute path, e.g. "
                            f"{SpoolConfig.path}")
        path = None
    return SpoolConfig(path=path or SpoolConfig.path, url=None)


def _pg_url_problem(url: str) -> str:
    """Why `url` is no postgresql://USER[:PASSWORD]@HOST[:PORT]/DB URL ('' if it is one); the
    answer never holds the password."""
    from urllib.parse import urlsplit

    example = "e.g. postgresql://sms:PASSWORD@db.example.com:5432/sms"
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return f"not a valid URL (a bad port?); {example}"
    if u.scheme not in ("postgresql", "postgres"):
        return f"must start with postgresql://; {example}"
    if not u.path.strip("/"):
        return f"names no database (the /DB part); {example}"
    if not u.hostname and "host=" not in u.query:
        return f"names no host; {example}"
    if port is not None and not 1 <= port <= 65535:
        return "the port must be 1-65535"
    return ""


def _domains(r: Reader, node: Any, channels: frozenset[str]) -> dict[str, Domain]:
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
        out[lname] = Domain(name=lname, style=style or "aspsms", channels=channels)
    if not out:
        r.bad("domains", "at least one SMS domain is required")
    return out


def _notify(r: Reader, node: Any) -> NotifyConfig:
    d = r.mapping(node, "notify", ("smtp", "from"))
    host, port = host_port(r, r.string(d, "smtp", "notify", "127.0.0.1:25") or "127.0.0.1:25",
                            "notify.smtp", 25) or ("127.0.0.1", 25)
    sender = r.string(d, "from", "notify", NotifyConfig.sender) or NotifyConfig.sender
    if "@" not in sender:
        r.bad("notify.from", f"{sender!r} is not an e-mail address")
    return NotifyConfig(smtp_host=host, smtp_port=port, sender=sender)


def _xml(r: Reader, node: Any) -> XmlConfig:
    d = r.mapping(node, "xml", ("allowed_url_hosts", "url_timeout"))
    hosts = d.get("allowed_url_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        r.bad("xml.allowed_url_hosts", "must be a list of host names")
        hosts = []
    return XmlConfig(
        allowed_url_hosts=tuple(h.lower() for h in hosts),
        url_timeout=r.number(d, "url_timeout", "xml", 5.0, 0.1, 60, integer=False),
    )


def _metrics(r: Reader, node: Any) -> MetricsConfig:
    d = r.mapping(node, "metrics", ("milter", "dispatcher"))
    out: dict[str, str | None] = {}
    for key in ("milter", "dispatcher"):
        value = r.string(d, key, "metrics")
        if value is not None:
            found = host_port(r, value, f"metrics.{key}", 0)  # a bad host or port: one line already
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
    r = Reader(words)
    if data is None:
        raise ConfigError([f"{source}: the file is empty; a configuration needs the sections "
                           f"{', '.join(REQUIRED_SECTIONS)} (see README)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections "
                           f"({', '.join(REQUIRED_SECTIONS)}), got {r.got(data, '')}"])
    top = r.mapping(data, "", ("milter", "spool", "domains", "accounts", "provider", "providers", "routes",
                                  "notify", "xml", "metrics", "limits", "voice", "fax"))
    for section in REQUIRED_SECTIONS if complete else ():
        present = section in top or (section == "provider" and "providers" in top)
        if not present and section not in ("domains", "accounts"):  # those two say so themselves
            r.bad(section, "the section is missing (see the example in README)")
    limits = parse_limits(r, top.get("limits"), "limits", Limits(), top=True)
    limits_node = top.get("limits")
    breaker = parse_breaker(r, limits_node.get("breaker")) if isinstance(limits_node, dict) else None
    accounts_node = r.mapping(top.get("accounts"), "accounts")
    accounts = {str(n): parse_account(r, str(n), spec, limits) for n, spec in accounts_node.items()}
    providers, routes = parse_providers(r, top)
    channels = configured_channels("voice" in top, "fax" in top)
    cfg = Config(
        milter=_milter(r, top.get("milter")),
        spool=_spool(r, top.get("spool")),
        domains=_domains(r, top.get("domains"), channels),
        accounts=accounts,
        providers=providers,
        routes=routes,
        notify=_notify(r, top.get("notify")),
        xml=_xml(r, top.get("xml")),
        metrics=_metrics(r, top.get("metrics")),
        limits=limits,
        breaker=breaker,
        voice=parse_voice(r, top["voice"]) if "voice" in top else None,
        fax=parse_fax(r, top["fax"]) if "fax" in top else None,
        source=source,
    )
    _cross_checks(r, cfg)
    if r.problems:
        raise ConfigError(r.problems)
    return cfg


def _cross_checks(r: Reader, cfg: Config) -> None:
    for i, route in enumerate(cfg.routes):
        for j, name in enumerate(route.accounts):
            if name not in cfg.accounts:
                r.bad(f"routes[{i}].accounts[{j}]", f"no account named {name!r}")
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


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # far above any real configuration; -c /dev/zero stops here


def load(path: str | Path) -> Config:
    if not str(path):
        raise ConfigError(["the configuration file name is empty (-c '')"])
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            mib = MAX_CONFIG_BYTES // (1024 * 1024)
            raise ConfigError([f"{p}: larger than {mib} MiB: not a configuration file"])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        words = scalar_words(root)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    except RecursionError:
        raise ConfigError([f"{p}: not valid YAML: nested too deeply"]) from None
    duplicates = duplicate_keys(root)
    if duplicates:
        raise ConfigError(duplicates)
    return parse(data, str(p), words, complete=True)
