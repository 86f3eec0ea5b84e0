"""Jobs for the dispatcher benchmarks and a raw smpplib pipeline to compare them with."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import smpplib.client
import smpplib.smpp
from sms_milter.dispatcher.pdus import job_parts
from sms_milter.policy.smstext import count_parts
from sms_milter.spool.base import Job, NewJob

ORIGINATOR = "+41760000000"
_GSM = "The quick brown fox jumps over the lazy dog, 0123456789. "
_UCS = "Grüße aus Zürich, ça va? Fußgängerübergänge é è ç. "


def job_text(i: int) -> str:
    """A third single-part GSM-7, a third 3-part GSM-7, a third 2-part UCS-2 (the ç)."""
    kind = i % 3
    tag = f"bench {i:07d} "
    if kind == 0:
        return (tag + _GSM * 3)[:120]
    if kind == 1:
        return (tag + _GSM * 8)[:400]
    return (tag + _UCS * 3)[:110]


def new_job(i: int, sender: str = "", notify: str = "") -> NewJob:
    text = job_text(i)
    return NewJob(recipient=f"+4179{i % 10**7:07d}", originator=ORIGINATOR, text=text,
                  parts=count_parts(text), account="acme", sender=sender, notify=notify)


def jobs(start: int, n: int, sender: str = "", notify: str = "") -> list[NewJob]:
    return [new_job(i, sender, notify) for i in range(start, start + n)]


def insert(path: Path, start: int, n: int, batch: int = 10_000, sender: str = "",
           notify: str = "") -> tuple[int, float]:
    """Insert n jobs in batches of `batch` (one transaction each); (total parts, seconds).
    On PostgreSQL when the benchmark runs with --postgres (_common.use_postgres)."""
    from _common import bed

    spool = bed.spool_at(path)
    t0 = time.perf_counter()
    parts = 0
    try:
        for s in range(start, start + n, batch):
            chunk = jobs(s, min(batch, start + n - s), sender, notify)
            parts += sum(j.parts for j in chunk)
            spool.add_message(None, chunk, 0.0)
    finally:
        spool.close()
    return parts, time.perf_counter() - t0


@dataclass
class RawResult:
    parts: int
    receipts: int
    seconds: float  # first submit sent -> last receipt read
    errors: int
    started: float = 0.0  # time.time() when the first submit was sent (for outside clocks)


def raw_pipeline(host: str, port: int, start: int, n: int, window: int,
                 progress: Callable[[str], None] = lambda s: None) -> RawResult:
    """smpplib alone: the same submit_sm octets as the dispatcher would send for the same jobs
    (built by smpplib before the clock starts), pipelined with at most `window` unanswered,
    every receipt read and answered with deliver_sm_resp. No spool, no bookkeeping."""
    client = smpplib.client.Client(host, port, timeout=60, allow_unknown_opt_params=True)
    client.connect()
    client.bind_transceiver(system_id="gw", password="pw")
    raws: list[bytes] = []
    for k, nj in enumerate(jobs(start, n)):
        job = Job(**{f: getattr(nj, f) for f in nj.__dataclass_fields__}, id=k + 1)
        for p in job_parts(job):
            ton, npi, addr = p.source
            pdu = smpplib.smpp.make_pdu(
                "submit_sm", client=client, service_type="", source_addr_ton=ton, source_addr_npi=npi,
                source_addr=addr, dest_addr_ton=1, dest_addr_npi=1, destination_addr=p.destination,
                esm_class=p.esm_class, protocol_id=0, priority_flag=0, schedule_delivery_time="",
                validity_period="", registered_delivery=1, replace_if_present_flag=0,
                data_coding=p.data_coding, sm_default_msg_id=0, short_message=p.short_message)
            raws.append(pdu.generate())
    total = len(raws)
    progress(f"raw smpplib: {total} submit_sm PDUs for {n} jobs built; sending, window {window}")
    sock = client._socket  # noqa: SLF001 (smpplib bound it; we pipeline on it)
    assert sock is not None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the dispatcher does: no Nagle stalls
    slots = threading.Semaphore(window)
    state = {"resps": 0, "receipts": 0, "errors": 0}
    done = threading.Event()
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            while state["resps"] < total or state["receipts"] < total:
                pdu = client.read_pdu()
                cmd = pdu.command
                if cmd == "submit_sm_resp":
                    state["resps"] += 1
                    if pdu.status != 0:
                        state["errors"] += 1
                    slots.release()
                elif cmd == "deliver_sm":
                    resp = smpplib.smpp.make_pdu("deliver_sm_resp", client=client)
                    resp.sequence = pdu.sequence  # make_pdu(sequence=...) is ignored by smpplib 2.2.4
                    sock.sendall(resp.generate())
                    state["receipts"] += 1
                elif cmd == "enquire_link":
                    resp = smpplib.smpp.make_pdu("enquire_link_resp", client=client)
                    resp.sequence = pdu.sequence
                    sock.sendall(resp.generate())
        except BaseException as e:  # noqa: BLE001 (reported by the caller)
            failure.append(e)
        finally:
            done.set()
            for _ in range(window):
                slots.release()

    t = threading.Thread(target=reader, daemon=True)
    started = time.time()
    t0 = time.perf_counter()
    t.start()
    for raw in raws:
        slots.acquire()
        if done.is_set():
            break
        sock.sendall(raw)
    done.wait()
    elapsed = time.perf_counter() - t0
    try:
        client.unbind()
    except Exception:  # noqa: BLE001 (the figures are in; a rude unbind does not matter)
        pass
    client.disconnect()
    if failure:
        raise RuntimeError(f"raw smpplib pipeline failed: {failure[0]!r}")
    return RawResult(total, state["receipts"], elapsed, state["errors"], started)

