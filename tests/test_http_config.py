"""`providers.NAME.http`: every template, JSON path, regex and callback setting is checked by
check-config, one line per problem naming its YAML path; the README's Kannel preset passes."""

from __future__ import annotations

import copy

import pytest
import yaml
from bed import run_cli, write_config
from kannel_bed import providers_config
from sms_milter.config import ConfigError, load

TOKEN = "x" * 32
PRESET = {
    "url": "http://127.0.0.1:13013/cgi-bin/sendsms", "method": "GET",
    "query": {"username": "u", "password": "p", "to": "{recipient_digits}", "text": "{text}",
              "dlr-url": "{callback_url}"},
    "response": {"success_status": [202], "success_regex": "^[03]: "},
    "callback": {"listen": "127.0.0.1:8896", "token": TOKEN, "state_field": "type",
                 "states": {"1": "delivered", "2": "failed", "8": "ignore"}},
}


def check(tmp_path, http: dict, cli: bool = False) -> tuple[int, list[str]]:
    """check-config's exit code and problem lines (in process: the same load() the CLI runs)."""
    path = providers_config(tmp_path, 2525, {"k": {"http": http}}, spool_path=tmp_path / "s.sqlite3")
    if not cli:
        try:
            load(path)
        except ConfigError as e:
            return 2, e.problems
        return 0, []
    r = run_cli(path, "check-config")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, [ln.removeprefix("sms-milter: ") for ln in r.stderr.strip().splitlines()]


def variant(change) -> dict:
    http = copy.deepcopy(PRESET)
    change(http)
    return http


def test_the_preset_passes(tmp_path):
    code, lines = check(tmp_path, PRESET, cli=True)
    assert code == 0, lines


def test_a_bad_setting_through_the_command(tmp_path):
    code, lines = check(tmp_path, variant(_set("query.to", "{to}")), cli=True)
    assert code == 2 and lines[0].startswith("providers.k.http.query.to: unknown placeholder {to}"), lines


def test_json_body_template_is_checked_inside(tmp_path):
    def change(http: dict) -> None:
        http.update(method="POST", body="json", fields={"msg": {"to": ["{recipient}", "{recipent}"]}})

    code, lines = check(tmp_path, variant(change))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("providers.k.http.fields.msg.to[1]: unknown placeholder {recipent}")


def _set(path: str, value):
    def change(http: dict) -> None:
        *parents, last = path.split(".")
        node = http
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return change


BAD = [
    ("query.to", "{recipient_e164}", "providers.k.http.query.to: unknown placeholder {recipient_e164}"),
    ("query.text", "{text.__class__}", "providers.k.http.query.text: unknown placeholder {text.__class__}"),
    ("query.text", "{text!r}", "providers.k.http.query.text: unknown placeholder {text!r}"),
    ("query.text", "{text", "providers.k.http.query.text: '{text' is not a valid template"),
    ("url", "ftp://x/{text}", "providers.k.http.url: 'ftp://x/{text}' must be an http:// or https:// URL"),
    ("url", "http://x/{nope}", "providers.k.http.url: unknown placeholder {nope}"),
    ("method", "DELETE", "providers.k.http.method: must be GET, POST or PUT"),
    ("body", "xml", "providers.k.http.body: must be form, json or none"),
    ("response.success_regex", "([",
     "providers.k.http.response.success_regex: not a valid regular expression"),
    ("response.message_id_regex", "id=\\w+",
     "providers.k.http.response.message_id_regex: needs a group ( ... ) around the value to take"),
    ("response.message_id_json", "data..id", "providers.k.http.response.message_id_json: 'data..id' is not a "
                                             "JSON path"),
    ("response.success_json", "status", "providers.k.http.response.success_values: is required with "
                                        "success_json"),
    ("response.success_status", ["2xx", 99], "providers.k.http.response.success_status[1]: 99 is not a "
                                             "status code"),
    ("response.temporary_status", ["599-500"], "providers.k.http.response.temporary_status[0]: '599-500': "
                                               "status codes run from 100 to 599, low to high"),
    ("timeout", 0, "providers.k.http.timeout: must be between 0.1 and 300"),
    ("concurrency", 1000, "providers.k.http.concurrency: must be between 1 and 256"),
    ("callback.token", "short", "providers.k.http.callback.token: must be at least 24 letters"),
    ("callback.token", "x" * 30 + "/../", "providers.k.http.callback.token: must be at least 24 letters"),
    ("callback.listen", "127.0.0.1", "providers.k.http.callback.listen: '127.0.0.1' needs a host and a port"),
    ("callback.states", {"1": "done"}, "providers.k.http.callback.states.1: must be one of delivered, "
                                       "buffered, failed, expired, ignore, got 'done'"),
    ("callback.ref_field", "MessageSid", "providers.k.http.callback.ref_field: names the provider's message "
                                         "id, but the response has no message_id_json"),
    ("headers", {"X-Key": "a\nb"}, "providers.k.http.headers.X-Key: the value must be printable ASCII"),
    ("headers", {"X Key": "ab"}, "providers.k.http.headers.X Key: is not an HTTP header name"),
    ("callback.colour", "red", "providers.k.http.callback.colour: unknown key"),
    ("poll", {"url": "http://x/{message_id}"}, "providers.k.http.poll: needs state_json or state_regex"),
    ("poll", {"url": "http://x/{mid}", "state_json": "s", "states": {"a": "delivered"}},
     "providers.k.http.poll.url: unknown placeholder {mid}"),
]


@pytest.mark.parametrize(("path", "value", "problem"), BAD, ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD])
def test_bad_settings_are_one_clear_line(tmp_path, path, value, problem):
    code, lines = check(tmp_path, variant(_set(path, value)))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(problem), lines


def test_missing_url_states_and_fields_with_get(tmp_path):
    def change(http: dict) -> None:
        del http["url"]
        del http["callback"]["states"]
        http["fields"] = {"a": "b"}
        http["body"] = "none"

    code, lines = check(tmp_path, variant(change))
    assert code == 2
    assert sorted(lines) == sorted([
        "providers.k.http.url: is required",
        "providers.k.http.callback.states: is required (the provider's state values -> delivered, buffered, "
        "failed, expired or ignore)",
        "providers.k.http.fields: given, but body is none (set body: form or body: json)",
    ]), lines


def test_secrets_never_in_check_config_output(tmp_path):
    http = variant(_set("query.text", "{bad}"))
    http["headers"] = {"Authorization": "Bearer top-secret-9876"}
    code, lines = check(tmp_path, http, cli=True)
    out = "\n".join(lines)
    assert code == 2 and TOKEN not in out and "top-secret-9876" not in out


def test_old_provider_section_still_valid(tmp_path):
    path = write_config(tmp_path, 1, 2, spool_path=tmp_path / "s.sqlite3")
    assert yaml.safe_load(path.read_text())["provider"]["smpp"]
    assert run_cli(path, "check-config").returncode == 0


def test_readme_presets_pass_check_config(tmp_path):
    """README's Kannel preset (tested against Kannel elsewhere) and the two untested vendor
    examples are valid configuration as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## HTTP providers"):]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)[:2]]
    found = {name: spec for b in blocks for name, spec in b["providers"].items()}
    assert set(found) == {"kannel", "aspsms", "twilio"}
    for name, spec in found.items():
        path = providers_config(tmp_path, 2525, {name: spec}, spool_path=tmp_path / "s.sqlite3",
                                name=f"{name}.yaml")
        try:
            load(path)
        except ConfigError as e:
            raise AssertionError(f"README preset {name}: {e.problems}") from None
