"""The administrator's queue tools and `stats` (INTERFACE.md, "Added for the second wave").

    sms-milter queue show ID [--json]
    sms-milter queue hold ID... | --state queued
    sms-milter queue release ID...
    sms-milter queue retry ID...
    sms-milter queue delete ID...
    sms-milter queue purge --older-than DURATION [--state S]
    sms-milter stats [--json]

They never create a spool: a missing spool file is one line on stderr and exit 1. A command
that changes jobs prints one line per job it changed on stdout and one line per ID that did
not qualify on stderr; it changes every job that qualifies, and exits 1 if any ID did not.
The spool is reached through its interface only (spool/base.py: QueueAdmin).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .model import Config
from .policy.limits import usage_report
from .spool.base import FILE_GRACE, FINAL_STATES, Change, JobDetail, QueueAdmin, SpoolError

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 100 * 365 * 86400  # seconds; anything longer overflows dates and means "everything"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")  # ASCII digits only, like job ids
PURGE_BATCH = 5000  # jobs per transaction: the milter never waits long for the write lock


def version() -> str:
    """The installed package's version (pyproject.toml is the one source), or the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sms-milter")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            import tomllib

            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, ValueError, KeyError):
            return "unknown"


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` -> seconds (argparse type)."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: write a number and a unit s, m, h, d or w (e.g. 30d)")
    seconds = float(m.group(1)) * DURATION_UNITS[m.group(2)]
    if not seconds <= MAX_DURATION:  # also catches inf from an absurdly long number
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: too large (at most {MAX_DURATION // (365 * 86400)} years)")
    return seconds


def job_id(text: str) -> int:
    """A job id as `queue list` prints it (argparse type)."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"invalid job id {text!r}: a job id is a positive number")
    return int(text)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_parsers(qsub: Any, sub: Any, with_config: Callable[..., argparse.ArgumentParser],
                option: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """The queue actions (`qsub`: the `queue` sub-parsers) and the `stats` command (`sub`).
    `option` adds -c/-v to a sub-parser, `with_config` makes a top-level command with them."""

    def ids(sp: argparse.ArgumentParser, dest: str, nargs: str | None = None) -> None:
        sp.add_argument(dest, nargs=nargs, type=job_id, metavar="ID", help="a job id (queue list)")

    s = option(qsub.add_parser("show", help="one job with its parts, provider references and notifications"))
    ids(s, "id")
    s.add_argument("--json", action="store_true", help="one JSON object")
    h = option(qsub.add_parser("hold", help="queued -> held: not sent until released"))
    ids(h, "ids", "*")
    h.add_argument("--state", choices=("queued",), help="hold every queued job")
    for name, help_ in (("release", "held -> queued"),
                        ("retry", "failed/expired -> queued now (attempts reset, validity renewed)"),
                        ("delete", "remove jobs that are not submitted; nothing is sent for them")):
        ids(option(qsub.add_parser(name, help=help_)), "ids", "+")
    p = option(qsub.add_parser("purge", help="remove final jobs (delivered/failed/expired) older than"
                                             " DURATION"))
    p.add_argument("--older-than", required=True, type=parse_duration, metavar="DURATION",
                   help="finished longer ago than this: e.g. 30d (units s, m, h, d, w)")
    p.add_argument("--state", choices=FINAL_STATES, help="only final jobs in this state")
    st = with_config("stats", "counts by state, parts sent per account today and this month, oldest queued")
    st.add_argument("--json", action="store_true", help="one JSON object")


def open_existing(cfg: Config) -> QueueAdmin:
    """The configured spool, if it exists: the queue tools never create one."""
    from .spool import open_spool

    path = Path(cfg.spool.path)
    if not cfg.spool.url and not path.exists():
        raise SpoolError(f"spool {path} does not exist (nothing has been spooled yet)")
    if not cfg.spool.url and path.is_file() and not os.access(path, os.R_OK | os.W_OK):
        # SQLite would only say "unable to open database file" or "readonly database"
        raise SpoolError(f"spool {path}: permission denied (run as root or as the daemons' user)")
    return open_spool(cfg, create=False)


def _fail(command: str, message: str) -> None:
    print(f"sms-milter: {command}: {message}", file=sys.stderr)


def run_queue(cfg: Config, args: argparse.Namespace) -> int:
    action = args.queue_command
    command = f"queue {action}"
    if action == "hold" and bool(args.ids) == bool(args.state):
        _fail(command, "give job IDs or --state queued (not both)")
        return 2
    try:
        spool = open_existing(cfg)
    except SpoolError as e:
        _fail(command, str(e))
        return 1
    try:
        if action == "show":
            return _show(spool, args, command)
        if action == "purge":
            return _purge(spool, args)
        if action == "hold":
            changes = spool.hold_jobs(None if args.state else args.ids)
            if args.state and not changes:
                print("no queued job to hold")
        else:
            changes = {"release": spool.release_held, "retry": spool.retry_jobs,
                       "delete": spool.delete_jobs}[action](args.ids)
        return _report(command, changes)
    except SpoolError as e:
        _fail(command, str(e))
        return 1
    finally:
        spool.close()


def _report(command: str, changes: list[Change]) -> int:
    """One line per changed job on stdout, one per refused ID on stderr; exit 1 if any refused."""
    refused = 0
    for c in changes:
        if c.changed:
            print(f"job {c.job_id}: {c.before} -> {c.after}")
        else:
            refused += 1
            _fail(command, f"job {c.job_id} {c.reason}" if c.before else f"job {c.job_id}: {c.reason}")
    return 1 if refused else 0


def _purge(spool: QueueAdmin, args: argparse.Namespace) -> int:
    before = time.time() - args.older_than
    states = (args.state,) if args.state else FINAL_STATES
    total = 0
    while True:
        batch = spool.purge(before, states, PURGE_BATCH)
        for jid, state in batch:
            print(f"job {jid}: {state} -> purged")
        total += len(batch)
        if len(batch) < PURGE_BATCH:
            break
    with_jobs = spool.files_removed.files, spool.files_removed.bytes
    orphans = spool.sweep_files()
    print(f"{total} job(s) purged (finished before {iso(before)}); stored files removed:"
          f" {with_jobs[0]} with their jobs ({with_jobs[1]} bytes), {orphans.files} no job named"
          f" for {FILE_GRACE / 3600:g}h ({orphans.bytes} bytes)")
    return 0


def timeline(d: JobDetail) -> list[dict[str, Any]]:
    """What happened to the job, from its own times (the spool keeps no other history)."""
    j = d.job
    out: list[dict[str, Any]] = [{"at": iso(j.created_at), "event": "spooled"}]
    if j.not_before is not None and j.not_before > j.created_at + 1:
        out.append({"at": iso(j.not_before), "event": "due"})
    if j.submitted_at is not None:
        out.append({"at": iso(j.submitted_at), "event": "submitted"})
    if j.done_at is not None:
        out.append({"at": iso(j.done_at), "event": j.state})
    return out


def detail_record(d: JobDetail) -> dict[str, Any]:
    from .cli import job_record

    rec = job_record(d.job)
    rec["parts_sent"] = [{"seq": p.seq + 1, "ref": p.ref, "state": p.state} for p in d.parts]
    rec["events"] = timeline(d)
    rec["notifications"] = [{"kind": n.kind, "status": n.status, "owed_since": iso(n.at),
                             "next_attempt": iso(n.next_at), "attempts": n.attempts,
                             "last_error": n.last_error} for n in d.notifications]
    return rec


def _show(spool: QueueAdmin, args: argparse.Namespace, command: str) -> int:
    d = spool.detail(args.id)
    if d is None:
        _fail(command, f"job {args.id}: no such job")
        return 1
    rec = detail_record(d)
    if args.json:
        print(json.dumps(rec, ensure_ascii=False, indent=1))
        return 0
    for key in ("id", "state", "account", "device", "channel", "language", "recipient", "originator", "parts",
                "attempts",
                "last_error", "created_at", "not_before", "expires_at", "submitted_at", "done_at",
                "notify", "queue_id", "message_id", "trans_ref", "provider"):
        if rec.get(key) not in (None, ""):
            print(f"{key + ':':<14}{rec[key]}")
    print(f"{'text:':<14}{rec['text']!r}")
    for f in rec.get("files") or ():  # voice recording / fax documents, stored by hash
        print(f"{'file:':<14}{f['name'] or '-'} ({f['content_type']}, {f['size']} bytes,"
              f" sha256 {f['sha256']})")
    print("parts sent:" if d.parts else "parts sent:   none")
    for p in rec["parts_sent"]:
        print(f"  {p['seq']}/{d.job.parts} ref {p['ref']} {p['state']}")
    print("events:")
    for e in rec["events"]:
        print(f"  {e['at']} {e['event']}")
    print("notifications owed:" if d.notifications else "notifications owed: none")
    for n in rec["notifications"]:
        err = f", last error: {n['last_error']}" if n["last_error"] else ""
        print(f"  {n['kind']} for {n['status']} since {n['owed_since']}, {n['attempts']} attempt(s),"
              f" next {n['next_attempt']}{err}")
    return 0


def _month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def stats_record(cfg: Config, spool: QueueAdmin, now: float | None = None) -> dict[str, Any]:
    """`stats --json`: counts by state, parts sent per account (UTC today / this month: by
    submit time, a dict per account), the oldest queued job's age in seconds."""
    now = time.time() if now is None else now
    t = datetime.fromtimestamp(now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    month = _month_start(t)
    s = spool.stats(day.timestamp(), month.timestamp())
    accounts: dict[str, dict[str, Any]] = {n: {"parts_today": 0, "parts_month": 0} for n in cfg.accounts}
    for name, a in s.accounts.items():
        accounts[name] = {"parts_today": a.parts_today, "parts_month": a.parts_month}
    # Against the caps: the parts counted by the limits (accepted at SMTP time, whether sent yet or not).
    for u in usage_report(cfg.accounts, spool.account_usage(now)):
        accounts.setdefault(u["account"], {"parts_today": 0, "parts_month": 0}).update(
            counted_today=u["parts_today"], counted_month=u["parts_month"],
            parts_per_day=u["parts_per_day"], parts_per_month=u["parts_per_month"], limits_mode=u["mode"])
    oldest = s.oldest_queued_at
    return {
        "at": iso(now),
        "day": day.strftime("%Y-%m-%d"),
        "month": month.strftime("%Y-%m"),
        "states": s.states,
        "channels": {c: dict(sorted(n.items())) for c, n in sorted(s.channels.items())},
        "total": sum(s.states.values()),
        "accounts": dict(sorted(accounts.items())),
        "oldest_queued_at": iso(oldest),
        "oldest_queued_age": None if oldest is None else round(max(0.0, now - oldest), 3),
    }


def _age(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return " ".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def _against(counted: int, cap: int | None) -> str:
    return f"{counted}/{cap if cap is not None else '-'}"


def run_stats(cfg: Config, args: argparse.Namespace) -> int:
    try:
        spool = open_existing(cfg)
    except SpoolError as e:
        _fail("stats", str(e))
        return 1
    try:
        rec = stats_record(cfg, spool)
    except SpoolError as e:
        _fail("stats", str(e))
        return 1
    finally:
        spool.close()
    if args.json:
        print(json.dumps(rec, ensure_ascii=False, indent=1))
        return 0
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in rec["states"].items()) + f" (total {rec['total']})")
    if set(rec["channels"]) - {"sms"}:  # voice / fax jobs: the states per channel
        for channel, n in rec["channels"].items():
            print(f"  {channel}: " + ", ".join(f"{k} {v}" for k, v in n.items()))
    if rec["oldest_queued_age"] is None:
        print("oldest queued: none")
    else:
        print(f"oldest queued: {_age(rec['oldest_queued_age'])} ago ({rec['oldest_queued_at']})")
    print(f"{'parts sent (UTC)':<24}{'today ' + rec['day']:>18}{'month ' + rec['month']:>16}"
          f"{'counted/cap today':>20}{'counted/cap month':>20}")
    for name, a in rec["accounts"].items():
        print(f"  {name:<22}{a['parts_today']:>18}{a['parts_month']:>16}"
              f"{_against(a.get('counted_today', 0), a.get('parts_per_day')):>20}"
              f"{_against(a.get('counted_month', 0), a.get('parts_per_month')):>20}")
    return 0
