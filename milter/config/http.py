"""`providers.NAME.http`: an HTTP SMS API described by configuration (dispatcher/http.py).

Every template, JSON path and regex is checked here, so a running dispatcher never meets a
bad one: an unknown placeholder, a broken regex, a message-id regex without a group, a token
too short to be unguessable are problems naming their YAML path.
"""

from __future__ import annotations

import re
import string
from typing import Any
from urllib.parse import urlsplit

from ..model import (
    HTTP_FIELDS,
    HTTP_PART_STATES,
    HTTP_POLL_FIELDS,
    HttpCallback,
    HttpConfig,
    HttpPoll,
    StatusRanges,
)
from .reader import Reader, host_port

KEYS = ("url", "method", "query", "headers", "auth", "body", "fields", "response", "timeout", "concurrency",
        "callback", "poll")
RESPONSE_KEYS = ("success_status", "success_regex", "success_json", "success_values", "message_id_json",
                 "message_id_regex", "temporary_status", "temporary_regex")
CALLBACK_KEYS = ("listen", "url", "token", "suffix", "state_field", "states", "ref_field", "number_field",
                 "error_field", "max_body", "timeout")
POLL_KEYS = ("url", "interval", "state_json", "state_regex", "states")
MIN_TOKEN = 24  # characters of a callback token


