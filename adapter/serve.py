"""`anc-adapter serve`: the CDS Hooks 2.0 service (CONTRACT §8). Routes, the CDS client's JWT, the
fhirServer allowlist, size limits, metrics and shutdown; no clinical logic of its own (that is
adapter/outputs/cards.py, fed by adapter/sources/prefetch.py).

Stack: Starlette (ASGI routing and requests, small, maintained by the encode team) on uvicorn (the
reference ASGI server: signal handling with graceful drain, keep-alive and connection limits). The
blocking parts (a JWKS or FHIR fetch, grading) run in Starlette's thread pool so one slow FHIR server does
not stall the event loop."""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import jwt
import requests
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapter.config import Config, TrustedClient
from adapter.errors import AuthError, ConfigError, FhirError
from adapter.mappings import Mappings
from adapter.outputs import cards
from adapter.sources import notifications, prefetch

log = logging.getLogger(__name__)

# Asymmetric only: with HS* the "key" would be a shared secret, and `none` is no signature at all.
ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
CLOCK_SKEW_S = 60  # iat may be this far ahead of our clock; exp this far behind
MAX_TOKEN_LIFETIME_S = 3600  # CDS Hooks asks for 5 minutes; longer tokens would make replay memory unbounded
MAX_REMEMBERED_JTI = 100_000
JWKS_TTL_S = 300
JWKS_REFRESH_MIN_S = 30  # an unknown kid refetches the JWKS at most this often
JWKS_TIMEOUT_S = 5

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str


SERVICES = {s.id: s for s in (
    Service("anc-patient-view", "patient-view", "Neutropenia from the latest absolute neutrophil count",
            "A card when the patient's latest ANC shows neutropenia: critical (severe, or febrile "
            "neutropenia), warning (moderate), info (mild), with the fever, projection, chemotherapy and "
            "any site-marked Duffy-null threshold behind it; no card when it is normal."),
    Service("anc-order-sign", "order-sign", "ANC check before signing a chemotherapy order",
            "A warning when a chemotherapy order is signed while the latest ANC is abnormal, or when there "
            "is no ANC recent enough to know."),
)}


