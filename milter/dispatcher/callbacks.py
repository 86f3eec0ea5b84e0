"""The dispatcher's listener for delivery reports over HTTP (Kannel `dlr-url`, vendor webhooks).

One listener per configured address, shared by every HTTP provider that names it; each
provider is found by its unguessable token in the path:

    GET|POST /dlr/<token>/<reference>/<parts>[?fields]    (the URL the provider got per job)
    GET|POST /dlr/<token>[?fields]                        (webhooks carrying the provider's message id)

Fields are read from the query, a form body or a JSON body (dotted paths). A report is
answered 200 only after the engine has stored it in the spool (applied, or kept as an
orphan as SMPP receipts are); 503 if that did not happen within the provider's callback
timeout (the provider sends it again). Hostile clients: the request head is at most
MAX_HEAD bytes and MAX_HEADERS lines, the body at most `max_body` bytes (413), chunked
bodies are refused (411), the whole request must arrive within the timeout (slow clients
are cut off; one asyncio loop serves every connection, so none can stall the others), at
most MAX_CONNECTIONS at once. A wrong token is 404 and logged without the path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import threading
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .quietlog import QuietLog

log = logging.getLogger("sms_milter.dispatcher.callbacks")

MAX_HEAD = 8192  # bytes of request line + headers
MAX_HEADERS = 64
MAX_CONNECTIONS = 512
IDLE = 15.0  # seconds a kept-alive connection may wait for its next request
_PATH = re.compile(r"/dlr/([A-Za-z0-9_-]{1,200})(?:/([A-Za-z0-9_.:-]{1,128})/(\d{1,3}))?/?")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


class Ack:
    """A report's token: answered once the engine has acknowledged all its receipts (stored)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.left = n
        self.lock = threading.Lock()

    def done_one(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def flatten(data: Any, prefix: str = "", out: dict[str, str] | None = None) -> dict[str, str]:
    """A JSON document as dotted paths -> scalar strings."""
    out = {} if out is None else out
    if isinstance(data, dict):
        for k, v in data.items():
            flatten(v, f"{prefix}{k}.", out)
    elif isinstance(data, list):
        for i, v in enumerate(data[:100]):
            flatten(v, f"{prefix}{i}.", out)
    elif data is not None and len(out) < 1000:
        out[prefix[:-1]] = ("true" if data else "false") if isinstance(data, bool) else str(data)
    return out


class CallbackServer:
    _servers: dict[str, CallbackServer] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def attach(cls, listen: str, token: str, target: Any) -> CallbackServer:
        """The listener on `listen` (started on first use) with `target` answering for `token`."""
        with cls._registry_lock:
            srv = cls._servers.get(listen)
            if srv is None:
                srv = cls._servers[listen] = CallbackServer(listen)
            srv.targets[token] = target
        return srv

    def detach(self, token: str) -> None:
        with self._registry_lock:
            self.targets.pop(token, None)
            if not self.targets:
                self._servers.pop(self.listen, None)
                self.stop()

    def __init__(self, listen: str):
        self.listen = listen
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.targets: dict[str, Any] = {}
        self.quiet = QuietLog(logger=log)
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name=f"dlr-http-{listen}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.create_task(self._listen())
        self.loop.run_forever()
        self.loop.close()

    async def _listen(self) -> None:
        wait = 1.0
        while True:
            try:
                self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD,
                                                          backlog=1024, reuse_address=True)
                log.info("delivery reports over HTTP: listening on %s", self.listen)
                self.ready.set()
                return
            except OSError as e:
                self.quiet.log(logging.ERROR, f"listen {self.listen}",
                               "cannot listen for delivery reports on %s: %s; trying again", self.listen,
                               e.strerror or e)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 30.0)

    def stop(self) -> None:
        def shut() -> None:
            if self._server is not None:
                self._server.close()
            self.loop.stop()

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(shut)
        self._thread.join(5.0)

    def _target(self, token: str) -> Any:
        found = None
        for t, target in list(self.targets.items()):
            if hmac.compare_digest(t.encode(), token.encode()):
                found = target
        return found

    @property
    def timeout(self) -> float:
        return max((t.cfg.callback.timeout for t in list(self.targets.values())), default=10.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                await self._answer(writer, 503, "too many connections", close=True)
                return
            first = True
            while True:
                keep = await self._one(reader, writer, self.timeout if first else IDLE)
                first = False
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 (one connection's trouble never stops the listener)
            log.exception("delivery report listener: unexpected error")
        finally:
            self.connections -= 1
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float) -> bool:
        """One request; True to keep the connection for another."""
        timeout = self.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait)
        except asyncio.IncompleteReadError:
            return False
        except asyncio.LimitOverrunError:
            await self._answer(writer, 431, f"request head over {MAX_HEAD} bytes", close=True)
            return False
        except TimeoutError:
            await self._answer(writer, 408, f"request not received within {wait:g}s", close=True)
            return False
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split(" ")
        if len(request) != 3 or not request[2].startswith("HTTP/1."):
            await self._answer(writer, 400, "not an HTTP/1.x request line", close=True)
            return False
        method, target, version = request
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip() or len(headers) >= MAX_HEADERS:
                await self._answer(writer, 431 if sep else 400, "bad or too many header lines", close=True)
                return False
            headers[name.strip().lower()] = value.strip()
        close = headers.get("connection", "").lower() == "close" or (
            version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive")
        if "transfer-encoding" in headers:
            await self._answer(writer, 411, "send the body with a Content-Length", close=True)
            return False
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or len(length_text) > 12:
            await self._answer(writer, 400, "bad Content-Length", close=True)
            return False
        length = int(length_text)
        path = unquote(urlsplit(target).path)
        m = _PATH.fullmatch(path)
        provider = self._target(m.group(1)) if m else None
        if provider is None:
            peer = (writer.get_extra_info("peername") or ("?",))[0]
            self.quiet.log(logging.WARNING, "unknown token", "delivery report to an unknown callback path "
                           "(wrong or old token) from %s: 404", peer)
            await self._answer(writer, 404, "unknown callback", close=True)
            return False
        assert m is not None
        if method not in ("GET", "POST"):
            await self._answer(writer, 405, "use GET or POST", close=True)
            return False
        cb = provider.cfg.callback
        if length > cb.max_body:
            await self._answer(writer, 413, f"body over {cb.max_body} bytes", close=True)
            return False
        try:
            body = await asyncio.wait_for(reader.readexactly(length), max(0.0, deadline - loop.time()))
        except TimeoutError:
            await self._answer(writer, 408, f"body not received within {timeout:g}s", close=True)
            return False
        fields, why = self._fields(target, headers.get("content-type", ""), body)
        if why:
            await self._answer(writer, 400, why, close=close)
            return not close
        if m.group(2) is None and not cb.ref_field:
            await self._answer(writer, 404, "unknown callback", close=True)
            return False
        receipts = provider.receipts_for(fields, m.group(2) or "", int(m.group(3) or 1))
        if isinstance(receipts, str):
            self.quiet.log(logging.WARNING, f"refused {provider.name} {receipts}",
                           "%s: delivery report refused (400): %s", provider.name, receipts)
            await self._answer(writer, 400, receipts, close=close)
            return not close
        if receipts:
            ack = Ack(loop, len(receipts))
            provider.hand_in([replace(r, token=ack) for r in receipts])
            try:
                await asyncio.wait_for(asyncio.shield(ack.future), cb.timeout)
            except TimeoutError:
                self.quiet.log(logging.WARNING, f"slow spool {provider.name}", "%s: delivery report not "
                               "stored within %gs: answered 503 (the provider sends it again)", provider.name,
                               cb.timeout)
                await self._answer(writer, 503, "not stored yet; send it again", close=close)
                return not close
        await self._answer(writer, 200, "OK", close=close)
        return not close

    @staticmethod
    def _fields(target: str, ctype: str, body: bytes) -> tuple[dict[str, str], str]:
        fields = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True, errors="replace"))
        if not body:
            return fields, ""
        text = body.decode("utf-8", "replace")
        if "json" in ctype.lower() or text.lstrip().startswith(("{", "[")):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                return fields, "the body is not valid JSON"
            fields.update(flatten(data))
        else:
            fields.update(parse_qsl(text, keep_blank_values=True, errors="replace"))
        return fields, ""

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, text: str, close: bool) -> None:
        body = (text + "\n").encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}"
                "\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), 5.0)
        except (ConnectionError, TimeoutError):
            pass
