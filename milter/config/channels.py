"""The `voice:` and `fax:` sections (issue 15): the TeleMessage voice and fax channels.

Absent section: that channel is off (None). See model.VoiceConfig / model.FaxConfig.
"""

from __future__ import annotations

import re
from typing import Any

from ..model import FaxConfig, VoiceConfig
from .reader import Reader, host_ok, host_port

VOICE_KEYS = ("trunk", "user", "domain", "auth_user", "password", "register", "codec", "listen", "rtp_ports",
              "dial_prefix", "language", "words_per_minute", "max_seconds", "repeat",
              "confirm_digit", "confirm_prompt", "ring_timeout",
              "max_attempts", "trunk_retry", "calls", "work_dir")
FAX_KEYS = ("server", "dial_prefix", "max_pages", "max_bytes", "max_tries", "max_dials", "kill_after", "poll",
            "jobs", "work_dir")
_SIP_USER = re.compile(r"^[A-Za-z0-9._~+-]{1,64}$")
_DIAL_PREFIX = re.compile(r"^[0-9+*#]{0,8}$")
_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{1,8})*$")
PREFIX_WHAT = "digits, + * or # (at most 8)"
DIGIT_WHAT = "one DTMF digit (0-9, * or #)"
_DIGIT = re.compile(r"^[0-9*#]?$")
_RANGE = re.compile(r"^(\d{1,5})-(\d{1,5})$")


def _flag(r: Reader, d: dict, key: str, path: str, default: bool) -> bool:
    if key not in d or d[key] is None:
        return default
    if not isinstance(d[key], bool):
        r.bad(f"{path}.{key}", f"must be true or false, got {r.got(d[key], f'{path}.{key}')}")
        return default
    return bool(d[key])


def _server(r: Reader, d: dict, key: str, path: str, default: str, port: int) -> str:
    value = r.string(d, key, path, default) or default
    hp = host_port(r, value.strip(), f"{path}.{key}", port)
    return f"{hp[0]}:{hp[1]}" if hp else default


def _match(r: Reader, d: dict, key: str, path: str, default: str, pattern: re.Pattern, what: str) -> str:
    value = r.string(d, key, path, default)
    if value is None or not pattern.match(value):
        r.bad(f"{path}.{key}", f"{value!r} is not {what}")
        return default
    return value


def _work_dir(r: Reader, d: dict, path: str, default: str) -> str:
    value = r.string(d, "work_dir", path, default) or default
    if not value.startswith("/"):
        r.bad(f"{path}.work_dir", f"{value!r} must be an absolute path")
        return default
    return value


def _secret(r: Reader, d: dict, key: str, path: str) -> str:
    """A password that goes into baresip's account line: no separators it would split on."""
    value = r.string(d, key, path, "") or ""
    if re.search(r'[\s;"<>,]', value):
        r.bad(f"{path}.{key}", "must not contain spaces or any of ; \" < > ,")  # the value is never shown
        return ""
    return value


def parse_voice(r: Reader, node: Any) -> VoiceConfig:
    p = "voice"
    d = r.mapping(node, p, VOICE_KEYS)
    b = VoiceConfig()
    codec = (r.string(d, "codec", p, b.codec) or b.codec).upper()
    if codec not in ("PCMU", "PCMA"):
        r.bad(f"{p}.codec", f"{codec!r} is not PCMU or PCMA")
        codec = b.codec
    listen = (r.string(d, "listen", p, b.listen) or b.listen).strip()
    if not host_ok(listen):
        r.bad(f"{p}.listen", f"{listen!r} is not an IP address or host name")
        listen = b.listen
    rtp = r.string(d, "rtp_ports", p, b.rtp_ports) or b.rtp_ports
    m = _RANGE.match(rtp)
    if not m or not 1024 <= int(m[1]) < int(m[2]) <= 65535:
        r.bad(f"{p}.rtp_ports", f"{rtp!r} is not a port range LOW-HIGH within 1024-65535")
        rtp = b.rtp_ports
    domain = (r.string(d, "domain", p, "") or "").strip()
    if domain and not host_ok(domain):
        r.bad(f"{p}.domain", f"{domain!r} is not a host name")
        domain = ""
    prompt = r.string(d, "confirm_prompt", p, b.confirm_prompt) or b.confirm_prompt
    try:
        prompt.format(digit="1")
    except (KeyError, IndexError, ValueError):
        r.bad(f"{p}.confirm_prompt", "may contain {digit} and no other {...}")
        prompt = b.confirm_prompt
    return VoiceConfig(
        trunk=_server(r, d, "trunk", p, b.trunk, 5060),
        user=_match(r, d, "user", p, b.user, _SIP_USER, "a SIP user name (letters, digits, ._~+-)"),
        domain=domain,
        auth_user=(r.string(d, "auth_user", p, "") or ""),
        password=_secret(r, d, "password", p),
        register=_flag(r, d, "register", p, b.register),
        codec=codec, listen=listen, rtp_ports=rtp,
        dial_prefix=_match(r, d, "dial_prefix", p, b.dial_prefix, _DIAL_PREFIX, PREFIX_WHAT),
        language=_match(r, d, "language", p, b.language, _LANG, "an espeak-ng language such as en or fr-ch"),
        words_per_minute=r.number(d, "words_per_minute", p, b.words_per_minute, 80, 450),
        max_seconds=r.number(d, "max_seconds", p, b.max_seconds, 1, 3600, integer=False),
        repeat=_flag(r, d, "repeat", p, b.repeat),
        confirm_digit=_match(r, d, "confirm_digit", p, b.confirm_digit, _DIGIT, DIGIT_WHAT),
        confirm_prompt=prompt,
        ring_timeout=r.number(d, "ring_timeout", p, b.ring_timeout, 1, 300, integer=False),
        max_attempts=r.number(d, "max_attempts", p, b.max_attempts, 1, 100),
        trunk_retry=r.number(d, "trunk_retry", p, b.trunk_retry, 1, 3600, integer=False),
        calls=r.number(d, "calls", p, b.calls, 1, 100),
        work_dir=_work_dir(r, d, p, b.work_dir),
    )


def parse_fax(r: Reader, node: Any) -> FaxConfig:
    p = "fax"
    d = r.mapping(node, p, FAX_KEYS)
    b = FaxConfig()
    return FaxConfig(
        server=_server(r, d, "server", p, b.server, 4559),
        dial_prefix=_match(r, d, "dial_prefix", p, b.dial_prefix, _DIAL_PREFIX, PREFIX_WHAT),
        max_pages=r.number(d, "max_pages", p, b.max_pages, 1, 1000),
        max_bytes=r.number(d, "max_bytes", p, b.max_bytes, 10000, 1 << 30),
        max_tries=r.number(d, "max_tries", p, b.max_tries, 1, 100),
        max_dials=r.number(d, "max_dials", p, b.max_dials, 1, 100),
        kill_after=r.number(d, "kill_after", p, b.kill_after, 60, 30 * 86400, integer=False),
        poll=r.number(d, "poll", p, b.poll, 0.1, 3600, integer=False),
        jobs=r.number(d, "jobs", p, b.jobs, 1, 10000),
        work_dir=_work_dir(r, d, p, b.work_dir),
    )
