"""A front for the real local FHIR server, as a hospital puts one before its FHIR endpoint: a reverse
proxy that may speak TLS (optionally demanding a client certificate) and may refuse requests that lack
the right Authorization header.

Standard library only; listens on 127.0.0.1 (a free port) and forwards only to a plain-http loopback
upstream. Absolute URLs in responses (Bundle links, fullUrl, Location) are rewritten from the upstream
base to the front's base, and back in request bodies, so paging continues through the front. `documents`
are JSON answered by the front itself (e.g. .well-known/smart-configuration, which a gateway serves)."""

from __future__ import annotations

import base64
import hmac
import http.client
import json
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler

from loopback import LoopbackServer, Serving
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

Gate = Callable[[Mapping[str, str]], "int | None"]  # request headers -> None to let through, else a status

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "host", "accept-encoding", "date", "server",
})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context; with `client_ca`, a client certificate signed by it is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


def basic_gate(username: str, password: str) -> Gate:
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def gate(headers: Mapping[str, str]) -> int | None:
        return None if hmac.compare_digest(headers.get("Authorization", ""), expected) else 401

    return gate


def bearer_gate(token: str) -> Gate:
    def gate(headers: Mapping[str, str]) -> int | None:
        return None if hmac.compare_digest(headers.get("Authorization", ""), f"Bearer {token}") else 401

    return gate


class Front(Serving):
    def __init__(self, upstream_base_url: str, tls: ssl.SSLContext | None = None, gate: Gate | None = None,
                 documents: dict[str, dict] | None = None):
        upstream = urlsplit(upstream_base_url.rstrip("/"))
        if upstream.scheme != "http" or upstream.hostname not in _LOOPBACK:
            raise ValueError("the front forwards only to a plain-http loopback server")
        self.upstream = upstream
        self.tls = tls
        self.gate = gate
        self.documents = {path.rstrip("/"): doc for path, doc in (documents or {}).items()}
        self.statuses: Counter[int] = Counter()  # answers given, by status
        self.paths: list[str] = []  # request targets received, in order
        self.handshake_failures = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        port = self._server.server_address[1]
        scheme = "https" if tls else "http"
        self.base_url = f"{scheme}://127.0.0.1:{port}{upstream.path}"
        self._upstream_origin = f"http://{upstream.netloc}".encode()
        self._front_origin = f"{scheme}://127.0.0.1:{port}".encode()
        self._serve_in_background("front")

    def _note(self, status: int, path: str) -> None:
        with self._lock:
            self.statuses[status] += 1
            self.paths.append(path)

    def _to_front(self, data: bytes) -> bytes:
        return _swap(data, self._upstream_origin, self._front_origin)

    def _to_upstream(self, data: bytes) -> bytes:
        return _swap(data, self._front_origin, self._upstream_origin)


def _swap(data: bytes, old: bytes, new: bytes) -> bytes:
    # JSON may escape the solidus ("http:\/\/host"); rewrite both spellings.
    return data.replace(old, new).replace(old.replace(b"/", b"\\/"), new.replace(b"/", b"\\/"))


class _Server(LoopbackServer):
    @property
    def front(self):
        return self.owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up, or fails the TLS handshake, is what some tests are about


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own
    server: _Server

    def setup(self) -> None:
        front = self.server.front
        if front.tls is not None:
            self.request.settimeout(self.timeout)
            try:
                # The handshake happens here, in this connection's thread, not in the accept loop.
                self.request = front.tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError):
                with front._lock:
                    front.handshake_failures += 1
                raise
        super().setup()

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        front = self.server.front
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path.rstrip("/")
        if path in front.documents and self.command == "GET":
            return self._answer(200, {"Content-Type": "application/json"}, json.dumps(front.documents[path]).encode())
        refused = front.gate(self.headers) if front.gate else None
        if refused is not None:
            outcome = {"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "login", "diagnostics": "not authenticated"}]}
            return self._answer(refused, {"Content-Type": "application/fhir+json",
                                          "WWW-Authenticate": 'Bearer realm="fhir"'}, json.dumps(outcome).encode())
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"authorization"}}
        upstream = http.client.HTTPConnection(front.upstream.hostname, front.upstream.port or 80, timeout=60)
        try:
            upstream.request(self.command, self.path, body=front._to_upstream(body) if body else None,
                             headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            answer_headers = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
        finally:
            upstream.close()
        for name in ("Location", "Content-Location"):
            if name in answer_headers:
                answer_headers[name] = front._to_front(answer_headers[name].encode()).decode()
        self._answer(response.status, answer_headers, front._to_front(payload))

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.server.front._note(status, self.path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
