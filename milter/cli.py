"""`sms-milter`: the one command (INTERFACE.md).

Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration. Errors are one
line on stderr; an operator's mistake never prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

from .config import DEFAULT_PATH, ConfigError, load
from .model import Config
from .spool.base import STATES, Job, SpoolError

log = logging.getLogger("sms_milter")


class Fatal(Exception):
    """A runtime failure worth one line on stderr and exit 1."""


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_record(job: Job) -> dict:
    """A job as `queue list --json` prints it (times in ISO 8601 UTC)."""
    d = job.public()
    for key in ("created_at", "not_before", "expires_at", "submitted_at", "done_at"):
        d[key] = _iso(d[key])
    return d


def _setup_logging(verbose: bool, command: str, log_format: str = "text") -> None:
    if command == "submit":
        # pipe(8) puts our stderr into bounces: only the refusal reason goes there.
        # Decisions are logged to syslog, where Postfix's own lines are.
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        if os.path.exists("/dev/log"):
            syslog = logging.handlers.SysLogHandler(
                "/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
            syslog.setFormatter(logging.Formatter("sms-milter[%(process)d]: %(message)s"))
            root.addHandler(syslog)
        else:
            root.addHandler(logging.NullHandler())
        return
    # The milter logs a line per message: what a record costs matters (profiled on
    # bench/milter_path.py, it was a tenth of the milter's CPU). No caller lookup, no
    # thread or process lookups per record (the pid is written into the format once),
    # and the time formatted once a second.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Under systemd the journal stamps every line itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":  # for log shippers: one JSON object per line
        from .runtime import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_Formatter(stamp + f"%(name)s[{os.getpid()}]: %(levelname)s %(message)s"))
    if command == "dispatcher":  # its job lines start with the Postfix queue id too
        from .runtime import JOB_QUEUE_IDS

        handler.addFilter(JOB_QUEUE_IDS)
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: once per process
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class _Formatter(logging.Formatter):
    """logging.Formatter's own time format, with the strftime done once a second."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.default_time_format, self.converter(second))
        return (self.default_msec_format or "%s,%03d") % (self._text, record.msecs)


def _on_signals(stop: Callable[[], None], reload: Callable[[], None] | None = None) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        from .sdnotify import Notifier

        Notifier.from_environment().stopping()
        stop()

    def hup(signum: int, frame: object) -> None:
        # No log line here: the reload itself logs exactly one (reloaded, or why not).
        if reload is not None:
            reload()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if reload is not None:
        signal.signal(signal.SIGHUP, hup)


def _open_spool(cfg: Config, create: bool = True):
    from .spool import open_spool

    if not create and not cfg.spool.url and not os.path.exists(cfg.spool.path):
        raise Fatal(f"the spool {cfg.spool.path} does not exist (nothing has been spooled yet, or "
                    "spool.path is wrong)")
    if not create and not cfg.spool.url and not os.access(cfg.spool.path, os.R_OK | os.W_OK):
        raise Fatal(f"spool {cfg.spool.path}: permission denied (run as root or as the daemons' user)")
    try:
        return open_spool(cfg, create=create)
    except SpoolError as e:
        raise Fatal(str(e)) from None


def cmd_milter(cfg: Config, args: argparse.Namespace) -> int:
    from . import metrics, sdnotify
    from .adapter import Server
    from .gateway import Gateway
    from .runtime import MilterRuntime

    stopping, reload = threading.Event(), threading.Event()
    # Before listening: a SIGTERM right after start still exits 0, a SIGHUP is not fatal.
    _on_signals(stopping.set, reload.set)
    spool = _open_spool(cfg)
    metrics.watch_spool(spool.counts_apart, STATES, spool.channel_counts_apart)
    try:
        server = Server(cfg.milter.socket, Gateway(cfg, spool), stopping=stopping)
    except OSError as e:
        raise Fatal(f"cannot listen on {cfg.milter.socket}: {e.strerror or e}") from None
    if cfg.metrics.milter:
        try:
            metrics.serve(cfg.metrics.milter)
        except OSError as e:
            raise Fatal(f"cannot serve metrics on {cfg.metrics.milter}: {e.strerror or e}") from None
    sd = sdnotify.Notifier.from_environment()
    runtime = MilterRuntime(server, args.config, reload, sd)
    server.on_tick = runtime.tick
    sd.ready(runtime.status())  # the socket listens: the MTA's connections wait in its backlog
    server.serve()
    sd.stopping()
    sd.close()
    spool.close()
    log.info("milter stopped")
    return 0


