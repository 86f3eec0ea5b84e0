"""sms-milter's own adapter with a gateway that does nothing: no validation, no spool.

The milter_path benchmark runs it as a reference round: the difference between this and
the real milter is what our decisions and the durable commit cost; the difference between
this and Postfix alone is the milter protocol itself (Postfix's side and our event loop).
Usage: python bench/noop_py_milter.py inet:127.0.0.1:PORT
"""

from __future__ import annotations

import signal
import sys

from sms_milter.adapter import Server
from sms_milter.gateway import Message, Outcome, SmsRecipient
from sms_milter.model import Config, MilterConfig


class NoSpool:
    def abandon(self, request: object) -> bool:
        return True


class NoopGateway:
    """Every recipient is "SMS", every message is discarded at once."""

    def __init__(self, socket_spec: str) -> None:
        self.cfg = Config(milter=MilterConfig(socket=socket_spec))
        self.spool = NoSpool()

    def rcpt(self, msg: Message, raw: bytes, address: str) -> None:
        msg.sms.append(SmsRecipient(raw=raw, address=address, target=None))  # type: ignore[arg-type]

    def decide(self, msg: Message) -> Outcome:
        return Outcome(discard=True)

    @staticmethod
    def slow(msg: Message) -> bool:
        return False  # decided in the loop


def main() -> int:
    spec = sys.argv[1]
    server = Server(spec, NoopGateway(spec))  # type: ignore[arg-type]
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
