"""The spool backends the spool unit tests run against: every test that takes `spool_factory`
runs once per backend in SPOOL_BACKENDS.

To add a backend: add its name to SPOOL_BACKENDS and a branch in `_open` that returns a fresh,
empty spool of that backend (`name` tells apart several spools of one test; `kw` are
busy_timeout / validity as `open_spool` would pass them), and, if it needs a server, start it in
a session fixture and skip its parameter where the server cannot run. Tests that are about one
backend's own storage (SQLite's file, its schema versions, its locks) open that backend directly.
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


def _open(backend: str, base: Path, name: str, kw: dict[str, Any]) -> Spool:
    if backend == "sqlite":
        return SqliteSpool(base / f"{name}.sqlite3", **kw)
    raise AssertionError(f"unknown spool backend {backend}")


@pytest.fixture(params=SPOOL_BACKENDS)
def spool_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpoolFactory]:
    """make(name="s", **kw) -> a fresh spool of the backend under test (closed after the test)."""
    opened: list[Spool] = []

    def make(name: str = "s", **kw: Any) -> Spool:
        spool = _open(request.param, tmp_path, name, kw)
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()
