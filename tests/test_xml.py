"""xml@ end to end: SMTP into a real Postfix, the milter, the spool, the dispatcher, the SMSC
simulator (tests/smsc/server.js), the XML reply mail at a capturing sink, URL callbacks.

The module starts its own gateway (the session one has no dispatcher and no URL allow-list):
Postfix + `sms-milter milter` + `sms-milter dispatcher` + the SMSC simulator + a notify sink.
"""

from __future__ import annotations

import calendar
import http.server
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import bed
import pytest

pytestmark = pytest.mark.bed
SMSC = Path(__file__).parent / "smsc" / "server.js"
SENDER = "xmlclient@client.example"
XML_RCPT = "xml@sms.example.com"


class _Callbacks(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        _Callbacks.seen.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


class XmlBed:
    def __init__(self, base: Path, relay_sink: bed.MailSink):
        if shutil.which("node") is None or not SMSC.exists():
            pytest.fail("node and tests/smsc/server.js are needed for the xml@ end-to-end tests",
                        pytrace=False)
        self.base = base
        self.undeliv = bed.unique_number()  # the SMSC reports this number UNDELIV
        self.smsc = subprocess.Popen(
            ["node", str(SMSC), "--port", "0", "--log", str(base / "smsc.log"),
             "--undeliv", self.undeliv[1].lstrip("+")],
            stdout=subprocess.PIPE, stderr=open(base / "smsc.err", "wb"), stdin=subprocess.PIPE,  # noqa: SIM115
            preexec_fn=bed._die_with_parent)
        assert self.smsc.stdout is not None
        line = self.smsc.stdout.readline().decode()
        m = re.match(r"LISTENING (\d+)", line)
        if not m:
            self.smsc.kill()
            raise RuntimeError(f"SMSC simulator did not start: {line!r} {bed.tail(base / 'smsc.err')}")
        self.smsc_port = int(m.group(1))
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Callbacks)
        self.http_port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.notify = bed.MailSink().start()
        self.milter_port = bed.free_port()
        self.config = bed.write_config(base, self.milter_port, self.notify.port, smpp_port=self.smsc_port,
                                       spool_path=base / "spool.sqlite3",
                                       extra={"xml": {"allowed_url_hosts": ["127.0.0.1"]}})
        self.milter = bed.Milter(self.config, base / "milter.log").start()
        self.postfix = bed.Postfix(None, relay_sink.port, f"inet:127.0.0.1:{self.milter_port}").start()
        log = open(base / "dispatcher.log", "ab")  # noqa: SIM115 (owned by the child)
        self.dispatcher = subprocess.Popen([*bed.milter_command(), "dispatcher", "-c", str(self.config)],
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=str(base), preexec_fn=bed._die_with_parent)
        log.close()

    def stop(self) -> None:
        for proc in (self.dispatcher, self.smsc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.milter.stop()
        self.postfix.stop()
        self.notify.stop()
        self.http.shutdown()

    def logs(self) -> str:
        return "\n".join(f"--- {name} tail:\n{bed.tail(self.base / name)}"
                         for name in ("milter.log", "dispatcher.log", "smsc.err"))

    # ---- conveniences
    def send(self, body: str | bytes, *, sender: str = SENDER, subtype: str = "xml",
             message_id: str | None = None) -> tuple[dict, str]:
        mid = message_id or f"<{bed.unique('x')}@client.bed.example>"
        raw = body.encode("latin-1") if isinstance(body, str) else body
        head = (f"From: <{sender or 'mailer-daemon@client.example'}>\r\nTo: <{XML_RCPT}>\r\n"
                f"Subject: anything\r\nMessage-ID: {mid}\r\nMIME-Version: 1.0\r\n"
                f"Content-Type: text/{subtype}; charset=ISO-8859-1\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n")
        return bed.smtp_send(self.postfix.port, sender, [XML_RCPT], head.encode("ascii") + raw), mid

    def reply_to(self, mid: str, timeout: float = 30) -> str:
        """The XML of the reply mail answering Message-ID `mid` (pure ASCII by design)."""
        found = self.notify.wait_for(lambda m: m.message.get("In-Reply-To") == mid, timeout=timeout)
        msg = found[0]
        assert msg.rcpt_tos == [SENDER]
        assert msg.message.get_content_type() == "text/xml"
        assert msg.message["Auto-Submitted"] == "auto-replied"
        payload = msg.message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        return payload.decode("ascii")

    def jobs(self, **match) -> list[dict]:
        return [j for j in bed.queue_list(self.config) if all(j.get(k) == v for k, v in match.items())]

    def wait_jobs(self, predicate, what: str, timeout: float = 30) -> list[dict]:
        return bed.wait_until(lambda: (lambda js: js if predicate(js) else None)(bed.queue_list(self.config)),
                              timeout, what, interval=0.3, detail=self.logs)


@pytest.fixture(scope="module")
def xb(tmp_path_factory, sink):
    b = XmlBed(tmp_path_factory.mktemp("xmlbed"), sink)
    yield b
    b.stop()


def request(action: str, body: str = "", userkey: str = "ACME123", password: str = "s3cret") -> str:
    return (f'<?xml version="1.0" encoding="ISO-8859-1"?>\r\n<aspsms>\r\n<Userkey>{userkey}</Userkey>\r\n'
            f"<Password>{password}</Password>\r\n{body}\r\n<Action>{action}</Action>\r\n</aspsms>\r\n")


def recipients(*pairs: tuple[str, str]) -> str:
    return "".join(f"<Recipient><PhoneNumber>{number}</PhoneNumber><TransRefNumber>{ref}</TransRefNumber>"
                   "</Recipient>" for number, ref in pairs)


def value(xml: str, name: str) -> str | None:
    m = re.search(rf"<{name}>(.*?)</{name}>", xml, re.S)
    return m.group(1) if m else None


def accepted(result: dict) -> None:
    assert result["rcpt"][XML_RCPT][0] == 250, result
    assert result["data"] is not None and result["data"][0] == 250, result


def _by_ref(jobs: list[dict], refs: set[str]) -> list[dict]:
    return [j for j in jobs if j.get("trans_ref") in refs]


def test_send_inquire_after_receipts(xb: XmlBed) -> None:
    (n1, e1), (n2, e2) = bed.unique_number(), bed.unique_number()
    n3, e3 = xb.undeliv
    refs = [bed.unique("r") for _ in range(3)]
    text = f"Gr&#252;&#223;e {refs[0]}"
    result, mid = xb.send(request("SendTextSMS", recipients((n1, refs[0]), (n2, refs[1]), (n3, refs[2]))
                                  + f"<Originator>Monitor</Originator><MessageData>{text}</MessageData>"))
    accepted(result)
    xml = xb.reply_to(mid)
    assert value(xml, "ErrorCode") == "1" and value(xml, "ErrorDescription") == "Ok"
    assert value(xml, "CreditsUsed") == "3"
    jobs = _by_ref(bed.queue_list(xb.config), set(refs))
    expected = sorted(zip((e1, e2, e3), refs, strict=True))
    assert sorted((j["recipient"], j["trans_ref"]) for j in jobs) == expected
    assert {j["text"] for j in jobs} == {f"Grüße {refs[0]}"}
    assert {j["originator"] for j in jobs} == {"Monitor"}

    final = ("delivered", "failed", "expired")
    xb.wait_jobs(lambda js: len([j for j in _by_ref(js, set(refs)) if j["state"] in final]) == 3,
                 "the three jobs in a final state after the SMSC's receipts")
    inquiry = "".join(f"<TransRefNumber>{r}</TransRefNumber>" for r in refs)
    result, mid = xb.send(request("InquireDeliveryNotifications", inquiry))
    accepted(result)
    xml = xb.reply_to(mid)
    assert value(xml, "ErrorCode") == "1"
    notes = re.findall(r"<DeliveryNotification>(.*?)</DeliveryNotification>", xml, re.S)
    states = {value(n, "TransRefNumber"): value(n, "DeliveryStatus") for n in notes}
    assert states == {refs[0]: "0", refs[1]: "0", refs[2]: "2"}
    for n in notes:
        assert re.fullmatch(r"\d{14}", value(n, "SubmissionDate") or "")
        assert re.fullmatch(r"\d{14}", value(n, "NotificationDate") or "")


def test_not_well_formed_document(xb: XmlBed) -> None:
    doc = request("ShowCredits").replace("</Password>", "</Passwort>")
    result, mid = xb.send(doc)
    accepted(result)
    xml = xb.reply_to(mid)
    assert value(xml, "ParserErrorLine") == "4"
    assert value(xml, "ParserErrorDescription") == "mismatched tag"
    assert value(xml, "ParserErrorLinePos") and "s3cret" not in xml


def test_entity_bomb(xb: XmlBed) -> None:
    n, _ = bed.unique_number()
    ref = bed.unique("bomb")
    ents = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    req = request("SendTextSMS", recipients((n, ref)) + "<MessageData>&l9;</MessageData>")
    doc = (f'<?xml version="1.0"?>\r\n<!DOCTYPE aspsms [<!ENTITY l0 "lol">{ents}]>\r\n'
           + req.split("\r\n", 1)[1])
    result, mid = xb.send(doc)
    accepted(result)
    xml = xb.reply_to(mid)
    assert value(xml, "ParserErrorCode") == "1001" and "lollol" not in xml  # nothing expanded
    assert _by_ref(bed.queue_list(xb.config), {ref}) == []


def test_deferred_send_waits_for_its_time(xb: XmlBed) -> None:
    n, e164 = bed.unique_number()
    ref = bed.unique("d")
    at = int(time.time()) + 15
    when = time.strftime("%d%m%Y%H%M%S", time.gmtime(at))  # TimeZone 0: GMT
    body = (recipients((n, ref)) + "<MessageData>later</MessageData>"
            f"<DeferredDeliveryTime>{when}</DeferredDeliveryTime><TimeZone>0</TimeZone>")
    result, mid = xb.send(request("SendTextSMS", body))
    accepted(result)
    [job] = _by_ref(bed.queue_list(xb.config), {ref})
    assert job["state"] == "queued" and job["recipient"] == e164, job
    assert value(xb.reply_to(mid), "ErrorCode") == "1"
    if time.time() < at - 2:
        time.sleep(max(0.0, at - 3 - time.time()))
        assert _by_ref(bed.queue_list(xb.config), {ref})[0]["state"] == "queued"
    jobs = xb.wait_jobs(lambda js: any(j["state"] != "queued" for j in _by_ref(js, {ref})),
                        "the deferred job submitted after its time")
    [job] = _by_ref(jobs, {ref})
    assert job["state"] in ("submitted", "delivered", "buffered"), job
    # queue list --json gives times as ISO 8601 UTC, to the second
    submitted = calendar.timegm(time.strptime(job["submitted_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert submitted >= at, job


def test_null_sender_gets_no_reply(xb: XmlBed) -> None:
    n, _ = bed.unique_number()
    ref = bed.unique("n")
    req = request("SendTextSMS", recipients((n, ref)) + "<MessageData>x</MessageData>")
    result, silent_mid = xb.send(req, sender="")
    accepted(result)
    xb.wait_jobs(lambda js: any(j["state"] == "delivered" for j in _by_ref(js, {ref})),
                 "the null sender's job delivered")
    # A later request's reply arriving proves the outbox was drained past the silent request.
    result, mid = xb.send(request("ShowCredits"))
    accepted(result)
    assert value(xb.reply_to(mid), "Credits") == "unlimited"
    assert xb.notify.matching(lambda m: m.message.get("In-Reply-To") == silent_mid) == []


def test_url_callback(xb: XmlBed) -> None:
    n, _ = bed.unique_number()
    ref = bed.unique("u")
    url = f"http://127.0.0.1:{xb.http_port}/dlr"
    body = (recipients((n, ref)) + "<MessageData>callback</MessageData>"
            f"<URLDeliveryNotification>{url}</URLDeliveryNotification>")
    result, mid = xb.send(request("SendTextSMS", body))
    accepted(result)
    assert value(xb.reply_to(mid), "ErrorCode") == "1"
    bed.wait_until(lambda: [p for p in _Callbacks.seen if ref in p], 30, "the delivery URL callback",
                   interval=0.2, detail=xb.logs)
    assert any(p.startswith("/dlr") for p in _Callbacks.seen if ref in p)


def test_url_to_other_host_is_refused(xb: XmlBed) -> None:
    n, _ = bed.unique_number()
    ref = bed.unique("v")
    body = (recipients((n, ref)) + "<MessageData>x</MessageData>"
            "<URLNonDeliveryNotification>http://169.254.169.254/latest</URLNonDeliveryNotification>")
    result, mid = xb.send(request("SendTextSMS", body))
    accepted(result)
    assert value(xb.reply_to(mid), "ErrorCode") == "19"
    assert _by_ref(bed.queue_list(xb.config), {ref}) == []


def test_wrong_password_answers_3(xb: XmlBed) -> None:
    result, mid = xb.send(request("ShowCredits", password="Wr0ngPw"))
    accepted(result)
    xml = xb.reply_to(mid)
    assert value(xml, "ErrorCode") == "3" and "Wr0ngPw" not in xml


def test_html_is_refused_inline(xb: XmlBed) -> None:
    result, _ = xb.send("<html><body><p>SendTextSMS</p></body></html>", subtype="html")
    assert result["data"] is not None and result["data"][0] == 550, result
    assert result["data"][1].startswith("5.6.1"), result


def test_one_job_per_number_in_any_spelling(xb: XmlBed) -> None:
    """The same number three times, and in four spellings, is one SMS and one credit."""
    (n1, e1), (n2, e2) = bed.unique_number(), bed.unique_number()
    token = bed.unique("dedupe")
    forms = [n2, "+" + n2[2:], f"{n2[:4]} {n2[4:6]} {n2[6:9]} {n2[9:]}", n2]
    refs = [bed.unique("r") for _ in range(7)]
    result, mid = xb.send(request("SendTextSMS", recipients(*zip([n1, n1, n1, *forms], refs, strict=True))
                                  + f"<MessageData>{token}</MessageData>"))
    accepted(result)
    xml = xb.reply_to(mid)
    assert value(xml, "ErrorCode") == "1" and value(xml, "CreditsUsed") == "2"
    jobs = [j for j in bed.queue_list(xb.config) if token in j["text"]]
    # The first spelling's TransRefNumber is the one kept.
    assert sorted((j["recipient"], j["trans_ref"]) for j in jobs) == sorted([(e1, refs[0]), (e2, refs[3])])
