"""`sms-milter dispatcher`: the engine, the SMPP provider and the notifier in one process.

`run(cfg, stop)` runs until `stop` is set (the CLI maps SIGTERM/SIGINT to it) and returns
an exit code. Stopping finishes what is in flight (or leaves it to be retried), acknowledges
stored receipts, unbinds, and hands back every lease.

Leases last 45 s (renewed every 15 s while a job is in flight); the environment variable
SMS_MILTER_LEASE_SECONDS overrides that (the crash tests use a short lease).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import uuid

from ..config import DEFAULT_PATH, Config, ConfigError, load
from ..spool.base import SpoolError
from ..spool.sqlite import open_spool
from .engine import Engine
from .notify import Notifier
from .smpp import SmppProvider

log = logging.getLogger("sms_milter.dispatcher")


def run(cfg: Config, stop: threading.Event | None = None) -> int:
    if stop is None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
    try:
        spool = open_spool(cfg, busy_timeout=10.0)
    except SpoolError as e:
        log.error("%s", e)
        return 1
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    provider = SmppProvider(cfg.smpp)
    notifier = Notifier(spool, cfg)
    try:
        lease = float(os.environ.get("SMS_MILTER_LEASE_SECONDS", "") or 45.0)
    except ValueError:
        lease = 45.0
    engine = Engine(spool, provider, cfg, owner, on_events=notifier.kick, lease_seconds=max(lease, 1.0))
    log.info("dispatcher %s started: spool %s, SMSC %s:%d, window %d, rate %s", owner, spool.path,
             cfg.smpp.host, cfg.smpp.port, cfg.smpp.window, cfg.smpp.rate or "unlimited")
    notifier.start(stop)
    try:
        engine.run(stop)
    except Exception:  # noqa: BLE001 (log it; leases bring every open job back)
        log.exception("dispatcher failed")
        return 1
    finally:
        stop.set()
        notifier.join(10.0)
        spool.close()
    log.info("dispatcher stopped: %s", engine.stats)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m sms_milter.dispatcher.service -c FILE`); the CLI uses run()."""
    ap = argparse.ArgumentParser(prog="sms-milter-dispatcher")
    ap.add_argument("-c", "--config", default=DEFAULT_PATH)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load(args.config)
    except ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
