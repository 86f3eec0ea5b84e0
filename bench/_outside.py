"""milter_path.py --outside: the milter path measured the way issue 16's outside run did.

    smtp-source -s 20 -m 2000 -l 300 -t 0041791239999@sms.example.com   (Postfix + sms-milter)
    smtp-source -s 20 -m 2000 -l 300 -t bench@relay.example             (Postfix alone -> smtp-sink)

One Postfix instance, restarted between the two (smtpd_milters set for the project, empty
for the baseline), Postfix's own milter timeouts (the production snippet's: connect 10 s,
command 30 s, content 60 s), the milter with the shipped defaults except what the
benchmark needs to verify itself; best of `rounds` runs each (default 2), the ratio of the
bests. Rounds alternate B P B P ... with a restart before each, and each neighbouring
pair's ratio is printed too, so the spread shows. Each round also runs the same messages
through Postfix + a milter that does nothing (bench/noop_py_milter.py: our adapter with no
validation and no spool; bench/noop_milter.c on sendmail's libmilter if it builds): their
ratios are the ceiling for any milter in this path (`--no-references` leaves them out).

Differences from the default mode (5,000 x 1 KB, two Postfix instances side by side, no
restart, median of per-round ratios), each selectable to find out which one matters:
`--size`, `--messages`, `--no-restart`, `--dedupe` (limits.identical_seconds as shipped:
smtp-source's text is the same every time, so all but the first message are duplicates
and commit only their dedupe key).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import urllib.request
from pathlib import Path

import milter_path as mp
from _common import BenchAbort, Proc, banner, bed, cleanup_on_exit, own, poll, result, say, workdir

OUTSIDE_RCPT = "0041791239999@sms.example.com"
PRODUCTION_TIMEOUTS = {"milter_connect_timeout": "10s", "milter_command_timeout": "30s",
                       "milter_content_timeout": "60s"}


def eom_to_commit(port: int) -> tuple[float, float]:
    """The milter's sms_milter_smtp_to_commit_seconds sum and count (its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("sms_milter_smtp_to_commit_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("sms_milter_smtp_to_commit_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def outside(a: argparse.Namespace) -> int:
    rounds = a.rounds or 2
    n = a.messages or 2000
    size = a.size or 300
    banner("milter_path --outside: issue 16's method (one Postfix, restarted between the two, best of N)")
    say(f"{rounds} round(s) each of {n} messages x {size} bytes, {a.sessions} sessions, to {OUTSIDE_RCPT}; "
        f"{'no restart' if a.no_restart else 'Postfix restarted between baseline and project'}; "
        f"identical-SMS dedupe {'on (shipped default)' if a.dedupe else 'off'}")
    with cleanup_on_exit() as stack:
        work = workdir(stack, "milter-outside")
        sink_port, milter_port = bed.free_port(), bed.free_port()
        spool = work / "spool.sqlite3"
        extra: dict = {"milter": {"spool_timeout": 5.0}}  # the shipped default (the bed's is 1 s)
        if not a.dedupe:
            extra["limits"] = {"identical_seconds": 0}
        if size > 900:  # --size 1024 as the default mode: 7 SMS parts, over the shipped cap of 6
            extra["accounts"] = {"acme": {"max_parts": 10}}
        metrics_port = bed.free_port()
        config = bed.write_config(work, milter_port, bed.free_port(), spool_path=spool,
                                  extra={**extra, "metrics": {"milter": f"127.0.0.1:{metrics_port}"}})
        spec = f"inet:127.0.0.1:{milter_port}"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink = own(stack, Proc(["smtp-sink", *user, "-c", f"127.0.0.1:{sink_port}", "256"]))
        poll(lambda: bed._port_listening(sink_port), 10, "smtp-sink listening", alive=[sink])
        milter = bed.Milter(config, work / "milter.log")
        stack.callback(milter.kill9)
        milter.start()
        (work / "pf").mkdir()
        pf = bed.Postfix(work / "pf", sink_port, spec, name=f"boutside{os.getpid()}",
                         extra_main=dict(PRODUCTION_TIMEOUTS))
        stack.callback(pf.stop)
        beds = {"project": (mp.Bed(sink, pf, pf, milter, config, spool), spec)}
        metrics_ports = {"project": metrics_port}
        for j, ab in enumerate(a.ab or [], 1):
            # Another milter, the same configuration but another port and the environment
            # given: A/B of a change in the same run (its rounds go next to the others').
            port_b, metrics_b = bed.free_port(), bed.free_port()
            config_b = bed.write_config(work, port_b, bed.free_port(), spool_path=spool,
                                        extra={**extra, "metrics": {"milter": f"127.0.0.1:{metrics_b}"}},
                                        name=f"sms-milter-b{j}.yaml")
            env = dict(kv.split("=", 1) for kv in ab.split(","))
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                milter_b = bed.Milter(config_b, work / f"milter-b{j}.log")
                stack.callback(milter_b.kill9)
                milter_b.start()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            beds[f"B{j} {ab}"] = (mp.Bed(sink, pf, pf, milter_b, config_b, spool), f"inet:127.0.0.1:{port_b}")
            metrics_ports[f"B{j} {ab}"] = metrics_b
        b = beds["project"][0]
        # The ceilings, in the same rounds: Postfix + a milter that does nothing (our own
        # adapter with no validation and no spool; sendmail's C libmilter if it builds).
        refs: dict[str, str] = {}
        if not a.no_references:
            port_py = bed.free_port()
            own(stack, Proc([sys.executable, str(Path(mp.__file__).with_name("noop_py_milter.py")),
                             f"inet:127.0.0.1:{port_py}"]))
            poll(lambda: bed._port_listening(port_py), 10, "no-op Python milter listening")
            refs["noop-py"] = f"inet:127.0.0.1:{port_py}"
            noop_c = mp.build_noop_milter(work)
            if noop_c is not None:
                port_c = bed.free_port()
                own(stack, Proc([str(noop_c), f"inet:{port_c}@127.0.0.1"]))
                poll(lambda: bed._port_listening(port_c), 10, "no-op C milter listening")
                refs["noop-C"] = f"inet:127.0.0.1:{port_c}"
            for spec_ref in refs.values():
                mp.let_postfix_in(spec_ref)
        state: dict[str, str | None] = {"with": None}

        def use(which: str) -> None:
            if state["with"] == which and a.no_restart:
                return
            if pf.running:
                pf.stop()
            pf.milter_socket = beds[which][1] if which in beds else refs.get(which)
            pf.start()
            state["with"] = which

        latency: dict[str, list[float]] = {k: [] for k in beds}

        def project(which: str, tag: str, count: int) -> float:
            s0, c0 = eom_to_commit(metrics_ports[which])
            rate = mp.project_round(beds[which][0], count, a.sessions, size, tag, rcpt=OUTSIDE_RCPT,
                                    expect_jobs=None if a.dedupe else count)
            s1, c1 = eom_to_commit(metrics_ports[which])
            if c1 > c0:
                latency[which].append((s1 - s0) / (c1 - c0))
            return rate

        use("baseline")
        mp.baseline_round(b, 100, a.sessions, size, "w0")
        for which in beds:
            use(which)
            project(which, "w1", 100)
        rates: dict[str, list[float]] = {k: [] for k in ["baseline", *beds, *refs]}
        cpus: dict[str, list[float]] = {k: [] for k in rates}
        for i in range(1, rounds + 1):
            order = list(rates) if i % 2 else list(reversed(rates))
            for which in order:
                use(which)
                if which == "baseline":
                    rates[which].append(mp.baseline_round(b, n, a.sessions, size, f"b{i}"))
                elif which in refs:
                    mp.CPU.clear()
                    rates[which].append(mp.ceiling_round(pf, n, a.sessions, size, f"r{i}{which[5]}"))
                    say(f"round {i} {which:<10} {rates[which][-1]:7.0f} msg/s (reference: a milter that "
                        "does nothing)")
                    continue
                else:
                    rates[which].append(project(which, f"p{i}{which[0]}", n))
                cpus[which].append(mp.cpu_per_msg())
                lat = f"; end of message -> commit {1000 * latency[which][-1]:.1f} ms" \
                    if which in latency and latency[which] else ""
                say(f"round {i} {which:<10} {rates[which][-1]:7.0f} msg/s; {mp.cpu_line()}{lat}")
            say(f"round {i} ratio " + ", ".join(f"{k} {rates[k][-1] / rates['baseline'][-1]:.2f}"
                                                for k in [*beds, *refs]))
        base, proj = rates["baseline"], rates["project"]
        base_cpu, proj_cpu = cpus["baseline"], cpus["project"]
        for k in list(beds)[1:]:
            vs = [x / y for x, y in zip(rates[k], proj, strict=True)]
            say(f"{k} against project: msg/s ratio per round {', '.join(f'{r:.2f}' for r in vs)} (median "
                f"{statistics.median(vs):.2f}); best {max(rates[k]) / max(base):.2f} of Postfix alone; "
                f"CPU {1000 * statistics.median(cpus[k]):.2f} vs "
                f"{1000 * statistics.median(proj_cpu):.2f} ms/msg; end of message -> commit "
                f"{1000 * statistics.median(latency[k]):.1f} vs "
                f"{1000 * statistics.median(latency['project']):.1f} ms")
        pairs = [p / q for p, q in zip(proj, base, strict=True)]
        best = max(proj) / max(base)
        say(f"best baseline {max(base):.0f} msg/s, best project {max(proj):.0f} msg/s: ratio of the bests "
            f"{best:.2f} (the outside's statistic); rounds' ratios {', '.join(f'{r:.2f}' for r in pairs)} "
            f"(median {statistics.median(pairs):.2f})")
        ceilings = {k: round(max(rates[k]) / max(base), 3) for k in refs}
        for k in refs:
            say(f"reference {k} (no validation, no spool): best {max(rates[k]):.0f} msg/s, "
                f"{ceilings[k]:.2f} of Postfix alone (what a milter that does nothing gets here); the "
                f"project reaches {max(proj) / max(rates[k]):.2f} of it")
        cpu_ratio = statistics.median(base_cpu) / statistics.median(proj_cpu)
        say(f"CPU per message (median): baseline {1000 * statistics.median(base_cpu):.2f} ms, project "
            f"{1000 * statistics.median(proj_cpu):.2f} ms: CPU-bound ratio {cpu_ratio:.2f} "
            "(msg/s on a quiet 2-core box where Postfix, smtp-source and the milter share the CPUs)")
        result("milter_path_outside", cpu_bound_ratio=round(cpu_ratio, 3),
               baseline_best_msg_s=round(max(base)),
               project_best_msg_s=round(max(proj)), ratio_of_bests=round(best, 3),
               round_ratios=[round(r, 3) for r in pairs], messages=n, size=size, rounds=rounds,
               restart=not a.no_restart, dedupe=a.dedupe,
               **{f"ceiling_{k.replace('-', '_')}": v for k, v in ceilings.items()})
        for bb, _ in beds.values():
            code = bb.milter.stop()
            if code != 0:
                raise BenchAbort(f"the milter exited {code} on SIGTERM")
    return 0