def template_problem(text: str, fields: tuple[str, ...] = HTTP_FIELDS) -> str | None:
    """None if `text` is a valid template ({name} of `fields`, {{ }} literal), else why not."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        return f"{text!r} is not a valid template ({e}; write {{{{ and }}}} for literal braces)"
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in fields or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            return f"unknown placeholder {shown} (known: {', '.join('{' + f + '}' for f in fields)})"
    return None


def json_path_problem(path: str) -> str | None:
    if not path or any(not seg for seg in path.split(".")):
        return f"{path!r} is not a JSON path (keys and list indexes separated by dots, e.g. messages.0.id)"
    return None


def _regex(r: Reader, d: dict, key: str, path: str, groups: int = 0) -> str:
    value = r.string(d, key, path, "") or ""
    if not value:
        return ""
    try:
        rx = re.compile(value)
    except re.error as e:
        r.bad(f"{path}.{key}", f"not a valid regular expression: {e}")
        return ""
    if rx.groups < groups:
        r.bad(f"{path}.{key}", "needs a group ( ... ) around the value to take")
        return ""
    return value


def _json_path(r: Reader, d: dict, key: str, path: str) -> str:
    value = r.string(d, key, path, "") or ""
    if value and (why := json_path_problem(value)):
        r.bad(f"{path}.{key}", why)
        return ""
    return value


def _statuses(r: Reader, node: Any, path: str, default: StatusRanges) -> StatusRanges:
    """[200, 202, "2xx", "500-599"] -> ranges."""
    if node is None:
        return default
    items = node if isinstance(node, list) else [node]
    out = []
    for i, item in enumerate(items):
        s = str(item).strip().lower()
        m = re.fullmatch(r"([1-5])xx|(\d{3})(?:-(\d{3}))?", s)
        if isinstance(item, bool) or m is None:
            r.bad(f"{path}[{i}]", f"{item!r} is not a status code, a class like 5xx or a range like 500-504")
            continue
        if m.group(1):
            out.append((int(m.group(1)) * 100, int(m.group(1)) * 100 + 99))
        else:
            lo = int(m.group(2))
            hi = int(m.group(3) or lo)
            if not 100 <= lo <= hi <= 599:
                r.bad(f"{path}[{i}]", f"{item!r}: status codes run from 100 to 599, low to high")
                continue
            out.append((lo, hi))
    return tuple(out)


def _pairs(r: Reader, node: Any, path: str, fields: tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """A mapping of strings (templates when `fields`), order kept."""
    d = r.mapping(node, path)
    out = []
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            r.bad(f"{path}.{k}", f"must be a string, got {r.got(v, f'{path}.{k}')}")
            continue
        v = str(v)
        if fields is not None and (why := template_problem(v, fields)):
            r.bad(f"{path}.{k}", why)
            continue
        out.append((str(k), v))
    return tuple(out)


def _headers(r: Reader, node: Any, path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in _pairs(r, node, path, None):
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", k):
            r.bad(f"{path}.{k}", "is not an HTTP header name")
        elif not re.fullmatch(r"[\x20-\x7e\t]*", v):
            r.bad(f"{path}.{k}", "the value must be printable ASCII on one line")
        else:
            out.append((k, v))
    return tuple(out)


def _states(r: Reader, node: Any, path: str) -> tuple[tuple[str, str], ...]:
    pairs = _pairs(r, node, path, None)
    for k, v in pairs:
        if v not in HTTP_PART_STATES:
            r.bad(f"{path}.{k}", f"must be one of {', '.join(HTTP_PART_STATES)}, got {v!r}")
    if node is not None and not pairs:
        r.bad(path, "needs at least one value -> state")
    return tuple((k, v) for k, v in pairs if v in HTTP_PART_STATES)


def _body_template(r: Reader, node: Any, path: str) -> object:
    """Check every string inside a JSON/form template; return it unchanged."""
    if isinstance(node, dict):
        for k, v in node.items():
            _body_template(r, v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _body_template(r, v, f"{path}[{i}]")
    elif isinstance(node, str):
        if why := template_problem(node):
            r.bad(path, why)
    elif node is not None and not isinstance(node, (int, float, bool)):
        r.bad(path, f"must be a string, number, boolean, list or mapping, got {r.got(node, path)}")
    return node


def _url(r: Reader, value: str | None, path: str, fields: tuple[str, ...]) -> str:
    if not value:
        return ""
    if why := template_problem(value, fields):
        r.bad(path, why)
        return ""
    parts = urlsplit(value.replace("{", "").replace("}", ""))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        r.bad(path, f"{value!r} must be an http:// or https:// URL")
        return ""
    return value


def _callback(r: Reader, node: Any, path: str) -> HttpCallback | None:
    if node is None:
        return None
    d = r.mapping(node, path, CALLBACK_KEYS)
    listen = r.string(d, "listen", path, required=True) or ""
    found = host_port(r, listen, f"{path}.listen", 0) if listen else None
    if found is not None and not found[1]:
        r.bad(f"{path}.listen", f"{listen!r} needs a host and a port, e.g. 127.0.0.1:8896")
    host, port = found if found else ("127.0.0.1", 0)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = _url(r, r.string(d, "url", path), f"{path}.url", ()) or f"http://{listen}"
    token = r.secret(d, "token", path, required=True) or ""
    if token and (len(token) < MIN_TOKEN or not re.fullmatch(r"[A-Za-z0-9_-]+", token)):
        r.bad(f"{path}.token", f"must be at least {MIN_TOKEN} letters, digits, '-' or '_' (unguessable: "
                               "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    base = HttpCallback(listen="", url="", token="")
    if "states" not in d:
        r.bad(f"{path}.states", "is required (the provider's state values -> delivered, buffered, failed, "
                                "expired or ignore)")
    return HttpCallback(
        listen=listen, url=url.rstrip("/"), token=token,
        suffix=r.string(d, "suffix", path, "") or "",
        state_field=r.string(d, "state_field", path, base.state_field) or base.state_field,
        states=_states(r, d.get("states"), f"{path}.states"),
        ref_field=r.string(d, "ref_field", path, "") or "",
        number_field=r.string(d, "number_field", path, "") or "",
        error_field=r.string(d, "error_field", path, "") or "",
        max_body=r.number(d, "max_body", path, base.max_body, 256, 1 << 20),
        timeout=r.number(d, "timeout", path, base.timeout, 0.5, 120, integer=False),
    )


def _poll(r: Reader, node: Any, path: str) -> HttpPoll | None:
    if node is None:
        return None
    d = r.mapping(node, path, POLL_KEYS)
    url = _url(r, r.string(d, "url", path, required=True), f"{path}.url", HTTP_POLL_FIELDS)
    state_json = _json_path(r, d, "state_json", path)
    state_regex = _regex(r, d, "state_regex", path, groups=1)
    if not state_json and not state_regex and "state_json" not in d and "state_regex" not in d:
        r.bad(path, "needs state_json or state_regex (where the answer holds the state)")
    return HttpPoll(url=url, interval=r.number(d, "interval", path, 300.0, 1, 86400, integer=False),
                    state_json=state_json, state_regex=state_regex,
                    states=_states(r, d.get("states"), f"{path}.states"))


def parse_http(r: Reader, node: Any, path: str) -> HttpConfig:
    """`path` is where the mapping sits, e.g. providers.kannel.http."""
    d = r.mapping(node, path, KEYS)
    method = (r.string(d, "method", path, "POST") or "POST").upper()
    if method not in ("GET", "POST", "PUT"):
        r.bad(f"{path}.method", f"must be GET, POST or PUT, got {method!r}")
        method = "POST"
    body = r.string(d, "body", path, "form" if method != "GET" else "none") or "form"
    if body not in ("form", "json", "none"):
        r.bad(f"{path}.body", f"must be form, json or none, got {body!r}")
        body = "none"
    fields = _body_template(r, d.get("fields"), f"{path}.fields")
    if body == "form" and fields is not None and not isinstance(fields, dict):
        r.bad(f"{path}.fields", "a form body needs a mapping of field -> template")
    if body == "none" and fields is not None:
        r.bad(f"{path}.fields", "given, but body is none (set body: form or body: json)")
    auth = None
    if d.get("auth") is not None:
        a = r.mapping(d.get("auth"), f"{path}.auth", ("username", "password"))
        auth = (r.secret(a, "username", f"{path}.auth", required=True) or "",
                r.secret(a, "password", f"{path}.auth", required=True) or "")
    resp = r.mapping(d.get("response"), f"{path}.response", RESPONSE_KEYS)
    rp = f"{path}.response"
    values = resp.get("success_values")
    if values is not None and (not isinstance(values, list) or not values
                               or any(isinstance(v, (dict, list)) for v in values)):
        r.bad(f"{rp}.success_values", "must be a list of values, e.g. [\"1\"]")
        values = None
    success_json = _json_path(r, resp, "success_json", rp)
    if success_json and not values:
        r.bad(f"{rp}.success_values", "is required with success_json (the values meaning success)")
    base = HttpConfig(url="")
    url = _url(r, r.string(d, "url", path, required=True), f"{path}.url", HTTP_FIELDS)
    cfg = HttpConfig(
        url=url, method=method,
        query=_pairs(r, d.get("query"), f"{path}.query", HTTP_FIELDS),
        headers=_headers(r, d.get("headers"), f"{path}.headers"),
        auth=auth, body=body, fields=fields,
        success_status=_statuses(r, resp.get("success_status"), f"{rp}.success_status", base.success_status),
        success_regex=_regex(r, resp, "success_regex", rp),
        success_json=success_json,
        success_values=tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values or ()),
        message_id_json=_json_path(r, resp, "message_id_json", rp),
        message_id_regex=_regex(r, resp, "message_id_regex", rp, groups=1),
        temporary_status=_statuses(r, resp.get("temporary_status"), f"{rp}.temporary_status",
                                   base.temporary_status),
        temporary_regex=_regex(r, resp, "temporary_regex", rp),
        timeout=r.number(d, "timeout", path, base.timeout, 0.1, 300, integer=False),
        concurrency=r.number(d, "concurrency", path, base.concurrency, 1, 256),
        callback=_callback(r, d.get("callback"), f"{path}.callback"),
        poll=_poll(r, d.get("poll"), f"{path}.poll"),
    )
    if cfg.message_id_json and cfg.message_id_regex:
        r.bad(f"{rp}.message_id_regex", "give message_id_json or message_id_regex, not both")
    if cfg.callback and cfg.callback.ref_field and not (cfg.message_id_json or cfg.message_id_regex):
        r.bad(f"{path}.callback.ref_field", "names the provider's message id, but the response has no "
                                            "message_id_json / message_id_regex to read it from")
    return cfg
