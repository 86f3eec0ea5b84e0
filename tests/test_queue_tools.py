"""The administrator's queue tools (INTERFACE.md, "Added for the second wave"): `queue show`,
`hold`, `release`, `retry`, `delete`, `purge`, `stats`, `--version`, `-c` anywhere.

Run as an operator runs them: the installed `sms-milter` command in a subprocess, against a
spool that a real dispatcher (`sms-milter dispatcher`) drains to the npm SMSC simulator
(tests/smsc/server.js). What the SMSC saw is read from its PDU log; every condition is polled.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import bed
import pytest
from bed import free_port, milter_command, wait_until
from dispatcher_bed import DispatcherProc, Smsc, dispatcher_config, job, states, wait_states
from sms_milter.spool.base import STATES
from spool_helpers import add_jobs, mark_submitted, record_receipt

SMPP_PASSWORD = "Pw-77sec"
REPO = Path(__file__).resolve().parent.parent


# The SMSC simulator must be able to run; nsink (a mailbox for notifications) is in conftest.py.
pytestmark = pytest.mark.usefixtures("smsc_node")


class Bed:
    """One test's SMSC, spool, config and dispatcher."""

    def __init__(self, base: Path, notify_port: int):
        self.base = base
        self.spool_path = base / "spool.sqlite3"
        self.notify_port = notify_port
        self.smsc: Smsc | None = None
        self.proc: DispatcherProc | None = None
        self._spool: Any = None
        self.config = dispatcher_config(base, 1, notify_port, spool_path=self.spool_path,
                                        smpp={"password": SMPP_PASSWORD})

    @property
    def spool(self) -> Any:
        if self._spool is None:
            self._spool = bed.spool_at(self.spool_path)
        return self._spool

    def start(self, *smsc_options: str) -> Bed:
        self.smsc = Smsc(self.base, password=SMPP_PASSWORD).start(*smsc_options)
        self.config = dispatcher_config(self.base, self.smsc.port, self.notify_port,
                                        spool_path=self.spool_path, smpp={"password": SMPP_PASSWORD})
        self.proc = DispatcherProc(self.config, self.base / "d.log").start()
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`sms-milter ARGS -c CONFIG` (-c after the subcommand, as operators usually write it)."""
        return subprocess.run([*milter_command(), *args, "-c", str(self.config)], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def to(self, recipient: str, accepted_only: bool = True) -> list[dict]:
        """submit_sm PDUs the SMSC got for this recipient."""
        assert self.smsc is not None
        return [r for r in self.smsc.submits(accepted_only) if r["destination_addr"] == recipient[1:]]

    def detail(self) -> str:
        return f"--- dispatcher log\n{self.proc.log_tail(30)}" if self.proc else ""

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stop()
            except AssertionError:
                pass
        if self.smsc is not None:
            self.smsc.stop()
        if self._spool is not None:
            self._spool.close()


@pytest.fixture
def tb(tmp_path, nsink):
    b = Bed(tmp_path, nsink.port)
    yield b
    b.close()


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stdout


def show(tb: Bed, job_id: int) -> dict:
    return json.loads(ok(tb.cli("queue", "show", str(job_id), "--json")))


# --------------------------------------------------------------------------- hold / release


def test_held_job_is_not_sent_until_released(tb):
    held, canary = add_jobs(tb.spool, [job("+41791110001", "wait for me"), job("+41791110002", "canary")])
    out = ok(tb.cli("queue", "hold", str(held)))
    assert out == f"job {held}: queued -> held\n"
    assert [j.state for j in states(tb.spool, [held]).values()] == ["held"]
    listed = json.loads(ok(tb.cli("queue", "list", "--json", "--state", "held")))
    assert [j["id"] for j in listed] == [held] and listed[0]["state"] == "held"
    tb.start()
    # The dispatcher runs and delivers the other job; the held one stays held and unsent.
    # Claims take the oldest due job first: the canary's delivery means the held job (older)
    # went through the same claims and was passed over.
    wait_states(tb.spool, [canary], {"delivered"}, detail=tb.detail)
    assert tb.to("+41791110001") == [] and states(tb.spool, [held])[held].state == "held"
    assert ok(tb.cli("queue", "release", str(held))) == f"job {held}: held -> queued\n"
    wait_states(tb.spool, [held], {"delivered"}, detail=tb.detail)
    assert len(tb.to("+41791110001")) == 1
    # Releasing again: it is not held any more -> exit 1, one line naming the job and its state.
    r = tb.cli("queue", "release", str(held))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"sms-milter: queue release: job {held} is delivered, not held"


def test_hold_state_queued_holds_every_waiting_job_and_refuses_jobs_in_flight(tb):
    ids = add_jobs(tb.spool, [job(f"+4179111010{i}", f"bulk {i}") for i in range(3)])
    # A dispatcher (played here by the spool API) holds the first job's lease: it is being
    # submitted right now, so it cannot be held (it would be sent anyway).
    claimed = tb.spool.claim("someone-else", 1, 60)
    assert [j.id for j in claimed] == [ids[0]]
    r = tb.cli("queue", "hold", "--state", "queued")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"job {i}: queued -> held" for i in ids[1:]]
    assert f"job {ids[0]} is being submitted" in r.stderr
    assert {j.id: j.state for j in states(tb.spool, ids).values()} == {
        ids[0]: "queued", ids[1]: "held", ids[2]: "held"}
    # IDs and --state together, or neither: bad usage.
    for args in (("queue", "hold"), ("queue", "hold", str(ids[1]), "--state", "queued")):
        r = tb.cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------- retry


def test_retry_sends_a_failed_and_an_expired_job_again(tb):
    tb.start("--fail-dest", "41791120001", "--expired-dest", "41791120002")
    failed, expired = add_jobs(tb.spool, [job("+41791120001", "try again"), job("+41791120002", "once more")])
    done = wait_states(tb.spool, [failed, expired], detail=tb.detail)
    assert (done[failed].state, done[expired].state) == ("failed", "expired")
    r = tb.cli("queue", "retry", str(failed))  # the SMSC still refuses that number
    assert r.returncode == 0
    wait_until(lambda: len(tb.to("+41791120001", accepted_only=False)) == 2, 30, "a second submit")
    wait_states(tb.spool, [failed], {"failed"}, detail=tb.detail)
    tb.smsc.control(fail_dest=[], expired_dest=[])
    validity_before = tb.spool.get(expired).expires_at
    out = ok(tb.cli("queue", "retry", str(failed), str(expired)))
    assert out.splitlines() == [f"job {failed}: failed -> queued", f"job {expired}: expired -> queued"]
    wait_states(tb.spool, [failed, expired], {"delivered"}, detail=tb.detail)
    assert len(tb.to("+41791120001", accepted_only=False)) == 3 and len(tb.to("+41791120001")) == 1
    assert len(tb.to("+41791120002")) == 2
    d = show(tb, expired)
    assert d["state"] == "delivered" and d["attempts"] == 1  # reset by retry, one claim since
    assert [p["ref"] for p in d["parts_sent"]] == d["provider_refs"] and len(d["provider_refs"]) == 1
    # Validity renewed: a provider validity (48 h) from the retry on, not from the spooling.
    assert tb.spool.get(expired).expires_at > validity_before
    # A delivered job does not qualify: exit 1, nothing changed.
    r = tb.cli("queue", "retry", str(expired))
    assert r.returncode == 1 and f"job {expired} is delivered, not failed or expired" in r.stderr


# --------------------------------------------------------------------------- delete


def test_deleted_queued_job_is_never_sent(tb):
    doomed, canary = add_jobs(tb.spool, [job("+41791130001", "never"), job("+41791130002", "canary")])
    out = ok(tb.cli("queue", "delete", str(doomed)))
    assert out == f"job {doomed}: queued -> deleted\n"
    tb.start()
    wait_states(tb.spool, [canary], {"delivered"}, detail=tb.detail)
    assert tb.to("+41791130001") == [] and tb.spool.get(doomed) is None
    r = tb.cli("queue", "show", str(doomed))
    assert r.returncode == 1 and r.stderr.strip() == f"sms-milter: queue show: job {doomed}: no such job"


def test_submitted_job_cannot_be_deleted_and_stats_counts_it(tb):
    tb.start("--no-receipts")
    sent, other = add_jobs(tb.spool, [job("+41791140001", "x" * 200), job("+41791140002", "held back",
                                                                          not_before=time.time() + 3600)])
    wait_states(tb.spool, [sent], {"submitted"}, detail=tb.detail)
    r = tb.cli("queue", "delete", str(sent), str(other), "999999")
    assert r.returncode == 1
    assert r.stdout == f"job {other}: queued -> deleted\n"  # the ones that qualify are changed
    assert f"job {sent} is submitted" in r.stderr and "job 999999: no such job" in r.stderr
    assert states(tb.spool, [sent])[sent].state == "submitted" and tb.spool.get(other) is None
    d = show(tb, sent)
    assert d["state"] == "submitted" and len(d["parts_sent"]) == 2
    assert d["provider"] == "smpp"  # the provider that took it (issue 10): --json and text
    assert [p["state"] for p in d["parts_sent"]] == ["submitted", "submitted"]
    assert [e["event"] for e in d["events"]] == ["spooled", "submitted"]
    text = ok(tb.cli("queue", "show", str(sent)))
    assert "state:" in text and "+41791140001" in text and "parts sent:" in text
    assert "\nprovider:     smpp\n" in text
    # stats --json: counts by state (every state, held included), parts per account as a dict
    # per account, the oldest queued job's age.
    add_jobs(tb.spool, [job("+41791140003", "later", not_before=time.time() + 3600)])
    st = json.loads(ok(tb.cli("stats", "--json")))
    assert set(st["states"]) == set(STATES)
    assert st["states"]["submitted"] == 1 and st["states"]["queued"] == 1 and st["total"] == 2
    acme, tmco = st["accounts"]["acme"], st["accounts"]["tmco"]
    assert (acme["parts_today"], acme["parts_month"]) == (2, 2)
    assert (tmco["parts_today"], tmco["parts_month"]) == (0, 0)  # configured, unused
    # against the caps: no limits configured here, nothing counted by the milter (jobs added directly)
    assert acme["counted_today"] == 0 and acme["parts_per_day"] is None and acme["parts_per_month"] is None
    assert isinstance(st["oldest_queued_age"], float) and 0 <= st["oldest_queued_age"] < 600
    assert st["oldest_queued_at"].endswith("Z") and len(st["day"]) == 10 and len(st["month"]) == 7
    text = ok(tb.cli("stats"))
    assert "submitted 1" in text and "acme" in text and "oldest queued:" in text


# --------------------------------------------------------------------------- purge


def _rows(path: Path, sql: str, *params: object) -> int:
    return bed.spool_sql(path, sql, *params)


def test_purge_removes_old_final_jobs_only(tb):
    sp = tb.spool
    names = ["queued", "held", "submitted", "buffered", "delivered", "failed", "expired", "old_delivered",
             "old_failed"]
    ids = dict(zip(names, add_jobs(sp, [job(f"+4179115{i:04d}", n) for i, n in enumerate(names)]),
                   strict=True))
    sp.hold_jobs([ids["held"]])
    claimed = sp.claim("t", 10, 60)
    assert {j.id for j in claimed} == {ids[n] for n in names if n not in ("held",)}
    sp.release([ids["queued"]], "t", 0.0)
    to_submit = [n for n in names if n not in ("queued", "held")]
    sp.mark_submitted_many([(ids[n], [f"ref{n}"]) for n in to_submit])
    for n, receipt in (("buffered", "buffered"), ("delivered", "delivered"), ("failed", "failed"),
                       ("expired", "expired"), ("old_delivered", "delivered"), ("old_failed", "failed")):
        record_receipt(sp, f"ref{n}", receipt)
    assert {n: j.state for n, j in zip(names, (sp.get(ids[n]) for n in names), strict=True)} == {
        "queued": "queued", "held": "held", "submitted": "submitted", "buffered": "buffered",
        "delivered": "delivered", "failed": "failed", "expired": "expired",
        "old_delivered": "delivered", "old_failed": "failed"}
    bed.spool_sql(tb.spool_path, "UPDATE jobs SET done_at=done_at-31*86400, created_at=created_at-31*86400"
                  " WHERE id IN (?,?)", ids["old_delivered"], ids["old_failed"])  # finished 31 days ago
    out = ok(tb.cli("queue", "purge", "--older-than", "30d", "--state", "failed")).splitlines()
    assert out[0] == f"job {ids['old_failed']}: failed -> purged" and out[1].startswith("1 job(s) purged")
    assert len(out) == 2
    out = ok(tb.cli("queue", "purge", "--older-than", "4w")).splitlines()
    assert out[:-1] == [f"job {ids['old_delivered']}: delivered -> purged"]
    left = {j.id for j in sp.list_jobs()}
    assert ids["old_delivered"] not in left and ids["old_failed"] not in left
    assert _rows(tb.spool_path, "SELECT count(*) FROM parts WHERE job_id IN (?,?)",
                 ids["old_delivered"], ids["old_failed"]) == 0
    # Everything final now, whatever its age; never a job that is not final.
    out = ok(tb.cli("queue", "purge", "--older-than", "0s")).splitlines()
    finals = ("delivered", "failed", "expired")
    assert sorted(out[:-1]) == sorted(f"job {ids[n]}: {n} -> purged" for n in finals)
    assert {j.id: j.state for j in sp.list_jobs()} == {
        ids["queued"]: "queued", ids["held"]: "held", ids["submitted"]: "submitted",
        ids["buffered"]: "buffered"}
    assert _rows(tb.spool_path, "SELECT count(*) FROM parts") == 2  # submitted's and buffered's
    for bad in (("--older-than", "30d", "--state", "queued"), ("--older-than", "30"),
                ("--older-than", "soon"), ()):
        r = tb.cli("queue", "purge", *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
        assert "Traceback" not in r.stderr


def test_purge_against_a_running_dispatcher_keeps_jobs_in_flight(tb):
    tb.start("--no-receipts")
    done, pending = add_jobs(tb.spool, [job("+41791160001", "done"), job("+41791160002", "pending")])
    wait_states(tb.spool, [done, pending], {"submitted"}, detail=tb.detail)
    record_receipt(tb.spool, tb.spool.get(done).provider_refs[0], "delivered")
    out = ok(tb.cli("queue", "purge", "--older-than", "0s"))
    assert out.splitlines()[0] == f"job {done}: delivered -> purged"
    assert tb.spool.get(done) is None and tb.spool.get(pending).state == "submitted"


def test_purge_removes_stored_files_with_their_jobs_and_old_orphans(tb):
    """Voice/fax files (issue 15): a file goes with the last job naming it; an unreferenced file
    older than the grace period (a crash between the file and its commit) goes too; the summary
    line says how many and how many bytes."""
    import os

    from sms_milter.spool.base import NewJob
    from sms_milter.spool.files import JobFile
    from sms_milter.spool.sqlite import files

    pdf = JobFile.of("application/pdf", "a.pdf", b"%PDF-1.4\n" + b"x" * 5000)
    wav = JobFile.of("audio/wav", "r.wav", b"RIFF" + b"y" * 300)
    lost = JobFile.of("application/pdf", "lost.pdf", b"%PDF-1.4\n" + b"z" * 700)
    fax = [NewJob(recipient=f"+4144123450{i}", originator="SMS", text="", parts=1, account="acme",
                  device="fax", channel="fax", files=(f,)) for i, f in enumerate((pdf, pdf, wav))]
    ids = add_jobs(tb.spool, fax)
    assert {j.id for j in tb.spool.claim("t", 10, 60)} == set(ids)
    tb.spool.mark_submitted_many([(ids[0], ["r0"]), (ids[1], ["r1"])])
    record_receipt(tb.spool, "r0", "delivered")
    record_receipt(tb.spool, "r1", "failed")
    # An orphan file exists only beside an SQLite spool: PostgreSQL writes a blob in its job's own
    # transaction, so nothing can be left over there (tests/unit/test_spool_files.py, both backends).
    sqlite = not bed.on_postgres()
    if sqlite:
        files.store(str(tb.spool_path), [lost])
        old = time.time() - 2 * 3600
        os.utime(files.path_of(str(tb.spool_path), lost.sha256), (old, old))
    out = ok(tb.cli("queue", "purge", "--older-than", "0s")).splitlines()
    assert sorted(out[:-1]) == [f"job {ids[0]}: delivered -> purged", f"job {ids[1]}: failed -> purged"]
    orphans = f"1 no job named for 1h ({lost.size} bytes)" if sqlite else "0 no job named for 1h (0 bytes)"
    assert out[-1].startswith("2 job(s) purged") and out[-1].endswith(
        f"stored files removed: 1 with their jobs ({pdf.size} bytes), {orphans}")
    with pytest.raises(KeyError):  # gone with its last job, on either backend
        tb.spool.file_data(pdf.sha256)
    if sqlite:
        assert not files.path_of(str(tb.spool_path), pdf.sha256).exists()
        assert not files.path_of(str(tb.spool_path), lost.sha256).exists()
    assert tb.spool.file_data(wav.sha256) == wav.data  # its job is still queued


def _scrape(address: str) -> dict[tuple[str, frozenset], float]:
    """GET the dispatcher's /metrics; {(name, labels): value}."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, frozenset], float] = {}
    for m in re.finditer(r'^(\w+)(?:\{(.*)\})? (\S+)$', text, re.M):
        out[(m.group(1), frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))] = float(m.group(3))
    return out


