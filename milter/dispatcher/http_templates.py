"""HTTP provider helpers: job fields into templates, JSON paths and status ranges of answers,
URLs and texts made safe for logs (dispatcher/http.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ..model import HttpConfig, StatusRanges
from ..policy.addresses import originator_wire
from ..policy.smstext import is_gsm7
from ..spool.base import Job

SECRET_KEY = re.compile(r"pass|secret|token|key|auth|sig|pwd|credential", re.I)


def json_at(data: Any, path: str) -> Any:
    """The value at a dotted JSON path (keys, list indexes), or None."""
    for seg in path.split("."):
        if isinstance(data, dict):
            data = data.get(seg)
        elif isinstance(data, list) and seg.lstrip("-").isdigit() and -len(data) <= int(seg) < len(data):
            data = data[int(seg)]
        else:
            return None
    return data


def scalar(value: Any) -> str | None:
    """A JSON scalar as the config writes it (true/false lower case); None for lists, maps, null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def in_ranges(status: int, ranges: StatusRanges) -> bool:
    return any(lo <= status <= hi for lo, hi in ranges)


def safe_url(url: str) -> str:
    """The URL for logs: no user info, no query, no fragment."""
    try:
        p = urlsplit(url)
        return urlunsplit((p.scheme, p.hostname or "", p.path, "", "")) if p.port is None else \
            urlunsplit((p.scheme, f"{p.hostname}:{p.port}", p.path, "", ""))
    except ValueError:
        return "<bad URL>"


def job_values(job: Job, reference: str, callback_url: str) -> dict[str, str]:
    """The template placeholders of one job (model.HTTP_FIELDS)."""
    digits = job.recipient.lstrip("+")
    ton, _, orig = originator_wire(job.originator)
    unicode = not is_gsm7(job.text)
    return {
        "recipient": job.recipient, "recipient_00": "00" + digits, "recipient_digits": digits,
        "text": job.text, "originator": job.originator, "originator_digits": orig,
        "reference": reference, "callback_url": callback_url, "parts": str(job.parts),
        "coding": "2" if unicode else "0", "unicode": "1" if unicode else "0",
        "flash": "1" if job.flash else "0", "job_id": str(job.id),
    }


def render(template: Any, values: Mapping[str, str], quote_values: bool = False) -> Any:
    """Fill a template (config/http.py checked it): strings are filled, lists and mappings walked."""
    if isinstance(template, str):
        if quote_values:
            return template.format_map({k: quote(v, safe="") for k, v in values.items()})
        return template.format_map(values)
    if isinstance(template, dict):
        return {str(k): render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, values) for v in template]
    return template


def secrets_of(cfg: HttpConfig) -> list[str]:
    out = [v for _, v in cfg.headers]
    if cfg.auth:
        out.append(cfg.auth[1])
    out += [v for k, v in cfg.query if SECRET_KEY.search(k) and "{" not in v]
    if isinstance(cfg.fields, dict):
        out += [str(v) for k, v in cfg.fields.items() if SECRET_KEY.search(str(k)) and isinstance(v, str)
                and "{" not in v]
    if cfg.callback:
        out.append(cfg.callback.token)
    return sorted({s for s in out if len(s) >= 4}, key=len, reverse=True)
