"""An OAuth2 token endpoint for tests, strict the way a hospital's authorization server is.

Standard library HTTP on 127.0.0.1 (a free port), PyJWT for the checks. Two kinds of registered client:
- a client secret, sent as HTTP Basic (client_secret_basic) or in the form (client_secret_post);
- a public key with its `kid` (SMART Backend Services, DOMAIN.md §6): the JWT client assertion must be
  signed by it (RS384 or ES384), carry kid and typ JWT, iss = sub = client_id, aud = this endpoint's URL,
  an exp no more than 5 minutes ahead and not past, and a jti never seen before.
Any failure is an RFC 6749 §5.2 error: 400 invalid_client (401 with a challenge for a bad Basic secret).

It issues short-lived opaque tokens and is the judge of them: `check_bearer` is the gate an authenticating
front (tests/fronts.py) asks for every FHIR request. `budgets` makes the next tokens die early (after so
many uses), as when a server restarts or revokes: the way to provoke a 401 on a token the client still
believes valid."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ["RS384", "ES384"]


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass
class Issued:
    client_id: str
    scope: str
    expires_at: float
    uses_left: int | None  # None: until it expires
    uses: int = 0


@dataclass
class Answer:
    """A canned answer instead of the real one (to test how the client copes with a broken endpoint)."""

    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass
class TokenServer:
    lifetime_s: int = 300
    clients_by_secret: dict[str, str] = field(default_factory=dict)
    keys: dict[tuple[str, str], Any] = field(default_factory=dict)  # (client_id, kid) -> public key
    budgets: list[int] = field(default_factory=list)  # uses allowed to each of the next tokens issued
    override: Answer | None = None
    tokens: dict[str, Issued] = field(default_factory=dict)
    assertions: list[tuple[dict, dict]] = field(default_factory=list)  # (header, claims) of accepted ones
    forms: list[dict[str, str]] = field(default_factory=list)  # every form received
    refusals: list[str] = field(default_factory=list)  # error codes answered, in order
    bearer_checks: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "refused": 0})

    def __post_init__(self) -> None:
        self._seen_jti: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.token_server = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="token-server", daemon=True)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def register_secret(self, client_id: str, client_secret: str) -> None:
        self.clients_by_secret[client_id] = client_secret

    def register_key(self, client_id: str, kid: str, public_key: Any) -> None:
        self.keys[(client_id, kid)] = public_key

    @property
    def issued(self) -> int:
        return len(self.tokens)

    # -- the gate for the FHIR front -------------------------------------------------------------
    def check_bearer(self, headers: Mapping[str, str]) -> int | None:
        """None when the request carries a live token of ours, else the status to refuse it with."""
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        with self._lock:
            issued = self.tokens.get(token) if scheme.lower() == "bearer" else None
            alive = issued is not None and time.time() < issued.expires_at and issued.uses_left != 0
            if alive:
                issued.uses += 1
                if issued.uses_left is not None:
                    issued.uses_left -= 1
            self.bearer_checks["accepted" if alive else "refused"] += 1
        return None if alive else 401

    # -- the token endpoint ------------------------------------------------------------------------
    def _token(self, form: dict[str, str], authorization: str) -> dict[str, Any]:
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        if "client_assertion" in form:
            client_id = self._verify_assertion(form)
        else:
            client_id = self._verify_secret(form, authorization)
        token = secrets.token_urlsafe(24)
        with self._lock:
            budget = self.budgets.pop(0) if self.budgets else None
            self.tokens[token] = Issued(client_id, form.get("scope", ""), time.time() + self.lifetime_s, budget)
        return {"access_token": token, "token_type": "bearer", "expires_in": self.lifetime_s,
                "scope": form.get("scope", "")}

    def _verify_secret(self, form: dict[str, str], authorization: str) -> str:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                raw_id, _, raw_secret = base64.b64decode(credentials).decode().partition(":")
            except ValueError:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
            client_id, client_secret = unquote(raw_id), unquote(raw_secret)
        elif "client_secret" in form:
            client_id, client_secret = form.get("client_id", ""), form["client_secret"]
        else:
            raise OAuthError("invalid_client", "no client authentication", 401)
        expected = self.clients_by_secret.get(client_id)
        if expected is None or not secrets.compare_digest(expected, client_secret):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client_id

    def _verify_assertion(self, form: dict[str, str]) -> str:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", "client_assertion_type must be jwt-bearer")
        assertion = form["client_assertion"]
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OAuthError("invalid_client", "client_assertion is not a JWT") from None
        if header.get("typ") != "JWT" or header.get("alg") not in ALGORITHMS or not header.get("kid"):
            raise OAuthError("invalid_client", "header must carry alg RS384|ES384, kid and typ JWT")
        client_id = unverified.get("iss")
        key = self.keys.get((client_id, header["kid"]))
        if key is None:
            raise OAuthError("invalid_client", "unknown client_id or kid")
        try:
            claims = jwt.decode(assertion, key, algorithms=[header["alg"]], audience=self.url,
                                options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_client", "client_assertion has expired") from None
        except jwt.InvalidAudienceError:
            raise OAuthError("invalid_client", "aud must be the token endpoint URL") from None
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_client", f"client_assertion rejected: {type(exc).__name__}") from None
        if claims["sub"] != client_id:
            raise OAuthError("invalid_client", "iss and sub must both be the client_id")
        if claims["exp"] > time.time() + 300:
            raise OAuthError("invalid_client", "exp must be no more than 5 minutes ahead")
        with self._lock:
            now = time.time()
            for jti, until in list(self._seen_jti.items()):
                if until < now:
                    del self._seen_jti[jti]
            if claims["jti"] in self._seen_jti:
                raise OAuthError("invalid_client", "jti already used (replayed assertion)")
            self._seen_jti[claims["jti"]] = claims["exp"]
            self.assertions.append((header, claims))
        return client_id


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def do_POST(self) -> None:  # noqa: N802
        tokens: TokenServer = self.server.token_server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        form = {name: values[0] for name, values in parse_qs(raw, keep_blank_values=True).items()}
        with tokens._lock:
            tokens.forms.append(form)
        if self.path != "/token":
            return self._send(404, {"error": "not_found"})
        if tokens.override is not None:
            return self._send_raw(tokens.override.status, tokens.override.body, tokens.override.content_type)
        try:
            self._send(200, tokens._token(form, self.headers.get("Authorization", "")))
        except OAuthError as exc:
            with tokens._lock:
                tokens.refusals.append(exc.error)
            extra = {"WWW-Authenticate": 'Basic realm="token"'} if exc.status == 401 else {}
            self._send(exc.status, {"error": exc.error, "error_description": exc.description}, extra)

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(body).encode(), "application/json", headers)

    def _send_raw(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
