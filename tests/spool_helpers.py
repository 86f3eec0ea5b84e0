"""Spool calls only tests make, built on the spool's interface (spool/base.py), so that they
work on any backend: the spool itself offers the batch forms its callers use."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from sms_milter.spool.base import AppliedOrphan, CommitSpool, DispatchSpool, NewJob, ReceiptOutcome


def add_jobs(spool: CommitSpool, jobs: Iterable[NewJob]) -> list[int]:
    """Commit jobs in one transaction without an idempotency key; their ids."""
    return list(spool.add_message(None, list(jobs), 0.0).job_ids)


def mark_submitted(spool: DispatchSpool, job_id: int, owner: str, refs: list[str]) -> list[AppliedOrphan]:
    """One job's parts submitted with these message ids."""
    return spool.mark_submitted_many([(job_id, refs)])


def record_receipt(spool: DispatchSpool, ref: str, part_state: str, error: str = "") -> ReceiptOutcome | None:
    """One receipt (see DispatchSpool.record_receipts)."""
    return spool.record_receipts([(ref, part_state, error)])[0]


def orphan_count(spool: object) -> int:
    """Orphan receipts stored (SQLite: read from its file)."""
    db = sqlite3.connect(getattr(spool, "path"))  # noqa: B009
    try:
        return int(db.execute("SELECT count(*) FROM orphan_receipts").fetchone()[0])
    finally:
        db.close()
