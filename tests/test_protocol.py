"""Raw milter-protocol cases Postfix cannot produce, driven by miltertest (tests/miltertest/*.lua).

Each script talks straight to the running milter of the `gw` fixture (no Postfix in between);
numbers are passed with -D so the jobs each script creates can be checked afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import bed
import pytest

LUA = Path(__file__).parent / "miltertest"


def run_lua(gw, script: str, **defines: str) -> subprocess.CompletedProcess:
    exe = shutil.which("miltertest")
    if exe is None:
        pytest.fail("miltertest is not installed: run .ci/run (apt-get install -y miltertest)", pytrace=False)
    args = [exe, "-s", str(LUA / "run.lua"), "-D", f"script={script}", "-D", f"port={gw.milter_port}",
            "-D", f"dir={LUA}"]
    for k, v in defines.items():
        args += ["-D", f"{k}={v}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    passed = r.returncode == 0 and f"PASS {script}" in r.stdout
    assert passed, (f"{script} failed (exit {r.returncode})\n--- stdout:\n{r.stdout}\n"
                    f"--- stderr:\n{r.stderr}\n{gw.logs()}")
    return r


def numbers(k: int) -> list[tuple[str, str]]:
    return [bed.unique_number() for _ in range(k)]


def test_abort_mid_message_then_valid_message(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "abort_then_valid.lua", n1=n1, n2=n2)
    assert gw.jobs(recipient=e1) == []
    assert [j["text"] for j in gw.jobs(recipient=e2)] == [f"after abort {n2}"]


def test_esmtp_args_and_exact_rcpt_delete(gw):
    ((n1, e1),) = numbers(1)
    run_lua(gw, "esmtp_args.lua", n1=n1)
    assert len(gw.jobs(recipient=e1)) == 1


def test_macros_only_at_connect_and_queue_id_only_at_rcpt(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "connect_macros_only.lua", n1=n1, n2=n2)
    assert [j["account"] for j in gw.jobs(recipient=e1)] == ["netlimited"]
    assert gw.jobs(recipient=e2) == []


def test_rejected_rcpt_gets_exactly_one_reply(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "rcpt_reject_one_reply.lua", n1=n1, n2=n2)
    assert len(gw.jobs(recipient=e1)) == 1
    assert len(gw.jobs(recipient=e2)) == 1


def test_rejected_message_gets_exactly_one_reply(gw):
    (n1, e1), (n2, e2) = numbers(2)
    run_lua(gw, "eom_reject_one_reply.lua", n1=n1, n2=n2)
    assert gw.jobs(recipient=e1) == []
    assert len(gw.jobs(recipient=e2)) == 1
