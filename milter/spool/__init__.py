"""The spool: the durable queue of SMS jobs. Callers use the interface in `base` and get
a backend from `open_spool`; only this package knows SQL or which backend is in use."""

from __future__ import annotations

from ..model import Config
from .base import Spool


def open_spool(cfg: Config, busy_timeout: float | None = None, create: bool = True) -> Spool:
    """The configured spool: PostgreSQL when `spool.url` is set, else the SQLite file.
    create=False (the read-only tools): a PostgreSQL database without the spool's tables is
    SpoolError "does not exist", nothing is created (the SQLite callers check the file)."""
    timeout = cfg.milter.spool_timeout if busy_timeout is None else busy_timeout
    if cfg.spool.url:
        from .postgres import PostgresSpool

        return PostgresSpool(cfg.spool.url, busy_timeout=timeout, validity=cfg.smpp.validity, create=create)
    from .sqlite import SqliteSpool

    return SqliteSpool(cfg.spool.path, busy_timeout=timeout, validity=cfg.smpp.validity)