def test_dispatcher_metrics_count_jobs_per_channel_as_stats_json_does(tmp_path, nsink):
    """`sms_milter_channel_jobs{channel,state}` on the dispatcher's /metrics agrees with
    `sms-milter stats --json`'s channels, and sums to `sms_milter_jobs{state}`."""
    from sms_milter.spool.base import NewJob
    from sms_milter.spool.files import JobFile

    b = Bed(tmp_path, nsink.port)
    try:
        b.smsc = Smsc(b.base, password=SMPP_PASSWORD).start()
        address = f"127.0.0.1:{free_port()}"
        b.config = dispatcher_config(b.base, b.smsc.port, b.notify_port, spool_path=b.spool_path,
                                     smpp={"password": SMPP_PASSWORD},
                                     extra={"metrics": {"dispatcher": address}})
        pdf = JobFile.of("application/pdf", "a.pdf", b"%PDF-1.4\n")
        other = [NewJob(recipient=f"+4144123460{i}", originator="SMS", text="", parts=1, account="acme",
                        device="fax", channel="fax", files=(pdf,)) for i in range(2)]
        other.append(NewJob(recipient="+41791234600", originator="SMS", text="hello", parts=1, account="acme",
                            device="mobile", channel="voice", language="de"))
        held = add_jobs(b.spool, other)
        assert all(c.changed for c in b.spool.hold_jobs(held))  # the dispatcher leaves them alone
        b.proc = DispatcherProc(b.config, b.base / "d.log").start()
        (sms,) = add_jobs(b.spool, [job("+41791170001", "hi")])
        wait_states(b.spool, [sms], {"delivered"}, detail=b.detail)
        channels = json.loads(ok(b.cli("stats", "--json")))["channels"]
        assert channels == {"fax": {"held": 2}, "sms": {"delivered": 1}, "voice": {"held": 1}}

        def agree() -> dict | None:
            got = _scrape(address)
            per = {(dict(ls)["channel"], dict(ls)["state"]): v for (n, ls), v in got.items()
                   if n == "sms_milter_channel_jobs"}
            want = {(c, st): float(channels.get(c, {}).get(st, 0)) for c in ("sms", "voice", "fax")
                    for st in STATES}
            totals = {dict(ls)["state"]: v for (n, ls), v in got.items() if n == "sms_milter_jobs"}
            sums = {st: sum(v for (_, s2), v in per.items() if s2 == st) for st in STATES}
            return got if per == want and totals == sums else None

        wait_until(agree, 15, "channel_jobs on /metrics agreeing with stats --json", detail=b.detail)
    finally:
        b.close()


