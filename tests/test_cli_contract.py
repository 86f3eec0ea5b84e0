"""The command line's worst inputs, as an outside tester tries them (INTERFACE.md: "Errors go to
stderr as one clear line, with exit 2 for bad usage/config and 1 for runtime failure; no
traceback for an operator's mistake"; "Read-only commands never create a spool").

Runs the installed `sms-milter` in a subprocess against configs and spool files of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from bed import milter_command, write_config

ID_COMMANDS = (("queue", "show"), ("queue", "hold"), ("queue", "release"), ("queue", "retry"),
               ("queue", "delete"))


def sms(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [*milter_command(), *args]
    if user is not None:  # root without the capabilities that let it read and write any file
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def one_line(r: subprocess.CompletedProcess, code: int) -> str:
    """The command failed with `code` and said why in exactly one line on stderr."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def sqlite_config(d: Path) -> Path:
    """These tests are about SQLite spool files, also when the suite runs on PostgreSQL."""
    spool = str(d / "spool.sqlite3")
    return write_config(d, milter_port=1, notify_port=2, spool_path=spool, extra={"spool": {"path": spool}})


@pytest.fixture
def shared_dir(tmp_path: Path):
    """A directory, and how to lock a file in it away from the commands `sms(..., user=...)` runs:
    as root (root reads every file) the file goes to `nobody` and the command runs as root without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER (setpriv), so the file's mode applies to it
    as to any other user; the checkout and its venv stay reachable wherever the clone is."""
    if os.geteuid() != 0:
        yield tmp_path, None
        return
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): cannot lock a file away")
    yield tmp_path, "nobody"


def lock_away(path: Path, user: str | None) -> None:
    """`path` belongs to `user` (when the suite runs as root), so its mode bits decide."""
    if user is not None:
        shutil.chown(path, user)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return sqlite_config(tmp_path)


