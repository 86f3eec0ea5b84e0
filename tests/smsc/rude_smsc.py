"""A "rude SMSC" on PyPI smpp34 (Rust-backed, asyncio): it reorders answers within a session,
answers ESME_RMSGQFUL under pipelined bursts, and never answers unbind.

    python tests/smsc/rude_smsc.py --port 0 --log FILE

Prints "LISTENING <port>"; accepts every submit_sm the library lets through and sends a
delivery receipt (esm_class 4, receipted_message_id + message_state TLVs and the receipt
text) for each; logs every submit_sm and receipt answer as a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

import smpp34


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", default="")
    ap.add_argument("--system-id", default="RUDE")
    ap.add_argument("--inbound-capacity", type=int, default=0,
                    help="queue of unhandled submits (small: RMSGQFUL)")
    ap.add_argument("--handle-delay", type=float, default=0.0, help="seconds spent on each submit")
    a = ap.parse_args()
    port = a.port or _free_port()
    log = open(a.log, "a", buffering=1) if a.log else None  # noqa: SIM115
    kw = {"inbound_capacity": a.inbound_capacity} if a.inbound_capacity else {}
    server = smpp34.Server("127.0.0.1", port, system_id=a.system_id, **kw)
    await server.start()
    print(f"LISTENING {port}", flush=True)
    sessions: dict[str, smpp34.Esme] = {}
    next_id = int(time.time()) * 100000
    tasks: set[asyncio.Task] = set()

    def record(**kw: object) -> None:
        if log:
            log.write(json.dumps({"t": time.time() * 1000, **kw}) + "\n")

    async def receipt(esme: smpp34.Esme, ev_dest: str, ev_src: str, mid: str) -> None:
        text = (f"id:{mid} sub:001 dlvrd:001 submit date:2401011200 done date:2401011200"
                " stat:DELIVRD err:000 text:")
        try:
            resp = await esme.deliver_sm(
                ev_src or "SMS", text.encode(), source_addr=ev_dest, esm_class=0x04,
                tlvs=[smpp34.Tlv(smpp34.TLV_RECEIPTED_MESSAGE_ID, mid.encode() + b"\0"),
                      smpp34.Tlv(smpp34.TLV_MESSAGE_STATE, b"\x02")])
            record(command="deliver_sm_resp", receipt=mid, status=resp.command_status)
        except Exception as e:  # noqa: BLE001
            record(command="deliver_sm_error", receipt=mid, error=str(e))

    while True:
        ev = await server.next()
        if isinstance(ev, smpp34.Esme):
            sessions[ev.session_id] = ev
            record(command="bind", session=ev.session_id, system_id=ev.system_id)
        elif isinstance(ev, smpp34.Unbound):
            sessions.pop(ev.session_id, None)
            record(command="unbound", session=ev.session_id)
        elif isinstance(ev, smpp34.SubmitSmEvent):
            if a.handle_delay:
                await asyncio.sleep(a.handle_delay)
            next_id += 1
            mid = str(next_id)
            ev.accept(mid)
            record(command="submit_sm", session=ev.session_id, destination_addr=ev.destination_addr,
                   short_message_hex=ev.short_message.hex(), esm_class=ev.esm_class,
                   data_coding=ev.data_coding, message_id=mid, status=0)
            esme = sessions.get(ev.session_id)
            if esme is not None:
                t = asyncio.create_task(receipt(esme, ev.destination_addr, ev.source_addr, mid))
                tasks.add(t)
                t.add_done_callback(tasks.discard)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
