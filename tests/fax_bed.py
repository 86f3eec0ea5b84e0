"""A private HylaFAX 6 (Debian `hylafax-server`) for the fax channel tests: faxq + hfaxd on a
loopback port with a spool in the test's temp dir, no modem.

Without a modem HylaFAX accepts and queues jobs (state W) and never sends them. To finish jobs
through HylaFAX itself the bed announces a fake modem (`faxmodem`) and sets `SendFaxCmd` to a
script that plays the fax machine at the far end: per dialled number (file etc/outcomes) it
marks the job sent (all pages), failed ("busy") or to be retried ("no answer"), and hands the
result back to faxq through the exit code faxsend would give. faxq prepares (converts, counts
pages), schedules, retries and files the job in doneq by its own rules.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# The binary itself: /usr/sbin/faxmodem is Debian's wrapper that bind-mounts /etc/hylafax over the
# system spool's etc (run as root it would touch the system instance).
FAXMODEM = "/usr/lib/hylafax/bin/faxmodem"
FAKE_SEND = r"""#!/bin/sh
# SendFaxCmd of the test bed, called by faxq as: CMD -m MODEM sendq/qN (cwd: the spool)
q="$3"
number=$(sed -n 's/^number://p' "$q")
outcome=$(awk -v n="$number" '$1 == n {print $2}' etc/outcomes 2>/dev/null)
[ -n "$outcome" ] || outcome=done
totpages=$(sed -n 's/^totpages://p' "$q")
tries=$(sed -n 's/^tottries://p' "$q")
setkey() {  # setkey KEY VALUE: replace or add a line of the qfile
  if grep -q "^$1:" "$q"; then sed -i "s|^$1:.*|$1:$2|" "$q"; else echo "$1:$2" >> "$q"; fi
}
setkey tottries $((${tries:-0} + 1))  # one more try, as faxsend counts it
case "$outcome" in
  done)  setkey npages "$totpages"; setkey status ""; code=2 ;;
  fail)  setkey status "Busy signal detected (fake modem)"; code=1 ;;
  *)     setkey status "No answer from remote (fake modem)"; code=0 ;;
esac
echo "$number $outcome $totpages" >> etc/fakesend.log
exit $code
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HylaFax:
    def __init__(self, tmp: Path):
        # Not in pytest's tmp_path: that is mode 0700 and faxq/hfaxd run as uucp.
        self.root = Path(tempfile.mkdtemp(prefix="hylafax-bed-", dir=tmp.anchor + "tmp"))
        self.root.chmod(0o755)
        tmp = self.root
        self.spool = spool = tmp / "hylafax"
        # cp -a: faxq and hfaxd drop to uucp and need the spool's owners as the package made them.
        subprocess.run(["cp", "-a", "/var/spool/hylafax", str(spool)], check=True)
        subprocess.run(["cp", "-a", "/etc/hylafax/.", str(spool / "etc")], check=True)
        cache = spool / "etc" / "setup.cache"
        cache.chmod(0o644)
        cache.write_text("".join(f"SPOOL='{spool}'\n" if ln.startswith("SPOOL=") else ln + "\n"
                                 for ln in cache.read_text().splitlines()))
        hosts = spool / "etc" / "hosts.hfaxd"
        hosts.write_text("localhost:21::\n127.0.0.1:21::\n")
        shutil.chown(hosts, "uucp", "uucp")
        hosts.chmod(0o600)
        lock = tmp / "hylafax-lock"
        lock.mkdir()
        shutil.chown(lock, "uucp", "uucp")
        script = spool / "etc" / "fakesend"
        script.write_text(FAKE_SEND)
        script.chmod(0o755)
        (spool / "etc" / "outcomes").write_text("")
        with open(spool / "etc" / "config", "a") as f:
            f.write(f"SendFaxCmd: {script}\nUUCPLockDir: {lock}\nMaxConcurrentCalls: 10\n"
                    "JobRetryNoAnswer: 3600\nJobRetryOther: 3600\n")
        self.port = free_tcp_port()
        self.server = f"127.0.0.1:{self.port}"
        self.procs = [
            subprocess.Popen(["faxq", "-q", str(spool), "-D"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen(["hfaxd", "-q", str(spool), "-d", "-l", "127.0.0.1", "-i", str(self.port)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    self.stop()
                    raise RuntimeError("hfaxd did not start") from None
                time.sleep(0.05)

    def outcome(self, number: str, what: str) -> None:
        """What the fake far end does with faxes to `number`: done | fail | retry."""
        with open(self.spool / "etc" / "outcomes", "a") as f:
            f.write(f"{number} {what}\n")

    def announce_modem(self) -> None:
        """A (fake) modem becomes ready: faxq starts preparing and sending waiting jobs."""
        subprocess.run(["runuser", "-u", "uucp", "--", FAXMODEM, "-q", str(self.spool), "ttyFAKE0"],
                       check=True, timeout=10, capture_output=True)

    def qfile(self, jobid: str) -> dict[str, str]:
        """The job's queue file (sendq while open, doneq when finished) as key -> value."""
        for d in ("doneq", "sendq"):
            p = self.spool / d / f"q{jobid}"
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()
                return dict(ln.split(":", 1) for ln in lines if ":" in ln)
        return {}

    def documents(self, jobid: str) -> list[Path]:
        """The job's documents in docq (what sendfax uploaded), from its qfile's `!...` lines."""
        q = self.qfile(jobid)
        return [self.spool / v.split(":")[-1] for v in q.values() if ":docq/" in v]

    def sent_log(self) -> str:
        p = self.spool / "etc" / "fakesend.log"
        return p.read_text() if p.exists() else ""

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)
