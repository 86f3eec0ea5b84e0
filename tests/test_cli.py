"""The `sms-milter` command as operators script it (INTERFACE.md): exit codes, one-line
errors with YAML paths, the queue listing contract, the pipe(8) `submit` transport and
hash-password. Runs the installed command as a subprocess, like an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bed import milter_command, queue_list, run_cli, unique_number, write_config

REQUIRED = {"id", "state", "recipient", "originator", "text", "parts", "account", "device",
            "created_at", "attempts", "last_error"}


def sms(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*milter_command(), *args], capture_output=True, text=True, timeout=60,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, milter_port=1, notify_port=2, spool_path=tmp_path / "spool.sqlite3")


def submit(config: Path, sender: str, rcpts: list[str], message: str) -> subprocess.CompletedProcess:
    return sms("submit", "-c", str(config), "-f", sender, "--", *rcpts, stdin=message)


def test_check_config_ok(config: Path) -> None:
    r = run_cli(config, "check-config")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "OK" in r.stdout and "account(s)" in r.stdout


def test_check_config_reports_every_problem_with_its_yaml_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("milter: {socket: 'tcp:nope', max_message_bytes: -1}\n"
                   "domains: {sms.example.com: {style: bulk}}\n"
                   "accounts:\n  a: {max_parts: 0, notify: SOMETIMES, senders: [{address: nope}],"
                   " networks: [300.1.1.1/8], password_hash: 'x'}\n"
                   "surprise: 1\n")
    r = run_cli(bad, "check-config")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    for path in ("milter.socket", "milter.max_message_bytes", "domains.sms.example.com.style",
                 "accounts.a.max_parts", "accounts.a.notify", "accounts.a.senders[0].address",
                 "accounts.a.networks[0]", "accounts.a.password_hash", "surprise"):
        assert any(f"{path}:" in ln for ln in lines), (path, lines)
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"),
    ("milter: [unclosed\n", "not valid YAML at line"),
    ("", "the file is empty"),
])
def test_unreadable_config_is_one_line_exit_2(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    r = run_cli(path, "queue", "list")
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_bad_usage_exits_2() -> None:
    assert sms("queue").returncode == 2
    assert sms("frobnicate").returncode == 2


def test_queue_list_contract_and_state_filter(config: Path) -> None:
    written, number = unique_number("aspsms")
    ok = submit(config, "c4ca423@client.example", [f"{written}@sms.example.com"],
                "Subject: Originator=Shop\n\nhello from the pipe\n")
    assert ok.returncode == 0, ok.stderr
    jobs = [j for j in queue_list(config) if j["recipient"] == number]
    assert len(jobs) == 1
    job = jobs[0]
    assert REQUIRED <= job.keys()
    assert (job["state"], job["originator"], job["text"], job["parts"], job["account"], job["device"]) == \
        ("queued", "Shop", "hello from the pipe", 1, "acme", "sms")
    assert job["created_at"].endswith("Z") and job["attempts"] == 0 and job["last_error"] == ""
    assert [j["id"] for j in queue_list(config, state="queued")] == [job["id"]]
    assert queue_list(config, state="delivered") == []
    table = run_cli(config, "queue", "list")
    assert table.returncode == 0 and number in table.stdout and "1 job(s)" in table.stdout
    assert run_cli(config, "queue", "list", "--state", "lost").returncode == 2


def test_submit_refusal_is_exit_65_with_the_reason_only(config: Path) -> None:
    number, e164 = unique_number("aspsms")
    r = submit(config, "c4ca423@client.example", [f"{number}@sms.example.com"],
               "Subject: x\nContent-Type: text/html\n\n<p>hi</p>\n")
    assert r.returncode == 65
    assert r.stderr.strip() == ("5.6.1 The message contains an HTML part; send the SMS text as plain "
                                "text only (text/plain).")
    r = submit(config, "stranger@elsewhere.example", [f"{number}@sms.example.com"], "Subject: x\n\nhi\n")
    assert r.returncode == 65 and r.stderr.startswith("5.7.1 ") and "stranger" not in r.stderr
    r = submit(config, "c4ca423@client.example", ["someone@relay.example"], "Subject: x\n\nhi\n")
    assert r.returncode == 65 and "only takes SMS addresses" in r.stderr


def test_submit_textsms_never_echoes_the_password(config: Path) -> None:
    r = submit(config, "c4ca423@client.example", ["textsms@sms.example.com"],
               "Subject: U=ACME123 P=wrong-pass R=0041791234567\n\nhi\n")
    assert r.returncode == 65 and r.stderr.startswith("5.7.8 ") and "wrong-pass" not in r.stderr


def test_submit_spool_locked_is_exit_75(config: Path, tmp_path: Path) -> None:
    import bed

    bed.spool_at(tmp_path / "spool.sqlite3").close()  # the spool exists (queue list creates none)
    assert run_cli(config, "queue", "list").returncode == 0
    with bed.spool_locked(tmp_path / "spool.sqlite3"):
        number, e164 = unique_number("aspsms")
        r = submit(config, "c4ca423@client.example", [f"{number}@sms.example.com"], "Subject: x\n\nhi\n")
        assert r.returncode == 75, r.stderr
        assert r.stderr.startswith("4.3.0 ")
    assert not [j for j in queue_list(config) if j["recipient"] == e164]


def test_hash_password_roundtrip(tmp_path: Path) -> None:
    r = sms("hash-password", stdin="t0p-secret\n")
    assert r.returncode == 0 and r.stdout.startswith("scrypt$") and "t0p-secret" not in r.stdout
    config = write_config(tmp_path, milter_port=1, notify_port=2, spool_path=tmp_path / "s.sqlite3",
                          extra={"accounts": {"hashed": {"password_hash": r.stdout.strip()}}})
    number, e164 = unique_number("aspsms")
    ok = submit(config, "x@client.example", ["textsms@sms.example.com"],
                f"Subject: U=HASH1 P=t0p-secret R={number}\n\nvia hash\n")
    assert ok.returncode == 0, ok.stderr
    bad = submit(config, "x@client.example", ["textsms@sms.example.com"],
                 f"Subject: U=HASH1 P=h4shed R={number}\n\nvia hash\n")
    assert bad.returncode == 65
    assert sms("hash-password", stdin="").returncode == 2


def test_module_entry_point_matches_console_script() -> None:
    r = subprocess.run([sys.executable, "-m", "sms_milter.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "check-config" in r.stdout
    assert json.dumps(sorted(REQUIRED))  # the contract list itself is well-formed


@pytest.mark.parametrize("duration", ["99999999999999d", "3000000d", "1000000000w",
                                      "999999999999999999999999s", "36501d"])
def test_purge_with_an_absurd_duration_is_one_line_and_exit_2(config: Path, duration: str) -> None:
    r = run_cli(config, "queue", "purge", "--older-than", duration)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "invalid duration" in lines[-1] and "too large" in lines[-1], lines
