"""The spool on PostgreSQL (`spool: {url: postgresql://...}`): several milters and dispatchers,
on several hosts, share one queue. The same interface as the SQLite spool (`spool.base`);
each side of it lives in its own module: `commit` (the milter's group commits, keys and
limit counters), `dispatch` (claims, leases, expiry, notifications), `receipts`, `admin`
(reading, queue tools, stats), `migrate` (`spool migrate --from`), on `core` (connection,
wake-ups) and `db` (transactions)."""

from __future__ import annotations

from .admin import AdminSide
from .commit import CommitSide
from .db import redact
from .dispatch import DispatchSide
from .migrate import MigrateSide
from .receipts import ReceiptSide


class PostgresSpool(CommitSide, DispatchSide, ReceiptSide, AdminSide, MigrateSide):
    """A spool in a PostgreSQL database; open it after fork (a connection per process)."""


__all__ = ["PostgresSpool", "redact"]
