"""Secrets in the configuration (outside probe): `sms-milter check-config`, a daemon start and a
SIGHUP reload refuse a secret YAML would change (12345678, yes, 0x1F, 000123 unquoted) with the
key path and "quote it", refuse SMPP fields longer than SMPP 3.4 allows, and never print a
secret or an authorized sender address."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from bed import _port_listening, free_port, milter_command, run_cli, tail, terminate, wait_until, write_config

QUOTE_IT = "which would change it (leading zeros, 0x.., 1e3, yes/no); quote it"


def config_text(tmp_path: Path, port: int = 1) -> str:
    return write_config(tmp_path, port, 2, spool_path=tmp_path / "s.db").read_text()


def written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def check(path: Path) -> tuple[int, str]:
    r = run_cli(path, "check-config")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("old, new, where, kind", [
    ("password: s3cret", "password: 12345678", "accounts.acme.password", "a number"),
    ("password: s3cret", "password: yes", "accounts.acme.password", "a boolean"),
    ("password: s3cret", "password: 0x1F", "accounts.acme.password", "a number"),
    ("password: s3cret", "password: 9.5e+7", "accounts.acme.password", "a decimal number"),
    ("userkey: ACME123", "userkey: 000123", "accounts.acme.userkey", "a number"),
    ("password: pw", "password: 0042", "provider.smpp.password", "a number"),
    ("system_id: gw", "system_id: 0123", "provider.smpp.system_id", "a number"),
    ("address: c4ca423@client.example", "address: 4179000", "accounts.acme.senders[0].address",
     "a number"),
])
def test_unquoted_secret_is_refused_and_not_printed(tmp_path, old, new, where, kind):
    text = config_text(tmp_path)
    assert old in text
    code, out = check(written(tmp_path, text.replace(old, new, 1)))
    assert code == 2, out
    assert f"{where}: YAML reads this unquoted value as {kind}, {QUOTE_IT}" in out
    value, rest = new.split(": ", 1)[1], out.replace(QUOTE_IT, "")
    assert value not in rest and str(yaml.safe_load(value)).lower() not in rest.lower(), out


def test_quoted_secrets_pass(tmp_path):
    text = config_text(tmp_path).replace("password: s3cret", 'password: "0x1F"').replace(
        "userkey: ACME123", "userkey: '000123'")
    code, out = check(written(tmp_path, text))
    assert code == 0, out


@pytest.mark.parametrize("key, limit", [("system_id", 15), ("password", 8), ("system_type", 12)])
def test_smpp_fields_longer_than_smpp34_allows(tmp_path, key, limit):
    secret = "Q" * (limit + 1)
    cfg = yaml.safe_load(config_text(tmp_path))
    cfg["provider"]["smpp"][key] = secret
    code, out = check(written(tmp_path, yaml.safe_dump(cfg)))
    assert code == 2
    want = f"provider.smpp.{key}: is {limit + 1} octets long; SMPP 3.4 {key} allows at most {limit} octets"
    assert want in out
    assert secret not in out


def test_sender_addresses_are_never_echoed(tmp_path):
    cfg = yaml.safe_load(config_text(tmp_path))
    cfg["accounts"]["acme"]["senders"] = [{"address": "c4ca423-at-client.example"}, {"domain": "c4ca4xyz"}]
    cfg["accounts"]["netlimited"]["senders"] = [{"address": "hashed@client.example"}]  # hashed's own
    code, out = check(written(tmp_path, yaml.safe_dump(cfg)))
    assert code == 2
    assert "accounts.acme.senders[0].address: is not an e-mail address" in out
    assert "accounts.acme.senders[1].domain: is not a domain name" in out
    assert re.search(r"accounts\.\w+\.senders\[0\]\.address: also authorized for account \w+", out), out
    for secret in ("c4ca423", "c4ca4xyz", "hashed@client.example"):
        assert secret not in out, out


def test_route_problems_name_the_path(tmp_path):
    cfg = yaml.safe_load(config_text(tmp_path))
    del cfg["provider"]
    cfg["providers"] = {"a": {"smpp": {"host": "127.0.0.1", "password": "pw"}}}
    cfg["routes"] = [{"prefixes": ["+41"], "providers": []}, {"providers": ["nope"]}]
    code, out = check(written(tmp_path, yaml.safe_dump(cfg)))
    assert code == 2
    assert "routes[0].providers: must be a non-empty list of provider names, got an empty list" in out
    assert "routes[1].providers[0]: no provider named 'nope' (providers: a)" in out


def test_daemon_start_refuses_an_unquoted_secret(tmp_path):
    path = written(tmp_path, config_text(tmp_path).replace("password: s3cret", "password: 12345678"))
    r = subprocess.run([*milter_command(), "milter", "-c", str(path)], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert f"accounts.acme.password: YAML reads this unquoted value as a number, {QUOTE_IT}" in r.stderr
    assert "12345678" not in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_reload_refuses_an_unquoted_secret_and_keeps_running(tmp_path):
    port = free_port()
    text = config_text(tmp_path, port)
    path = written(tmp_path, text)
    logfile = tmp_path / "milter.log"
    with open(logfile, "ab") as log:
        proc = subprocess.Popen([*milter_command(), "milter", "-c", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: _port_listening(port) or proc.poll() is not None, 30, "the milter listening",
                   detail=lambda: tail(logfile))
        assert proc.poll() is None, tail(logfile)
        path.write_text(text.replace("userkey: ACME123", "userkey: 0x1F00"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reload failed" in logfile.read_text(errors="replace"), 30,
                   "the reload refused", detail=lambda: tail(logfile))
        log_text = logfile.read_text(errors="replace")
        assert f"accounts.acme.userkey: YAML reads this unquoted value as a number, {QUOTE_IT}" in log_text
        assert "0x1F00" not in log_text and "7936" not in log_text and "s3cret" not in log_text
        assert proc.poll() is None and _port_listening(port)
    finally:
        assert terminate(proc, 20, "milter", logfile) == 0
