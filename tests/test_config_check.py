"""Issue 9 items 8 and 9: `sms-milter check-config` as a new user meets it: every gap is one
line with its YAML path (or the file name), exit 2, never a traceback; templates are not a
sandbox escape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from bed import run_cli, write_config


def check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    r = run_cli(path, "check-config")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stderr.strip().splitlines()


def variant(tmp_path: Path, change) -> str:
    """The test fixture configuration with `change(dict)` applied, as YAML text."""
    cfg = yaml.safe_load(write_config(tmp_path, 1, 2, spool_path=tmp_path / "s.db").read_text())
    change(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.mark.parametrize("template", [
    "{subject.zzz}", "{subject.__class__.__mro__}", "{body.__init__.__globals__}", "{0}", "{}", "{x}",
    "{subject[0]}", "{subject!r}", "{subject:>200}", "{subject", "subject}", "{{subject}", "{ subject}",
])
def test_template_other_than_subject_and_body_is_an_error(tmp_path, template):
    def change(cfg):
        cfg["accounts"]["tmco"]["template"] = template

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("sms-milter: accounts.tmco.template: may use only {subject} and {body}"), lines


@pytest.mark.parametrize("template", ["{subject},{body}", "{body}", "{{{subject}}} {body}", "plain", ""])
def test_good_templates_pass(tmp_path, template):
    def change(cfg):
        cfg["accounts"]["tmco"]["template"] = template

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 0, lines


@pytest.mark.parametrize("section", ["milter", "spool", "provider", "notify"])
def test_missing_section_is_an_error_with_its_path(tmp_path, section):
    code, lines = check(tmp_path, variant(tmp_path, lambda cfg: cfg.pop(section)))
    want = f"sms-milter: {section}: the section is missing (see the example in README)"
    assert code == 2 and lines == [want], lines


def test_providers_counts_as_the_provider_section(tmp_path):
    text = variant(tmp_path, lambda cfg: cfg.pop("provider"))
    code, lines = check(tmp_path, text + "providers: {}\n")
    assert not any(ln.startswith("sms-milter: provider:") for ln in lines), lines


@pytest.mark.parametrize("socket,fragment", [
    ("unix:relative/path", "a unix socket needs an absolute path"),
    ("unix:", "a unix socket needs an absolute path"),
    ("inet:no such host:8894", "'no such host' in 'no such host:8894' is not a host name or IP address"),
    ("inet:127.0.0.1:99999", "port '99999' in '127.0.0.1:99999' must be a number from 1 to 65535"),
    ("inet:127.0.0.1:0", "port '0'"),
    ("inet:127.0.0.1", "needs a host and a port"),
    ("tcp:127.0.0.1:1", "must be inet:HOST:PORT"),
])
def test_bad_socket_is_one_correct_line(tmp_path, socket, fragment):
    def change(cfg):
        cfg["milter"]["socket"] = socket

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("sms-milter: milter.socket: ") and fragment in lines[0], lines


def test_network_with_host_bits_set(tmp_path):
    def change(cfg):
        cfg["accounts"]["netlimited"]["networks"] = ["10.0.0.1/8", "2001:db8::1/32", "192.0.2.0/24",
                                                     "192.0.2.7"]

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == ("sms-milter: accounts.netlimited.networks[0]: '10.0.0.1/8' has host bits set; "
                        "write the network address 10.0.0.0/8 (or a single address without /prefix)")
    assert lines[1].startswith("sms-milter: accounts.netlimited.networks[1]: '2001:db8::1/32' has host bits")


@pytest.mark.parametrize("key,value,words", [
    ("spool_timeout", "yes", "must be a number, got a boolean (yes)"),
    ("spool_timeout", "off", "must be a number, got a boolean (off)"),
    ("max_message_bytes", "'100000'", "must be an integer, got a string (100000)"),
    ("max_message_bytes", "1.5e+6", "must be an integer, got a decimal number (1.5e+6)"),
    ("socket", "[a, b]", "must be a string, got a list"),
    ("socket", "true", "must be a string, got a boolean (true)"),
])
def test_types_are_reported_in_yaml_words(tmp_path, key, value, words):
    text = variant(tmp_path, lambda cfg: cfg["milter"].pop(key, None))
    text = text.replace("milter:\n", f"milter:\n  {key}: {value}\n", 1)
    code, lines = check(tmp_path, text)
    assert code == 2 and lines == [f"sms-milter: milter.{key}: {words}"], lines


def test_empty_file_and_top_level_list(tmp_path):
    for text, want in (("", "the file is empty"), ("# only a comment\n", "the file is empty"),
                       ("- milter\n- spool\n", "the top level must be a mapping of sections"),
                       ("just words\n", "the top level must be a mapping of sections")):
        code, lines = check(tmp_path, text)
        assert code == 2 and len(lines) == 1, (text, lines)
        assert lines[0].startswith(f"sms-milter: {tmp_path / 'c.yaml'}: {want}"), (text, lines)


def test_alias_bomb_and_recursive_alias_are_answered(tmp_path):
    """YAML aliases are not walked again: a billion-laughs file is answered at once."""
    lines = ["a: &a [" + ",".join(["x"] * 10) + "]"]
    for i in range(1, 12):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * 10) + "]")
    lines.append("milter: *l11")
    code, lines_out = check(tmp_path, "\n".join(lines) + "\n")
    assert code == 2 and "sms-milter: milter: must be a mapping, got a list" in lines_out
    code, lines_out = check(tmp_path, "a: &a [*a]\nmilter: *a\n")
    assert code == 2 and "sms-milter: milter: must be a mapping, got a list" in lines_out


@pytest.mark.parametrize("where", ["top", "account"])
def test_country_codes_that_do_not_exist_are_named_by_index(tmp_path, where):
    def change(cfg):
        limits = {"countries": ["UK", "ch", "EU", 1, "ZZ"]}
        if where == "top":
            cfg["limits"] = limits
        else:
            cfg["accounts"]["tmco"]["limits"] = limits

    code, lines = check(tmp_path, variant(tmp_path, change))
    path = "limits" if where == "top" else "accounts.tmco.limits"
    assert code == 2 and len(lines) == 4, lines
    assert f"{path}.countries[0]: 'UK' is not an ISO 3166 alpha-2 region code" in lines[0], lines
    assert "the United Kingdom is GB" in lines[0], lines
    for i in (2, 3, 4):  # `ch` (index 1) is accepted as CH
        assert any(f"{path}.countries[{i}]:" in ln for ln in lines), (i, lines)


def test_lower_case_country_is_accepted_as_upper_case(tmp_path):
    def change(cfg):
        cfg["limits"] = {"countries": ["ch", "DE"]}

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 0, lines


@pytest.mark.parametrize("key", ["countries", "number_types"])
def test_an_empty_allow_list_is_refused(tmp_path, key):
    def change(cfg):
        cfg["limits"] = {key: []}

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 1, lines
    assert f"limits.{key}: an empty list refuses every destination" in lines[0], lines


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    text = variant(tmp_path, lambda cfg: None)
    lines_before = text.count("\n")
    text += "milter: {socket: 'inet:127.0.0.1:1'}\n"  # a second top-level milter:
    code, lines = check(tmp_path, text)
    assert code == 2 and len(lines) == 1, lines
    assert f"milter: duplicate key 'milter' at line {lines_before + 1}" in lines[0], lines


def test_duplicate_account_name_is_refused(tmp_path):
    text = ("accounts:\n  acme: {userkey: A1, password: x}\n  acme: {userkey: B2, password: y}\n"
            "base: &b {k: 1}\nother: {<<: *b, k: 2}\n")
    code, lines = check(tmp_path, text)
    assert code == 2, lines
    dup = [ln for ln in lines if "duplicate key" in ln]
    assert len(dup) == 1 and "accounts.acme: duplicate key 'acme' at line 3" in dup[0], lines


@pytest.mark.parametrize("host", ["", " ", "-bad-", "1234"])
def test_smpp_host_must_be_a_host(tmp_path, host):
    def change(cfg):
        cfg.setdefault("provider", {}).setdefault("smpp", {})["host"] = host

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 1, lines
    assert "provider.smpp.host:" in lines[0] and "is not a host name or IP address" in lines[0], lines


def test_relative_spool_path_is_refused(tmp_path):
    def change(cfg):
        cfg["spool"] = {"path": "relative.sqlite3"}

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 1, lines
    assert "spool.path: 'relative.sqlite3': the spool needs an absolute path" in lines[0], lines


def test_range_bounds_are_printed_as_written(tmp_path):
    def change(cfg):
        cfg["limits"] = {"parts_per_day": -1}
        cfg.setdefault("provider", {}).setdefault("smpp", {})["submit_timeout"] = 0

    code, lines = check(tmp_path, variant(tmp_path, change))
    assert code == 2 and len(lines) == 2, lines
    text = "\n".join(lines)
    assert "limits.parts_per_day: must be between 0 and 1099511627776, got" in text, lines
    assert "provider.smpp.submit_timeout: must be between 0.1 and 3600, got" in text, lines
    assert "e+" not in text, lines
