"""A fault-injecting HTTP reverse proxy for tests: the adapter talks to it, it talks to the real local FHIR
server, and now and then it fails the way networks, gateways and busy servers fail.

Standard library only. Listens on 127.0.0.1 (a free port) and forwards only to a loopback upstream; stops
when its context exits. Which request fails, and how, comes from a seeded generator: one stream per HTTP
method, so the n-th POST meets the same fate however many GETs came before it. A POST that only reads (a
batch Bundle of GET searches) is a read with a stream of its own: it never counts as a write, and the
writes' fates do not depend on how many of them came first. Kinds are drawn from a
shuffled bag (every kind once before any repeats), so a short run still sees a variety of faults.

A write (any method but GET/HEAD) may be forwarded and *then* failed: the server applied it but the client
never hears so. Counted as `lost-write`; it is the case that proves the client's writes are idempotent.

Absolute URLs in responses (Bundle links, fullUrl, Location headers) are rewritten from the upstream base to
the proxy base, so paging continues through the proxy."""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from loopback import LoopbackServer, Serving
from urllib.parse import urlsplit

DROP = "drop"  # close the connection without a response
RESET = "reset"  # status line, headers and part of the body, then a TCP reset
RATE_LIMITED = "429"  # 429 with Retry-After in seconds
UNAVAILABLE = "503"  # 503 with an OperationOutcome
SLOW = "slow"  # a short delay (below any sane client timeout), then the real answer
TRUNCATED = "truncated"  # Content-Length promises the whole body; half of it is sent, then the connection closes
CUT = "cut"  # half of the body, with a Content-Length that matches it: a 200 whose JSON is broken
HTML_502 = "html-502"  # a gateway's HTML error page
LOST_WRITE = "lost-write"  # counter only: a write forwarded to the server, then failed towards the client

ALL_KINDS = (DROP, RESET, RATE_LIMITED, UNAVAILABLE, SLOW, TRUNCATED, CUT, HTML_502)
# Kinds that need the real response (they damage it); for a write they always mean the server applied it.
_AFTER_FORWARD = frozenset({RESET, TRUNCATED, CUT})
BATCH_READ = "POST (a batch of searches)"  # the fault stream and request count of a POST that only reads
_READ_METHODS = frozenset({"GET", "HEAD", BATCH_READ})
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "host", "accept-encoding", "date", "server",
})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

