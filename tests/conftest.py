"""Fixtures of the real-peer test bed (see tests/bed.py).

- `sink`: the relay sink (what Postfix delivers after the milter) - session scoped, shared;
  tests find their own mail by a unique token (bed.unique()).
- `notify_sink`: where the gateway sends notification / XML-reply mail.
- `gateway`: the milter (sms-milter milter -c CONFIG) behind a private Postfix whose
  smtpd_milters points at it. Session scoped; `gateway.ensure_milter()` restarts a milter a
  test killed (done automatically before every test that uses `gw`).
- `gw`: the same gateway, function scoped: guarantees the milter runs, and on failure adds the
  tails of the Postfix maillog and the milter log to the report.

Jobs: tests filter `gateway.jobs()` by a unique recipient (bed.unique_number()) or a unique
token in the text instead of cleaning the spool.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import bed  # noqa: E402
from spool_backends import spool_factory  # noqa: E402, F401 (the spool unit tests' backends)


def pytest_addoption(parser):
    parser.addoption("--spool", choices=("sqlite", "postgres"), default=None,
                     help="the spool backend of the gateways and dispatchers the tests start "
                          "(default: $SMS_MILTER_TEST_SPOOL or sqlite)")


def spool_backend(config) -> str:
    import os
    return config.getoption("--spool") or os.environ.get("SMS_MILTER_TEST_SPOOL") or "sqlite"


def pytest_configure(config):
    config.addinivalue_line("markers", "bed: needs the real-peer test bed (Postfix, milter)")
    config.addinivalue_line("markers", "postgres: needs a private PostgreSQL cluster (tests/pgbed.py)")
    if spool_backend(config) == "postgres":
        bed.SPOOL_URL_FACTORY = _pg_database


_PG: list = []


def pg_cluster():
    """The session's private PostgreSQL cluster, started on first use (tests/pgbed.py)."""
    import pgbed
    if not _PG:
        why = pgbed.why_not()
        if why:
            pytest.fail(f"PostgreSQL tests cannot run: {why}", pytrace=False)
        _PG.append(pgbed.PgCluster().start())
    cluster = _PG[0]
    if not cluster.running():  # a fault test left it stopped
        cluster.start()
    return cluster


def _pg_database() -> str:
    return pg_cluster().new_database()


@pytest.fixture(scope="session")
def pg():
    """A private PostgreSQL cluster (initdb + pg_ctl on a free loopback port, as `nobody`)."""
    return pg_cluster()


def _require_postfix() -> None:
    if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
        pytest.fail("postfix is not installed: run .ci/run (or apt-get install -y postfix miltertest); "
                    "the real-peer tests need a real Postfix", pytrace=False)


class Gateway:
    def __init__(self, base: Path, sink: bed.MailSink, notify_sink: bed.MailSink):
        self.base = base
        self.sink = sink
        self.notify_sink = notify_sink
        self.milter_port = bed.free_port()
        self.spool_path = base / "spool.sqlite3"
        self.config = bed.write_config(base, self.milter_port, notify_sink.port, spool_path=self.spool_path)
        self.milter = bed.Milter(self.config, base / "milter.log")
        self.postfix: bed.Postfix | None = None

    @property
    def port(self) -> int:
        assert self.postfix is not None
        return self.postfix.port

    @property
    def milter_socket(self) -> str:
        return f"inet:127.0.0.1:{self.milter_port}"

    def start(self) -> Gateway:
        self.postfix = bed.Postfix(None, self.sink.port, self.milter_socket)
        self.milter.start()
        self.postfix.start()
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator[Gateway]:
        """Started for the block (a failed start leaves nothing behind), stopped after it."""
        try:
            self.start()
        except Exception:
            self.milter.kill9()
            if self.postfix is not None:
                self.postfix.stop()
            raise
        try:
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        errors = []
        try:
            self.milter.stop()
        except Exception as e:  # keep going: Postfix must stop too
            errors.append(e)
            self.milter.kill9()
        if self.postfix is not None:
            self.postfix.stop()
        if errors:
            raise errors[0]

    def ensure_milter(self) -> None:
        if not self.milter.running():
            self.milter.proc = None
            self.milter.start()

    # ---- the spool (either backend)
    @property
    def spool_url(self) -> str | None:
        """The PostgreSQL URL of this gateway's spool, None when it is the SQLite file."""
        import yaml
        return (yaml.safe_load(self.config.read_text()).get("spool") or {}).get("url")

    @contextlib.contextmanager
    def spool_locked(self) -> Iterator[None]:
        """Another process holds the spool's write lock for the block (SQLite: BEGIN EXCLUSIVE;
        PostgreSQL: LOCK TABLE on the tables a commit writes)."""
        with bed.spool_locked(self.spool_path):
            yield

    # ---- conveniences
    def jobs(self, **match) -> list[dict]:
        """queue_list(config), optionally filtered: jobs(recipient="+41...") or jobs(text_contains=...)."""
        contains = match.pop("text_contains", None)
        out = bed.queue_list(self.config)
        if contains is not None:
            out = [j for j in out if contains in (j.get("text") or "")]
        return [j for j in out if all(j.get(k) == v for k, v in match.items())]

    def send(self, mail_from: str, rcpts, msg, **kw) -> dict:
        return bed.smtp_send(self.port, mail_from, rcpts, msg, **kw)

    def session(self, **kw) -> bed.SmtpSession:
        return bed.SmtpSession(self.port, **kw)

    def logs(self, lines: int = 40) -> str:
        pf = bed.tail(self.postfix.maillog, lines) if self.postfix else ""
        ml = bed.tail(self.milter.logfile, lines)
        return f"--- postfix maillog tail:\n{pf}\n--- milter log tail:\n{ml}"


@pytest.fixture(scope="session")
def sink():
    s = bed.MailSink().start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def notify_sink():
    s = bed.MailSink().start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, sink, notify_sink):
    _require_postfix()
    with Gateway(tmp_path_factory.mktemp("gateway"), sink, notify_sink).running() as g:
        yield g


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call" and rep.failed:
        g = item.funcargs.get("gw")
        if isinstance(g, Gateway):
            rep.sections.append(("bed logs", g.logs()))
    return rep


@pytest.fixture
def gw(gateway):
    """The session gateway, with a running milter guaranteed for this test."""
    gateway.ensure_milter()
    return gateway


@pytest.fixture(scope="module")
def smsc_node() -> None:
    """Fails the module's tests at once (not one by one) when the SMSC simulator cannot run."""
    from dispatcher_bed import node_ready
    why = node_ready()
    if why:
        pytest.fail(f"the SMSC simulator cannot run: {why}", pytrace=False)


@pytest.fixture(scope="module")
def nsink():
    """A mailbox for notification mail, one per test module."""
    with bed.MailSink() as s:
        yield s
