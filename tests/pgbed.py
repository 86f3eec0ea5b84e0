"""A private PostgreSQL cluster for the tests (Debian's `postgresql` package, no system service).

`PgCluster().start()` runs initdb and `pg_ctl start` in a fresh directory under /tmp, listening
on a free loopback port and a unix socket in that directory only. Tests run as root and
PostgreSQL refuses to: the cluster then belongs to `nobody` and every command runs through
`runuser -u nobody`. Each user of the cluster takes a database of its own (`new_database`),
so tests never see each other's jobs. `stop()`/`start()` again keep the data and the port
(the database-fault tests), `kill_backends()` resets every client connection (a failover).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import bed

USER = "sms"


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def why_not() -> str:
    """'' if a private cluster can run here, else why not."""
    if pg_bin() is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql; demo/setup does it)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser is missing (util-linux)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed in this venv (pip install -e .)"
    return ""


class PgCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sms-milter-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = bed.free_port()
        self.bin = pg_bin()
        self._as_nobody = os.geteuid() == 0
        if self._as_nobody:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "nobody", "nogroup")

    def _cmd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        assert self.bin is not None
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_nobody:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir,
                              stdin=subprocess.DEVNULL)

    def start(self) -> PgCluster:
        if not self.data.exists():
            r = self._cmd("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                          "--locale=C.UTF-8", "--no-sync")
            if r.returncode:
                raise RuntimeError(f"initdb failed: {r.stderr.strip()[-2000:]}")
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=300 "
                "-c synchronous_commit=on -c fsync=on -c shared_buffers=32MB")
        r = self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts,
                      "start")
        if r.returncode:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()}\n{bed.tail(self.log)}")
        _running.add(self)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        _running.discard(self)

    def running(self) -> bool:
        return self._cmd("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def url(self, db: str = "postgres", password: str | None = None) -> str:
        cred = USER if password is None else f"{USER}:{password}"
        return f"postgresql://{cred}@127.0.0.1:{self.port}/{db}"

    def sql(self, statement: str, db: str = "postgres") -> list[tuple]:
        import psycopg
        with psycopg.connect(self.url(db), autocommit=True, connect_timeout=10) as c:
            cur = c.execute(statement)
            return cur.fetchall() if cur.description else []

    def new_database(self, prefix: str = "t") -> str:
        """A fresh empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def kill_backends(self, db: str | None = None) -> int:
        """pg_terminate_backend() every client connection (of one database): a failover's reset."""
        where = f" AND datname='{db}'" if db else ""
        rows = self.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE"
                        f" backend_type='client backend' AND pid<>pg_backend_pid(){where}")
        return int(rows[0][0])

    def wait_ready(self, timeout: float = 30) -> None:
        bed.wait_until(lambda: self._ready(), timeout, "PostgreSQL accepting connections")

    def _ready(self) -> bool:
        try:
            self.sql("SELECT 1")
            return True
        except Exception:  # noqa: BLE001
            return False

    def destroy(self) -> None:
        if self.data.exists():
            self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        _running.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)


_running: set[PgCluster] = set()


@atexit.register
def _stop_all() -> None:
    for c in list(_running):
        try:
            c.destroy()
        except Exception:  # noqa: BLE001
            pass


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]

