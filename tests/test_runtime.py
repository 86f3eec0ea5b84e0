"""The running daemons (issue 11 §4-5): Prometheus /metrics scraped with a real HTTP client
while mail goes through a real Postfix, the milter, the dispatcher and the npm SMSC; systemd
notify datagrams caught on a unix datagram socket of the test's own; SIGHUP reloads with an
SMTP session held open across them; `--log-format json`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from bed import (
    MailSink,
    Postfix,
    SmtpSession,
    _port_listening,
    free_port,
    make_message,
    milter_command,
    queue_list,
    run_cli,
    tail,
    terminate,
    unique,
    unique_number,
    wait_until,
)
from dispatcher_bed import Smsc, dispatcher_config, node_ready
from spool_helpers import add_jobs

SENDER = "c4ca423@client.example"  # account acme in bed.write_config


# --------------------------------------------------------------------------- helpers

class Daemon:
    """`sms-milter milter|dispatcher -c CONFIG [args]` with an environment of the test's choice."""

    def __init__(self, kind: str, config: Path, logfile: Path, *args: str, env: dict[str, str] | None = None):
        self.kind = kind
        self.config = config
        self.logfile = logfile
        systemd = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        e = {k: v for k, v in os.environ.items() if k not in systemd}
        e.update(env or {}, PYTHONUNBUFFERED="1")
        with open(logfile, "ab") as log:
            self.proc = subprocess.Popen([*milter_command(), kind, "-c", str(config), *args], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20) -> None:
        wait_until(lambda: len(re.findall(pattern, self.log())) >= count or self.proc.poll() is not None,
                   timeout, f"{count} log line(s) matching {pattern!r}", detail=lambda: tail(self.logfile))
        assert self.proc.poll() is None, f"{self.kind} exited {self.proc.returncode}:\n{tail(self.logfile)}"

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        return terminate(self.proc, 20, self.kind, self.logfile)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """GET /metrics with a real HTTP client; {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, f"not exposition format: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(data: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in data.items() if n == name and want <= set(ls))


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path | None = None, abstract: str | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.sock.bind(b"\0" + abstract.encode())
            self.env = "@" + abstract
        else:
            assert path is not None
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def pump(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait(self, key: str, value: str | None = None, count: int = 1, timeout: float = 20) -> list[dict]:
        def hits() -> list[dict]:
            return [m for m in self.messages if key in m and (value is None or m[key] == value)]

        deadline = time.monotonic() + timeout
        while len(hits()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {key}={value} among {self.messages}")
            self.pump()
        return hits()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """A private Postfix whose smtpd_milters points at a fixed port, a relay sink, a notify sink,
    the npm SMSC simulator. Each test starts its own milter/dispatcher on them."""
    why = node_ready()
    if why:
        pytest.fail(why, pytrace=False)
    base = tmp_path_factory.mktemp("runtime")
    relay, notify = MailSink().start(), MailSink().start()
    smsc = Smsc(base).start()
    milter_port = free_port()
    pf = Postfix(None, relay.port, f"inet:127.0.0.1:{milter_port}").start()
    rig = {"base": base, "pf": pf, "smsc": smsc, "notify": notify, "milter_port": milter_port}
    yield rig
    pf.stop()
    smsc.stop()
    relay.stop()
    notify.stop()


def config(rig: dict[str, Any], tmp: Path, name: str = "sms-milter.yaml", **extra: Any) -> Path:
    return dispatcher_config(tmp, rig["smsc"].port, rig["notify"].port, spool_path=tmp / "spool.sqlite3",
                             extra={"milter": {"socket": f"inet:127.0.0.1:{rig['milter_port']}"}, **extra},
                             name=name)


def start_milter(cfg: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    port = int(yaml.safe_load(cfg.read_text())["milter"]["socket"].rsplit(":", 1)[1])
    wait_until(lambda: not _port_listening(port), 10, "the milter port free")
    m = Daemon("milter", cfg, tmp / "milter.log", *args, env=env)
    wait_until(lambda: _port_listening(port) or m.proc.poll() is not None, 15, "the milter listening",
               detail=lambda: tail(m.logfile))
    assert m.proc.poll() is None, tail(m.logfile)
    return m


def sms_mail(token: str) -> bytes:
    return make_message(f"metrics {token}", f"runtime test {token}")


# --------------------------------------------------------------------------- metrics

def test_metrics_move_with_traffic_through_postfix_and_the_dispatcher(rig, tmp_path):
    mport, dport = free_port(), free_port()
    cfg = config(rig, tmp_path, metrics={"milter": f"127.0.0.1:{mport}", "dispatcher": f"127.0.0.1:{dport}"})
    milter = start_milter(cfg, tmp_path)
    disp = Daemon("dispatcher", cfg, tmp_path / "dispatcher.log")
    try:
        wait_until(lambda: _port_listening(mport) and _port_listening(dport), 15, "both /metrics listening")
        disp.wait_log(r"bound to SMSC")
        m0, d0 = scrape(mport), scrape(dport)
        token = unique("met")
        addr, e164 = unique_number()
        with SmtpSession(rig["pf"].port) as s:
            ok = s.send(SENDER, [f"{addr}@sms.example.com"], sms_mail(token))
            bad = s.send(SENDER, [f"+{addr[2:]}@sms.example.com"], sms_mail(token + "b"))
            spam = s.send("stranger@else.example", [f"{addr}@sms.example.com"], sms_mail(token + "c"))
        assert ok["data"][0] == 250, ok
        assert bad["rcpt"][f"+{addr[2:]}@sms.example.com"][0] == 550
        assert spam["rcpt"][f"{addr}@sms.example.com"][0] == 550
        wait_until(lambda: [j for j in queue_list(cfg) if j["recipient"] == e164
                            and j["state"] == "delivered"], 30, "the job delivered",
                   detail=lambda: tail(disp.logfile))

        def moved() -> bool:
            d = scrape(dport)
            return (metric(d, "sms_milter_receipts_total", result="delivered")
                    > metric(d0, "sms_milter_receipts_total", result="delivered"))

        wait_until(moved, 15, "the receipt counted")
        m1, d1 = scrape(mport), scrape(dport)

        def delta(a: dict, b: dict, name: str, **labels: str) -> float:
            return metric(b, name, **labels) - metric(a, name, **labels)

        # The milter: one accepted, two rejected with their reasons, one commit timed.
        assert delta(m0, m1, "sms_milter_decisions_total", outcome="accepted") == 1
        assert delta(m0, m1, "sms_milter_decisions_total", outcome="rejected", reason="bad_address") == 1
        assert delta(m0, m1, "sms_milter_decisions_total", outcome="rejected", reason="not_authorized") == 1
        assert delta(m0, m1, "sms_milter_smtp_to_commit_seconds_count") == 1
        assert metric(m1, "sms_milter_smtp_to_commit_seconds_sum") > 0
        # The dispatcher: the submit, the receipt, both stages timed, jobs by state from the spool.
        assert delta(d0, d1, "sms_milter_submits_total", provider="smpp", result="ok") == 1
        assert delta(d0, d1, "sms_milter_receipts_total", provider="smpp", result="delivered") == 1
        assert delta(d0, d1, "sms_milter_commit_to_submit_seconds_count") == 1
        assert delta(d0, d1, "sms_milter_submit_to_receipt_seconds_count") == 1
        assert metric(d1, "sms_milter_provider_bound", provider="smpp") == 1
        assert metric(d1, "sms_milter_binds_total", provider="smpp") == 1
        # Both daemons serve the spool's jobs by state (read at scrape time, cached for a second).
        for port, before in ((mport, m0), (dport, d0)):
            wait_until(lambda p=port, b=before: delta(b, scrape(p), "sms_milter_jobs",
                                                      state="delivered") == 1,
                       10, f"jobs{{state=delivered}} moved on :{port}")
            assert ("sms_milter_jobs", frozenset({("state", "queued")})) in scrape(port)
    finally:
        assert milter.stop() == 0
        assert disp.stop() == 0


def test_check_config_validates_the_metrics_section(tmp_path, rig):
    cfg = config(rig, tmp_path, metrics={"milter": "127.0.0.1:9894", "dispatcher": "127.0.0.1:9895"})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    bad = config(rig, tmp_path, name="bad.yaml", metrics={"milter": "127.0.0.1:99999", "dispatcher": "nope",
                                                         "scraper": "x"})
    r = run_cli(bad, "check-config")
    assert r.returncode == 2
    for path in ("metrics.milter", "metrics.dispatcher", "metrics.scraper"):
        assert re.search(rf"^sms-milter: {re.escape(path)}: ", r.stderr, re.M), r.stderr


# --------------------------------------------------------------------------- systemd notify

def test_milter_notifies_systemd_ready_status_watchdog_reloading_stopping(rig, tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    cfg = config(rig, tmp_path)
    # WatchdogSec=0.4s: WATCHDOG=1 at least every 0.2 s, sent by the event loop.
    milter = start_milter(cfg, tmp_path, env={"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "400000"})
    try:
        ready = ns.wait("READY", "1")[0]
        assert "listening on inet:127.0.0.1:" in ready["STATUS"]
        t0 = time.monotonic()
        ns.wait("WATCHDOG", "1", count=len(ns.wait("WATCHDOG", "1")) + 5, timeout=20)
        assert time.monotonic() - t0 < 15
        # mail moves the STATUS line (refreshed every 5 s)
        addr, _ = unique_number()
        with SmtpSession(rig["pf"].port) as s:
            assert s.send(SENDER, [f"{addr}@sms.example.com"], sms_mail(unique()))["data"][0] == 250
        ns.wait("STATUS", f"listening on inet:127.0.0.1:{rig['milter_port']}; 0 MTA connection(s); "
                "1 accepted, 0 rejected, 0 tempfailed", timeout=20)
        milter.hup()
        ns.wait("RELOADING", "1")
        assert int(ns.wait("RELOADING", "1")[0]["MONOTONIC_USEC"]) > 0
        ns.wait("READY", "1", count=2)
        assert milter.stop() == 0
        ns.wait("STOPPING", "1")
    finally:
        if milter.proc.poll() is None:
            milter.stop()
        ns.close()


def test_dispatcher_notifies_systemd_on_an_abstract_socket(rig, tmp_path):
    ns = NotifySocket(abstract=f"sms-milter-test-{os.getpid()}-{unique()}")
    cfg = config(rig, tmp_path)
    disp = Daemon("dispatcher", cfg, tmp_path / "dispatcher.log",
                  env={"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "2000000"})
    try:
        ready = ns.wait("READY", "1")[0]
        assert f"SMSC 127.0.0.1:{rig['smsc'].port}" in ready["STATUS"]
        ns.wait("WATCHDOG", "1", count=3, timeout=20)  # every second from the engine loop
        wait_until(lambda: (ns.pump(), any("bound to SMSC" in m.get("STATUS", "") for m in ns.messages))[1],
                   20, "STATUS says bound")
        disp.hup()
        ns.wait("RELOADING", "1")
        ns.wait("READY", "1", count=2)
        assert disp.stop() == 0
        ns.wait("STOPPING", "1")
    finally:
        if disp.proc.poll() is None:
            disp.stop()
        ns.close()


def test_no_notify_socket_no_notifications(rig, tmp_path):
    """Without $NOTIFY_SOCKET (not under systemd) the daemons run as before."""
    cfg = config(rig, tmp_path)
    milter = start_milter(cfg, tmp_path)
    addr, _ = unique_number()
    with SmtpSession(rig["pf"].port) as s:
        assert s.send(SENDER, [f"{addr}@sms.example.com"], sms_mail(unique()))["data"][0] == 250
    assert milter.stop() == 0
    assert "cannot notify systemd" not in milter.log()


# --------------------------------------------------------------------------- SIGHUP reload

def _with_account(cfg: Path, name: str, sender: str) -> None:
    data = yaml.safe_load(cfg.read_text())
    data["accounts"][name] = {"senders": [{"address": sender}], "originator": "NewCo"}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))


def test_milter_reload_keeps_the_session_and_the_next_transaction_uses_new_accounts(rig, tmp_path):
    cfg = config(rig, tmp_path)
    milter = start_milter(cfg, tmp_path)
    newcomer = f"{unique('new')}@newco.example"
    try:
        with SmtpSession(rig["pf"].port) as s:  # one SMTP session (and milter connection) across the reload
            addr, e164 = unique_number()
            r = s.send(newcomer, [f"{addr}@sms.example.com"], sms_mail(unique()))
            assert r["rcpt"][f"{addr}@sms.example.com"][0] == 550  # not an authorized sender yet
            assert s.send(SENDER, [f"{addr}@sms.example.com"], sms_mail(unique()))["data"][0] == 250
            _with_account(cfg, "newco", newcomer)
            milter.hup()
            milter.wait_log(r"configuration reloaded from .*: 2 domain\(s\), 5 account\(s\)")
            addr2, e164_2 = unique_number()
            r = s.send(newcomer, [f"{addr2}@sms.example.com"], sms_mail(unique()))
            assert r["data"] and r["data"][0] == 250, r
            r = s.send(SENDER, [f"{addr2}@sms.example.com"], sms_mail(unique()))  # old accounts still work
            assert r["data"][0] == 250, r
        jobs = [j for j in queue_list(cfg) if j["recipient"] == e164_2]
        assert sorted(j["account"] for j in jobs) == ["acme", "newco"]
        assert [j["originator"] for j in jobs if j["account"] == "newco"] == ["NewCo"]
    finally:
        assert milter.stop() == 0


def test_milter_reload_of_an_invalid_config_keeps_the_old_one_and_says_why_once(rig, tmp_path):
    cfg = config(rig, tmp_path)
    milter = start_milter(cfg, tmp_path)
    try:
        good = cfg.read_text()
        (tmp_path / "good.yaml").write_text(good)  # the same spool, for queue list
        cfg.write_text(good.replace("max_parts: 6", "max_parts: many"))
        milter.hup()
        milter.wait_log(r"configuration reload failed")
        lines = [ln for ln in milter.log().splitlines() if "reload" in ln]
        assert len(lines) == 1, lines
        assert "keeping the old configuration" in lines[0]
        assert "accounts.acme.max_parts: must be an integer" in lines[0]
        assert "s3cret" not in milter.log()
        addr, e164 = unique_number()
        with SmtpSession(rig["pf"].port) as s:
            assert s.send(SENDER, [f"{addr}@sms.example.com"], sms_mail(unique()))["data"][0] == 250
        jobs = queue_list(tmp_path / "good.yaml")
        assert [j["account"] for j in jobs if j["recipient"] == e164] == ["acme"]
        cfg.write_text("milter: [unclosed\n")
        milter.hup()
        milter.wait_log(r"configuration reload failed", count=2)
        assert milter.proc.poll() is None
    finally:
        assert milter.stop() == 0


def test_dispatcher_rebinds_only_when_the_provider_settings_change(rig, tmp_path):
    smsc = Smsc(tmp_path).start()  # its own SMSC: binds are counted
    cfg = dispatcher_config(tmp_path, smsc.port, rig["notify"].port, spool_path=tmp_path / "spool.sqlite3")
    disp = Daemon("dispatcher", cfg, tmp_path / "dispatcher.log")
    from bed import spool_at
    from dispatcher_bed import job, wait_states

    spool = spool_at(tmp_path / "spool.sqlite3")
    try:
        disp.wait_log(r"bound to SMSC")
        assert len(smsc.records("bind_transceiver")) == 1
        _with_account(cfg, "newco", "x@newco.example")  # accounts only
        disp.hup()
        disp.wait_log(r"configuration reloaded .*provider unchanged: binding kept")
        ids = add_jobs(spool, [job("+41791111001", "after an accounts-only reload")])
        spool.wake()
        wait_states(spool, ids, {"delivered"})
        assert len(smsc.records("bind_transceiver")) == 1
        assert not smsc.records("unbind")

        data = yaml.safe_load(cfg.read_text())
        data["provider"]["smpp"]["window"] = 3
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        disp.hup()
        disp.wait_log(r"configuration reloaded .*provider settings changed: re-binding")
        wait_until(lambda: len(smsc.records("bind_transceiver")) == 2, 20, "a second bind")
        assert len(smsc.records("unbind")) == 1
        ids = add_jobs(spool, [job("+41791111002", "after a provider reload")])
        spool.wake()
        wait_states(spool, ids, {"delivered"})
        assert "configuration reload failed" not in disp.log()
    finally:
        spool.close()
        assert disp.stop() == 0
        smsc.stop()


def test_dispatcher_reload_of_an_invalid_config_keeps_the_old_one(rig, tmp_path):
    cfg = config(rig, tmp_path)
    disp = Daemon("dispatcher", cfg, tmp_path / "dispatcher.log")
    try:
        disp.wait_log(r"bound to SMSC")
        cfg.write_text(cfg.read_text().replace("window:", "windoe:") + "\nprovider: {smpp: {port: x}}\n")
        disp.hup()
        disp.wait_log(r"configuration reload failed, keeping the old configuration: ")
        assert len([ln for ln in disp.log().splitlines() if "configuration reload" in ln]) == 1
        assert disp.proc.poll() is None
    finally:
        assert disp.stop() == 0


# --------------------------------------------------------------------------- logging

def test_json_log_lines_carry_the_postfix_queue_id(rig, tmp_path):
    cfg = config(rig, tmp_path)
    milter = start_milter(cfg, tmp_path, "--log-format", "json")
    disp = Daemon("dispatcher", cfg, tmp_path / "dispatcher.log", "--log-format", "json")
    try:
        addr, e164 = unique_number()
        with SmtpSession(rig["pf"].port) as s:
            r = s.send(SENDER, [f"{addr}@sms.example.com"], sms_mail(unique()))
        assert r["data"][0] == 250
        qid = re.search(r"queued as (\w+)", r["data"][1])
        milter.wait_log(r"accepted: 1 job")
        disp.wait_log(r"job \d+ receipt")
    finally:
        assert milter.stop() == 0
        assert disp.stop() == 0
    for d in (milter, disp):
        lines = [ln for ln in d.log().splitlines() if ln.startswith("{")]
        assert lines
        for ln in lines:
            rec = json.loads(ln)
            assert {"time", "level", "queue_id", "message", "logger", "pid"} <= set(rec), rec
            assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", rec["time"])
    accepted = [json.loads(ln) for ln in milter.log().splitlines() if "accepted: 1 job" in ln]
    assert len(accepted) == 1
    rec = accepted[0]
    assert rec["level"] == "info" and rec["queue_id"] and rec["message"].startswith(rec["queue_id"] + ": ")
    if qid:  # Postfix's 250 names its queue id only when it kept the message
        assert rec["queue_id"] == qid.group(1)
    # The dispatcher's lines about the job start with the same Postfix queue id: one grep
    # follows the message from Postfix to the SMSC.
    job_lines = [json.loads(ln) for ln in disp.log().splitlines() if '"job_id"' in ln]
    submitted = [r for r in job_lines if " submitted to " in r["message"]]
    receipts = [r for r in job_lines if " receipt for " in r["message"]]
    assert submitted and receipts
    for r in (submitted[0], receipts[0]):
        assert isinstance(r["job_id"], int)
        assert r["queue_id"] == rec["queue_id"], r
        assert r["message"].startswith(f"{rec['queue_id']}: job {r['job_id']} "), r
    assert SENDER not in milter.log()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
