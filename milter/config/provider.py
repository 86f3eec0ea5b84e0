"""The `provider:` section: how the dispatcher reaches the SMSC."""

from __future__ import annotations

from typing import Any

from ..model import SmppConfig
from .reader import Reader, host_ok


def parse_provider(r: Reader, node: Any) -> SmppConfig:
    d = r.mapping(node, "provider", ("smpp",))
    s = r.mapping(d.get("smpp"), "provider.smpp", (
        "host", "port", "system_id", "password", "system_type", "window", "rate", "enquire_link",
        "reconnect_min", "reconnect_max", "validity", "submit_timeout", "receipt_timeout"))
    b = SmppConfig()
    p = "provider.smpp"
    host = r.string(s, "host", p, b.host)
    if host is not None and not host_ok(host.strip()):
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
