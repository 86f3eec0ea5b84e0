"""The spool: the durable queue of SMS jobs. Callers use the interface in `base` and get
a backend from `open_spool`; only this package knows SQL or which backend is in use."""

from __future__ import annotations

from ..model import Config
from .base import Spool


def open_spool(cfg: Config, busy_timeout: float | None = None) -> Spool:
    """The configured spool (SQLite today; `spool.url` will choose PostgreSQL here)."""
    from .sqlite import SqliteSpool

    timeout = cfg.milter.spool_timeout if busy_timeout is None else busy_timeout
    return SqliteSpool(cfg.spool.path, busy_timeout=timeout, validity=cfg.smpp.validity)
