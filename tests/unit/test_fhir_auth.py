"""adapter.fhir.auth without a network: the factory's config errors, the SMART client assertion, the token
cache against a fake clock, token endpoint answers -> error types, and secrets kept out of messages and
reprs. The HTTP side (token endpoint, 401 -> refresh -> retry) is in tests/integration/test_auth.py."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from adapter.config import AuthConfig
from adapter.errors import AuthError, ConfigError, TransientHttpError
from adapter.fhir import auth
from pki import ec_key, rsa_key, write_key

BASE = "https://fhir.hospital.example/r4"
TOKEN_URL = "https://login.hospital.example/oauth2/token"
CLIENT_SECRET = "cs-7f1b2a9c4e6d8f0a"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(status: int, body: Any = None, raw: bytes | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = raw if raw is not None else json.dumps(body).encode()
    response.headers["Content-Type"] = "application/json"
    return response


class FakeHttp:
    """Stands in for the token-endpoint Session: canned answers in order, every call recorded."""

    def __init__(self, *answers: requests.Response | Exception, discovery: requests.Response | None = None):
        self.answers = list(answers)
        self.discovery = discovery
        self.posts: list[dict[str, Any]] = []
        self.gets: list[str] = []

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        self.posts.append({"url": url, **kwargs})
        outcome = self.answers.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        self.gets.append(url)
        assert self.discovery is not None
        return self.discovery


def token(value: str = "at-1", expires_in: Any = 300) -> requests.Response:
    body = {"access_token": value, "token_type": "Bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    return answer(200, body)


@pytest.fixture
def secret_config(monkeypatch) -> AuthConfig:
    monkeypatch.setenv("ANC_TEST_CLIENT_SECRET", CLIENT_SECRET)
    return AuthConfig(type="client_credentials", client_id="anc-adapter", client_secret_env="ANC_TEST_CLIENT_SECRET",
                      token_url=TOKEN_URL, scope="system/Observation.rs")


@pytest.fixture
def rsa_pem(tmp_path):
    key = rsa_key()
    return key, write_key(key, tmp_path / "rsa.pem")


def smart_config(key_file, **changes: Any) -> AuthConfig:
    return replace(AuthConfig(type="smart_backend", client_id="anc-adapter", private_key_file=str(key_file),
                              kid="key-2026", token_url=TOKEN_URL), **changes)


def sent_form(http: FakeHttp, n: int = 0) -> dict[str, str]:
    return http.posts[n]["data"]


# -- the factory --------------------------------------------------------------------------------------


def test_none_is_no_auth():
    assert auth.build(AuthConfig(), BASE) is None


@pytest.mark.parametrize(("config", "key"), [
    (AuthConfig(type="basic", password_env="X"), "auth.username"),
    (AuthConfig(type="basic", username="u"), "auth.password_env / auth.password_file"),
    (AuthConfig(type="basic", username="u", password_env="ANC_TEST_UNSET_VARIABLE"), "ANC_TEST_UNSET_VARIABLE"),
    (AuthConfig(type="bearer", token_file="/nonexistent/token"), "auth.token_env / auth.token_file"),
    (AuthConfig(type="client_credentials", client_secret_env="X"), "auth.client_id"),
    (AuthConfig(type="client_credentials", client_id="c"), "auth.client_secret_env / auth.client_secret_file"),
    (AuthConfig(type="smart_backend", kid="k", private_key_file="/k.pem"), "auth.client_id"),
    (AuthConfig(type="smart_backend", client_id="c", private_key_file="/k.pem"), "auth.kid"),
    (AuthConfig(type="smart_backend", client_id="c", kid="k"), "auth.private_key_file"),
    (AuthConfig(type="smart_backend", client_id="c", kid="k", private_key_file="/nonexistent/k.pem"),
     "auth.private_key_file"),
])
def test_missing_or_unreadable_settings_are_config_errors_naming_the_key(config, key, monkeypatch):
    monkeypatch.delenv("ANC_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        auth.build(config, BASE)


def test_secret_comes_from_the_environment_else_the_first_line_of_the_file(tmp_path, monkeypatch):
    path = tmp_path / "password"
    path.write_text("from-file-pw\nsecond line ignored\n")
    config = AuthConfig(type="basic", username="anc", password_env="ANC_TEST_PW", password_file=str(path))
    monkeypatch.delenv("ANC_TEST_PW", raising=False)
    assert auth.build(config, BASE).password == "from-file-pw"
    monkeypatch.setenv("ANC_TEST_PW", "from-env-pw")
    assert auth.build(config, BASE).password == "from-env-pw"


@pytest.mark.parametrize("token_url", ["login.example/token", "ftp://login.example/token"])
def test_token_url_must_be_an_absolute_http_url(secret_config, token_url):
    with pytest.raises(ConfigError, match=r"auth\.token_url"):
        auth.build(replace(secret_config, token_url=token_url), BASE)


def test_plain_http_token_url_is_refused_when_the_fhir_server_is_https(secret_config):
    with pytest.raises(ConfigError, match=r"auth\.token_url: .*plain http"):
        auth.build(replace(secret_config, token_url="http://login.hospital.example/token"), BASE)
    assert auth.build(replace(secret_config, token_url="http://127.0.0.1:1/token"), "http://127.0.0.1:2/fhir")


# -- keys and the SMART client assertion ------------------------------------------------------------


@pytest.mark.parametrize(("make_key", "alg"), [(rsa_key, "RS384"), (ec_key, "ES384")])
def test_the_algorithm_follows_the_key_type(make_key, alg, tmp_path):
    key_file = write_key(make_key(), tmp_path / "key.pem")
    built = auth.build(smart_config(key_file), BASE)
    assert built.tokens.grant.alg == alg


@pytest.mark.parametrize(("make_key", "message"), [
    (lambda: ec_key(ec.SECP256R1()), "P-384"),
    (lambda: rsa_key(1024), "too short"),
])
def test_keys_smart_does_not_allow_are_config_errors(make_key, message, tmp_path):
    key_file = write_key(make_key(), tmp_path / "key.pem")
    with pytest.raises(ConfigError, match=message):
        auth.build(smart_config(key_file), BASE)


def test_encrypted_or_garbage_key_files_are_config_errors_that_do_not_echo_the_file(tmp_path):
    encrypted = write_key(ec_key(), tmp_path / "encrypted.pem", password=b"passphrase")
    with pytest.raises(ConfigError, match="encrypted"):
        auth.build(smart_config(encrypted), BASE)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nTUlJQ1hBSUJBQUtCZ1FD\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM private key") as caught:
        auth.build(smart_config(garbage), BASE)
    assert "TUlJQ1hBSUJBQUtCZ1FD" not in str(caught.value)


@pytest.mark.parametrize(("make_key", "alg"), [(rsa_key, "RS384"), (ec_key, "ES384")])
def test_client_assertion_header_and_claims(make_key, alg, tmp_path):
    key = make_key()
    clock = Clock()
    http = FakeHttp(token())
    built = auth.build(smart_config(write_key(key, tmp_path / "key.pem"), scope="system/Flag.cru"), BASE,
                       http=http, clock=clock)
    built.tokens.token()

    form = sent_form(http)
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "system/Flag.cru"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert jwt.get_unverified_header(form["client_assertion"]) == {"alg": alg, "kid": "key-2026", "typ": "JWT"}
    claims = jwt.decode(form["client_assertion"], key.public_key(), algorithms=[alg], audience=TOKEN_URL,
                        options={"verify_exp": False})
    assert claims["iss"] == claims["sub"] == "anc-adapter"
    assert claims["aud"] == TOKEN_URL
    assert 0 < claims["exp"] - clock.now <= 300
    assert http.posts[0]["url"] == TOKEN_URL
    assert http.posts[0]["auth"] is not None  # an explicit no-op, so a Session's own auth never applies


def test_every_assertion_has_a_new_jti(rsa_pem):
    grant = auth.build(smart_config(rsa_pem[1]), BASE).tokens.grant
    jtis = {jwt.decode(grant.assertion(TOKEN_URL), options={"verify_signature": False})["jti"] for _ in range(20)}
    assert len(jtis) == 20


def test_smart_scope_defaults_to_what_the_adapter_needs(rsa_pem):
    grant = auth.build(smart_config(rsa_pem[1]), BASE).tokens.grant
    assert grant.scope == "system/Observation.rs system/Patient.r system/Flag.cru system/RiskAssessment.cru"


# -- the token cache -------------------------------------------------------------------------------


def test_token_is_cached_until_shortly_before_it_expires(secret_config):
    clock = Clock()
    http = FakeHttp(token("at-1", 300), token("at-2", 300))
    tokens = auth.build(secret_config, BASE, http=http, clock=clock).tokens
    assert tokens.token() == "at-1"
    clock.now += 269
    assert tokens.token() == "at-1"
    clock.now += 1  # 30 s before expiry
    assert tokens.token() == "at-2"
    assert len(http.posts) == 2


@pytest.mark.parametrize(("expires_in", "reused_until"), [
    (None, 270),  # absent: assume 5 minutes
    ("60", 45),  # a string, as some servers send it; a quarter of a short life as margin
    (0, None),  # already expired: good for one request only
])
def test_expires_in_shapes(secret_config, expires_in, reused_until):
    clock = Clock()
    http = FakeHttp(token("at-1", expires_in), token("at-2"))
    tokens = auth.build(secret_config, BASE, http=http, clock=clock).tokens
    assert tokens.token() == "at-1"
    if reused_until is not None:
        clock.now += reused_until - 1
        assert tokens.token() == "at-1"
        clock.now += 1
    assert tokens.token() == "at-2"


def test_invalidate_drops_only_the_refused_token(secret_config):
    http = FakeHttp(token("at-1"), token("at-2"))
    tokens = auth.build(secret_config, BASE, http=http, clock=Clock()).tokens
    assert tokens.token() == "at-1"
    tokens.invalidate("some-older-token")
    assert tokens.token() == "at-1"
    tokens.invalidate("at-1")
    assert tokens.token() == "at-2"


def test_client_secret_goes_in_a_basic_header_not_the_form(secret_config):
    http = FakeHttp(token())
    auth.build(secret_config, BASE, http=http).tokens.token()
    assert sent_form(http) == {"grant_type": "client_credentials", "scope": "system/Observation.rs"}
    prepared = requests.Request("POST", TOKEN_URL, auth=http.posts[0]["auth"]).prepare()
    assert prepared.headers["Authorization"].startswith("Basic ")


# -- token endpoint answers -> error types ------------------------------------------------------------


@pytest.mark.parametrize("failure", [
    answer(400, {"error": "invalid_client", "error_description": "client authentication failed"}),
    answer(401, {"error": "invalid_client"}),
    answer(403, raw=b"<html>Forbidden</html>"),
    answer(200, raw=b"<html>login page</html>"),
    answer(200, {"token_type": "bearer", "expires_in": 300}),
    answer(200, {"access_token": "", "token_type": "bearer"}),
    answer(200, {"access_token": "x", "token_type": "DPoP"}),
])
def test_token_endpoint_refusals_and_unusable_answers_are_auth_errors(secret_config, failure):
    tokens = auth.build(secret_config, BASE, http=FakeHttp(failure)).tokens
    with pytest.raises(AuthError, match="token endpoint"):
        tokens.token()


@pytest.mark.parametrize("failure", [answer(503, {}), answer(429, {}),
                                     requests.ConnectionError("refused"), requests.ReadTimeout("slow")])
def test_token_endpoint_outages_are_transient(secret_config, failure):
    tokens = auth.build(secret_config, BASE, http=FakeHttp(failure)).tokens
    with pytest.raises(TransientHttpError):
        tokens.token()


def test_error_description_is_kept_but_anything_we_sent_is_scrubbed(secret_config, rsa_pem):
    echo = answer(400, {"error": "invalid_client", "error_description": f"bad secret {CLIENT_SECRET}"})
    with pytest.raises(AuthError) as caught:
        auth.build(secret_config, BASE, http=FakeHttp(echo)).tokens.token()
    assert "invalid_client: bad secret <redacted>" in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value)

    class Echo(FakeHttp):
        def post(self, url: str, **kwargs: Any) -> requests.Response:
            self.posts.append(kwargs)
            assertion = kwargs["data"]["client_assertion"]
            return answer(400, {"error": "invalid_client", "error_description": f"cannot parse {assertion}"})

    with pytest.raises(AuthError) as caught:
        auth.build(smart_config(rsa_pem[1]), BASE, http=Echo()).tokens.token()
    assert "<redacted>" in str(caught.value)
    assert "eyJ" not in str(caught.value)  # no JWT, nor any part of one


# -- discovery -----------------------------------------------------------------------------------------


def test_token_endpoint_is_discovered_and_is_the_assertion_audience(rsa_pem):
    discovered = "https://fhir.hospital.example/auth/token"
    http = FakeHttp(token(), discovery=answer(200, {"token_endpoint": discovered}))
    tokens = auth.build(smart_config(rsa_pem[1], token_url=""), BASE, http=http).tokens
    tokens.token()
    assert http.gets == [f"{BASE}/.well-known/smart-configuration"]
    assert http.posts[0]["url"] == discovered
    claims = jwt.decode(sent_form(http)["client_assertion"], options={"verify_signature": False})
    assert claims["aud"] == discovered
    tokens.invalidate("at-1")
    http.answers.append(token("at-2"))
    tokens.token()
    assert len(http.gets) == 1  # discovered once


@pytest.mark.parametrize(("discovery", "message"), [
    (answer(404, {"resourceType": "OperationOutcome"}), "gave no token_endpoint"),
    (answer(200, raw=b"not json"), "gave no token_endpoint"),
    (answer(200, {"token_endpoint": "http://fhir.hospital.example/token"}), "plain http"),
])
def test_failed_discovery_asks_for_token_url(rsa_pem, discovery, message):
    tokens = auth.build(smart_config(rsa_pem[1], token_url=""), BASE, http=FakeHttp(discovery=discovery)).tokens
    with pytest.raises(ConfigError, match=rf"auth\.token_url.*{message}"):
        tokens.token()


# -- secrets stay out of reprs ---------------------------------------------------------------------


def test_reprs_show_no_secret(secret_config, rsa_pem, monkeypatch, tmp_path):
    monkeypatch.setenv("ANC_TEST_PW", "pw-9d8c7b6a")
    monkeypatch.setenv("ANC_TEST_TOKEN", "tok-5e4d3c2b")
    http = FakeHttp(token("at-secret-1234"), token("at-secret-5678"))
    built = [
        auth.build(AuthConfig(type="basic", username="anc", password_env="ANC_TEST_PW"), BASE),
        auth.build(AuthConfig(type="bearer", token_env="ANC_TEST_TOKEN"), BASE),
        auth.build(secret_config, BASE, http=http),
        auth.build(smart_config(rsa_pem[1]), BASE, http=http),
    ]
    for item in built[2:]:
        item.tokens.token()
    pem_body = rsa_pem[1].read_text().splitlines()[1]
    shown = " ".join(repr(item) + str(item) for item in built)
    shown += " ".join(repr(item.tokens) + repr(item.tokens.grant) for item in built[2:])
    for secret in ("pw-9d8c7b6a", "tok-5e4d3c2b", CLIENT_SECRET, "at-secret-1234", "at-secret-5678", pem_body):
        assert secret not in shown
    assert "anc-adapter" in shown and "redacted" in shown


@pytest.mark.parametrize("auth_type,variable,extra", [
    ("bearer", "ANC_FHIR_TOKEN", {"token_env": "SOME_OTHER_VAR"}),
    ("basic", "ANC_FHIR_PASSWORD", {"username": "u", "password_file": "/nonexistent"}),
])
def test_anc_environment_variables_override_the_configured_secret(monkeypatch, auth_type, variable, extra):
    import requests as _requests

    from adapter.config import AuthConfig
    from adapter.fhir import auth as auth_module

    monkeypatch.delenv("SOME_OTHER_VAR", raising=False)
    monkeypatch.setenv(variable, "from-the-environment")
    built = auth_module.build(AuthConfig(type=auth_type, **extra), "https://fhir.example.org/r4")
    prepared = built(_requests.Request("GET", "https://fhir.example.org/r4/metadata").prepare())
    header = prepared.headers["Authorization"]
    if auth_type == "bearer":
        assert header == "Bearer from-the-environment"
    else:
        import base64
        assert base64.b64decode(header.split()[1]).decode() == "u:from-the-environment"
