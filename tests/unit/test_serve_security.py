"""The service's gatekeeping without HTTP: JWT verification (clock injected), replay memory, the fhirServer
allowlist, hook-call parsing and the [serve] config. End to end over HTTP: tests/integration/test_serve.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter import config as config_module
from adapter.config import TrustedClient
from adapter.errors import ConfigError
from adapter.serve import SERVICES, Allowlist, Refusal, Verifier, _SeenTokens, normalised_url, parse_call
from cdshooks import Ehr

AUD = "https://cds.hospital.test/cds-services/anc-patient-view"
T0 = 1_800_000_000.0


@pytest.fixture
def ehr(tmp_path):
    return Ehr(tmp_path)


def verifier(ehr: Ehr, clock: list[float]) -> Verifier:
    return Verifier((TrustedClient(iss=ehr.iss, jwks_file=str(ehr.jwks_file)),), clock=lambda: clock[0])


def token(ehr: Ehr, **claims) -> str:
    return ehr.token(**{"aud": AUD, "iat": int(T0), "exp": int(T0) + 300, **claims})


def refused(check, *args) -> str:
    with pytest.raises(Refusal) as caught:
        check(*args)
    assert caught.value.status == 401
    return caught.value.message


def test_a_valid_token_passes_once(ehr):
    clock = [T0 + 10]
    check = verifier(ehr, clock)
    signed = token(ehr)
    assert check.verify(f"Bearer {signed}", (AUD,))["iss"] == ehr.iss
    assert "already used" in refused(check.verify, f"Bearer {signed}", (AUD,))


def test_a_jti_is_forgotten_only_after_its_token_expired(ehr):
    clock = [T0 + 10]
    check = verifier(ehr, clock)
    signed = token(ehr, jti="same")
    check.verify(f"Bearer {signed}", (AUD,))
    clock[0] = T0 + 350  # expired (300 s) but within the skew: still remembered, still refused
    assert "already used" in refused(check.verify, f"Bearer {signed}", (AUD,))
    clock[0] = T0 + 1000
    assert "expired" in refused(check.verify, f"Bearer {signed}", (AUD,))


@pytest.mark.parametrize("claims,why", [
    ({"iat": int(T0) + 120}, "not valid yet"),
    ({"exp": int(T0) + 7200}, "more than 3600 s ahead"),
    ({"jti": ""}, "jti"),
    ({"iat": None}, "iat claim is required"),
    # JSON as Python reads it takes NaN: such an exp compares false to everything, so it never expired and
    # its jti was forgotten at once (replayable for ever).
    ({"exp": float("nan")}, "exp must be a number"),
    ({"iat": float("nan")}, "iat must be a number"),
    ({"nbf": float("-inf")}, "nbf must be a number"),
])
def test_claims_we_insist_on(ehr, claims, why):
    check = verifier(ehr, [T0 + 10])
    assert why in refused(check.verify, f"Bearer {token(ehr, **claims)}", (AUD,))


def test_a_jku_header_is_never_followed(ehr, tmp_path):
    # A token signed by a stranger's key that points to the stranger's JWKS: our keys only, so refused.
    (tmp_path / "stranger").mkdir()
    stranger = Ehr(tmp_path / "stranger", kid=ehr.kid)
    stranger.iss = ehr.iss
    forged = stranger.token(aud=AUD, iat=int(T0), exp=int(T0) + 300,
                            headers={"jku": "http://127.0.0.1:9/jwks.json"})
    assert "signature" in refused(verifier(ehr, [T0]).verify, f"Bearer {forged}", (AUD,))


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer not.a.jwt"])
def test_missing_or_unusable_authorization(ehr, header):
    refused(verifier(ehr, [T0]).verify, header, (AUD,))


def test_replay_memory_is_bounded_and_refuses_rather_than_forgets():
    seen = _SeenTokens(limit=2)
    assert seen.first_use("i", "a", expires=100, now=0)
    assert seen.first_use("i", "b", expires=200, now=0)
    with pytest.raises(Refusal) as full:
        seen.first_use("i", "c", expires=300, now=50)
    assert full.value.status == 503
    assert not seen.first_use("i", "a", expires=100, now=60)  # still remembered
    assert seen.first_use("i", "c", expires=300, now=150)  # "a" expired: room again
    assert not seen.first_use("i", "b", expires=200, now=150)


def test_jwks_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "jwks.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"serve.trusted_clients\[0\].jwks_file"):
        Verifier((TrustedClient(iss="x", jwks_file=str(bad)),))


@pytest.mark.parametrize("url,form", [
    ("https://FHIR.Hospital.test:443/r4/", "https://fhir.hospital.test/r4"),
    ("http://127.0.0.1:8080/fhir", "http://127.0.0.1:8080/fhir"),
    ("HTTP://127.0.0.1:80/fhir", "http://127.0.0.1/fhir"),
    ("https://user@fhir.hospital.test/r4", None),
    ("https://fhir.hospital.test/r4?x=1", None),
    ("https://fhir.hospital.test/r4#x", None),
    ("file:///etc/passwd", None),
    ("https://fhir.hospital.test:99999/r4", None),
    ("gopher://fhir.hospital.test/r4", None),
])
def test_url_normalisation(url, form):
    assert normalised_url(url) == form


@pytest.mark.parametrize("asked,allowed", [
    ("https://fhir.hospital.test/r4", True),
    ("https://FHIR.hospital.test:443/r4/", True),
    ("https://fhir.hospital.test/r4/../admin", False),
    ("https://fhir.hospital.test/r4.evil.test", False),
    ("https://fhir.hospital.test.evil.test/r4", False),
    ("https://fhir.hospital.test/r", False),
    ("http://fhir.hospital.test/r4", False),
    ("https://fhir.hospital.test@evil.test/r4", False),
])
def test_allowlist_is_exact(asked, allowed):
    assert (Allowlist(("https://fhir.hospital.test/r4",)).base_for(asked) is not None) is allowed


def test_the_configured_base_is_what_gets_fetched():
    assert Allowlist(("https://fhir.hospital.test/r4/",)).base_for("HTTPS://fhir.hospital.test/r4") == \
        "https://fhir.hospital.test/r4"


@pytest.mark.parametrize("body,field", [
    (b"\xff\xfe", "not valid JSON"),
    (b'{"a": Infinity}', "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (json.dumps({"hook": "patient-view", "hookInstance": 1, "context": {"patientId": "p"}}).encode(), "hookInstance"),
    (json.dumps({"hook": "patient-view", "hookInstance": "h", "context": {"patientId": "p"},
                 "fhirServer": 5}).encode(), "fhirServer"),
    (json.dumps({"hook": "patient-view", "hookInstance": "h", "context": {"patientId": "p"}, "fhirServer": "x",
                 "fhirAuthorization": {"access_token": "t", "token_type": "MAC"}}).encode(), "token_type"),
    (json.dumps({"hook": "patient-view", "hookInstance": "h", "context": {"patientId": "p"},
                 "prefetch": []}).encode(), "prefetch"),
    (json.dumps({"hook": "patient-view", "hookInstance": "h", "context": {"patientId": ".."}}).encode(),
     "context.patientId"),
])
def test_parse_call_names_the_field(body, field):
    with pytest.raises(Refusal) as caught:
        parse_call(body, SERVICES["anc-patient-view"])
    assert caught.value.status == 400 and field in caught.value.message


def _load(tmp_path: Path, text: str):
    path = tmp_path / "adapter.toml"
    path.write_text(text)
    return config_module.load(path)


@pytest.mark.parametrize("text,key", [
    ('[[serve.trusted_clients]]\njwks_file = "/x"\n', "serve.trusted_clients[0].iss"),
    ('[[serve.trusted_clients]]\niss = "a"\n', "serve.trusted_clients[0]: give exactly one"),
    ('[[serve.trusted_clients]]\niss = "a"\njwks_file = "/x"\njwks_url = "https://x/jwks"\n', "exactly one"),
    ('[[serve.trusted_clients]]\niss = "a"\njwks_url = "http://ehr.test/jwks"\n', "jwks_url: must be an https"),
    ('[[serve.trusted_clients]]\niss = "a"\njwks_file = "/x"\nkey = "k"\n', "[serve.trusted_clients[0]] unknown key"),
    ('[[serve.trusted_clients]]\niss = "a"\njwks_file = "/x"\n[[serve.trusted_clients]]\niss = "a"\njwks_file = "/y"\n',
     "listed twice"),
    ('[serve]\ntrusted_clients = "a"\n', "serve.trusted_clients: expected an array of tables"),
    ('[serve]\nfhir_servers = ["ftp://x"]\n', "serve.fhir_servers[0]"),
    ('[serve]\nfhir_servers = "https://x"\n', "serve.fhir_servers: expected a list"),
    ('[serve]\npublic_url = "cds.hospital.test"\n', "serve.public_url"),
    ('[serve]\norder_sign_recent = "7 days"\n', "serve.order_sign_recent"),
    ('[serve]\nmax_body_bytes = 10\n', "serve.max_body_bytes"),
    ('[serve]\nport = 70000\n', "serve.port"),
    # Subscription mode exists now (docs/real-time.md): the key is known, and typed.
    ('[serve]\nsubscriptions = "yes"\n', "serve.subscriptions"),
    ('[serve]\nsubscriptions = true\nhost = "0.0.0.0"\n', "serve.public_url: required with serve.subscriptions"),
])
def test_serve_config_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert key in str(caught.value)


def test_serve_config_defaults_and_public_url(tmp_path):
    loaded = _load(tmp_path, '[serve]\nport = 9443\n[[serve.trusted_clients]]\niss = "a"\n'
                             'jwks_url = "https://ehr.test/.well-known/jwks.json"\n')
    assert loaded.serve.base_url == "http://127.0.0.1:9443"
    assert loaded.serve.trusted_clients == (TrustedClient(iss="a", jwks_url="https://ehr.test/.well-known/jwks.json"),)
    assert loaded.serve.fhir_servers == ()
    explicit = _load(tmp_path, '[serve]\npublic_url = "https://cds.hospital.test/anc/"\n')
    assert explicit.serve.base_url == "https://cds.hospital.test/anc"