@pytest.mark.parametrize("content,expected", [
    (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    (b"- milter\n- spool\n", "must be a mapping"),
    (b"milter: !!python/object/apply:os.system [true]\n", "not valid YAML"),
    (b"milter: {socket: [\n", "not valid YAML"),
])
def test_config_that_is_not_a_configuration_is_one_line_exit_2(tmp_path: Path, content: bytes,
                                                                 expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    for args in (("check-config",), ("queue", "list"), ("stats",), ("milter",), ("dispatcher",)):
        line = one_line(sms("-c", str(path), *args), 2)
        assert expected in line and "c.yaml" in line, (args, line)
    assert not (tmp_path / "spool.sqlite3").exists()


def test_config_that_is_a_directory_or_unreadable_is_one_line_exit_2(tmp_path: Path, shared_dir) -> None:
    line = one_line(sms("-c", str(tmp_path), "check-config"), 2)
    assert str(tmp_path) in line and "cannot read" in line
    d, user = shared_dir
    config = sqlite_config(d)
    lock_away(config, user)
    config.chmod(0o644)
    assert sms("-c", str(config), "check-config", user=user).returncode == 0  # it can reach the file
    config.chmod(0o600 if user else 0)
    line = one_line(sms("-c", str(config), "check-config", user=user), 2)
    assert str(config) in line and "cannot read" in line and "Permission denied" in line, line


@pytest.mark.parametrize("duration", ["", "30", "30x", "d", "1D", "+1d", "1,5d", "0x10d", "1_0d",
                                      "\u0661d", "\uff11d", "1e3d", "nand", "infd"])
def test_purge_older_than_garbage_is_one_line_exit_2(config: Path, duration: str) -> None:
    """Only ASCII digits: `١d` (ARABIC-INDIC DIGIT ONE) or a full-width `１d` is no duration."""
    line = one_line(sms("-c", str(config), "queue", "purge", "--older-than", duration), 2)
    assert "invalid duration" in line, line
    assert not (config.parent / "spool.sqlite3").exists()


@pytest.mark.parametrize("bad_id", ["abc", "0", "1.0", "1e3", "0x1", "\u0661", "\uff11", " ", "9" * 20])
def test_every_id_command_refuses_an_id_that_is_no_number_with_one_line_exit_2(config: Path,
                                                                                bad_id: str) -> None:
    for command in ID_COMMANDS:
        line = one_line(sms(*command, bad_id, "-c", str(config)), 2)
        assert "invalid job id" in line, (command, line)
    for command in ID_COMMANDS:  # negative: argparse sees an option, still one line and exit 2
        one_line(sms(*command, "-5", "-c", str(config)), 2)
    assert not (config.parent / "spool.sqlite3").exists()


def test_listing_commands_on_a_missing_spool_say_so_and_create_nothing(config: Path) -> None:
    spool = config.parent / "spool.sqlite3"
    for args in (("queue", "list"), ("queue", "list", "--json"), ("queue", "list", "--state", "held"),
                 ("stats", "--json"), ("queue", "release", "1"), ("queue", "retry", "1"),
                 ("queue", "delete", "1")):
        line = one_line(sms("-c", str(config), *args), 1)
        assert "does not exist" in line and str(spool) in line, (args, line)
        assert not spool.exists() and not Path(f"{spool}-wal").exists(), args


def test_a_spool_that_is_not_a_database_is_one_line_exit_1_and_left_alone(config: Path) -> None:
    spool = config.parent / "spool.sqlite3"
    spool.write_bytes(b"not a database at all\n" * 100)
    before = spool.read_bytes()
    for args in (("queue", "list"), ("queue", "list", "--json"), ("stats",), ("stats", "--json"),
                 ("queue", "show", "1"), ("queue", "hold", "1"), ("queue", "hold", "--state", "queued"),
                 ("queue", "release", "1"), ("queue", "retry", "1"), ("queue", "delete", "1"),
                 ("queue", "purge", "--older-than", "1d")):
        line = one_line(sms("-c", str(config), *args), 1)
        assert str(spool) in line and "not a database" in line, (args, line)
    assert spool.read_bytes() == before


def test_check_config_takes_c_before_or_after_and_a_missing_file_is_named(config: Path) -> None:
    for args in (("-c", str(config), "check-config"), ("check-config", "-c", str(config)),
                 ("check-config", "--config", str(config))):
        r = sms(*args)
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and "OK" in r.stdout, (args, r)
    missing = config.parent / "absent.yaml"
    line = one_line(sms("check-config", "-c", str(missing)), 2)
    assert str(missing) in line and "no such file" in line


def test_spool_migrate_worst_inputs_are_one_line(tmp_path: Path) -> None:
    """`spool migrate --from FILE`: a wrong file or a database that is down is one line and
    exit 1 (no daemon-style "retrying" log line first), and the URL's password is never shown."""
    from bed import free_port

    url = f"postgresql://sms:Pg-Sekr3t@127.0.0.1:{free_port()}/sms"  # nothing listens there
    config = write_config(tmp_path, milter_port=1, notify_port=2, spool_url=url)
    source = tmp_path / "old.sqlite3"
    for src, expected in ((tmp_path / "absent.sqlite3", "no such SQLite spool file"),
                          (tmp_path, "no such SQLite spool file")):
        line = one_line(sms("-c", str(config), "spool", "migrate", "--from", str(src)), 1)
        assert line.startswith("sms-milter: spool migrate: ") and str(src) in line and expected in line, line
    source.write_bytes(b"")
    line = one_line(sms("-c", str(config), "spool", "migrate", "--from", str(source)), 1)
    assert "not an sms-milter spool" in line, line
    source.unlink()
    from sms_milter.spool.sqlite import SqliteSpool

    SqliteSpool(source).close()  # a real (empty) SQLite spool: now the database is tried
    r = sms("spool", "migrate", "--from", str(source), "-c", str(config))
    line = one_line(r, 1)
    assert line.startswith("sms-milter: spool migrate: ") and "cannot connect" in line, line
    assert "Pg-Sekr3t" not in r.stderr + r.stdout
    one_line(sms("-c", str(config), "spool", "migrate"), 2)  # --from missing: bad usage


def test_config_that_never_ends_or_is_huge_or_unnamed_is_one_line_exit_2(tmp_path: Path) -> None:
    """`-c /dev/zero` used to read until memory ran out (a MemoryError traceback); a config
    file many MiB long is no configuration either; `-c ''` named the current directory."""
    huge = tmp_path / "huge.yaml"
    huge.write_text("x: " + "a" * (5 * 1024 * 1024) + "\n")
    for path, expected in (("/dev/zero", "/dev/zero: larger than"), (str(huge), "huge.yaml: larger than"),
                           ("", "file name is empty")):
        for args in (("-c", path, "check-config"), ("queue", "list", "-c", path)):
            line = one_line(sms(*args), 2)
            assert expected in line, (args, line)


def test_a_spool_the_user_may_not_open_is_named_as_such(shared_dir) -> None:
    """SQLite alone says "unable to open database file" or "attempt to write a readonly database"."""
    from sms_milter.spool.sqlite import SqliteSpool

    d, user = shared_dir
    config = sqlite_config(d)
    config.chmod(0o644)
    spool = d / "spool.sqlite3"
    SqliteSpool(spool).close()
    lock_away(spool, user)
    for mode in (0o600, 0o644):  # unreadable; readable but not writable (WAL readers write -shm)
        spool.chmod(mode if user else mode & 0o400)
        for args in (("queue", "list"), ("stats",), ("queue", "show", "1"), ("queue", "hold", "1")):
            line = one_line(sms("-c", str(config), *args, user=user), 1)
            assert str(spool) in line and "permission denied" in line, (oct(mode), args, line)


def test_without_c_the_default_path_is_read_and_named() -> None:
    default = "/etc/sms-milter/sms-milter.yaml"
    if os.path.exists(default):
        pytest.skip(f"{default} exists on this machine (the package is installed)")
    for args in (("check-config",), ("queue", "list"), ("stats",)):
        line = one_line(sms(*args), 2)
        assert line == f"sms-milter: {default}: no such file", (args, line)


def test_job_text_a_terminal_cannot_show_is_escaped_not_a_traceback(config: Path) -> None:
    from dispatcher_bed import job
    from sms_milter.spool.sqlite import SqliteSpool
    from spool_helpers import add_jobs

    spool = SqliteSpool(config.parent / "spool.sqlite3")
    try:
        (jid,) = add_jobs(spool, [job("+41791260001", "Preis 5 \u20ac \u4e2d")])
    finally:
        spool.close()
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # as a terminal in an ASCII locale
    for args in (("queue", "list", "--json"), ("queue", "show", str(jid), "--json"), ("queue", "list"),
                 ("queue", "show", str(jid))):
        r = subprocess.run([*milter_command(), "-c", str(config), *args], capture_output=True, env=env,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, (args, r.stderr)
        assert r.stdout.isascii() and (args == ("queue", "list") or b"\\u20ac" in r.stdout), (args, r.stdout)
        if "--json" in args:
            got = json.loads(r.stdout)
            assert (got[0] if isinstance(got, list) else got)["text"] == "Preis 5 \u20ac \u4e2d"
