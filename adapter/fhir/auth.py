"""One factory for every auth type (CONTRACT §2, DOMAIN.md §6). Secrets only by reference: an environment
variable or a file, never a literal in the config, and never in a log line, an error message or a repr.

`none`, `basic`, `bearer`: a header on every request. `client_credentials` (OAuth2 client secret) and
`smart_backend` (SMART Backend Services: a JWT client assertion signed with our private key): an access
token from the token endpoint (`token_url`, else discovered at [base]/.well-known/smart-configuration),
cached until shortly before it expires. A 401 from the FHIR server gets one new token and one retry of
that request; a second 401 reaches the FhirClient, which makes it an AuthError (exit 4)."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
import requests
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from requests.auth import AuthBase, HTTPBasicAuth
from requests.cookies import extract_cookies_to_jar

from adapter.config import AuthConfig
from adapter.errors import AuthError, ConfigError, TransientHttpError

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SMART_CONFIGURATION = ".well-known/smart-configuration"
# What the adapter reads and writes (DOMAIN.md §6), asked for when [auth] scope is empty: SMART requires one.
DEFAULT_SMART_SCOPE = "system/Observation.rs system/Patient.r system/Flag.cru system/RiskAssessment.cru"
# Servers refuse an assertion whose exp is more than 5 minutes ahead by *their* clock: keep a minute of slack.
ASSERTION_LIFETIME_S = 240
# expires_in is only RECOMMENDED (RFC 6749 §5.1); without it, assume a short life rather than a long one.
DEFAULT_TOKEN_LIFETIME_S = 300.0
# Ask for a new token this long before the old one expires (at most a quarter of its life), so a request
# never leaves with a token that dies on the way.
REFRESH_MARGIN_S = 30.0
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_OAUTH_ERROR_CODE = re.compile(r"^[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §5.2 `error` charset


def build(auth: AuthConfig, base_url: str, http: requests.Session | None = None, timeout_s: float = 30.0,
          clock: Callable[[], float] = time.time) -> AuthBase | None:
    """The requests auth for `auth.type`, or None for `none`. `http` makes the token endpoint and discovery
    calls and carries the TLS settings for them (verify, client cert); it must not carry this auth itself.
    Secrets and keys are read here, so a missing one is a ConfigError before any request; tokens are
    fetched by the first request."""
    if auth.type == "none":
        return None
    if auth.type == "basic":
        _require(auth.username, "auth.username", auth.type)
        password = _secret("ANC_FHIR_PASSWORD", auth.password_env, auth.password_file,
                           "auth.password_env / auth.password_file")
        return BasicAuth(auth.username, password)
    if auth.type == "bearer":
        return BearerAuth(_secret("ANC_FHIR_TOKEN", auth.token_env, auth.token_file,
                                  "auth.token_env / auth.token_file"))
    if auth.type == "client_credentials":
        _require(auth.client_id, "auth.client_id", auth.type)
        client_secret = _secret("ANC_CLIENT_SECRET", auth.client_secret_env, auth.client_secret_file,
                                "auth.client_secret_env / auth.client_secret_file")
        grant: _Grant = ClientSecretGrant(auth.client_id, client_secret, auth.scope)
    elif auth.type == "smart_backend":
        _require(auth.client_id, "auth.client_id", auth.type)
        _require(auth.kid, "auth.kid", auth.type)
        key_file = os.environ.get("ANC_PRIVATE_KEY_FILE") or auth.private_key_file
        _require(key_file, "auth.private_key_file (or $ANC_PRIVATE_KEY_FILE)", auth.type)
        key, alg = _private_key(key_file)
        grant = JwtAssertionGrant(auth.client_id, key, alg, auth.kid, auth.scope or DEFAULT_SMART_SCOPE, clock)
    else:
        raise ConfigError(f"auth.type: {auth.type!r} is not available in this version of anc-adapter")
    if auth.token_url:
        _check_token_url(auth.token_url, base_url, "auth.token_url")
    tokens = TokenSource(grant, auth.token_url, base_url, http or requests.Session(), timeout_s, clock)
    return TokenAuth(tokens)


class BasicAuth(HTTPBasicAuth):
    def __repr__(self) -> str:
        return f"BasicAuth(username={self.username!r}, password=<redacted>)"


class BearerAuth(AuthBase):
    """A static token: nothing to refresh, so a 401 is final."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(token=<redacted>)"


