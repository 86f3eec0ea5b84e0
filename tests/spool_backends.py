"""The spool backends the spool unit tests run against (the `spool_factory` fixture, made known
to every test by tests/conftest.py): every test that takes `spool_factory` runs once per
backend in SPOOL_BACKENDS.

To add a backend: add its name to SPOOL_BACKENDS and a branch in `_open` that returns a fresh,
empty spool of that backend (`name` tells apart several spools of one test; `kw` are
busy_timeout / validity as `open_spool` would pass them); a backend that needs a server gets it
from its session fixture through `request.getfixturevalue` (and skips where it cannot run).
Tests about one backend's own storage (SQLite's file, schema versions, locks) open it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sms_milter.spool.base import Spool
from sms_milter.spool.sqlite import SqliteSpool

SPOOL_BACKENDS = ["sqlite"]

SpoolFactory = Callable[..., Spool]


def _open(request: pytest.FixtureRequest, backend: str, base: Path, name: str, kw: dict[str, Any]) -> Spool:
    """A fresh spool of `backend`; `request.getfixturevalue(...)` gives a backend its server."""
    if backend == "sqlite":
        return SqliteSpool(base / f"{name}.sqlite3", **kw)
    raise AssertionError(f"unknown spool backend {backend}")


@pytest.fixture(params=SPOOL_BACKENDS)
def spool_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpoolFactory]:
    """make(name="s", **kw) -> a fresh spool of the backend under test (closed after the test)."""
    opened: list[Spool] = []

    def make(name: str = "s", **kw: Any) -> Spool:
        spool = _open(request, request.param, tmp_path, name, kw)
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()