# --------------------------------------------------------------------------- the command itself


def test_version_is_the_package_version():
    r = subprocess.run([*milter_command(), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert r.stdout.strip() == f"sms-milter {want}" and want == version("sms-milter")


def test_config_option_before_or_after_the_subcommand(tb):
    (jid,) = add_jobs(tb.spool, [job("+41791170001", "where is -c")])
    c = str(tb.config)
    for args in (["-c", c, "queue", "list", "--json"], ["queue", "-c", c, "list", "--json"],
                 ["queue", "list", "--json", "-c", c], ["queue", "list", "--config", c, "--json"]):
        r = subprocess.run([*milter_command(), *args], capture_output=True, text=True, timeout=60)
        assert [j["id"] for j in json.loads(ok(r))] == [jid], args
    for args in (["-c", c, "stats", "--json"], ["stats", "-c", c, "--json"],
                 ["-c", c, "queue", "show", str(jid)], ["queue", "hold", str(jid), "-c", c]):
        ok(subprocess.run([*milter_command(), *args], capture_output=True, text=True, timeout=60))
    assert tb.spool.get(jid).state == "held"
    # The innermost -c wins; a wrong one is a clear error, exit 2.
    r = subprocess.run([*milter_command(), "-c", c, "stats", "-c", str(tb.base / "nope.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.yaml" in r.stderr


def test_read_only_commands_never_create_a_spool(tb):
    assert not tb.spool_path.exists()
    for args in (("queue", "show", "1"), ("stats",), ("queue", "hold", "1"), ("queue", "purge",
                                                                               "--older-than", "1d")):
        r = tb.cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not tb.spool_path.exists(), args
    for args in (("queue", "show", "abc"), ("queue", "retry"), ("queue", "delete", "-3"),
                 ("queue", "show", "9" * 20), ("queue", "release", "1e3")):
        r = tb.cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_retry_forgets_the_old_message_ids(tb):
    """A late receipt for the failed try's message id must not finish the new try."""
    (jid,) = add_jobs(tb.spool, [job("+41791180001", "late receipt")])
    assert [j.id for j in tb.spool.claim("t", 1, 60)] == [jid]
    mark_submitted(tb.spool, jid, "t", ["aa01"])
    assert record_receipt(tb.spool, "aa01", "failed").state == "failed"
    assert ok(tb.cli("queue", "retry", str(jid))) == f"job {jid}: failed -> queued\n"
    assert record_receipt(tb.spool, "aa01", "delivered") is None  # matches nothing now
    j = tb.spool.get(jid)
    assert (j.state, j.attempts, j.done_at, j.provider_refs) == ("queued", 0, None, ())


def test_show_lists_a_notification_still_owed(tmp_path):
    """The notification mail cannot be handed over (nothing listens on the notify port):
    `queue show` names it with its attempts and last error until it is sent."""
    b = Bed(tmp_path, free_port())
    try:
        b.start()
        (jid,) = add_jobs(b.spool, [job("+41791190001", "tell me", sender="c4ca423@client.example",
                                       notify="ALWAYS")])
        wait_states(b.spool, [jid], {"delivered"}, detail=b.detail)

        def owed() -> list[dict]:
            notes = show(b, jid)["notifications"]
            return notes if notes and notes[0]["attempts"] >= 1 else []

        notes = wait_until(owed, 30, "a failed notification attempt", detail=b.detail)
        assert [(n["kind"], n["status"]) for n in notes] == [("mail", "delivered")]
        assert "Connection" in notes[0]["last_error"] or "refused" in notes[0]["last_error"]
        assert notes[0]["next_attempt"] >= notes[0]["owed_since"]
        text = ok(b.cli("queue", "show", str(jid)))
        assert "notifications owed:\n  mail for delivered since" in text
        # Deleting the job drops what it still owed: nothing is mailed for it later.
        assert ok(b.cli("queue", "delete", str(jid))) == f"job {jid}: delivered -> deleted\n"
        assert _rows(b.spool_path, "SELECT count(*) FROM events WHERE job_id=?", jid) == 0
    finally:
        b.close()


def test_held_job_keeps_its_validity_and_expires_once_released(tb):
    (jid,) = add_jobs(tb.spool, [job("+41791200001", "too late", expires_at=time.time() + 0.5)])
    ok(tb.cli("queue", "hold", str(jid)))
    wait_until(lambda: time.time() > tb.spool.get(jid).expires_at, 5, "the validity to end")
    assert tb.spool.expire_due() == [] and tb.spool.get(jid).state == "held"  # held: left alone
    ok(tb.cli("queue", "release", str(jid)))
    assert tb.spool.expire_due() == [jid] and tb.spool.get(jid).state == "expired"
    assert ok(tb.cli("queue", "retry", str(jid))) == f"job {jid}: expired -> queued\n"
    assert tb.spool.get(jid).expires_at > time.time() + 3600
