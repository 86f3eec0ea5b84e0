"""A private Kannel (Debian `kannel` 1.4.5: bearerbox + smsbox) for the HTTP provider tests.

    smsc = Smsc(tmp).start()                      # tests/smsc/server.js: the SMSC behind Kannel
    k = Kannel(tmp, smsc.port).start()            # both boxes in the foreground, config written here
    k.sendsms_url  -> http://127.0.0.1:PORT/cgi-bin/sendsms  (user k.user / k.password)
    k.stop()

Everything lives in the test's directory and on free loopback ports (never 13000, where a
system bearerbox may listen): no system service is used or started. smsbox is stopped
before bearerbox, as FIELD-NOTES says.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import urllib.request
from pathlib import Path

from bed import _die_with_parent, free_port, tail, wait_until

BEARERBOX = "/usr/sbin/bearerbox"
SMSBOX = "/usr/sbin/smsbox"


def kannel_ready() -> str | None:
    """Why Kannel cannot run here, or None."""
    for b in (BEARERBOX, SMSBOX):
        if not Path(b).exists() and shutil.which(Path(b).name) is None:
            return f"{b} is missing: apt-get install -y kannel (demo/setup installs it)"
    return None


class Kannel:
    def __init__(self, base: Path, smsc_port: int, system_id: str = "gw", smpp_password: str = "pw",
                 user: str = "gwuser", password: str = "Kannel-sec-7", throughput: int = 0):
        self.base = Path(base) / f"kannel-{free_port()}"
        self.smsc_port = smsc_port
        self.system_id = system_id
        self.smpp_password = smpp_password
        self.user = user
        self.password = password
        self.throughput = throughput
        self.admin_port = free_port()
        self.smsbox_port = free_port()
        self.sendsms_port = free_port()
        self.status_password = "st-" + password
        self.bearerbox: subprocess.Popen | None = None
        self.smsbox: subprocess.Popen | None = None

    @property
    def sendsms_url(self) -> str:
        return f"http://127.0.0.1:{self.sendsms_port}/cgi-bin/sendsms"

    def conf(self) -> str:
        d = self.base
        smsc_extra = f"throughput = {self.throughput}\n" if self.throughput else ""
        return f"""group = core
admin-port = {self.admin_port}
admin-interface = 127.0.0.1
admin-password = adm-{self.password}
status-password = {self.status_password}
admin-allow-ip = "127.0.0.1"
box-allow-ip = "127.0.0.1"
smsbox-port = {self.smsbox_port}
smsbox-interface = 127.0.0.1
log-file = "{d}/bearerbox.log"
log-level = 1
access-log = "{d}/access.log"
dlr-storage = internal
store-type = file
store-location = "{d}/store"

group = smsc
smsc = smpp
smsc-id = sim
host = 127.0.0.1
port = {self.smsc_port}
transceiver-mode = true
smsc-username = {self.system_id}
smsc-password = {self.smpp_password}
system-type = ""
reconnect-delay = 1
max-pending-submits = 10
{smsc_extra}
group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {self.smsbox_port}
sendsms-port = {self.sendsms_port}
sendsms-interface = 127.0.0.1
http-request-retry = 3
http-queue-delay = 1
log-file = "{d}/smsbox.log"
log-level = 1
access-log = "{d}/smsbox-access.log"

group = sendsms-user
username = {self.user}
password = {self.password}
max-messages = 10
concatenation = true
"""

    def start(self, timeout: float = 30) -> Kannel:
        self.base.mkdir(parents=True, exist_ok=True)
        conf = self.base / "kannel.conf"
        conf.write_text(self.conf())
        self.bearerbox = subprocess.Popen([BEARERBOX, "-v", "1", str(conf)], cwd=self.base,
                                          stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                          stdout=open(self.base / "bearerbox.out", "ab"),  # noqa: SIM115
                                          preexec_fn=_die_with_parent)
        try:
            wait_until(lambda: self.status() is not None or self._dead(), timeout, "bearerbox status page",
                       interval=0.1, detail=self.logs)
            self._check_alive("bearerbox")
            self.smsbox = subprocess.Popen([SMSBOX, "-v", "1", str(conf)], cwd=self.base,
                                           stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                           stdout=open(self.base / "smsbox.out", "ab"),  # noqa: SIM115
                                           preexec_fn=_die_with_parent)
            self.wait_online(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _dead(self) -> bool:
        return any(p is not None and p.poll() is not None for p in (self.bearerbox, self.smsbox))

    def _check_alive(self, what: str) -> None:
        if self._dead():
            raise RuntimeError(f"Kannel {what} exited\n{self.logs()}")

    def status(self) -> str | None:
        url = f"http://127.0.0.1:{self.admin_port}/status.txt?password={self.status_password}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback)
                return r.read().decode("latin-1")
        except OSError:
            return None

    def online(self) -> bool:
        s = self.status() or ""
        return "(online" in s and "smsbox:" in s and self._sendsms_listening()

    def _sendsms_listening(self) -> bool:
        import socket

        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.sendsms_port), 0.5):
            return True
        return False

    def wait_online(self, timeout: float = 30) -> None:
        wait_until(lambda: self.online() or self._dead(), timeout, "Kannel bound to the SMSC with smsbox up",
                   interval=0.1, detail=self.logs)
        self._check_alive("box")

    def logs(self, n: int = 30) -> str:
        return "\n".join(f"--- {name}\n{tail(self.base / name, n)}" for name in
                         ("bearerbox.log", "bearerbox.out", "smsbox.log", "smsbox.out", "smsbox-access.log"))

    def kill(self) -> None:
        """SIGKILL both boxes (a crash)."""
        for p in (self.smsbox, self.bearerbox):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        self.smsbox = self.bearerbox = None

    def stop(self) -> None:
        for p in (self.smsbox, self.bearerbox):  # smsbox first
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.smsbox = self.bearerbox = None

    def __enter__(self) -> Kannel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def providers_config(base: Path, notify_port: int, providers: dict, routes: list | None = None,
                     spool_path: Path | None = None, milter_port: int | None = None,
                     name: str = "sms-milter.yaml") -> Path:
    """tests/bed.py's fixture configuration with `providers:` (and `routes:`) instead of `provider:`."""
    import yaml
    from bed import write_config

    path = write_config(base, milter_port or free_port(), notify_port, spool_path=spool_path, name=name)
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("provider", None)
    cfg["providers"] = providers
    if routes is not None:
        cfg["routes"] = routes
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    path.write_text("# written by tests/kannel_bed.py\n" + text)
    return path


def readme_kannel_preset() -> dict:
    """README's Kannel preset (section "### Kannel"), as documented."""
    import re

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Kannel (`sendsms` + `dlr-url`)"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "README: no yaml block in the Kannel section"
    return yaml.safe_load(block.group(1))["providers"]["kannel"]


def kannel_provider(k: Kannel, callback_port: int, token: str, **over: object) -> dict:
    """README's Kannel preset as written, pointed at this Kannel (URL, sendsms user) and a
    callback listener on a free loopback port with a fresh token."""
    preset = readme_kannel_preset()
    http = preset["http"]
    http["url"] = k.sendsms_url
    http["query"].update(username=k.user, password=k.password)
    http["callback"].update(listen=f"127.0.0.1:{callback_port}", token=token)
    http.update(over)
    return {"http": http}