class TokenAuth(AuthBase):
    """A bearer token from a TokenSource; on a 401, one new token and one retry of that request."""

    def __init__(self, tokens: TokenSource):
        self.tokens = tokens

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.tokens.token()}"
        request.register_hook("response", self._retry_once_on_401)
        return request

    def _retry_once_on_401(self, response: requests.Response, **send_kwargs: Any) -> requests.Response:
        # The retry below goes straight to the transport adapter, which runs no hooks: one retry at most.
        if response.status_code != 401:
            return response
        refused = response.request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.tokens.invalidate(refused)
        log.warning("the FHIR server refused the access token; getting a new one and retrying once",
                    extra={"event": "token-refused", "token_endpoint": self.tokens.token_url})
        # Drain and release the connection so the retry can reuse it (as requests' HTTPDigestAuth does).
        response.content  # noqa: B018
        response.close()
        retry = response.request.copy()
        extract_cookies_to_jar(retry._cookies, response.request, response.raw)
        retry.prepare_cookies(retry._cookies)
        retry.headers["Authorization"] = f"Bearer {self.tokens.token()}"
        answer = response.connection.send(retry, **send_kwargs)
        answer.history.append(response)
        answer.request = retry
        return answer

    def __repr__(self) -> str:
        return f"TokenAuth({self.tokens!r})"


class _Grant:
    """What one token request sends: the form, and how the client authenticates at the token endpoint."""

    kind = ""
    client_id = ""

    def form(self, token_url: str) -> dict[str, str]:
        raise NotImplementedError

    def client_auth(self) -> AuthBase | None:
        return None

    def secrets(self, form: dict[str, str]) -> Iterable[str]:
        """Values that must never be repeated in an error message."""
        return ()


class ClientSecretGrant(_Grant):
    """OAuth2 client_credentials with a client secret, sent as client_secret_basic: the one method every
    authorization server must support (RFC 6749 §2.3.1), and it keeps the secret out of the form body."""

    kind = "client_credentials"

    def __init__(self, client_id: str, client_secret: str, scope: str):
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope

    def form(self, token_url: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}

    def client_auth(self) -> AuthBase | None:
        # RFC 6749 §2.3.1: both are form-urlencoded before they go into the Basic header.
        return BasicAuth(quote(self.client_id, safe=""), quote(self._client_secret, safe=""))

    def secrets(self, form: dict[str, str]) -> Iterable[str]:
        return (self._client_secret, quote(self._client_secret, safe=""))

    def __repr__(self) -> str:
        return f"ClientSecretGrant(client_id={self.client_id!r}, client_secret=<redacted>, scope={self.scope!r})"


class JwtAssertionGrant(_Grant):
    """SMART Backend Services (DOMAIN.md §6): client_credentials with a signed JWT client assertion."""

    kind = "smart_backend"

    def __init__(self, client_id: str, key: Any, alg: str, kid: str, scope: str,
                 clock: Callable[[], float] = time.time):
        self.client_id = client_id
        self._key = key
        self.alg = alg
        self.kid = kid
        self.scope = scope
        self._clock = clock

    def assertion(self, token_url: str) -> str:
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": now + ASSERTION_LIFETIME_S,
            "jti": uuid.uuid4().hex,  # servers refuse a jti they have seen: new for every assertion
        }
        return jwt.encode(claims, self._key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})

    def form(self, token_url: str) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(token_url),
        }

    def secrets(self, form: dict[str, str]) -> Iterable[str]:
        return (form["client_assertion"],)

    def __repr__(self) -> str:
        return (f"JwtAssertionGrant(client_id={self.client_id!r}, alg={self.alg!r}, kid={self.kid!r}, "
                f"key=<redacted>, scope={self.scope!r})")


