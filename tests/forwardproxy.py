"""A forward proxy for tests, as a hospital's egress proxy ($HTTP_PROXY / $HTTPS_PROXY): absolute-URI
requests (`GET http://host:port/path`) for plain HTTP, `CONNECT host:port` tunnels for HTTPS (the bytes
pass through untouched: TLS is still between the client and the server). It counts what passes.

Standard library only; listens on 127.0.0.1 (a free port) and forwards only to loopback targets."""

from __future__ import annotations

import http.client
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from loopback import LoopbackServer, Serving

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# Hop-by-hop headers, and those this server writes itself.
_NOT_PASSED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "date", "server",
})


class ForwardProxy(Serving):
    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str]] = []  # (method, absolute URI) of each plain-HTTP request
        self.tunnels: list[str] = []  # host:port of each CONNECT
        self.tunnelled_bytes = 0  # client -> server and back, through every tunnel
        self.refused: list[str] = []  # requests that were not for a loopback target, or not proxy requests
        self._lock = threading.Lock()
        self._server = LoopbackServer(("127.0.0.1", 0), _Handler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._serve_in_background("forward-proxy")

    @property
    def seen(self) -> int:
        with self._lock:
            return len(self.forwarded) + len(self.tunnels) + len(self.refused)

    def _note(self, kind: list, value: Any) -> None:
        with self._lock:
            kind.append(value)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own

    @property
    def proxy(self) -> ForwardProxy:
        return self.server.owner  # type: ignore[attr-defined]

    def do_CONNECT(self) -> None:  # noqa: N802
        host, _, port = self.path.rpartition(":")
        if host.strip("[]") not in _LOOPBACK or not port.isdigit():
            self.proxy._note(self.proxy.refused, self.path)
            return self._refuse(403)
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError:
            return self._refuse(502)
        self.proxy._note(self.proxy.tunnels, self.path)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self._relay(self.connection, upstream)
        self.close_connection = True

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        passed = 0
        try:
            peers = {client: upstream, upstream: client}
            while True:
                readable, _, _ = select.select(list(peers), [], [], self.timeout)
                if not readable:
                    return  # idle: let both sides go
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    passed += len(data)
        except OSError:
            return
        finally:
            upstream.close()
            with self.proxy._lock:
                self.proxy.tunnelled_bytes += passed

    def do_GET(self) -> None:  # noqa: N802
        self._forward()

    def do_POST(self) -> None:  # noqa: N802
        self._forward()

    def do_PUT(self) -> None:  # noqa: N802
        self._forward()

    def do_DELETE(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        target = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if target.scheme != "http" or target.hostname not in _LOOPBACK:
            # An origin-form request ("GET /path") means the client took us for the server.
            self.proxy._note(self.proxy.refused, self.path)
            return self._refuse(400)
        self.proxy._note(self.proxy.forwarded, (self.command, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_PASSED}
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            upstream.request(self.command, path or "/", body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            answer = [(k, v) for k, v in response.getheaders() if k.lower() not in _NOT_PASSED]
        except OSError:
            return self._refuse(502)
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for name, value in answer:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _refuse(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass
