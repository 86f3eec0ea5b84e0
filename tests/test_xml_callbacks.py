"""xml@ callback URLs (issue 9, item 17): the allowlist check and the HTTP call read a URL
with one parser, and a redirect is followed only to a URL that passes the same check.

Through the real peers: an xml@ request through Postfix and the milter (the check at SMTP
time), and the dispatcher calling local HTTP servers (127.0.0.1 allowed, 127.0.0.2 not).
The parser itself is fuzzed: whatever it accepts, urllib reads the same host and port.
"""

from __future__ import annotations

import http.server
import threading
from urllib.parse import urlsplit

import bed
import pytest
from dispatcher_bed import DispatcherProc, dispatcher_config, job, wait_states
from hypothesis import given, settings
from hypothesis import strategies as st
from sms_milter.xmlapi.callback import CallbackUrl, parse_url, url_problem
from spool_helpers import add_jobs
from test_dispatcher import Bed
from test_xml import XmlBed, accepted, recipients, request, value, xb  # noqa: F401 (the fixture)

# --------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("url", [
    "http://127.0.0.1\\@callbacks.example.com/",
    "http://evil.example\\@callbacks.example.com/x",
    "http://user@callbacks.example.com/",
    "http://callbacks.example.com@127.0.0.1/",
    "http://callbacks.example.com:99999/",
    "http://callbacks.example.com:80:81/",
    "http://callbacks.example.com /",
    "http://[::1/",
    "http:///path",
    "ftp://callbacks.example.com/",
    "http://callbacks.example.com\t/",
    "http://127.1/",
])
def test_urls_that_parsers_read_differently_are_refused(url):
    assert url_problem(url, ("callbacks.example.com", "127.0.0.1", "127.1")) is not None


def test_accepted_urls_and_their_parts():
    want = CallbackUrl("http", "callbacks.example.com", 80, "/dlr?a=1")
    assert parse_url("HTTP://Callbacks.Example.COM./dlr?a=1") == want
    assert parse_url("https://[::1]:8443?x") == CallbackUrl("https", "::1", 8443, "/?x")
    assert url_problem("http://callbacks.example.com:8080/p#frag", ("callbacks.example.com",)) is None


_chars = st.sampled_from(list("abc019.:/@\\?#[]%-_~ ") + ["\t", "\x00", "é"])


@settings(max_examples=400, deadline=None)
@given(st.text(_chars, max_size=40), st.sampled_from(["http://", "https://", "HTTP://", "http:/", ""]))
def test_whatever_the_parser_accepts_urllib_reads_the_same(tail, scheme):
    u = parse_url(scheme + tail)
    if isinstance(u, str):
        return
    for text in (scheme + tail, str(u)):
        s = urlsplit(text)
        assert (s.hostname or "").rstrip(".") == u.host
        assert (s.port or (80 if u.scheme == "http" else 443)) == u.port
    assert parse_url(str(u)) == u


# --------------------------------------------------------------------------- at SMTP time


def test_backslash_userinfo_url_is_refused_by_the_milter(xb: XmlBed) -> None:  # noqa: F811
    n, _ = bed.unique_number()
    ref = bed.unique("w")
    body = (recipients((n, ref)) + "<MessageData>x</MessageData>"
            "<URLDeliveryNotification>http://evil.example\\@127.0.0.1/dlr</URLDeliveryNotification>")
    result, mid = xb.send(request("SendTextSMS", body))
    accepted(result)
    assert value(xb.reply_to(mid), "ErrorCode") == "18"


# --------------------------------------------------------------------------- redirects


class _Server:
    def __init__(self, host: str, redirects: dict[str, str] | None = None):
        self.hits: list[str] = []
        hits, redirects = self.hits, redirects or {}

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                target = redirects.get(self.path.split("?", 1)[0])
                self.send_response(302 if target else 200)
                if target:
                    self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer((host, 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def test_redirects_are_checked_against_the_allowlist_at_every_hop(tmp_path):
    with bed.MailSink() as sink:
        b = Bed(tmp_path, sink.port)
        other = _Server("127.0.0.2")  # not in the allowlist
        home = _Server("127.0.0.1", {
            "/hop": "/final",  # relative, same host: followed
            "/away": f"http://127.0.0.2:{other.port}/stolen",  # another host: not followed
            "/sneaky": f"http://127.0.0.2\\@127.0.0.1:{other.port}/stolen",  # read differently: refused
        })
        try:
            b.start_smsc()
            base = f"http://127.0.0.1:{home.port}"
            ids = add_jobs(b.spool, [
                job("+41791380001", "cb", trans_ref="R1", urls={"delivered": f"{base}/hop"}),
                job("+41791380002", "cb", trans_ref="R2", urls={"delivered": f"{base}/away"}),
                job("+41791380003", "cb", trans_ref="R3", urls={"delivered": f"{base}/sneaky"}),
            ])
            cfg = dispatcher_config(tmp_path, b.smsc.port, sink.port, spool_path=tmp_path / "spool.sqlite3",
                                    smpp={"password": "Pw-77sec"},
                                    extra={"xml": {"allowed_url_hosts": ["127.0.0.1"]}})
            d = DispatcherProc(cfg, tmp_path / "d.log").start()
            b.procs.append(d)
            wait_states(b.spool, ids, {"delivered"}, timeout=20, detail=b.detail)
            bed.wait_until(lambda: d.log().count("not allowed") >= 2 and "/final" in home.hits, 15,
                           "one redirect followed, two refused", detail=d.log_tail)
            assert sorted(home.hits) == ["/away?ID=R2", "/final", "/hop?ID=R1", "/sneaky?ID=R3"]
            assert other.hits == []
        finally:
            home.close()
            other.close()
            b.close()
