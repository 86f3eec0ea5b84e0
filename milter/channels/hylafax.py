"""A HylaFAX server (hfaxd) as the fax channel's peer, through HylaFAX's own client tools.

`sendfax` submits a document and answers "request id is N"; `faxstat -s -d` lists the send
queue and the done queue in a format we choose (JobFmt in a private ~/.hylarc, tab-separated);
`faxrm` removes a job. HylaFAX converts, schedules, dials and retries by its own rules; we
follow the job's state letter:

    P pending, S sleeping (between tries), B blocked, W waiting for a modem, R running,
    T suspended, ? undefined  -> still in progress
    D done (sent)             -> delivered
    F failed (or removed)     -> failed
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .tools import ChannelError, run, tool

TIMEOUT = 60.0
# Fields: job id, state, pages sent, total pages, tries, max tries, dialled number, job tag, status.
JOB_FMT = "J\\t%j\\t%a\\t%p\\t%y\\t%t\\t%u\\t%e\\t%J\\t%s"
_REQUEST = re.compile(r"request id is (\d+)")


@dataclass(frozen=True)
class FaxJob:
    jobid: str
    state: str  # HylaFAX's state letter
    pages_sent: int
    pages: int  # total pages to transmit (known once HylaFAX has prepared the job)
    tries: int
    max_tries: int
    number: str
    tag: str
    status: str  # why the last try failed ("" when none)

    @property
    def final(self) -> str:
        """Our part state when HylaFAX is done with the job, else ""."""
        return {"D": "delivered", "F": "failed"}.get(self.state, "")


def _int(s: str) -> int:
    try:
        return int(s.strip() or 0)
    except ValueError:
        return 0


class HylaFaxClient:
    def __init__(self, server: str, owner: str = ""):
        self.server = server  # host:port of hfaxd
        self.owner = owner
        # faxstat reads its JobFmt from ~/.hylarc: a private HOME for the client tools. Passive mode:
        # in active mode hfaxd binds its end of every transfer (a sendfax upload, a faxstat listing)
        # to its control port - 1, and when another socket holds that port it retries for 55 s and
        # then answers "425 Cannot create data socket ... Address already in use" (sendfax fails,
        # faxstat prints nothing); in passive mode hfaxd listens on a port the kernel picks.
        self.home = Path(tempfile.mkdtemp(prefix="sms-milter-hylafax-"))
        (self.home / ".hylarc").write_text(f'JobFmt: "{JOB_FMT}"\nPassiveMode: yes\n')

    def _env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}

    def submit(self, document: Path, number: str, tag: str, max_tries: int, max_dials: int,
               kill_after: float) -> str:
        """Queue one fax (no cover page: the document carries its own first page); its job id."""
        cmd = [tool("sendfax"), "-n", "-N", "-m", "-h", self.server, "-i", tag, "-t", str(max_tries),
               "-T", str(max_dials), "-k", f"now + {max(1, int(kill_after // 60))} minutes"]
        if self.owner:
            cmd += ["-o", self.owner]
        try:
            out = run([*cmd, "-d", number, str(document)], TIMEOUT, env=self._env())
        except ChannelError as e:
            # The server refused or is not there: not the fax's fault.
            raise ChannelError(f"HylaFAX at {self.server}: {e}", temporary=True) from None
        m = _REQUEST.search(out)
        if m is None:
            raise ChannelError(f"sendfax answered without a job id: {out.strip()[:200]}", temporary=True)
        return m.group(1)

    def jobs(self) -> dict[str, FaxJob]:
        """Every job in the send queue and the done queue, by job id."""
        try:
            out = run([tool("faxstat"), "-h", self.server, "-s", "-d"], TIMEOUT, env=self._env())
        except ChannelError as e:
            raise ChannelError(f"HylaFAX at {self.server}: {e}", temporary=True) from None
        found: dict[str, FaxJob] = {}
        for line in out.splitlines():
            cols = line.rstrip("\r").split("\t")
            if len(cols) < 10 or cols[0] != "J" or not cols[1].strip().isdigit():
                continue
            j = FaxJob(jobid=cols[1].strip(), state=cols[2].strip() or "?", pages_sent=_int(cols[3]),
                       pages=_int(cols[4]), tries=_int(cols[5]), max_tries=_int(cols[6]),
                       number=cols[7].strip(), tag=cols[8].strip(), status="\t".join(cols[9:]).strip())
            found[j.jobid] = j
        return found

    def remove(self, jobid: str) -> None:
        run([tool("faxrm"), "-h", self.server, jobid], TIMEOUT, env=self._env())

    def close(self) -> None:
        for p in self.home.iterdir():
            p.unlink(missing_ok=True)
        self.home.rmdir()
