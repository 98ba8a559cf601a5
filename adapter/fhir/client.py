"""One requests.Session to one FHIR server: timeouts on every call, one retry policy, safe paging."""

from __future__ import annotations

import email.utils
import json
import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson
import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from adapter.errors import (
    AuthError, FhirError, PermanentHttpError, SearchTruncated, Stopped, TransientHttpError,
)
from adapter.fhir.throttle import ThrottledAdapter, TokenBucket

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
# A body cut short after the headers (ChunkedEncodingError, a reset mid-body) is as transient as a
# refused connection: the request may or may not have taken effect, and every write we send is idempotent.
_TRANSPORT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
_STOP_POLL_S = 0.1  # how often a wait on the server looks for a stop request (SIGTERM/SIGINT)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # the first try and up to 5 retries
    budget_s: float = 120.0  # total time one call may spend retrying
    initial_s: float = 0.5  # backoff: 0.5, 1, 2, 4 … s plus up to initial_s of jitter
    max_wait_s: float = 30.0


class ConfiguredSession(requests.Session):
    """A Session whose TLS settings are the configured ones. requests lets $REQUESTS_CA_BUNDLE /
    $CURL_CA_BUNDLE override Session.verify (psf/requests#3829), silently replacing `verify = false` or a
    hospital CA bundle; environment proxies are still honoured.

    The environment's settings for a server are worked out once per session: requests scans the whole
    environment twice for every request ($HTTPS_PROXY, $NO_PROXY and every other *_proxy), a tenth of a ms
    each time, and the environment a process was started with does not change under it (cron, systemd, a
    pod). What they depend on (the url's host and port, the arguments, the session's own settings) is the
    key, so a different server or setting is worked out anew."""

    def __init__(self) -> None:
        super().__init__()
        self._environment_settings: dict[tuple[Any, ...], dict[str, Any]] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        key = (urlsplit(url).netloc, tuple((proxies or {}).items()), stream, verify, cert,
               tuple(self.proxies.items()), self.stream, self.verify, self.cert, self.trust_env)
        settings = self._environment_settings.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None:
                settings["verify"] = self.verify
            self._environment_settings[key] = settings
        return {**settings, "proxies": settings["proxies"].copy()}  # the caller's to change


def session(verify: bool | str = True, cert: str | tuple[str, str] | None = None) -> requests.Session:
    http = ConfiguredSession()
    http.verify, http.cert = verify, cert
    return http


