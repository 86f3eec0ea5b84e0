"""Several providers: binds per SMSC, routes, failover and recovery, against real SMPP peers
(two or more tests/smsc/server.js processes, npm smpp 0.5.1) and `sms-milter dispatcher` as a
subprocess. Jobs go into the spool directly; every condition is polled with a deadline.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from bed import free_port, run_cli, spool_at, wait_until
from dispatcher_bed import DispatcherProc, Smsc, dispatcher_config, job, states, wait_states
from sms_milter.config import ConfigError, parse
from sms_milter.model import Route
from sms_milter.spool.base import NewJob
from sms_milter.spool.sqlite import SqliteSpool

pytestmark = pytest.mark.usefixtures("smsc_node")

FAST = {"reconnect_min": 0.2, "reconnect_max": 1.0, "enquire_link": 5, "system_id": "gw", "password": "pw",
        "host": "127.0.0.1"}


class Bed:
    def __init__(self, base: Path, notify_port: int):
        self.base = base
        self.notify_port = notify_port
        self.spool = spool_at(base / "spool.sqlite3")
        self.smscs: list[Smsc] = []
        self.procs: list[DispatcherProc] = []
        self.metrics = f"127.0.0.1:{free_port()}"

    def smsc(self, *options: str, port: int = 0) -> Smsc:
        s = Smsc(self.base, port=port).start(*options)
        self.smscs.append(s)
        return s

    def config(self, providers: dict[str, dict], routes: list[dict] | None = None) -> Path:
        path = dispatcher_config(self.base, 0, self.notify_port, spool_path=self.base / "spool.sqlite3")
        data = yaml.safe_load(path.read_text())
        del data["provider"]
        data["providers"] = providers
        if routes is not None:
            data["routes"] = routes
        data["metrics"] = {"dispatcher": self.metrics}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def dispatcher(self, cfg: Path) -> DispatcherProc:
        p = DispatcherProc(cfg, self.base / f"d{len(self.procs)}.log").start()
        self.procs.append(p)
        return p

    def detail(self) -> str:
        return "\n".join(f"--- {p.logfile.name}\n{p.log_tail(30)}" for p in self.procs)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            return r.read().decode()

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stop()
            except AssertionError:
                pass
        for s in self.smscs:
            s.stop()
        self.spool.close()


@pytest.fixture
def pb(tmp_path, nsink):
    b = Bed(tmp_path, nsink.port)
    yield b
    b.close()


def add(spool: SqliteSpool, jobs: list[NewJob]) -> list[int]:
    """Commit jobs as the milter does (one transaction), on any backend."""
    return list(spool.add_message(None, jobs, 0.0).job_ids)


def smpp(s: Smsc, **more: Any) -> dict:
    return {"smpp": {**FAST, "port": s.port, **more}}


def numbers(start: int, n: int, prefix: str = "+4179") -> list[str]:
    return [f"{prefix}{start + i:07d}" for i in range(n)]


def accepted_by(s: Smsc) -> Counter:
    """destination_addr -> how many submit_sm the SMSC accepted for it."""
    return Counter(r["destination_addr"] for r in s.submits())


def pending_receipts(s: Smsc) -> int:
    """Receipts the SMSC sent and got no deliver_sm_resp ROK for (it would send them again)."""
    assert s.proc is not None and s.proc.stdin is not None
    s.proc.stdin.write('{"command": "stats"}\n')
    s.proc.stdin.flush()
    return int(json.loads(s._expect("STATS", 5)[6:])["pending_receipts"])  # noqa: SLF001


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return 0.0


# --------------------------------------------------------------------------- configuration


BASE = {"domains": {"sms.example.com": {"style": "aspsms"}}, "accounts": {"acme": {}}}


def problems(extra: dict) -> list[str]:
    try:
        parse({**BASE, **extra})
    except ConfigError as e:
        return e.problems
    return []


def test_old_provider_section_is_one_provider_with_a_catch_all_route():
    cfg = parse({**BASE, "provider": {"smpp": {"host": "smsc.example.net", "binds": 2}}})
    assert list(cfg.providers) == ["smpp"] and cfg.providers["smpp"].smpp.binds == 2
    assert cfg.routes == (Route(providers=("smpp",)),)
    assert cfg.smpp.host == "smsc.example.net"


def test_providers_and_routes_parse_and_default_route():
    cfg = parse({**BASE, "providers": {"a": {"smpp": {"port": 1}, "down_after": 5, "cooldown": 2.5},
                                       "b": {"smpp": {"port": 2}}}})
    assert cfg.routes == (Route(providers=("a", "b")),)  # no routes: every provider, in the order written
    assert (cfg.providers["a"].down_after, cfg.providers["a"].cooldown) == (5, 2.5)
    cfg = parse({**BASE, "providers": {"a": {"smpp": {}}, "b": {"smpp": {}}},
                 "routes": [{"prefixes": ["+41", "+423"], "accounts": ["acme"], "providers": ["b", "a"]},
                            {"providers": ["a"]}]})
    assert cfg.routes[0].matches("+41791234567", "acme") and not cfg.routes[0].matches("+41791234567", "x")
    assert not cfg.routes[0].matches("+33612345678", "acme") and cfg.routes[1].matches("+33612345678", "x")


@pytest.mark.parametrize("extra, expected", [
    ({"provider": {"smpp": {}}, "providers": {"a": {"smpp": {}}}}, "providers: write either provider:"),
    ({"providers": {"a": {"sip": {}}}},
     "providers.a.sip: unknown key (known: smpp, http, down_after, cooldown)"),
    ({"providers": {"a": {}}}, "providers.a: needs exactly one kind (smpp, http), got none"),
    ({"providers": {"a": {"smpp": {"binds": 0}}}}, "providers.a.smpp.binds: must be between 1 and 64"),
    ({"providers": {"a": {"smpp": {}}}, "routes": [{"providers": ["a", "nope"]}]},
     "routes[0].providers[1]: no provider named 'nope'"),
    ({"providers": {"a": {"smpp": {}}},
      "routes": [{"prefixes": ["41"], "providers": ["a"]}, {"providers": ["a"]}]},
     "routes[0].prefixes[0]: '41' must be '+' and digits"),
    ({"providers": {"a": {"smpp": {}}}, "routes": [{"prefixes": ["+41"], "providers": ["a"]}]},
     "routes[0]: the last route must match every destination"),
    ({"providers": {"a": {"smpp": {}}, "b": {"smpp": {}}}, "routes": [{"providers": ["a"]}]},
     "providers.b: not used by any route"),
    ({"providers": {"a": {"smpp": {}}}, "routes": [{"accounts": ["ghost"], "providers": ["a"]},
                                                   {"providers": ["a"]}]},
     "routes[0].accounts[0]: no account named 'ghost'"),
    ({"providers": {"a": {"smpp": {}}}, "routes": [{"prefixes": ["+41"]}, {"providers": ["a"]}]},
     "routes[0].providers: is required"),
    ({"provider": {"smpp": {}}, "routes": [{"providers": ["smpp"]}]}, "routes: routes: need providers:"),
])
def test_provider_config_problems_name_what_is_wrong(extra, expected):
    found = problems(extra)
    assert any(p.startswith(expected) for p in found), found


# --------------------------------------------------------------------------- several binds


def test_binds_each_carry_traffic_and_a_refused_bind_is_retried(pb):
    """binds: 3 against an SMSC that allows 2 sessions: two binds carry every job, the third
    is refused (ESME_RBINDFAIL) and retried with backoff; raising the limit lets it in."""
    s = pb.smsc("--max-binds", "2")
    d = pb.dispatcher(pb.config({"main": smpp(s, binds=3, window=5)}))
    ids = add(pb.spool, [job(n, "multi-bind") for n in numbers(0, 600)])
    wait_states(pb.spool, ids, {"delivered"}, timeout=60, detail=pb.detail)
    sessions = Counter(r["session"] for r in s.submits())
    assert len(sessions) == 2 and min(sessions.values()) > 50, sessions  # both bound sessions worked
    assert sum(sessions.values()) == 600
    wait_until(lambda: "ESME_RBINDFAIL" in d.log(), 10, "the refused bind in the log", detail=pb.detail)
    refused = len(s.records("bind_refused"))
    assert refused >= 1
    s.control(max_binds=3)
    wait_until(lambda: len({r["session"] for r in s.records("bind_transceiver")}) - refused >= 3, 15,
               "the third bind once the SMSC allows it", detail=pb.detail)
    ids = add(pb.spool, [job(n, "three binds") for n in numbers(1000, 600)])
    wait_states(pb.spool, ids, {"delivered"}, timeout=60, detail=pb.detail)
    late = Counter(r["session"] for r in s.submits() if "7468726565" in r["body_hex"])  # "three"
    assert len(late) == 3, late


def test_throttling_slows_only_the_bind_that_got_it(pb):
    s = pb.smsc()
    d = pb.dispatcher(pb.config({"main": smpp(s, binds=2)}))
    wait_until(lambda: len(s.records("bind_transceiver")) >= 2, 15, "two binds", detail=pb.detail)
    first = min(r["session"] for r in s.records("bind_transceiver"))
    s.control(throttle=60, throttle_session=first)
    ids = add(pb.spool, [job(n, "throttle one bind") for n in numbers(0, 3000)])
    wait_states(pb.spool, ids, {"delivered"}, timeout=90, detail=pb.detail)
    recs = s.records("submit_sm")
    throttled = [r["t"] for r in recs if r.get("status") == 0x58]
    assert len(throttled) == 60 and all(r["session"] == first for r in recs if r.get("status") == 0x58)
    t0, t1 = min(throttled), max(throttled)
    other = [r for r in recs if r["session"] != first and r.get("status") == 0 and t0 <= r["t"] <= t1]
    mine = [r for r in recs if r["session"] == first and r.get("status") == 0 and t0 <= r["t"] <= t1]
    # While the throttled bind pauses (and its rate is cut), the other goes on at full speed.
    assert len(other) > 2 * max(len(mine), 10), (len(other), len(mine), t1 - t0)
    assert "SMSC throttling" in d.log() and "bind " in d.log()
    assert Counter(r["destination_addr"] for r in s.submits()).most_common(1)[0][1] == 1  # nothing twice


# --------------------------------------------------------------------------- routes


def test_routes_by_prefix_and_account_with_metrics_per_provider(pb):
    a, b = pb.smsc(), pb.smsc()
    cfg = pb.config({"a": smpp(a), "b": smpp(b)},
                    [{"prefixes": ["+4179"], "accounts": ["acme"], "providers": ["b"]}, {"providers": ["a"]}])
    pb.dispatcher(cfg)
    to_b = add(pb.spool, [job(n, "b") for n in numbers(0, 40)])
    other_account = add(pb.spool, [job(n, "a1", account="tmco") for n in numbers(100, 20)])
    other_prefix = add(pb.spool, [job(n, "a2") for n in numbers(200, 20, "+4178")])
    wait_states(pb.spool, to_b + other_account + other_prefix, {"delivered"}, timeout=30, detail=pb.detail)
    assert set(accepted_by(b)) == {n[1:] for n in numbers(0, 40)}
    assert set(accepted_by(a)) == {n[1:] for n in numbers(100, 20) + numbers(200, 20, "+4178")}
    text = pb.scrape()
    assert metric(text, "sms_milter_submits_total", provider="b", result="ok") == 40
    assert metric(text, "sms_milter_submits_total", provider="a", result="ok") == 40
    assert metric(text, "sms_milter_receipts_total", provider="b", result="delivered") == 40
    assert metric(text, "sms_milter_provider_bound", provider="a") == 1
    # Each job records the provider that took it: `queue show` says so.
    for jid, name in ((to_b[0], "b"), (other_prefix[0], "a")):
        r = run_cli(cfg, "queue", "show", str(jid), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["provider"] == name
        assert re.search(rf"(?m)^\s*provider:?\s+{name}\b", run_cli(cfg, "queue", "show", str(jid)).stdout)
    # Every receipt went back through the router to the bind it came from (deliver_sm_resp).
    wait_until(lambda: pending_receipts(a) == 0 and pending_receipts(b) == 0, 10, "receipts acknowledged",
               detail=pb.detail)


def test_failover_when_a_provider_dies_and_traffic_returns(pb):
    """Two SMSCs, route [a, b]: a is killed mid-stream; every job still goes out, none by both;
    a restarted, new traffic goes to a again. Duplicates within a (the submits that were on
    the wire when it died, sent to a again) are counted and reported."""
    a, b = pb.smsc(), pb.smsc()
    port_a = a.port
    # a fixed window of 10 (window_max 10): the bounds on what was on the wire are made of it
    d = pb.dispatcher(pb.config({"a": smpp(a, window=10, window_max=10), "b": smpp(b)},
                                [{"providers": ["a", "b"]}]))
    first = add(pb.spool, [job(n, "before") for n in numbers(0, 200)])
    wait_states(pb.spool, first, {"delivered"}, timeout=30, detail=pb.detail)
    assert len(a.submits()) == 200 and not b.submits()  # the first provider takes everything while up
    burst = add(pb.spool, [job(n, "burst") for n in numbers(1000, 3000)])
    wait_until(lambda: len(a.submits()) >= 700, 30, "a mid-stream", interval=0.01, detail=pb.detail)
    assert a.proc is not None
    a.proc.kill()  # SIGKILL: no unbind, answers on the wire lost
    a.proc.wait(5)
    # Everything not possibly at a goes out through b.
    wait_until(lambda: len(states_in(pb.spool, burst, {"submitted", "delivered"})) >= 3000 - 20, 60,
               "the burst through b", detail=pb.detail)
    at_a = {r["destination_addr"] for r in a.submits()}
    at_b = accepted_by(b)
    assert not at_a & set(at_b), sorted(at_a & set(at_b))[:10]  # never sent by both providers
    assert at_b.most_common(1)[0][1] == 1
    # a comes back on its port: the jobs that waited for it (sticky) and new traffic go there.
    a2 = pb.smsc(port=port_a)
    wait_until(lambda: len(a2.records("bind_transceiver")) >= 1, 15, "a rebinds", detail=pb.detail)
    wait_states(pb.spool, burst, {"submitted", "delivered"}, timeout=30, detail=pb.detail)
    after = add(pb.spool, [job(n, "after") for n in numbers(5000, 200)])
    wait_states(pb.spool, after, {"delivered"}, timeout=30, detail=pb.detail)
    assert {n[1:] for n in numbers(5000, 200)} <= set(accepted_by(a2))  # traffic returned to a
    burst_numbers = {n[1:] for n in numbers(1000, 3000)}
    waited = (set(accepted_by(a2)) & burst_numbers) - at_a  # in flight at a when it died, kept for a
    resent = set(accepted_by(a2)) & at_a
    both = (set(accepted_by(a2)) | at_a) & set(at_b)
    assert not both, sorted(both)[:10]
    print(f"\n[failover] killed a after {len(at_a)} accepted submits; b took {len(at_b)}; "
          f"{len(waited) + len(resent)} job(s) waited for a (on the wire when it died), {len(resent)} of "
          f"them accepted by a twice; "
          f"0 sent by both providers")
    assert len(resent) <= 10 + 10  # at most the window (plus answers not yet stored) went twice
    assert len(waited) + len(resent) <= 10  # at most the window was on the wire when a died
    assert "may be at provider a (connection lost" in d.log() and "through a only" in d.log()


def test_consecutive_temporary_errors_send_traffic_elsewhere_until_the_cooldown_ends(pb):
    """a answers every submit ESME_RSYSERR (temporary): after 3 in a row it is skipped for its
    cool-down, then probed with one job at a time; b carries the traffic. When a answers
    again, traffic returns to it."""
    a, b = pb.smsc("--syserr", "100000"), pb.smsc()
    cfg = pb.config({"a": {**smpp(a, window=2), "down_after": 3, "cooldown": 2},
                     "b": smpp(b)}, [{"providers": ["a", "b"]}])
    d = pb.dispatcher(cfg)
    ids = add(pb.spool, [job(n, "errors") for n in numbers(0, 100)])
    wait_states(pb.spool, ids, {"delivered"}, timeout=60, detail=pb.detail)
    assert set(accepted_by(b)) == {n[1:] for n in numbers(0, 100)} and not a.submits()
    assert "provider a: 3 temporary errors in a row" in d.log()
    # Jobs keep coming: after each cool-down a gets one probe, not a batch.
    n0, t0 = len(a.submits(accepted_only=False)), time.monotonic()
    trickle: list[int] = []
    for k in range(25):
        trickle += add(pb.spool, [job(n, "trickle") for n in numbers(1000 + 10 * k, 10)])
        time.sleep(0.3)  # pacing the load (not a synchronisation)
    wait_states(pb.spool, trickle, {"delivered"}, timeout=60, detail=pb.detail)
    probes, took = len(a.submits(accepted_only=False)) - n0, time.monotonic() - t0
    assert 1 <= probes <= took / 2 + 2, (probes, took)
    a.control(syserr=0)  # a recovers: its next probe is accepted and traffic returns

    def returned() -> bool:
        more = add(pb.spool, [job(f"+4177{time.monotonic_ns() % 10**7:07d}", "probe")])
        wait_states(pb.spool, more, {"delivered"}, timeout=30, detail=pb.detail)
        return bool(a.submits())

    wait_until(returned, 30, "traffic back on a after the cool-down", interval=0.2, detail=pb.detail)
    back = add(pb.spool, [job(n, "back") for n in numbers(5000, 50)])
    wait_states(pb.spool, back, {"delivered"}, timeout=30, detail=pb.detail)
    assert {n[1:] for n in numbers(5000, 50)} <= set(accepted_by(a))


def states_in(spool: SqliteSpool, ids: list[int], accept: set[str]) -> list[int]:
    return [i for i, j in states(spool, ids).items() if j.state in accept]


def test_reload_from_one_provider_to_routes_moves_traffic(pb):
    """SIGHUP with `provider:` replaced by `providers:` + `routes:`: the dispatcher re-binds
    through the factory and the router, and new jobs follow the new routes."""
    import signal

    a, b = pb.smsc(), pb.smsc()
    cfg = pb.config({"a": smpp(a)})  # one provider, no routes: no router
    d = pb.dispatcher(cfg)
    first = add(pb.spool, [job(n, "one") for n in numbers(0, 20)])
    wait_states(pb.spool, first, {"delivered"}, timeout=30, detail=pb.detail)
    assert len(a.submits()) == 20 and not b.submits()
    data = yaml.safe_load(cfg.read_text())
    data["providers"]["b"] = smpp(b)
    data["routes"] = [{"prefixes": ["+4179"], "providers": ["b", "a"]}, {"providers": ["a"]}]
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "provider settings changed: re-binding" in d.log(), 20, "the reload", detail=pb.detail)
    wait_until(lambda: b.records("bind_transceiver"), 20, "b bound", detail=pb.detail)
    later = add(pb.spool, [job(n, "two") for n in numbers(100, 20)] +
                              [job(n, "three") for n in numbers(200, 5, "+4178")])
    wait_states(pb.spool, later, {"delivered"}, timeout=30, detail=pb.detail)
    assert set(accepted_by(b)) == {n[1:] for n in numbers(100, 20)}
    assert {n[1:] for n in numbers(200, 5, "+4178")} <= set(accepted_by(a))
    assert "configuration reload failed" not in d.log()


def test_a_route_whose_providers_are_down_waits_without_blocking_other_routes(pb):
    b = pb.smsc()
    dead = {"smpp": {**FAST, "port": free_port()}}  # nothing listens there: never bound
    pb.dispatcher(pb.config({"a": dead, "b": smpp(b)},
                            [{"prefixes": ["+4178"], "providers": ["a"]}, {"providers": ["b"]}]))
    stuck = add(pb.spool, [job(n, "to a") for n in numbers(0, 3, "+4178")])
    fine = add(pb.spool, [job(n, "to b") for n in numbers(0, 30)])
    wait_states(pb.spool, fine, {"delivered"}, timeout=30, detail=pb.detail)

    def told() -> bool:
        return all("no provider of its route is up (a: not connected)" in (j.last_error or "")
                   for j in states(pb.spool, stuck).values())

    wait_until(told, 30, "last_error naming the down provider", detail=pb.detail)
    assert {j.state for j in states(pb.spool, stuck).values()} == {"queued"}
    assert not {n[1:] for n in numbers(0, 3, "+4178")} & set(accepted_by(b))  # never sent elsewhere