def cmd_dispatcher(cfg: Config, args: argparse.Namespace) -> int:
    from .dispatcher import service

    stop, reload = threading.Event(), threading.Event()
    _on_signals(stop.set, reload.set)
    return service.run(cfg, stop, reload, config_path=args.config)


def cmd_queue(cfg: Config, args: argparse.Namespace) -> int:
    spool = _open_spool(cfg, create=False)
    try:
        jobs = spool.list_jobs(state=args.state)
    except SpoolError as e:
        raise Fatal(str(e)) from None
    finally:
        spool.close()
    if args.json:
        print(json.dumps([job_record(j) for j in jobs], ensure_ascii=False, indent=1))
        return 0
    print(f"{'ID':>8} {'STATE':<10} {'RECIPIENT':<17} {'PARTS':>5} {'TRIES':>5} {'CREATED':<20} LAST ERROR")
    for j in jobs:
        print(f"{j.id:>8} {j.state:<10} {j.recipient:<17} {j.parts:>5} {j.attempts:>5} "
              f"{_iso(j.created_at):<20} {j.last_error}")
    print(f"{len(jobs)} job(s)")
    return 0


def cmd_submit(cfg: Config, args: argparse.Namespace) -> int:
    """Postfix pipe(8) transport for SMS-domain mail that did not pass the milter.

    Reads one message on stdin and applies exactly the milter's decisions. Exit codes
    follow sysexits, which pipe(8) understands: 0 accepted, 65 (EX_DATAERR) refused:
    the one-line reason on stderr goes into the bounce, 75 (EX_TEMPFAIL) try later.
    """
    from .gateway import Gateway, Message, split_message
    from .policy import catalogue as replies

    try:
        spool = _open_spool(cfg)
    except Fatal as e:
        no_spool = replies.SUBMIT_NO_SPOOL(error=e)
        print(f"{no_spool.xcode} {no_spool.text}", file=sys.stderr)
        return 75
    try:
        gateway = Gateway(cfg, spool)
        headers, body = split_message(sys.stdin.buffer.read())
        msg = Message(sender=args.sender, queue_id=args.queue_id or "", headers=headers)
        msg.add_body(body, cfg.milter.max_message_bytes)
        for rcpt in args.recipients:
            refusal = gateway.rcpt(msg, f"<{rcpt}>".encode("utf-8", "surrogateescape"), rcpt)
            if refusal:
                break
        else:
            if msg.others:
                wrong = replies.SUBMIT_NOT_SMS()
                print(f"{wrong.xcode} {wrong.text}", file=sys.stderr)
                return 65
            refusal = gateway.end_of_message(msg).refusal
    finally:
        spool.close()
    if refusal is None:
        return 0
    print(f"{refusal.xcode} {refusal.text}", file=sys.stderr)
    return 75 if refusal.temporary else 65


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    print(cfg.summary())
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from .policy.auth import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("sms-milter: hash-password: no password given", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad usage: one line on stderr (what is wrong, and where to get help), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _config_options(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """-c/-v on a sub-command too: `sms-milter -c F queue list`, `sms-milter queue -c F list` and
    `sms-milter queue list -c F` all work (SUPPRESS: an absent option keeps the outer value)."""
    sp.add_argument("-c", "--config", default=argparse.SUPPRESS,
                    help=f"configuration file (default {DEFAULT_PATH})")
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return sp


def _parser() -> argparse.ArgumentParser:
    from . import queuecli

    p = _Parser(prog="sms-milter", description="E-mail-to-SMS gateway for Postfix and Sendmail")
    p.add_argument("--version", action="version", version=f"%(prog)s {queuecli.version()}")
    p.add_argument("-c", "--config", default=DEFAULT_PATH,
                   help=f"configuration file (default {DEFAULT_PATH})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        return _config_options(sub.add_parser(name, help=help_))

    for name in ("milter", "dispatcher"):
        daemon = with_config(name, f"run the {name} until SIGTERM/SIGINT (SIGHUP reloads the configuration)")
        daemon.add_argument("--log-format", choices=("text", "json"), default="text",
                            help="text lines (default) or one JSON object per line for log shippers")
    q = with_config("queue", "inspect the spool")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True
    ql = _config_options(qsub.add_parser("list", help="list spooled jobs"))
    ql.add_argument("--json", action="store_true", help="one JSON array of job objects")
    ql.add_argument("--state", choices=STATES, help="only jobs in this state")
    queuecli.add_parsers(qsub, sub, with_config, _config_options)
    with_config("check-config", "validate the configuration file")
    sb = with_config("submit", "pipe(8) transport: decide one message on stdin like the milter")
    sb.add_argument("-f", "--sender", required=True, help="envelope sender ('' for <>)")
    sb.add_argument("-q", "--queue-id", help="the MTA queue id, for logs")
    sb.add_argument("recipients", nargs="+", metavar="RECIPIENT")
    sub.add_parser("hash-password", help="read a password on stdin, print a password_hash for the config")
    sp = with_config("spool", "spool maintenance")
    spsub = sp.add_subparsers(dest="spool_command", metavar="ACTION")
    spsub.required = True
    mig = _config_options(spsub.add_parser("migrate", help="copy an SQLite spool into the configured "
                                                           "PostgreSQL spool (spool.url); idempotent"))
    mig.add_argument("--from", dest="source", required=True, metavar="FILE.sqlite3", help="the SQLite spool")
    return p


def cmd_spool(cfg: Config, args: argparse.Namespace) -> int:
    """`spool migrate --from FILE.sqlite3`: prints what it copied."""
    if not cfg.spool.url:
        print("sms-milter: spool migrate: the configuration has no spool.url (the PostgreSQL spool to copy "
              "into)", file=sys.stderr)
        return 2
    if not os.path.isfile(args.source):  # the operator's typo: said before any connection is tried
        raise Fatal(f"{args.source}: no such SQLite spool file")
    # A daemon starting while the database is down logs it and waits; this one-shot command
    # says it once, as its own error line (below), and exits 1.
    spool_log = logging.getLogger("sms_milter.spool")
    spool_log.disabled = True
    try:
        spool = _open_spool(cfg)
    finally:
        spool_log.disabled = False
    try:
        copied = spool.import_sqlite(args.source)
    except SpoolError as e:
        raise Fatal(str(e)) from None
    finally:
        spool.close()
    print("\n".join(copied.lines(args.source, cfg.spool.where)))
    return 0


def cmd_queue_action(cfg: Config, args: argparse.Namespace) -> int:
    """`queue list` here, the other queue tools in queuecli.py."""
    if args.queue_command == "list":
        return cmd_queue(cfg, args)
    from .queuecli import run_queue

    return run_queue(cfg, args)


def cmd_stats(cfg: Config, args: argparse.Namespace) -> int:
    from .queuecli import run_stats

    return run_stats(cfg, args)


COMMANDS = {"milter": cmd_milter, "dispatcher": cmd_dispatcher, "queue": cmd_queue_action,
            "check-config": cmd_check_config, "submit": cmd_submit, "stats": cmd_stats, "spool": cmd_spool}


def main(argv: list[str] | None = None) -> int:
    # A terminal that cannot show a job's text (an ASCII or Latin-1 locale) gets \uXXXX escapes,
    # which keep `--json` valid JSON, instead of a UnicodeEncodeError traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    if args.command == "hash-password":
        return cmd_hash_password(args)
    _setup_logging(args.verbose, args.command, getattr(args, "log_format", "text"))
    try:
        cfg = load(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"sms-milter: {problem}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](cfg, args)
    except Fatal as e:
        action = getattr(args, "queue_command", None) or getattr(args, "spool_command", None)
        print(f"sms-milter: {args.command}{' ' + action if action else ''}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
