"""The SQLite spool: one file, WAL, synchronous=FULL.

The milter commits in its event-loop thread: every message that ended in one loop
iteration goes into one transaction (one fsync for many concurrent SMTP sessions), and
each session gets its reply only after that commit. The dispatcher's calls are short
transactions on their own connection. Open a spool after fork, never before.

The class is assembled from one side per caller (the modules here); the rules (which state a
receipt leads to, which notifications are owed) are `spool.lifecycle`'s.
"""

from __future__ import annotations

from ..lifecycle import NOTIFY_STATES, number_key, same_number
from .admin import AdminSide
from .commit import CommitSide
from .dispatch import DispatchSide
from .files import FilesSide
from .receipts import ReceiptSide
from .schema import JOB_COLUMNS, MIGRATIONS, SCHEMA
from .store import DEFAULT_VALIDITY, WAKE_SLOTS

__all__ = ["DEFAULT_VALIDITY", "JOB_COLUMNS", "MIGRATIONS", "NOTIFY_STATES", "SCHEMA", "WAKE_SLOTS",
           "SqliteSpool", "number_key", "same_number"]


class SqliteSpool(CommitSide, DispatchSide, ReceiptSide, AdminSide, FilesSide):
    """The SQLite spool: every method of `spool.base.Spool`."""