class Refusal(Exception):
    """An answer other than 200. The message is for the EHR's integrator: names fields, never values."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _unauthorized(why: str) -> Refusal:
    return Refusal(401, "security", f"not authorised: {why}")


# --- the CDS client's JWT -----------------------------------------------------------------------------

class _Issuer:
    """One trusted client's keys: a JWKS file read at start, or a JWKS URL fetched and cached."""

    def __init__(self, client: TrustedClient, index: int):
        self.client = client
        self.key = f"serve.trusted_clients[{index}]"
        self._lock = threading.Lock()
        self._keys: list[jwt.PyJWK] = []
        self._fetched_at = float("-inf")
        if client.jwks_file:
            try:
                self._keys = _jwks(json.loads(Path(client.jwks_file).read_text(encoding="utf-8")))
            except (OSError, ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
                raise ConfigError(f"{self.key}.jwks_file: cannot use {client.jwks_file}: "
                                  f"{type(exc).__name__}") from None

    def keys(self, kid: str | None) -> list[jwt.PyJWK]:
        if not self.client.jwks_url:
            return self._matching(kid)
        with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = age > JWKS_TTL_S or (not self._matching(kid) and age > JWKS_REFRESH_MIN_S)
            if stale:
                self._refresh()
            return self._matching(kid)

    def _refresh(self) -> None:
        try:
            response = requests.get(self.client.jwks_url, timeout=JWKS_TIMEOUT_S, allow_redirects=False)
            response.raise_for_status()
            self._keys = _jwks(response.json())
            self._fetched_at = time.monotonic()
        except (requests.RequestException, ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            # Keep the keys we had: a JWKS endpoint down for a minute must not lock every EHR out.
            log.warning("could not fetch a trusted client's JWKS", extra={
                "event": "jwks-fetch-failed", "config_key": f"{self.key}.jwks_url",
                "error_type": type(exc).__name__})
            self._fetched_at = time.monotonic() - JWKS_TTL_S + JWKS_REFRESH_MIN_S

    def _matching(self, kid: str | None) -> list[jwt.PyJWK]:
        return [k for k in self._keys if kid is None or k.key_id == kid]


def _jwks(document: Any) -> list[jwt.PyJWK]:
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("a JWKS is a JSON object with a list of keys")
    # Keys published for encryption only are not signing keys.
    signing = [key for key in keys if isinstance(key, dict) and key.get("use", "sig") == "sig"]
    return jwt.PyJWKSet.from_dict({"keys": signing}).keys


class _SeenTokens:
    """jti values until their token expires: a second use within that time is a replay. Bounded: when
    full of unexpired tokens, new ones are refused rather than forgetting one that could be replayed."""

    def __init__(self, limit: int = MAX_REMEMBERED_JTI):
        self.limit = limit
        self._expiry: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def first_use(self, issuer: str, jti: str, expires: float, now: float) -> bool:
        with self._lock:
            remembered = self._expiry.get((issuer, jti))
            if remembered is not None and remembered >= now:
                return False
            if len(self._expiry) >= self.limit:
                self._expiry = {key: until for key, until in self._expiry.items() if until >= now}
                if len(self._expiry) >= self.limit:
                    raise Refusal(503, "throttled", "too many unexpired tokens; retry shortly")
            self._expiry[(issuer, jti)] = expires
            return True


class Verifier:
    def __init__(self, clients: tuple[TrustedClient, ...], clock: Callable[[], float] = time.time):
        self.issuers = {c.iss: _Issuer(c, i) for i, c in enumerate(clients)}
        self.seen = _SeenTokens()
        self.clock = clock

    def verify(self, authorization: str | None, audiences: tuple[str, ...]) -> dict[str, Any]:
        """The token's claims, or a 401 Refusal saying what was wrong with the token (never why in
        more detail than the integrator needs to fix it)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("an Authorization: Bearer JWT is required")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _unauthorized("the token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise _unauthorized(f"signature algorithm must be one of {', '.join(ALGORITHMS)}")
        # `jku` / `x5u` in the header are ignored on purpose: keys come only from our configuration.
        issuer = self.issuers.get(unverified.get("iss")) if isinstance(unverified.get("iss"), str) else None
        if issuer is None:
            raise _unauthorized("the issuer (iss) is not a trusted client")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        candidates = issuer.keys(kid)
        if not candidates:
            raise _unauthorized("no key of this issuer matches the token's kid")
        now = self.clock()
        claims = self._decode(token, candidates, algorithm, audiences, issuer.client.iss, now)
        if float(claims["exp"]) - now > MAX_TOKEN_LIFETIME_S:
            raise _unauthorized(f"exp is more than {MAX_TOKEN_LIFETIME_S} s ahead")
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise _unauthorized("jti must be a non-empty string")
        if not self.seen.first_use(issuer.client.iss, claims["jti"], float(claims["exp"]) + CLOCK_SKEW_S, now):
            raise _unauthorized("this token (jti) was already used")
        return claims

    @staticmethod
    def _decode(token: str, candidates: list[jwt.PyJWK], algorithm: str, audiences: tuple[str, ...],
                issuer: str, now: float) -> dict[str, Any]:
        # PyJWT checks the signature, aud, iss and presence; the times are checked below against our own
        # clock, so there is one notion of "now" (and tests can set it).
        options = {"require": ["iss", "aud", "exp", "iat", "jti"], "verify_exp": False, "verify_iat": False,
                   "verify_nbf": False}
        for key in candidates:
            try:
                claims = jwt.decode(token, key.key, algorithms=[algorithm], audience=list(audiences),
                                    issuer=issuer, options=options)
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, jwt.InvalidAlgorithmError, TypeError,
                    ValueError):
                continue  # not this key (or a key of another type); try the next
            except jwt.MissingRequiredClaimError as exc:
                raise _unauthorized(f"the {exc.claim} claim is required") from None
            except jwt.InvalidAudienceError:
                raise _unauthorized("aud must be the URL of the service called") from None
            except jwt.PyJWTError as exc:
                raise _unauthorized(f"the token is invalid ({type(exc).__name__})") from None
            _check_times(claims, now)
            return claims
        raise _unauthorized("the signature does not verify with the issuer's keys")


def _check_times(claims: dict[str, Any], now: float) -> None:
    times = {}
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if value is None and name == "nbf":
            continue
        # NaN (which Python's JSON reader takes) compares false to everything: it would never expire.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _unauthorized(f"{name} must be a number (seconds since the epoch)")
        times[name] = float(value)
    if times["exp"] + CLOCK_SKEW_S < now:
        raise _unauthorized("the token has expired (exp)")
    if times["iat"] - CLOCK_SKEW_S > now or times.get("nbf", now) - CLOCK_SKEW_S > now:
        raise _unauthorized("the token is not valid yet (iat or nbf in the future)")


# --- the allowlist ------------------------------------------------------------------------------------

def normalised_url(url: str) -> str | None:
    """Scheme and host in lower case, default port and trailing slash dropped; None for anything that
    is not a plain http(s) base URL (user info, query, fragment)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc \
            or parts.query or parts.fragment:
        return None
    default = 443 if parts.scheme.lower() == "https" else 80
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


class Allowlist:
    def __init__(self, urls: tuple[str, ...]):
        self._by_form = {normalised_url(url): url.rstrip("/") for url in urls}

    def base_for(self, url: str) -> str | None:
        """The configured base URL that `url` names, else None. Exact match only: a prefix rule would let
        `https://fhir.example/r4.evil.example` or `…/r4/../admin` through."""
        form = normalised_url(url)
        return self._by_form.get(form) if form else None


# --- the hook call ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    service: Service
    hook_instance: str
    patient_id: str
    draft_orders: dict[str, Any] | None
    fhir_server: str | None
    access_token: str | None
    prefetch: dict[str, Any]


def parse_call(body: bytes, service: Service) -> Call:
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _bad("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise _bad("the body must be a JSON object (a CDS Hooks request)")
    if document.get("hook") != service.hook:
        raise _bad(f"hook: this service answers '{service.hook}' calls")
    hook_instance = document.get("hookInstance")
    if not isinstance(hook_instance, str) or not hook_instance:
        raise _bad("hookInstance: required, a string")
    context = document.get("context")
    if not isinstance(context, dict):
        raise _bad("context: required, an object")
    patient_id = context.get("patientId")
    # Dots alone are a valid FHIR id by the regex, but `Patient/..` would be a path, not a patient.
    if not isinstance(patient_id, str) or not _ID.match(patient_id) or not patient_id.strip("."):
        raise _bad("context.patientId: required, a FHIR id")
    draft_orders = None
    if service.hook == "order-sign":
        draft_orders = context.get("draftOrders")
        if not isinstance(draft_orders, dict) or draft_orders.get("resourceType") != "Bundle":
            raise _bad("context.draftOrders: required for order-sign, a FHIR Bundle")
    fhir_server = document.get("fhirServer")
    if fhir_server is not None and not isinstance(fhir_server, str):
        raise _bad("fhirServer: must be a URL string")
    authorization = document.get("fhirAuthorization")
    access_token = None
    if authorization is not None:
        if not isinstance(authorization, dict) or not isinstance(authorization.get("access_token"), str):
            raise _bad("fhirAuthorization: must be an object with access_token")
        if str(authorization.get("token_type", "Bearer")).lower() != "bearer":
            raise _bad("fhirAuthorization.token_type: must be Bearer")
        if fhir_server is None:
            raise _bad("fhirAuthorization: given without fhirServer")
        access_token = authorization["access_token"]
    given = document.get("prefetch")
    if given is not None and not isinstance(given, dict):
        raise _bad("prefetch: must be an object")
    return Call(service, hook_instance, patient_id, draft_orders, fhir_server, access_token, given or {})


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _bad(message: str) -> Refusal:
    return Refusal(400, "invalid", message)


class CdsService:
    """What one process serves: the configured rules, keys and allowlist, and its metrics."""

    def __init__(self, config: Config, mappings: Mappings, base_url: str | None = None,
                 now: Callable[[], datetime] | None = None):
        self.config = config
        self.rules = cards.Rules.from_config(config, mappings)
        self.templates = prefetch.templates(mappings)
        self.verifier = Verifier(config.serve.trusted_clients)
        self.allowlist = Allowlist(config.serve.fhir_servers)
        self.base_url = base_url or config.serve.base_url
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.registry = CollectorRegistry()
        self.requests = Counter("anc_adapter_cds_requests", "CDS Hooks service requests by service and status",
                                ("service", "status"), registry=self.registry)
        self.latency = Histogram("anc_adapter_cds_request_duration_seconds",
                                 "CDS Hooks service request latency by service", ("service",),
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.cards = Counter("anc_adapter_cds_cards", "Cards returned by service and indicator",
                             ("service", "indicator"), registry=self.registry)
        self.receiver: Any = None  # adapter.realtime.Receiver when [serve] subscriptions = true
        if not config.serve.trusted_clients:
            log.warning("no [[serve.trusted_clients]]: every hook call will be refused (401)",
                        extra={"event": "no-trusted-clients"})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/cds-services", self.discovery, methods=["GET"]),
            Route("/cds-services/{service_id}", self.hook, methods=["POST"]),
            Route("/cds-services/{service_id}/feedback", self.feedback, methods=["POST"]),
            # Subscription notifications (CONTRACT §10): POST to the endpoint (Backport IG Bundles, a
            # resource, an empty ping), or PUT/POST to [endpoint]/<type>/<id> (classic R4 with a payload).
            Route("/notifications/{name}", self.notified, methods=["POST"]),
            Route("/notifications/{name}/{resource_type}/{resource_id}", self.notified, methods=["PUT", "POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    # Discovery, health and metrics hold no patient data and are open, as EHRs and probes expect.
    async def discovery(self, request: Request) -> Response:
        return self._measured("discovery", time.monotonic(), JSONResponse({"services": [
            {"hook": s.hook, "id": s.id, "title": s.title, "description": s.description,
             "prefetch": self.templates} for s in SERVICES.values()]}))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def hook(self, request: Request) -> Response:
        return await self._guarded(request, "", self._hook)

    async def feedback(self, request: Request) -> Response:
        return await self._guarded(request, "/feedback", self._feedback)

    async def _guarded(self, request: Request, suffix: str,
                       handler: Callable[[Request, Service], Awaitable[Response]]) -> Response:
        started = time.monotonic()
        service = SERVICES.get(request.path_params["service_id"])
        label = service.id + suffix if service else "unknown"
        try:
            if service is None:
                raise Refusal(404, "not-found", "no such CDS service; see GET /cds-services")
            url = f"{self.base_url}/cds-services/{service.id}"
            # The feedback endpoint is its own URL; a client may name it or the service in `aud`.
            audiences = (url, url + suffix) if suffix else (url,)
            await run_in_threadpool(self.verifier.verify, request.headers.get("authorization"), audiences)
            response = await handler(request, service)
        except Refusal as refusal:
            response = _outcome(refusal)
            log.info("hook call refused", extra={"event": "cds-refused", "service": label,
                                                 "status": refusal.status, "why": refusal.message})
        except Exception as exc:  # a bug: an answer with nothing in it, a log line with its type only
            response = _outcome(Refusal(500, "exception", "internal error"))
            log.error("hook call failed", extra={"event": "cds-error", "service": label,
                                                 "error_type": type(exc).__name__})
        return self._measured(label, started, response)

    async def notified(self, request: Request) -> Response:
        """Authenticated by the Subscription's own token, queued, answered at once (adapter/realtime.py
        says why). 401 and 400 leave nothing queued."""
        started = time.monotonic()
        name = request.path_params["name"]
        receiver = self.receiver
        label = f"notifications/{name}" if receiver is not None and receiver.known(name) else "notifications/unknown"
        try:
            if receiver is None or not receiver.known(name):
                raise Refusal(404, "not-found", "no such notification endpoint")
            if not receiver.authentic(name, request.headers.get("authorization")):
                receiver.refused(name, "unauthorised")
                raise _unauthorized("the Subscription's token is required (Authorization: Bearer)")
            path = request.path_params
            named = (path["resource_type"], path["resource_id"]) if "resource_type" in path else None
            try:
                notification = notifications.parse(await self._body(request), named)
            except notifications.NotificationError as exc:
                receiver.refused(name, "invalid")
                raise _bad(str(exc)) from None
            queued = receiver.accept(name, notification)
            log.info("notification", extra={
                "event": "notification", "subscription": name, "kind": notification.kind,
                "observations": len(notification.observations), "ids": len(notification.observation_ids),
                "other": notification.other, "queued": queued})
            if not queued:
                log.warning("the notification queue is full; the cron pass will find these",
                            extra={"event": "notification-dropped", "subscription": name})
            response = JSONResponse({"resourceType": "OperationOutcome", "issue": [
                {"severity": "information", "code": "informational", "diagnostics": "received"}]})
        except Refusal as refusal:
            response = _outcome(refusal)
            log.info("notification refused", extra={"event": "notification-refused", "subscription": label,
                                                     "status": refusal.status, "why": refusal.message})
        return self._measured(label, started, response)

    def _measured(self, label: str, started: float, response: Response) -> Response:
        self.requests.labels(service=label, status=str(response.status_code)).inc()
        self.latency.labels(service=label).observe(time.monotonic() - started)
        return response

    async def _hook(self, request: Request, service: Service) -> Response:
        call = parse_call(await self._body(request), service)
        found, fetched = await run_in_threadpool(self._gather, call)
        records = prefetch.records(call.patient_id, found)
        now = self.now()
        if service.hook == "order-sign":
            answer = await run_in_threadpool(cards.order_sign, records, call.draft_orders or {}, self.rules, now)
        else:
            answer = await run_in_threadpool(cards.patient_view, records, self.rules, now)
        for card in answer:
            self.cards.labels(service=service.id, indicator=card["indicator"]).inc()
        log.info("hook call answered", extra={
            "event": "cds-call", "service": service.id, "hook_instance": _loggable(call.hook_instance),
            "cards": [card["indicator"] for card in answer], "fetched": fetched})
        return JSONResponse({"cards": answer})

    async def _feedback(self, request: Request, service: Service) -> Response:
        try:
            document = json.loads(await self._body(request), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise _bad("the body is not valid JSON") from None
        feedback = document.get("feedback") if isinstance(document, dict) else None
        if not isinstance(feedback, list):
            raise _bad("feedback: required, a list")
        outcomes = [item.get("outcome") for item in feedback if isinstance(item, dict)]
        log.info("card feedback", extra={
            "event": "cds-feedback", "service": service.id,
            "cards": [_loggable(item.get("card")) for item in feedback if isinstance(item, dict)],
            "outcomes": [o if o in ("accepted", "overridden") else "other" for o in outcomes]})
        return JSONResponse({})

    async def _body(self, request: Request) -> bytes:
        limit = self.config.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _bad(f"the body is larger than {limit} bytes ([serve] max_body_bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _bad(f"the body is larger than {limit} bytes ([serve] max_body_bytes)")
        return bytes(body)

    def _gather(self, call: Call) -> tuple[dict[str, Any], list[str]]:
        """The prefetched resources, completed from fhirServer when something is missing and that server
        is allowlisted. A server not on the list is never contacted, whatever the call says."""
        found = {k: v for k, v in call.prefetch.items() if k in self.templates}
        missing = prefetch.missing(found, self.templates)
        if not missing:
            return found, []
        base = self.allowlist.base_for(call.fhir_server) if call.fhir_server else None
        if base is None:
            required = [key for key in prefetch.REQUIRED if key in missing]
            if required:
                # CDS Hooks 2.0: 412 is "unable to retrieve the necessary FHIR data". The caller is
                # authenticated; its data source is what we refuse.
                why = ("fhirServer is not in [serve] fhir_servers, so it is not contacted" if call.fhir_server
                       else "no fhirServer was given")
                raise Refusal(412, "forbidden" if call.fhir_server else "not-found",
                              f"prefetch lacks {', '.join(required)} and {why}")
            if call.fhir_server:
                log.warning("fhirServer not on the allowlist; context not fetched", extra={
                    "event": "fhir-server-refused", "prefetch_keys": missing})
            return found, []
        try:
            fetched = prefetch.fetch(base, call.access_token, missing, self.templates, call.patient_id,
                                     self.config.serve.fetch_timeout_s)
        except AuthError:
            raise Refusal(412, "security", "the FHIR server refused the fhirAuthorization token") from None
        except FhirError:
            raise Refusal(502, "transient", "the FHIR server could not be read") from None
        lacking = [key for key in prefetch.REQUIRED if key not in found and key not in fetched]
        if lacking:
            raise Refusal(412, "not-found", f"could not read {', '.join(lacking)} from the FHIR server")
        return {**found, **fetched}, sorted(fetched)


def _outcome(refusal: Refusal) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if refusal.status == 401 else None
    return JSONResponse({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": refusal.code, "diagnostics": refusal.message}]},
        status_code=refusal.status, headers=headers)


def _loggable(value: Any) -> str | None:
    """Client-chosen ids go to the log only when they look like ids (a UUID), never free text."""
    return value if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9\-]{1,64}", value) else None


def serve(config: Config, mappings: Mappings) -> int:
    """Listen until SIGTERM or SIGINT, then finish the calls in flight and return 0."""
    import uvicorn

    listener = _listen(config.serve.host, config.serve.port)
    host, port = listener.getsockname()[:2]
    # Port 0 (any free port) is known only now; `aud` must name the port actually listened on.
    public = config.serve.public_url or f"http://{f'[{host}]' if ':' in host else host}:{port}"
    service = CdsService(config, mappings, base_url=public.rstrip("/"))
    if config.serve.subscriptions:
        # The socket listens already: a handshake the server sends while we register waits in its backlog.
        service.receiver = _start_subscriptions(config, mappings, service)
    server = uvicorn.Server(uvicorn.Config(
        service.app(), log_config=None, access_log=False, server_header=False, proxy_headers=False,
        limit_concurrency=200, timeout_keep_alive=5, timeout_graceful_shutdown=20, lifespan="off"))
    # uvicorn re-raises the signal that stopped it once it has drained; these handlers make that a
    # no-op, so a SIGTERM from the orchestrator ends the process with exit 0 after a clean drain.
    logging.getLogger("uvicorn.error").addFilter(_drop_color_message)
    stops: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: stops.append(received))
    log.info("serving CDS Hooks", extra={"event": "serve-start", "host": host, "port": port,
                                         "public_url": service.base_url,
                                         "fhir_servers": len(config.serve.fhir_servers),
                                         "trusted_clients": len(config.serve.trusted_clients),
                                         "subscriptions": config.serve.subscriptions})
    server.run(sockets=[listener])
    if service.receiver is not None:
        service.receiver.batcher.stop()  # what was queued before the stop is processed, then we exit
    log.info("stopped", extra={"event": "serve-stop", "signal": [signal.Signals(s).name for s in stops]})
    return 0


def _start_subscriptions(config: Config, mappings: Mappings, service: CdsService) -> Any:
    from adapter import cli, realtime
    from adapter import state as state_module
    from adapter.state import State

    client = cli._client(config)
    state = State.open(state_module.where(config.state))
    try:
        # The write modes are pinned in the state at first use, exactly as `run` does.
        output = cli._output(config, client, state)
        return realtime.start(config, mappings, client, output, state, service.base_url, service.registry)
    finally:
        state.db.close()


def _drop_color_message(record: logging.LogRecord) -> bool:
    record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured duplicate of the message
    return True


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ConfigError(f"serve.port: cannot listen on {host}:{port} ({exc.strerror})") from None
    listener.listen(256)
    listener.set_inheritable(True)
    return listener
