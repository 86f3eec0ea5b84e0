"""xml@ URL notifications: one parser for the allowlist check and for the HTTP call.

A callback URL is checked when the xml@ request comes (the allowlist of hosts) and called
by the dispatcher later. Both read it with `parse_url`, a strict parser of the plain
`http(s)://host[:port]/path?query` form, and the call connects to exactly the host and port
that were checked: there is no second parser (urllib, a browser-style WHATWG parser) to
disagree with the first. What such parsers read differently is refused outright:
a backslash, user information (`user@`), blanks and control characters, non-ASCII, an
empty or odd host, a bad port.

Redirects are not left to a library: each hop's Location is parsed the same way and
checked against the same allowlist (at most MAX_REDIRECTS hops); a hop outside it ends the
callback (logged by the caller, never followed).
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin

MAX_URL_LEN = 2000
MAX_REDIRECTS = 3
_URL = re.compile(r"(https?)://([^/?#]*)([/?][^#]*)?(#.*)?", re.IGNORECASE | re.DOTALL)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TARGET_OK = re.compile(r"[!-~]*")  # printable ASCII, no blank


@dataclass(frozen=True)
class CallbackUrl:
    scheme: str  # http | https
    host: str  # lowercased, no trailing dot; an IPv6 address without brackets
    port: int
    target: str  # path and query, as sent in the request line

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 80 if self.scheme == "http" else 443
        return f"{self.scheme}://{host}{'' if self.port == default else f':{self.port}'}{self.target}"


class CallbackError(Exception):
    """The call failed in a way worth trying again (connection, HTTP status)."""


class CallbackRefused(Exception):
    """The URL (or a redirect's) may not be called: never tried again."""


def parse_url(url: str) -> CallbackUrl | str:
    """The URL's parts, or why it is not accepted (a short phrase)."""
    if len(url) > MAX_URL_LEN:
        return f"the URL is longer than {MAX_URL_LEN} characters"
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "the URL contains blanks, control or non-ASCII characters"
    if "\\" in url:
        return "the URL contains a backslash"
    m = _URL.fullmatch(url)
    if m is None:
        return "only http:// and https:// URLs are accepted" if "://" in url else "the URL is malformed"
    scheme, authority, target = m.group(1).lower(), m.group(2), m.group(3) or "/"
    if "@" in authority:
        return "user information (user@host) in the URL is not accepted"
    if not authority:
        return "the URL has no host"
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return "the URL is malformed"
        host, rest = authority[1:end], authority[end + 1:]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            return "the URL's host is not a valid IPv6 address"
    else:
        host, colon, port_text = authority.partition(":")
        rest = colon + port_text
        host = host.lower().rstrip(".")
        if not host:
            return "the URL has no host"
        if not all(_LABEL.fullmatch(label) for label in host.split(".")):
            return "the URL's host is not a valid host name or address"
        if re.fullmatch(r"[0-9.]+", host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                return "the URL's host is not a valid IPv4 address"
    port = 80 if scheme == "http" else 443
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
            return "the URL's port is not valid"
        port = int(rest[1:])
    if target.startswith("?"):
        target = "/" + target
    if not _TARGET_OK.fullmatch(target):
        return "the URL is malformed"
    return CallbackUrl(scheme, host, port, target)


def url_problem(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """None if `url` may be called back (parsed, and its host in the allowlist), else why not."""
    u = parse_url(url)
    if isinstance(u, str):
        return u
    if u.host not in allowed_hosts:
        return f"host {u.host} is not in this gateway's list of allowed notification hosts"
    return None


def call(url: str, allowed_hosts: tuple[str, ...] | None, timeout: float,
         user_agent: str = "sms-milter") -> str:
    """GET `url`; returns the host that answered 2xx. Redirects are followed only to URLs that
    pass the same check (allowed_hosts None: only to the first URL's host). CallbackRefused
    when a URL may not be called, CallbackError when the call failed (try again later)."""
    u = parse_url(url)
    if isinstance(u, str):
        raise CallbackRefused(u)
    allowed = allowed_hosts if allowed_hosts is not None else (u.host,)
    for _ in range(MAX_REDIRECTS + 1):
        if u.host not in allowed:
            raise CallbackRefused(f"host {u.host} is not an allowed notification host")
        conn: http.client.HTTPConnection
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.host, u.port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(u.host, u.port, timeout=timeout)
        try:
            conn.request("GET", u.target, headers={"User-Agent": user_agent, "Connection": "close"})
            resp = conn.getresponse()
            location = resp.getheader("Location") or ""
            resp.read(4096)
            status = resp.status
        except (OSError, http.client.HTTPException) as e:
            raise CallbackError(f"{type(e).__name__}: {e}") from None
        finally:
            conn.close()
        if 200 <= status < 300:
            return u.host
        if status in (301, 302, 303, 307, 308) and location:
            nxt = parse_url(urljoin(str(u), location.strip()))
            if isinstance(nxt, str):
                raise CallbackRefused(f"redirect to a URL that is not accepted: {nxt}")
            u = nxt
            continue
        raise CallbackError(f"HTTP {status} from {u.host}")
    raise CallbackError(f"more than {MAX_REDIRECTS} redirects")
