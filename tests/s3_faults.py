"""A fault-injecting HTTP proxy in front of the local S3 server (127.0.0.1 only).

Point a client's ``endpoint_url`` at :attr:`FaultProxy.url`; every request is
forwarded to moto unless a :class:`Fault` rule matches it, in which case the
client gets what a real bucket sends under stress: ``503 SlowDown``, a
``500``, a ``403 AccessDenied``, a connection closed with no answer, or a
request applied whose answer is lost on the way back.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclass
class Fault:
    path: str  # a regex searched in the request path (bucket/key)
    status: int | str = 503  # an HTTP status from ERRORS, "reset", or "answer-lost" (forwarded, answer dropped)
    methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE")
    probability: float = 1.0
    times: int | None = None  # at most this many hits, then the rule is spent


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0):
        self.upstream = urlparse(upstream)
        self.faults: list[Fault] = []
        self.injected: list[tuple[str, str, int | str]] = []
        self.requests = 0
        self.delay = 0.0  # seconds added to every forwarded request: a bucket's latency
        self.in_flight = self.max_in_flight = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests += 1
            for fault in self.faults:
                if method in fault.methods and re.search(fault.path, path) and fault.times != 0:
                    if self._random.random() < fault.probability:
                        if fault.times is not None:
                            fault.times -= 1
                        self.injected.append((method, path, fault.status))
                        return fault
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault_for(self.command, self.path)
                if fault is not None and fault.status == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None and fault.status == "answer-lost":  # applied upstream, the answer never comes
                    upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    upstream.getresponse().read()
                    upstream.close()
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    code, message = ERRORS[fault.status]
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload if self.command != "HEAD" else b"")
                    return
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    time.sleep(proxy.delay)
                    self._relay(body)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _relay(self, body):
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")
                }
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(name, value)
                # a HEAD answer carries the object's length, not its own
                self.send_header(
                    "Content-Length",
                    response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        return Handler