class FhirClient:
    def __init__(
        self,
        base_url: str,
        session: requests.Session,
        timeout_s: float = 30.0,
        max_pages: int = 10_000,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        limit: TokenBucket | None = None,
        stop: threading.Event | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout_s = timeout_s
        self.max_pages = max_pages
        self.retry = retry
        self._sleep = sleep
        if limit is not None:  # [fhir] max_requests_per_s; the token endpoint has its own session, unlimited
            for scheme in ("https://", "http://"):
                session.mount(scheme, ThrottledAdapter(limit))
        self.stop = stop  # set by a signal (adapter/stopping.py): waits on the server give up at once
        self.requests_by_status: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._hold_next_prefetch = False
        self._held: set[_Permit] = set()  # prefetches waiting for `release_prefetch`
        session.headers.setdefault("Accept", FHIR_JSON)

    def _count(self, status: str) -> None:
        with self._count_lock:  # the prefetch thread counts too
            self.requests_by_status[status] += 1

    @property
    def request_count(self) -> int:
        return sum(self.requests_by_status.values())

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @contextmanager
    def prefetch_held(self) -> Iterator[None]:
        """A page prefetched by a search step inside this block waits to be sent until `release_prefetch`
        (or until the search is asked for it): a caller about to send requests of its own (lookups, writes)
        keeps them from queueing behind a page fetch on a server that serves one request at a time, and
        lets the fetch overlap its own CPU afterwards instead."""
        self._hold_next_prefetch = True
        try:
            yield
        finally:
            self._hold_next_prefetch = False

    def release_prefetch(self) -> None:
        with self._count_lock:
            held, self._held = self._held, set()
        for permit in held:
            permit.set()

    def get(self, path_or_url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._call("GET", self._url(path_or_url), params=params)

    def update(self, path: str, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT one resource to its own id. Retried: a PUT to a fixed id is idempotent."""
        return self._call("PUT", self._url(path), body=resource)

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction/batch Bundle. Retried: every entry we send is a conditional (idempotent) write.
        `Prefer: return=minimal`: each entry's status and location are all we read of the answer; without it a
        server echoes every resource we sent, which it must serialise and we must parse."""
        return self._call("POST", self.base_url, body=bundle, minimal=True)

    def batch(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a batch Bundle of reads (searches) and return the batch-response, whose entries carry what
        each read answered. Retried, as reads are; no `Prefer: return=minimal`: the answers are the point."""
        return self._call("POST", self.base_url, body=bundle)

    def search(self, resource_type: str, params: dict[str, Any],
               first: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield search result pages (Bundles), following `next` exactly as given (CONTRACT §3).
        `first`: the search's first page, already in hand (answered inside a batch): paging goes on from it.

        The next page is fetched in the background while the caller works on this one, so the server
        pages while we classify and write (reads only: nothing about commit order changes)."""
        seen_links: set[str] = set()
        permit: _Permit | None = None
        if self._stopping():
            raise Stopped("stop requested")
        if first is None:
            pending = in_background(self._attempts, "GET", f"{self.base_url}/{resource_type}", params, None)
        else:
            pending = Future()
            pending.set_result(first)
        try:
            for _ in range(self.max_pages):
                bundle = self._await(pending)
                if bundle.get("resourceType") != "Bundle":
                    raise PermanentHttpError(
                        f"search answered a {bundle.get('resourceType')!r}, not a Bundle")
                entries = bundle.get("entry")
                if entries is not None and not isinstance(entries, list):
                    raise PermanentHttpError("search answered a Bundle whose entry is not a list")
                if not entries:
                    return
                refused: PermanentHttpError | None = None
                try:
                    url = self._next_link(bundle)
                except PermanentHttpError as exc:  # this page is good: hand it over, then refuse
                    url, refused = None, exc
                looped = url in seen_links
                if looped:
                    url = None
                if url is not None:
                    seen_links.add(url)
                    permit = _Permit()
                    if self._hold_next_prefetch:
                        self._hold_next_prefetch = False
                        with self._count_lock:
                            self._held.add(permit)
                    else:
                        permit.set()
                    pending = in_background(self._prefetch, permit, url)
                yield bundle
                if url is not None:
                    permit.set()  # asked for: it goes now, held or not
                if refused is not None:
                    raise refused
                if looped:
                    raise SearchTruncated("paging stopped: the server repeated a next link")
                if url is None:
                    return
            raise SearchTruncated(f"paging stopped at the page cap ({self.max_pages} pages)")
        finally:
            # A search ended early lets its prefetch finish first, as before (a held one is not sent at
            # all); after a stop it is left to its daemon thread (a read: nothing depends on it).
            if permit is not None and not permit.is_set():
                permit.cancelled = True  # never sent: its thread returns at once
                permit.set()
                with self._count_lock:
                    self._held.discard(permit)
            while not pending.done() and not self._stopping():
                wait([pending], timeout=_STOP_POLL_S)

    def _prefetch(self, permit: _Permit, url: str) -> dict[str, Any]:
        permit.wait()
        if permit.cancelled:
            return {}
        return self._attempts("GET", url, None, None)

    def _next_link(self, bundle: dict[str, Any]) -> str | None:
        links = bundle.get("link") if isinstance(bundle.get("link"), list) else []
        for link in links:
            if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
                resolved = urljoin(self.base_url + "/", link["url"])
                if not _same_origin(resolved, self.base_url):
                    # Credentials must never leave the configured server.
                    raise PermanentHttpError("a next link points away from the configured server; refused")
                return resolved
        return None

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            if not _same_origin(path_or_url, self.base_url):
                raise PermanentHttpError("refusing a URL on another server")
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def send(self, method: str, url: str, params: Any = None, headers: dict[str, str] | None = None,
             stream: bool = False, after_stop: bool = False) -> requests.Response:
        """One request whose answer is not a JSON resource (Bulk Data: a 202 without a body, an NDJSON
        stream), under the same origin check, retry policy, stop and error types as every other call.
        The caller reads the response and closes it. `after_stop`: sent once even after a stop (the
        DELETE that cancels an export job we leave behind)."""
        url = self._url(url)
        if after_stop:
            return self._send_once(method, url, params, headers, stream)
        return self._guarded(lambda *args: self._retrying()(self._send_once, *args),
                             method, url, params, headers, stream)

    def on_this_server(self, url: str) -> bool:
        return _same_origin(url, self.base_url)

    def _send_once(self, method: str, url: str, params: Any, headers: dict[str, str] | None,
                   stream: bool, body: Any = None) -> requests.Response:
        """One try: the response when it is not an error; else the error type the retry policy reads."""
        try:
            response = self.session.request(method, url, params=params,
                                            data=None if body is None else orjson.dumps(body), headers=headers,
                                            stream=True, timeout=self.timeout_s)
            if not stream:
                _read_whole(response)
        except requests.exceptions.SSLError as exc:
            self._count("error")
            raise _tls_error(method, url, exc) from None
        except _TRANSPORT_ERRORS as exc:
            self._count("error")
            raise TransientHttpError(f"{method} failed: {type(exc).__name__}") from None
        self._count(str(response.status_code))
        status = response.status_code
        if status < 400:
            return response
        with response:  # an error body is small: read it for the OperationOutcome codes, then let go
            if status in AUTH_STATUSES:
                raise AuthError(f"the server refused our credentials ({status} on {method})")
            if status in RETRY_STATUSES:
                raise TransientHttpError(
                    f"{method} answered {status}", retry_after_s=_retry_after(response), status=status
                )
            raise PermanentHttpError(f"{method} answered {status}{_outcome_summary(response)}", status=status)

    def _call(self, method: str, url: str, params: Any = None, body: Any = None, minimal: bool = False) -> dict[str, Any]:
        return self._guarded(self._attempts, method, url, params, body, minimal)

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        if self.stop is None:
            return call(*args)
        if self.stop.is_set():
            raise Stopped("stop requested")  # nothing new is sent after a stop
        return self._await(in_background(call, *args))

    def _await(self, pending: Future) -> Any:
        """The call's result; with a stop installed, give up waiting as soon as a stop is requested.
        The request is left to its daemon thread: given up, a read costs nothing, and a write is
        either applied or not — the page's state rolls back and the rerun repeats the idempotent PUT."""
        if self.stop is not None:
            while not pending.done():
                if self.stop.is_set():
                    raise Stopped("stop requested: the request in flight is given up")
                wait([pending], timeout=_STOP_POLL_S)
        return pending.result()

    def _attempts(self, method: str, url: str, params: Any = None, body: Any = None,
                  minimal: bool = False) -> dict[str, Any]:
        return self._retrying()(self._once, method, url, params, body, minimal)

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception_type(TransientHttpError),
            wait=_wait_honouring_retry_after(
                wait_exponential(multiplier=self.retry.initial_s, max=self.retry.max_wait_s)
                + wait_random(0, self.retry.initial_s)
            ),
            stop=stop_after_attempt(self.retry.attempts) | stop_after_delay(self.retry.budget_s)
            | _stop_requested(self._stopping),
            reraise=True,
            before_sleep=_log_retry,
            sleep=self._pause,
        )

    def _pause(self, seconds: float) -> None:
        if self.stop is not None:
            self.stop.wait(seconds)  # (a background thread: a stop ends the backoff early)
        else:
            self._sleep(seconds)

    def _once(self, method: str, url: str, params: Any, body: Any, minimal: bool = False) -> dict[str, Any]:
        headers = {"Content-Type": FHIR_JSON} if body is not None else None
        if minimal:
            headers = {**(headers or {}), "Prefer": "return=minimal"}
        response = self._send_once(method, url, params, headers, stream=False, body=body)
        status = response.status_code
        try:
            parsed = _parsed(response)
        except (ValueError, json.JSONDecodeError):
            # A proxy's HTML page or a body cut short: worth another try, then exit 3.
            raise TransientHttpError(f"{method} answered {status} with a body that is not JSON") from None
        if not isinstance(parsed, dict):
            raise TransientHttpError(f"{method} answered {status} with JSON that is not a resource")
        return parsed


class _Permit(threading.Event):
    """A prefetch's permission to be sent (set); cancelled when its search ended before granting it."""

    cancelled = False


def in_background(call: Callable[..., Any], *args: Any) -> Future:
    """Run one call on a daemon thread. A ThreadPoolExecutor's workers are joined when the interpreter
    exits, so a request given up after a stop would hold the exit for its whole timeout; this does not."""
    future: Future = Future()

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call(*args))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            future.set_exception(exc)

    threading.Thread(target=work, name="fhir-call", daemon=True).start()
    return future


class _stop_requested(stop_base):
    """Retry no more once a stop is requested (the caller has given up waiting anyway)."""

    def __init__(self, stopping: Callable[[], bool]):
        self.stopping = stopping

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.stopping()


def _tls_error(method: str, url: str, exc: requests.exceptions.SSLError) -> Exception:
    """A certificate that fails verification will fail the same way on every retry: say what to fix.
    Other TLS failures (a handshake cut short) stay transient."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__ or (cause.args[0] if cause.args and
                                                         isinstance(cause.args[0], BaseException) else None)
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.netloc}"
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = cause.verify_message or cause.reason or "certificate rejected"
        return FhirError(f"TLS verification of {where} failed ({reason}); set fhir.verify to the CA bundle "
                         "that signed its certificate")
    reason = getattr(cause, "reason", None) or type(cause or exc).__name__
    return TransientHttpError(f"{method} to {where} failed in TLS ({reason})")


def _same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, _port(a)) == (b.scheme, b.hostname, _port(b))


def _port(parts: Any) -> int | None:
    try:
        return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds or as an HTTP-date (RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _wait_honouring_retry_after:
    """The server's Retry-After when it gave one (capped by the fallback's maximum), else the fallback."""

    def __init__(self, fallback: Any, cap_s: float = 120.0):
        self.fallback = fallback
        self.cap_s = cap_s

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientHttpError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.cap_s)
        return self.fallback(state)


def _parsed(response: requests.Response) -> Any:
    """The body as JSON. orjson parses a page of Observations in about half the time of the standard
    library. What it refuses and the standard library reads (NaN, a lone surrogate, a byte-order mark,
    another encoding than UTF-8) goes to the standard library, as before, so we read all we read before.
    The one silent difference: an integer beyond 64 bits comes back a float, not an int; no element we
    read holds one that could be plausible (a count, a temperature, a Bundle.total)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.json()


def _read_whole(response: requests.Response) -> None:
    """Read the body now, as requests does for a request that is not streamed, but in one read instead of
    10 KB at a time: each of those passes through several layers of urllib3, a ms of CPU for a page of 1,000
    Observations (a fifth of it in one read). iter_content raises what requests raises for a body cut
    short, and marks it consumed; the bytes are kept where `response.content` finds them."""
    response._content = b"".join(response.iter_content(None)) or b""


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "retrying after a transient failure",
        extra={"event": "retry", "attempt": state.attempt_number, "error": str(exc)},
    )


def _outcome_summary(response: requests.Response) -> str:
    """OperationOutcome issue codes only: diagnostics may echo patient data."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    codes = [i.get("code", "?") for i in body.get("issue", []) if isinstance(i, dict)]
    return f" (OperationOutcome: {', '.join(codes[:5])})"