_HTML_502_PAGE = b"""<html>
<head><title>502 Bad Gateway</title></head>
<body>
<center><h1>502 Bad Gateway</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""


def _outcome(code: str, text: str) -> bytes:
    return (
        '{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"%s","diagnostics":"%s"}]}'
        % (code, text)
    ).encode()


@dataclass(frozen=True)
class Fault:
    kind: str
    after_forward: bool  # the upstream server got (and answered) the request first


class _Plan:
    """Seeded fate of each request, per method."""

    def __init__(self, seed: int, rate: float, kinds: tuple[str, ...], write_applied_share: float,
                 max_faults: int | None):
        self.seed = seed
        self.rate = rate
        self.kinds = kinds
        self.write_applied_share = write_applied_share
        self.faults_left = max_faults
        self._streams: dict[str, random.Random] = {}
        self._bags: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def next(self, method: str) -> Fault | None:
        with self._lock:
            rng = self._streams.setdefault(method, random.Random(f"{self.seed}:{method}"))
            if not self.kinds or self.faults_left == 0 or rng.random() >= self.rate:
                return None
            if self.faults_left is not None:
                self.faults_left -= 1
            bag = self._bags.setdefault(method, [])
            if not bag:
                bag.extend(self.kinds)
                rng.shuffle(bag)
            kind = bag.pop()
            if kind in _AFTER_FORWARD:
                return Fault(kind, after_forward=True)
            if kind == SLOW:
                return Fault(kind, after_forward=False)
            applied = method not in _READ_METHODS and rng.random() < self.write_applied_share
            return Fault(kind, after_forward=applied)


class FaultProxy(Serving):
    """The running proxy. `base_url` replaces the upstream base; `counts` says what was injected."""

    def __init__(self, upstream_base_url: str, rate: float = 0.2, seed: int = 1,
                 kinds: tuple[str, ...] = ALL_KINDS, write_applied_share: float = 0.5,
                 slow_s: tuple[float, float] = (0.2, 0.5), retry_after: tuple[str, ...] = ("0", "1"),
                 max_faults: int | None = None):
        upstream = urlsplit(upstream_base_url.rstrip("/"))
        if upstream.scheme != "http" or upstream.hostname not in _LOOPBACK:
            raise ValueError("the fault proxy forwards only to a plain-http loopback server")
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        self.upstream_base_url = upstream_base_url.rstrip("/")
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port or 80
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.counts: Counter[str] = Counter()  # injected faults by kind, plus LOST_WRITE
        self.requests: Counter[str] = Counter()  # requests received, by method
        self.forwarded: Counter[str] = Counter()  # requests the upstream server answered, by method
        self._plan = _Plan(seed, rate, tuple(kinds), write_applied_share, max_faults)
        self.held = 0  # requests that met `hold`
        self._hold_s = 0.0
        self._hold_from = 0  # requests received before the hold starts
        self._hold_after_method: str | None = None  # the hold starts after a request with this method
        self._hold_after_body = b""  # … whose body contains this
        self._received = 0
        self._released = threading.Event()
        self._jitter = random.Random(f"{seed}:jitter")
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}{upstream.path}"
        self._upstream_origin = f"http://{upstream.netloc}".encode()
        self._proxy_origin = f"http://127.0.0.1:{port}".encode()
        self._serve_in_background("fault-proxy")

    @property
    def injected(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != LOST_WRITE)

    def hold(self, seconds: float, after: int = 0, after_method: str | None = None,
             body_containing: bytes = b"") -> None:
        """Once `after` more requests have passed — or, with `after_method`, once a request with that
        method (and a body containing `body_containing`) has passed (e.g. "POST" and b'"transaction"': the
        first write went through) — every request waits this long before anything else happens (a hung
        server or gateway); `stop` releases them. 0 seconds ends it."""
        with self._lock:
            self._hold_s = seconds
            self._hold_from = self._received + after
            self._hold_after_method = after_method
            self._hold_after_body = body_containing

    def stop(self) -> None:
        self._released.set()  # held requests go first, or shutdown would wait for them
        super().stop()

    # -- used by the handler -------------------------------------------------------------------
    def _wait_if_held(self, method: str, body: bytes) -> None:
        with self._lock:
            self._received += 1
            waiting_for_method = self._hold_after_method is not None
            hold_s = self._hold_s if self._received > self._hold_from and not waiting_for_method else 0.0
            if waiting_for_method and method == self._hold_after_method and self._hold_after_body in body:
                self._hold_after_method = None  # this one passes; every later request is held
            self.held += bool(hold_s)
        if hold_s:
            self._released.wait(hold_s)

    def _decide(self, method: str) -> Fault | None:
        fault = self._plan.next(method)
        with self._lock:
            self.requests[method] += 1
            if fault is not None:
                self.counts[fault.kind] += 1
                if fault.after_forward and fault.kind != SLOW and method not in _READ_METHODS:
                    self.counts[LOST_WRITE] += 1
        return fault

    def _note_forwarded(self, method: str) -> None:
        with self._lock:
            self.forwarded[method] += 1

    def _delay(self) -> float:
        with self._lock:
            return self._jitter.uniform(*self.slow_s)

    def _retry_after(self) -> str:
        with self._lock:
            return self._jitter.choice(self.retry_after)

    def _to_proxy(self, data: bytes) -> bytes:
        return _swap(data, self._upstream_origin, self._proxy_origin)

    def _to_upstream(self, data: bytes) -> bytes:
        return _swap(data, self._proxy_origin, self._upstream_origin)


def _stream(method: str, body: bytes) -> str:
    """The fault stream of a request: its method, or BATCH_READ for a POST of a batch of GETs."""
    if method != "POST" or b'"batch"' not in body:
        return method
    try:
        bundle = json.loads(body)
    except ValueError:
        return method
    entries = bundle.get("entry") if isinstance(bundle, dict) and bundle.get("type") == "batch" else None
    reads = isinstance(entries, list) and bool(entries) and all(
        isinstance(e, dict) and isinstance(e.get("request"), dict) and e["request"].get("method") == "GET"
        for e in entries)
    return BATCH_READ if reads else method


def _swap(data: bytes, old: bytes, new: bytes) -> bytes:
    # JSON may escape the solidus ("http:\/\/host"); rewrite both spellings.
    escaped_old, escaped_new = old.replace(b"/", b"\\/"), new.replace(b"/", b"\\/")
    return data.replace(old, new).replace(escaped_old, escaped_new)


class _Server(LoopbackServer):
    @property
    def proxy(self):
        return self.owner


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 15  # an idle keep-alive connection ends by itself
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        if body is None:
            return
        proxy._wait_if_held(self.command, body)
        fault = proxy._decide(_stream(self.command, body))
        if fault is not None and fault.kind == SLOW:
            time.sleep(proxy._delay())
            fault = None
        if fault is not None and not fault.after_forward:
            self._fail(fault.kind, None)
            return
        answer = self._forward(body)
        if answer is None:
            return
        if fault is not None:
            self._fail(fault.kind, answer)
        else:
            self._answer(*answer)

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._answer(411, [("Content-Type", "text/plain")], b"chunked request bodies are not supported\n")
            self.close_connection = True
            return None
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes] | None:
        proxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Accept-Encoding"] = "identity"  # the body must stay readable to rewrite its links
        payload = proxy._to_upstream(body) if body else b""
        if payload or self.command not in _READ_METHODS:
            headers["Content-Length"] = str(len(payload))
        connection = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            connection.request(self.command, self.path, body=payload or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            answer_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            self._answer(502, [("Content-Type", "text/plain")], f"upstream failed: {exc!r}\n".encode())
            return None
        finally:
            connection.close()
        proxy._note_forwarded(self.command)
        rewritten = [
            (k, proxy._to_proxy(v.encode("latin-1")).decode("latin-1")
             if k.lower() in ("location", "content-location") else v)
            for k, v in answer_headers
        ]
        return status, rewritten, proxy._to_proxy(data)

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes,
                content_length: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _fail(self, kind: str, answer: tuple[int, list[tuple[str, str]], bytes] | None) -> None:
        proxy = self.server.proxy
        if kind == DROP:
            self.close_connection = True
        elif kind == RATE_LIMITED:
            self._answer(429, [("Content-Type", "application/fhir+json"), ("Retry-After", proxy._retry_after())],
                         _outcome("throttled", "too many requests"))
        elif kind == UNAVAILABLE:
            self._answer(503, [("Content-Type", "application/fhir+json")],
                         _outcome("transient", "service unavailable"))
        elif kind == HTML_502:
            self._answer(502, [("Content-Type", "text/html")], _HTML_502_PAGE)
        elif kind in (RESET, TRUNCATED, CUT):
            assert answer is not None
            status, headers, data = answer
            half = data[: len(data) // 2]
            if kind == CUT:
                self._answer(status, headers, half)
                return
            self._answer(status, headers, half, content_length=len(data))
            self.wfile.flush()
            self.close_connection = True
            if kind == RESET:
                # Linger 0: close() sends RST instead of FIN, as a crashed middlebox would.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
        else:  # pragma: no cover - kinds are checked in FaultProxy.__init__
            raise AssertionError(kind)


@contextmanager
def fault_proxy(upstream_base_url: str, rate: float = 0.2, seed: int = 1,
                kinds: tuple[str, ...] = ALL_KINDS, write_applied_share: float = 0.5,
                max_faults: int | None = None) -> Iterator[FaultProxy]:
    """Run a FaultProxy in front of `upstream_base_url` for the duration of the block. `rate` is the chance
    that a request fails; `max_faults` (None: no limit) stops injecting after that many faults."""
    proxy = FaultProxy(upstream_base_url, rate=rate, seed=seed, kinds=kinds,
                       write_applied_share=write_applied_share, max_faults=max_faults)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
