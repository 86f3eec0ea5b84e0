"""The HTTP provider against a vendor stand-in (a real HTTP server in the test, answering as told
per recipient) and the dispatcher's delivery-report listener under hostile callers.

Every test runs `sms-milter dispatcher` as a process with `providers: {vendor: {http: ...}}`:
a JSON API with a bearer token, the message id read by a JSON path, reports as JSON webhooks.
"""

from __future__ import annotations

import http.server
import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request

import bed
import pytest
from dispatcher_bed import DispatcherProc, job, wait_states
from kannel_bed import providers_config
from spool_helpers import add_jobs, orphan_count

BEARER = "Bearer vendor-secret-4711-abcdef"


class Vendor(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), VendorHandler)
        self.requests: list[dict] = []
        self.behaviour: dict[str, str] = {}  # recipient -> 500 | 400 | 429 | slow | refuse | garbage
        self.status: dict[str, str] = {}  # message id -> state word at /status/<id>
        self.asked: list[str] = []
        self.n = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/v1/messages?account=acme"

    def sent(self, recipient: str) -> list[dict]:
        return [r for r in self.requests if r["body"].get("to") == recipient]


class VendorHandler(http.server.BaseHTTPRequestHandler):
    server: Vendor

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     "body": body, "ctype": self.headers.get("Content-Type")})
        how = self.server.behaviour.get(body.get("to", ""), "ok")
        if how == "slow":
            time.sleep(4)
        if how == "drip":  # an answer that never ends in time: one byte every 0.3 s
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.3)
            return
        if how in ("500", "400", "429"):
            self._send(int(how), {"error": f"simulated {how}", "echo": BEARER})
        elif how == "refuse":
            self._send(200, {"status": "error", "reason": "number blocked"})
        else:
            self.server.n += 1
            self._send(200, {"status": "ok", "data": {"messages": [{"id": f"VND{self.server.n:06d}"}]}})

    def do_GET(self) -> None:  # noqa: N802 (the status URL of polled providers)
        mid = self.path.rsplit("/", 1)[-1]
        self.server.asked.append(mid)
        if mid in self.server.status:
            self._send(200, {"message": {"id": mid, "status": self.server.status[mid]}})
        else:
            self._send(404, {"error": "unknown message"})

    def _send(self, status: int, doc: dict) -> None:
        raw = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a) -> None:
        pass


def vendor_provider(v: Vendor, cb_port: int, token: str, **over) -> dict:
    http = {
        "url": v.url, "method": "POST", "headers": {"Authorization": BEARER}, "body": "json",
        "fields": {"to": "{recipient}", "from": "{originator}", "text": "{text}", "ref": "{reference}",
                   "callback": "{callback_url}", "unicode": "{unicode}", "tags": ["sms-milter", "{job_id}"]},
        "response": {"success_json": "status", "success_values": ["ok"],
                     "message_id_json": "data.messages.0.id", "temporary_status": ["5xx", 429]},
        "timeout": 2, "concurrency": 4,
        "callback": {"listen": f"127.0.0.1:{cb_port}", "token": token, "state_field": "event.status",
                     "states": {"delivered": "delivered", "undelivered": "failed", "queued": "buffered",
                                "sent": "ignore"},
                     "ref_field": "message_id", "number_field": "event.to", "error_field": "event.error",
                     "max_body": 4096, "timeout": 2},
    }
    http.update(over)
    return {"http": http}


class Bed:
    def __init__(self, base, notify_port):
        self.base = base
        self.vendor = Vendor()
        self.token = secrets.token_urlsafe(32)
        self.cb_port = bed.free_port()
        self.spool_path = base / "spool.sqlite3"
        self.spool = bed.spool_at(self.spool_path)
        providers = {"vendor": vendor_provider(self.vendor, self.cb_port, self.token)}
        self.config = providers_config(base, notify_port, providers, spool_path=self.spool_path)
        self.d = DispatcherProc(self.config, base / "d.log").start()
        bed.wait_until(lambda: bed._port_listening(self.cb_port), 20, "the callback listener",
                       detail=self.d.log_tail)

    def report(self, path: str, doc: dict | bytes, method: str = "POST",
               timeout: float = 10) -> tuple[int, str]:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.cb_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback)
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except urllib.error.URLError as e:  # not listening (yet)
            return 0, str(e.reason)

    def close(self):
        self.d.stop()
        self.vendor.shutdown()
        self.spool.close()


@pytest.fixture
def vb(tmp_path, nsink):
    b = Bed(tmp_path, nsink.port)
    yield b
    b.close()


def callback_path(req: dict) -> str:
    return "/" + req["body"]["callback"].split("/", 3)[3]


def test_request_from_templates_message_id_from_json_and_webhook_report(vb, nsink):
    (jid,) = add_jobs(vb.spool, [job("+41791230301", "Привет via HTTP", sender="c4ca423@client.example")])
    wait_states(vb.spool, [jid], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    (req,) = vb.vendor.sent("+41791230301")
    assert req["path"] == "/api/v1/messages?account=acme" and req["auth"] == BEARER
    assert req["ctype"] == "application/json"
    body = req["body"]
    assert body["from"] == "+41760000000" and body["text"] == "Привет via HTTP"
    assert body["unicode"] == "1"
    assert body["tags"] == ["sms-milter", str(jid)] and body["ref"].startswith(f"{jid}-")
    assert body["callback"].startswith(f"http://127.0.0.1:{vb.cb_port}/dlr/{vb.token}/{body['ref']}/1")
    assert vb.spool.get(jid).provider_refs == ("vnd000001",)  # stored normalised
    # "sent" is acknowledged and changes nothing; "delivered" is stored before the 200.
    status, _ = vb.report(callback_path(req), {"message_id": "VND000001", "event": {"status": "sent"}})
    assert status == 200 and vb.spool.get(jid).state == "submitted"
    status, _ = vb.report(callback_path(req), {"message_id": "VND000001",
                                               "event": {"status": "delivered", "to": "+41791230301"}})
    assert status == 200
    assert vb.spool.get(jid).state == "delivered"  # already stored when the 200 came
    nsink.wait_for(lambda m: "+41791230301" in m.text(), timeout=20)
    log = vb.d.log()
    assert BEARER.split()[1] not in log and vb.token not in log and "account=acme" not in log


def test_error_classes_temporary_permanent_timeout(vb):
    v = vb.vendor
    cases = {"+41791230311": "500", "+41791230312": "400", "+41791230313": "429", "+41791230314": "slow",
             "+41791230315": "refuse", "+41791230316": "drip"}
    v.behaviour.update(cases)
    added = add_jobs(vb.spool, [job(n, f"case {how}") for n, how in cases.items()])
    ids = dict(zip(cases, added, strict=True))
    failed = wait_states(vb.spool, [ids["+41791230312"], ids["+41791230315"]], {"failed"}, timeout=20,
                         detail=vb.d.log_tail)
    assert failed[ids["+41791230312"]].last_error.startswith("HTTP 400: ")
    assert "simulated 400" in failed[ids["+41791230312"]].last_error
    assert BEARER.split()[1] not in failed[ids["+41791230312"]].last_error  # an echoed secret is masked
    assert failed[ids["+41791230315"]].last_error.startswith("HTTP 200, status=error")

    def retried(number: str, text: str) -> bool:
        j = vb.spool.get(ids[number])
        return j.state == "queued" and j.attempts >= 1 and text in j.last_error and len(v.sent(number)) >= 1

    for number, what in (("+41791230311", "HTTP 500"), ("+41791230313", "HTTP 429")):
        bed.wait_until(lambda n=number, w=what: retried(n, w), 20, f"{what} -> back to the queue",
                       detail=vb.d.log_tail)
    bed.wait_until(lambda: retried("+41791230314", "within 2s"), 20, "timeout -> back to the queue",
                   detail=vb.d.log_tail)
    bed.wait_until(lambda: retried("+41791230316", "within 2s"), 20, "a dripping answer -> back to the queue",
                   detail=vb.d.log_tail)
    # The vendor recovers: the temporary ones go out and are accepted.
    v.behaviour.clear()
    wait_states(vb.spool, [ids[n] for n in ("+41791230311", "+41791230313", "+41791230314", "+41791230316")],
                {"submitted"},
                timeout=60, detail=vb.d.log_tail)


def test_unreachable_provider_jobs_wait_without_counting_attempts(tmp_path, nsink):
    dead = bed.free_port()
    token = secrets.token_urlsafe(32)
    v = Vendor()
    v.shutdown()
    prov = vendor_provider(v, bed.free_port(), token, url=f"http://127.0.0.1:{dead}/send")
    config = providers_config(tmp_path, nsink.port, {"vendor": prov}, spool_path=tmp_path / "s.sqlite3")
    spool = bed.spool_at(tmp_path / "s.sqlite3")
    (jid,) = add_jobs(spool, [job("+41791230321", "nobody listens")])
    d = DispatcherProc(config, tmp_path / "d.log").start()
    try:
        bed.wait_until(lambda: "cannot reach http://127.0.0.1" in (spool.get(jid).last_error or ""), 20,
                       "the job back in the queue", detail=d.log_tail)
        j = spool.get(jid)
        assert j.state == "queued" and j.attempts == 0
        assert "cannot reach" in d.log() and "next try in" in d.log()
    finally:
        d.stop()
        spool.close()


# --------------------------------------------------------------------------- hostile callbacks


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_wrong_token_huge_body_chunked_and_garbage_fields_are_refused(vb):
    (jid,) = add_jobs(vb.spool, [job("+41791230331", "hostile")])
    wait_states(vb.spool, [jid], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    path = callback_path(vb.vendor.sent("+41791230331")[0])
    good = {"message_id": "VND000001", "event": {"status": "delivered"}}
    wrong = secrets.token_urlsafe(32)
    assert vb.report(path.replace(vb.token, wrong), good)[0] == 404
    assert vb.report(f"/dlr/{vb.token[:-1]}", good)[0] == 404
    assert vb.report("/", good)[0] == 404
    assert vb.report(path, b"{" + b" " * 5000 + b"}")[0] == 413
    assert raw(vb.cb_port, f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "5\r\nhello\r\n0\r\n\r\n".encode()).startswith(b"HTTP/1.1 411")
    huge_head = b"GET /dlr/x HTTP/1.1\r\n" + b"X-A: " + b"a" * 9000 + b"\r\n\r\n"
    assert raw(vb.cb_port, huge_head).startswith(b"HTTP/1.1 431")
    assert raw(vb.cb_port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    long_length = f"POST {path} HTTP/1.1\r\nContent-Length: {'9' * 5000}\r\n\r\n".encode()
    assert raw(vb.cb_port, long_length).startswith(b"HTTP/1.1 400")
    for doc, why in [({"message_id": "VND000001", "event": {"status": "exploded"}}, "unknown event.status"),
                     ({"message_id": "VND000001"}, "no 'event.status' field"),
                     ({"event": {"status": "delivered"}}, "no message id"),
                     ({"message_id": "VND000001", "event": {"status": "delivered", "to": "DROP TABLE"}},
                      "not a phone number"),
                     (b"{not json", "not valid JSON")]:
        status, text = vb.report(path, doc)
        assert status == 400 and why in text, (doc, status, text)
    assert vb.spool.get(jid).state == "submitted"  # none of that changed the job
    assert vb.report(path, good)[0] == 200
    assert vb.spool.get(jid).state == "delivered"
    assert vb.token not in vb.d.log() and wrong not in vb.d.log() and "Traceback" not in vb.d.log()


def test_slow_clients_do_not_stall_the_listener(vb):
    (jid,) = add_jobs(vb.spool, [job("+41791230341", "slowloris")])
    wait_states(vb.spool, [jid], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    path = callback_path(vb.vendor.sent("+41791230341")[0])
    slow = []
    for _ in range(20):  # each sends part of a request head and then nothing
        s = socket.create_connection(("127.0.0.1", vb.cb_port), 5)
        s.sendall(f"POST {path} HTTP/1.1\r\nContent-Length: 100\r\n".encode())
        slow.append(s)
    try:
        t0 = time.monotonic()
        status, _ = vb.report(path, {"message_id": "VND000001", "event": {"status": "delivered"}}, timeout=5)
        assert status == 200 and time.monotonic() - t0 < 3
        assert vb.spool.get(jid).state == "delivered"
        # The slow ones are cut off after the callback timeout (2 s): 408 and closed.
        slow[0].settimeout(15)
        answer = slow[0].recv(1000)
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for s in slow:
            s.close()


def test_unmatched_report_is_kept_as_an_orphan_and_a_foreign_number_is_not_applied(vb):
    (jid,) = add_jobs(vb.spool, [job("+41791230351", "matching")])
    wait_states(vb.spool, [jid], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    ref = vb.spool.get(jid).provider_refs[0]
    before = orphan_count(vb.spool)
    # An id we never had, and our id with another handset's number: both stored, neither applied.
    unknown = {"message_id": "VND999999", "event": {"status": "delivered"}}
    assert vb.report(f"/dlr/{vb.token}", unknown)[0] == 200
    foreign = {"message_id": ref, "event": {"status": "delivered", "to": "+41790000000"}}
    assert vb.report(f"/dlr/{vb.token}", foreign)[0] == 200
    assert orphan_count(vb.spool) == before + 2
    assert vb.spool.get(jid).state == "submitted"
    right = {"message_id": ref.upper(), "event": {"status": "delivered", "to": "0041791230351"}}
    assert vb.report(f"/dlr/{vb.token}", right)[0] == 200
    assert vb.spool.get(jid).state == "delivered"


def test_report_is_answered_only_after_it_is_stored(vb):
    (jid,) = add_jobs(vb.spool, [job("+41791230361", "durable")])
    wait_states(vb.spool, [jid], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    path = callback_path(vb.vendor.sent("+41791230361")[0])
    doc = {"message_id": vb.spool.get(jid).provider_refs[0], "event": {"status": "delivered"}}
    with bed.spool_locked(vb.spool_path):  # the spool cannot be written: the report cannot be stored
        status, text = vb.report(path, doc)
        assert status == 503 and "not stored" in text
    wait_states(vb.spool, [jid], {"delivered"}, timeout=20, detail=vb.d.log_tail)  # stored once unlocked
    assert vb.report(path, doc)[0] == 200  # the provider's retry: acknowledged (a repeat, not applied twice)


def test_providers_without_callbacks_are_polled(tmp_path, nsink):
    v = Vendor()
    prov = vendor_provider(v, bed.free_port(), secrets.token_urlsafe(32))
    del prov["http"]["callback"]
    prov["http"]["fields"].pop("callback")
    prov["http"]["poll"] = {"url": f"http://127.0.0.1:{v.server_address[1]}/status/{{message_id}}",
                            "interval": 1, "state_json": "message.status",
                            "states": {"queued": "buffered", "sent": "ignore", "delivered": "delivered"}}
    config = providers_config(tmp_path, nsink.port, {"vendor": prov}, spool_path=tmp_path / "s.sqlite3")
    spool = bed.spool_at(tmp_path / "s.sqlite3")
    jid, other = add_jobs(spool, [job("+41791230371", "polled", sender="c4ca423@client.example",
                                     notify="ALWAYS"), job("+41791230372", "polled too")])
    d = DispatcherProc(config, tmp_path / "d.log").start()
    try:
        wait_states(spool, [jid, other], {"submitted"}, timeout=20, detail=d.log_tail)
        ref, ref2 = spool.get(jid).provider_refs[0], spool.get(other).provider_refs[0]
        bed.wait_until(lambda: ref.upper() in v.asked, 20, "the status URL asked", detail=d.log_tail)
        assert spool.get(jid).state == "submitted"  # 404 from the status URL: nothing known yet
        v.status[ref.upper()] = "queued"
        wait_states(spool, [jid], {"buffered"}, timeout=20, detail=d.log_tail)
        v.status[ref.upper()] = "delivered"
        v.status[ref2.upper()] = "sent"
        wait_states(spool, [jid], {"delivered"}, timeout=20, detail=d.log_tail)
        texts = [m.text().lower() for m in nsink.wait_for(lambda m: "+41791230371" in m.text(), timeout=20,
                                                         count=2)]
        assert any("buffered" in t for t in texts) and any("delivered" in t for t in texts)
        n = len(v.asked)
        bed.wait_until(lambda: v.asked[n:].count(ref2.upper()) >= 2, 20, "still asked while not final")
        assert spool.get(other).state == "submitted"
        assert v.asked[n:].count(ref.upper()) == 0  # final: not asked again
    finally:
        d.stop()
        spool.close()
        v.shutdown()


def test_sighup_with_changed_http_settings_keeps_reports_coming(vb):
    """A reload that changes the provider re-creates it: the old listener is closed, the new
    one takes the same address, the new token is the one that works."""
    import signal

    import yaml

    (first,) = add_jobs(vb.spool, [job("+41791230381", "before the reload")])
    wait_states(vb.spool, [first], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    old_path = callback_path(vb.vendor.sent("+41791230381")[0])
    data = yaml.safe_load(vb.config.read_text())
    new_token = secrets.token_urlsafe(32)
    data["providers"]["vendor"]["http"]["callback"]["token"] = new_token
    data["providers"]["vendor"]["http"]["concurrency"] = 2
    vb.config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    assert vb.d.proc is not None
    vb.d.proc.send_signal(signal.SIGHUP)
    bed.wait_until(lambda: "settings changed: re-binding" in vb.d.log(), 20, "the reload",
                   detail=vb.d.log_tail)
    (second,) = add_jobs(vb.spool, [job("+41791230382", "after the reload")])
    wait_states(vb.spool, [second], {"submitted"}, timeout=20, detail=vb.d.log_tail)
    new_path = callback_path(vb.vendor.sent("+41791230382")[0])
    assert new_token in new_path
    delivered = {"message_id": vb.spool.get(second).provider_refs[0].upper(),
                 "event": {"status": "delivered"}}
    status = bed.wait_until(lambda: vb.report(new_path, delivered)[0] == 200 or None, 20, "the new listener")
    assert status and vb.spool.get(second).state == "delivered"
    old = {"message_id": vb.spool.get(first).provider_refs[0].upper(), "event": {"status": "delivered"}}
    assert vb.report(old_path, old)[0] == 404  # the old token no longer works
    assert "configuration reload failed" not in vb.d.log()
