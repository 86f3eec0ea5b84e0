#!/usr/bin/env python3
"""Benchmark 6: the HTTP path. How fast the dispatcher drains a spool through Kannel
(HTTP sendsms -> bearerbox -> SMPP -> SMSC simulator, reports back through dlr-url),
against Kannel's own rate fed directly, in the same run.

    python bench/http_kannel.py [--quick] [--jobs N] [--threads T]

Both runs use the same private Kannel (bearerbox + smsbox, tests/kannel_bed.py) bound to
the same SMSC simulator (tests/smsc/server.js, receipts at once), the same texts (single
GSM-7 parts to distinct numbers) and dlr-mask 31 (every message's reports come back over
HTTP).

- Baseline: T client threads (keep-alive, httpx) calling sendsms directly, each message
  with a dlr-url to a bare HTTP sink in this process; timed from the first request to the
  last "delivered" report received.
- Project: the jobs committed to a fresh spool in one transaction while `sms-milter
  dispatcher` runs with the README's Kannel preset (concurrency T); timed from the commit
  to the last job `delivered` in the spool (its report stored before it was answered).

Prints messages/s for both and the ratio (no target was set; the issue asks for the figure).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402,E501
    BenchAbort,
    banner,
    bed,
    cleanup_on_exit,
    poll,
    result,
    say,
    spool_query,
    spool_states,
    tail,
    workdir,
)


class DlrSink:
    """A bare asyncio HTTP/1.1 server counting Kannel's delivery reports (type=1)."""

    def __init__(self) -> None:
        self.port = bed.free_port()
        self.delivered = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port, backlog=1024))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                if "type=1" in line:
                    self.delivered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def numbers(start: int, n: int) -> list[str]:
    return [f"4179{start + i:07d}" for i in range(n)]


def direct(k, sink: DlrSink, n: int, threads: int) -> float:
    import httpx

    client = httpx.Client(limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads))
    dlr = f"http://127.0.0.1:{sink.port}/dlr?type=%d&to=%p"
    before = sink.delivered

    def send(to: str) -> int:
        q = {"username": k.user, "password": k.password, "from": "41760000000", "to": to,
             "text": "bench message direct", "charset": "UTF-8", "coding": "0", "dlr-mask": "31",
             "dlr-url": dlr}
        return client.get(k.sendsms_url + "?" + urllib.parse.urlencode(q)).status_code

    t0 = time.time()
    with ThreadPoolExecutor(threads) as pool:
        codes = list(pool.map(send, numbers(0, n)))
    if any(c != 202 for c in codes):
        raise BenchAbort(f"Kannel answered {sorted(set(codes))} to sendsms")
    poll(lambda: sink.delivered - before >= n, 600, f"{n} delivery reports at the sink", interval=0.02)
    took = time.time() - t0
    client.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 messages")
    ap.add_argument("--jobs", type=int, help="messages per run (default 5000, --quick 500)")
    ap.add_argument("--threads", type=int, default=8, help="HTTP requests at once in both runs (default 8)")
    a = ap.parse_args()
    n = a.jobs or (500 if a.quick else 5000)
    banner("http_kannel: spool -> dispatcher -> HTTP -> Kannel -> SMPP -> SMSC, reports back over HTTP")
    from kannel_bed import Kannel, kannel_provider, kannel_ready, providers_config

    why = kannel_ready()
    if why:
        say(f"SKIPPED: {why}")
        result("http_kannel", skipped=why)
        return 0
    from dispatcher_bed import DispatcherProc, Smsc

    with cleanup_on_exit() as stack:
        work = workdir(stack, "kannel")
        smsc = Smsc(work).start()
        stack.callback(smsc.stop)
        k = Kannel(work, smsc.port).start()
        stack.callback(k.stop)
        sink = DlrSink()
        say(f"{n} single-part GSM-7 messages per run, {a.threads} HTTP requests at once; Kannel 1.4.5 "
            f"(max-pending-submits 10) bound to the SMSC simulator on port {smsc.port}")
        base_s = direct(k, sink, n, a.threads)
        base_rate = n / base_s
        say(f"baseline (sendsms fed directly, reports to a bare sink): {n} in {base_s:.2f} s: "
            f"{base_rate:.0f} msg/s")

        spool = work / "spool.sqlite3"
        from sms_milter.spool.sqlite import SqliteSpool

        provider = kannel_provider(k, bed.free_port(), secrets.token_urlsafe(32), concurrency=a.threads)
        config = providers_config(work, bed.free_port(), {"kannel": provider}, spool_path=spool)
        SqliteSpool(spool).close()
        d = DispatcherProc(config, work / "dispatcher.log").start()
        stack.callback(d.stop)
        poll(lambda: "delivery reports over HTTP: listening" in d.log(), 30, "the dispatcher's listener")
        from sms_milter.spool.base import NewJob

        batch = [NewJob(recipient="+" + to, originator="+41760000000", text="bench message project",
                        parts=1, account="acme") for to in numbers(100000, n)]
        s = SqliteSpool(spool)
        s.add_message(None, batch, 0.0)  # one transaction; wakes the dispatcher
        t0 = time.time()
        s.close()

        def done() -> bool:
            st = spool_states(spool)
            if st.get("failed") or st.get("expired"):
                raise BenchAbort(f"jobs ended {st}; dispatcher log:\n{tail(work / 'dispatcher.log')}")
            return st.get("delivered", 0) == n

        poll(done, 600, f"all {n} jobs delivered", interval=0.05)
        proj_s = spool_query(spool, "SELECT max(done_at) FROM jobs")[0][0] - t0
        proj_rate = n / proj_s
        at_smsc = len([x for x in smsc.submits() if x["destination_addr"] in set(numbers(100000, n))])
        if at_smsc != n:
            raise BenchAbort(f"the SMSC accepted {at_smsc} submits for {n} jobs")
        say(f"project (dispatcher, reports stored before answered): {n} in {proj_s:.2f} s: "
            f"{proj_rate:.0f} msg/s")
        ratio = proj_rate / base_rate
        say(f"verified: all {n} jobs delivered, the SMSC took each exactly once; ratio {ratio:.2f}")
        result("http_kannel", jobs=n, threads=a.threads, kannel_direct_msg_s=round(base_rate),
               project_msg_s=round(proj_rate), ratio=round(ratio, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