class TokenSource:
    """Access tokens from the token endpoint, cached until shortly before they expire."""

    def __init__(self, grant: _Grant, token_url: str, base_url: str, http: requests.Session,
                 timeout_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.grant = grant
        self._token_url = token_url or None
        self._base_url = base_url.rstrip("/")
        self._http = http
        self._timeout_s = timeout_s
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = threading.Lock()

    @property
    def token_url(self) -> str | None:
        """Configured, or discovered by the first token request; None before that."""
        return self._token_url

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._token, self._refresh_at = self._fetch()
            return self._token

    def invalidate(self, refused: str) -> None:
        """Forget the token the server refused (and only that one: a newer one may already be here)."""
        with self._lock:
            if self._token == refused:
                self._token = None

    def _fetch(self) -> tuple[str, float]:
        url = self._token_url or self._discover()
        self._token_url = url
        asked_at = self._clock()
        form = self.grant.form(url)
        secrets = tuple(s for s in self.grant.secrets(form) if s)
        try:
            response = self._http.post(
                url, data=form, auth=self.grant.client_auth() or _NoAuth(),
                headers={"Accept": "application/json"}, timeout=self._timeout_s, allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientHttpError(f"token endpoint {url} unreachable: {type(exc).__name__}") from None
        status = response.status_code
        if status in _RETRY_STATUSES:
            raise TransientHttpError(f"token endpoint {url} answered {status}", status=status)
        if status != 200:
            raise AuthError(f"token endpoint {url} refused the token request (HTTP {status}"
                            f"{_oauth_error(response, secrets)}); check [auth] client_id and its credentials")
        access_token, expires_in_s = _token_from(response, url)
        lifetime = expires_in_s if expires_in_s is not None else DEFAULT_TOKEN_LIFETIME_S
        log.info("access token obtained", extra={"event": "token", "auth_type": self.grant.kind,
                                                 "token_endpoint": url, "expires_in_s": expires_in_s})
        return access_token, asked_at + lifetime - min(REFRESH_MARGIN_S, max(lifetime, 0.0) / 4)

    def _discover(self) -> str:
        url = f"{self._base_url}/{SMART_CONFIGURATION}"
        try:
            response = self._http.get(url, headers={"Accept": "application/json"}, auth=_NoAuth(),
                                      timeout=self._timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientHttpError(f"SMART discovery at {url} failed: {type(exc).__name__}") from None
        if response.status_code in _RETRY_STATUSES:
            raise TransientHttpError(f"SMART discovery at {url} answered {response.status_code}",
                                     status=response.status_code)
        endpoint = None
        if response.status_code == 200:
            try:
                document = response.json()
            except ValueError:
                document = None
            endpoint = document.get("token_endpoint") if isinstance(document, dict) else None
        if not isinstance(endpoint, str) or not endpoint:
            raise ConfigError(f"auth.token_url: not set, and {url} gave no token_endpoint "
                              f"(HTTP {response.status_code}); set auth.token_url")
        _check_token_url(endpoint, self._base_url, f"auth.token_url (discovered at {url})")
        log.info("token endpoint discovered", extra={"event": "smart-discovery", "token_endpoint": endpoint})
        return endpoint

    def __repr__(self) -> str:
        return f"TokenSource({self.grant!r}, token_url={self._token_url!r})"


class _NoAuth(AuthBase):
    """Keeps a Session's own auth (and ~/.netrc) off the token and discovery requests."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


def _token_from(response: requests.Response, url: str) -> tuple[str, float | None]:
    try:
        body = response.json()
    except ValueError:
        raise AuthError(f"token endpoint {url} answered 200 with a body that is not JSON") from None
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise AuthError(f"token endpoint {url} answered 200 without an access_token")
    token_type = body.get("token_type")
    if isinstance(token_type, str) and token_type.lower() != "bearer":
        shown = token_type if _OAUTH_ERROR_CODE.match(token_type) and len(token_type) <= 20 else "?"
        raise AuthError(f"token endpoint {url} issued a {shown!r} token; only bearer tokens are supported")
    return token, _seconds(body.get("expires_in"))


def _seconds(value: Any) -> float | None:
    # Some servers send expires_in as a string ("3599"); anything unreadable counts as absent.
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _oauth_error(response: requests.Response, secrets: tuple[str, ...]) -> str:
    """`: error: description` from an RFC 6749 §5.2 error body, with anything we sent scrubbed out."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return ""
    error = body["error"] if _OAUTH_ERROR_CODE.match(body["error"]) else "?"
    description = body.get("error_description")
    if not isinstance(description, str) or not description:
        return f": {error}"
    description = "".join(ch if ch.isprintable() else " " for ch in description)
    for secret in sorted(secrets, key=len, reverse=True):
        description = description.replace(secret, "<redacted>")
    if len(description) > 200:
        description = description[:200] + "…"
    return f": {error}: {description}"


def _check_token_url(url: str, base_url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {url!r} is not an absolute http(s) URL")
    if urlsplit(base_url).scheme == "https" and parts.scheme != "https":
        # Credentials must not travel in the clear when the FHIR server itself is reached over TLS.
        raise ConfigError(f"{key}: {url!r} is plain http while fhir.base_url is https; refused")


def _private_key(path: str) -> tuple[Any, str]:
    """The signing key and its algorithm: RSA -> RS384, EC P-384 -> ES384 (the two SMART requires)."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.private_key_file: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(f"auth.private_key_file: {path} is encrypted; give an unencrypted PEM key "
                          "(protect it with file permissions)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"auth.private_key_file: {path} is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ConfigError(f"auth.private_key_file: an RSA key of {key.key_size} bits is too short for "
                              "RS384; use 2048 bits or more")
        return key, "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise ConfigError(f"auth.private_key_file: ES384 needs an EC key on P-384 (secp384r1), "
                              f"this one is on {key.curve.name}")
        return key, "ES384"
    raise ConfigError("auth.private_key_file: only RSA (RS384) and EC P-384 (ES384) keys are supported")


def _require(value: str, key: str, auth_type: str) -> None:
    if not value:
        raise ConfigError(f"{key}: required for auth.type = {auth_type!r}")


def _secret(override: str, env_name: str, file_path: str, keys: str) -> str:
    """The secret from $override (CONTRACT §2: environment variables override secrets, ANC_* names),
    else from the environment variable the config names, else the first line of the file it names."""
    if os.environ.get(override):
        return os.environ[override]
    if env_name:
        value = os.environ.get(env_name)
        if value:
            return value
        if not file_path:
            raise ConfigError(f"{keys}: environment variable {env_name} is not set")
    if file_path:
        try:
            value = Path(file_path).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            raise ConfigError(f"{keys}: cannot read a secret from {file_path}") from None
        if value:
            return value
    raise ConfigError(f"{keys}: set one of them")
