"""Reading YAML for the configuration: a problem collector, host/port and socket spellings,
and the node walk behind duplicate-key detection and "as written" values."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Any

import yaml

_KINDS = ((bool, "a boolean"), (int, "a number"), (float, "a decimal number"), (str, "a string"),
          (list, "a list"), (dict, "a mapping"))


def _num(x: float) -> str:
    """A bound as an operator writes it: 1099511627776, not 1.09951e+12; 0.1 stays 0.1."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Reader:
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

    def secret(self, d: dict, key: str, path: str, default: str | None = None, required: bool = False,
               max_octets: int = 0, what: str = "") -> str | None:
        """A secret or an identifier (password, login, userkey, system_id): a string as written,
        never a value YAML converted (12345678, yes, 1e3, 0x1F, 007 would silently change). No
        problem line ever holds the value; `max_octets` (with `what`, e.g. "SMPP 3.4 password")
        bounds its UTF-8 length, which may be named."""
        where = f"{path}.{key}"
        if key not in d or d[key] is None:
            if required:
                self.bad(where, "is required")
            return default
        return self.secret_value(d[key], where, key, default, max_octets, what)

    def secret_value(self, v: Any, where: str, key: str, default: str | None = None, max_octets: int = 0,
                     what: str = "") -> str | None:
        """`secret` for a value already taken out (a list item): `where` is its path."""
        if isinstance(v, (bool, int, float)):
            kind = next(k for t, k in _KINDS if isinstance(v, t))
            self.bad(where, f"YAML reads this unquoted value as {kind}, which would change it (leading "
                            f"zeros, 0x.., 1e3, yes/no); quote it ({key}: \"...\"); the value is not shown")
            return default
        if not isinstance(v, str):
            self.bad(where, f"must be a quoted string, got {self.got(v, where)}")
            return default
        if max_octets and len(v.encode("utf-8")) > max_octets:
            self.bad(where, f"is {len(v.encode('utf-8'))} octets long; {what or key} allows at most "
                            f"{max_octets} octets")
            return default
        return v

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


def host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host)) and not host.replace(".", "").isdigit()


def host_port(r: Reader, value: str, path: str, default_port: int) -> tuple[str, int] | None:
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
    if not host or not host_ok(host):
        r.bad(path, f"{host!r} in {value!r} is not a host name or IP address")
        return None
    return host, int(port) if port else default_port


def socket_spec(r: Reader, value: str, path: str) -> str:
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
        found = host_port(r, rest, path, 0)
        if found is None:
            return value
        host, port = found
        if not port:
            r.bad(path, f"{value!r} needs a host and a port, e.g. inet:127.0.0.1:8894")
            return value
        return f"inet:{host}:{port}"
    r.bad(path, f"{value!r} must be inet:HOST:PORT, inet:[IPv6]:PORT or unix:/PATH")
    return value


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


def duplicate_keys(root: Any) -> list[str]:
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


def scalar_words(root: Any) -> dict[str, str]:
    """Every scalar of the document as written, by its YAML path (the first one written there)."""
    out: dict[str, str] = {}
    for path, node in _nodes(root):
        if isinstance(node, yaml.ScalarNode):
            out.setdefault(path, str(node.value))
    return out
