"""Every auth type end to end: `anc-adapter run` against the real local FHIR server behind an
authenticating front (tests/fronts.py) and, for the OAuth2 types, a strict local token endpoint
(tests/tokenserver.py) whose tokens the front demands. Then the failures: wrong password, wrong key,
a token that dies early (one refresh, then success), a token refused twice (exit 4, no loop), a broken
token endpoint — and no secret in any log line."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import requests

from adapter.cli import main
from adapter.config import AuthConfig
from adapter.fhir import auth
from builders import anc, patient
from fronts import Front, basic_gate, bearer_gate
from pki import ec_key, rsa_key, write_key
from tokenserver import Answer, TokenServer

pytestmark = pytest.mark.integration

CLIENT_ID = "anc-adapter"
KID = "anc-2026-01"
PASSWORD = "pw-Q3v8-basic-secret"
STATIC_TOKEN = "static-tok-7Hc2"
CLIENT_SECRET = "cs-M4x9-client-secret"


def toml(value: object) -> str:
    return json.dumps(value)  # a JSON string or bool is a TOML one


def write_config(tmp_path, base_url: str, **auth_keys: object) -> str:
    lines = ["[fhir]", f"base_url = {toml(base_url)}", "retries = 1", "retry_budget_s = 2", "", "[auth]"]
    lines += [f"{key} = {toml(value)}" for key, value in auth_keys.items()]
    path = tmp_path / "adapter.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(tmp_path, config: str, *extra: str) -> int:
    return main(["run", "--config", config, "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json",
                 *extra])


def load_two_patients(server) -> None:
    server.load(patient("p-severe"), anc("o-severe", "p-severe", 0.3),
                patient("p-normal"), anc("o-normal", "p-normal", 4.1))


def assert_flag_written(server) -> None:
    assert [f["subject"]["reference"] for f in server.flags()] == ["Patient/p-severe"]


@pytest.fixture
def token_server():
    with TokenServer(lifetime_s=120) as server:
        yield server


def key_pair(tmp_path, alg: str):
    key = rsa_key() if alg == "RS384" else ec_key()
    return key, write_key(key, tmp_path / f"{alg.lower()}.pem")


def smart_keys(key_file, token_url: str = "") -> dict[str, str]:
    return {"type": "smart_backend", "client_id": CLIENT_ID, "kid": KID, "private_key_file": str(key_file),
            "token_url": token_url, "scope": "system/Observation.rs system/Patient.r system/Flag.cru"}


# -- each type works --------------------------------------------------------------------------------


def test_basic(fhir_server, tmp_path, monkeypatch):
    load_two_patients(fhir_server)
    monkeypatch.setenv("ANC_TEST_FHIR_PASSWORD", PASSWORD)
    with Front(fhir_server.base_url, gate=basic_gate("anc", PASSWORD)) as front:
        config = write_config(tmp_path, front.base_url, type="basic", username="anc",
                              password_env="ANC_TEST_FHIR_PASSWORD")
        assert run(tmp_path, config) == 0
    assert_flag_written(fhir_server)
    assert set(front.statuses) == {200}


def test_static_bearer_token_from_a_file(fhir_server, tmp_path):
    load_two_patients(fhir_server)
    (tmp_path / "token").write_text(STATIC_TOKEN + "\n")
    with Front(fhir_server.base_url, gate=bearer_gate(STATIC_TOKEN)) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, type="bearer",
                                          token_file=str(tmp_path / "token"))) == 0
    assert_flag_written(fhir_server)


def test_client_credentials_with_a_secret_one_token_for_the_whole_run(fhir_server, tmp_path, token_server):
    load_two_patients(fhir_server)
    token_server.register_secret(CLIENT_ID, CLIENT_SECRET)
    (tmp_path / "secret").write_text(CLIENT_SECRET)
    with Front(fhir_server.base_url, gate=token_server.check_bearer) as front:
        config = write_config(tmp_path, front.base_url, type="client_credentials", client_id=CLIENT_ID,
                              client_secret_file=str(tmp_path / "secret"), token_url=token_server.url,
                              scope="system/*.cruds")
        assert run(tmp_path, config) == 0
    assert_flag_written(fhir_server)
    assert token_server.issued == 1  # cached across every request of the run
    assert token_server.forms == [{"grant_type": "client_credentials", "scope": "system/*.cruds"}]
    assert token_server.bearer_checks["refused"] == 0 and token_server.bearer_checks["accepted"] >= 3


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend(fhir_server, tmp_path, token_server, alg, capsys):
    load_two_patients(fhir_server)
    key, key_file = key_pair(tmp_path, alg)
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    with Front(fhir_server.base_url, gate=token_server.check_bearer) as front:
        config = write_config(tmp_path, front.base_url, **smart_keys(key_file, token_server.url))
        assert run(tmp_path, config, "--log-level", "DEBUG") == 0
    assert_flag_written(fhir_server)
    logged = capsys.readouterr().err
    assert '"event": "token"' in logged
    [access_token] = token_server.tokens
    assert access_token not in logged and token_server.forms[0]["client_assertion"] not in logged
    [(header, claims)] = token_server.assertions
    assert header == {"alg": alg, "kid": KID, "typ": "JWT"}
    assert claims["iss"] == claims["sub"] == CLIENT_ID and claims["aud"] == token_server.url
    [form] = token_server.forms
    assert form["scope"] == "system/Observation.rs system/Patient.r system/Flag.cru"


def test_smart_backend_discovers_the_token_endpoint(fhir_server, tmp_path, token_server):
    load_two_patients(fhir_server)
    key, key_file = key_pair(tmp_path, "ES384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    discovery = {"/fhir/.well-known/smart-configuration": {
        "token_endpoint": token_server.url, "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"]}}
    with Front(fhir_server.base_url, gate=token_server.check_bearer, documents=discovery) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, **smart_keys(key_file))) == 0
    assert_flag_written(fhir_server)
    assert token_server.assertions[0][1]["aud"] == token_server.url


# -- expiry and refresh ----------------------------------------------------------------------------


def test_a_token_that_dies_early_is_refreshed_once_and_the_request_retried(fhir_server, tmp_path, token_server):
    load_two_patients(fhir_server)
    key, key_file = key_pair(tmp_path, "ES384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    token_server.budgets = [2]  # the first token dies after /metadata and the first search page
    with Front(fhir_server.base_url, gate=token_server.check_bearer) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, **smart_keys(key_file, token_server.url))) == 0
    assert_flag_written(fhir_server)
    assert token_server.issued == 2
    assert front.statuses[401] == 1


def test_a_token_refused_again_after_the_refresh_exits_4_without_looping(fhir_server, tmp_path, token_server):
    load_two_patients(fhir_server)
    key, key_file = key_pair(tmp_path, "RS384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    token_server.budgets = [1, 0]  # /metadata works; the search is refused with the first and second token
    with Front(fhir_server.base_url, gate=token_server.check_bearer) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, **smart_keys(key_file, token_server.url))) == 4
    assert token_server.issued == 2
    assert front.statuses[401] == 2
    assert fhir_server.flags() == []


def test_short_lived_tokens_are_renewed_before_they_expire(tmp_path, token_server):
    """A token that lives 1 s, used across 1.2 s: the cache renews it before the server would refuse it."""
    key, key_file = key_pair(tmp_path, "ES384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    token_server.lifetime_s = 1
    config = AuthConfig(**smart_keys(key_file, token_server.url))
    session = requests.Session()
    session.auth = auth.build(config, "http://127.0.0.1:1/fhir")
    headers = []
    for _ in range(4):
        prepared = session.prepare_request(requests.Request("GET", "http://127.0.0.1:1/fhir/metadata"))
        headers.append(prepared.headers["Authorization"])
        assert token_server.check_bearer(prepared.headers) is None
        time.sleep(0.4)
    assert token_server.issued >= 2 and len(set(headers)) == token_server.issued


# -- refusals -> exit 4, secrets never shown ----------------------------------------------------------


def test_wrong_password_exits_4_and_the_password_is_never_shown(fhir_server, tmp_path, monkeypatch, capsys):
    load_two_patients(fhir_server)
    monkeypatch.setenv("ANC_TEST_FHIR_PASSWORD", "wrong-pw-Zq81")
    with Front(fhir_server.base_url, gate=basic_gate("anc", PASSWORD)) as front:
        config = write_config(tmp_path, front.base_url, type="basic", username="anc",
                              password_env="ANC_TEST_FHIR_PASSWORD")
        assert run(tmp_path, config, "--log-level", "DEBUG") == 4
    logged = capsys.readouterr().err
    assert "401" in logged
    assert "wrong-pw-Zq81" not in logged and PASSWORD not in logged
    assert fhir_server.flags() == []


def test_wrong_key_exits_4_with_the_token_endpoint_error_and_no_secret(tmp_path, token_server, capsys):
    registered, _ = key_pair(tmp_path, "RS384")
    token_server.register_key(CLIENT_ID, KID, registered.public_key())
    other = rsa_key()
    key_file = write_key(other, tmp_path / "other.pem")
    # No FHIR server needed: the first request needs a token, and the token endpoint refuses.
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", **smart_keys(key_file, token_server.url))
    assert run(tmp_path, config, "--log-level", "DEBUG") == 4
    logged = capsys.readouterr().err
    error = next(json.loads(line) for line in logged.splitlines() if '"event": "error"' in line)
    assert error["exit_code"] == 4 and "invalid_client" in error["msg"]
    assert token_server.refusals == ["invalid_client"]
    sent = token_server.forms[0]["client_assertion"]
    pem_lines = key_file.read_text().splitlines()[1:-1]
    assert sent not in logged and sent.split(".")[2] not in logged
    assert not any(line in logged for line in pem_lines)


def test_wrong_client_secret_exits_4_and_the_secret_is_never_shown(tmp_path, token_server, monkeypatch, capsys):
    token_server.register_secret(CLIENT_ID, CLIENT_SECRET)
    monkeypatch.setenv("ANC_TEST_CLIENT_SECRET", "cs-wrong-Lk20")
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", type="client_credentials", client_id=CLIENT_ID,
                          client_secret_env="ANC_TEST_CLIENT_SECRET", token_url=token_server.url)
    assert run(tmp_path, config, "--log-level", "DEBUG") == 4
    logged = capsys.readouterr().err
    assert "invalid_client" in logged
    assert "cs-wrong-Lk20" not in logged and CLIENT_SECRET not in logged


@pytest.mark.parametrize(("broken", "code"), [
    (Answer(200, b"<html>sign in</html>", "text/html"), 4),  # not JSON
    (Answer(200, b'{"token_type": "bearer", "expires_in": 60}'), 4),  # no access_token
    (Answer(400, b'{"error": "invalid_scope"}'), 4),
    (Answer(503, b"busy"), 3),  # an outage: retried, then unreachable
])
def test_a_broken_token_endpoint(tmp_path, token_server, broken, code):
    key, key_file = key_pair(tmp_path, "ES384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    token_server.override = broken
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", **smart_keys(key_file, token_server.url))
    assert run(tmp_path, config) == code


def test_an_unreachable_token_endpoint_exits_3(tmp_path):
    key, key_file = key_pair(tmp_path, "ES384")
    config = write_config(tmp_path, "http://127.0.0.1:9/fhir", **smart_keys(key_file, "http://127.0.0.1:9/token"))
    assert run(tmp_path, config) == 3


# -- the token endpoint is as strict as a real one ------------------------------------------------------


def post_assertion(token_server, assertion: str) -> requests.Response:
    return requests.post(token_server.url, timeout=10, data={
        "grant_type": "client_credentials", "scope": "system/Flag.cru", "client_assertion": assertion,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"})


def test_token_endpoint_refuses_wrong_aud_expired_and_replayed_assertions(tmp_path, token_server):
    key, key_file = key_pair(tmp_path, "RS384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    grant = auth.build(AuthConfig(**smart_keys(key_file, token_server.url)), "http://127.0.0.1:1/fhir").tokens.grant

    good = grant.assertion(token_server.url)
    assert post_assertion(token_server, good).status_code == 200
    replayed = post_assertion(token_server, good)
    wrong_aud = post_assertion(token_server, grant.assertion("http://127.0.0.1:1/other-token"))
    grant._clock = lambda: time.time() - 600  # signed ten minutes ago: exp has passed
    expired = post_assertion(token_server, grant.assertion(token_server.url))
    claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": token_server.url, "exp": int(time.time()) + 3600,
              "jti": "far-future"}
    too_long = post_assertion(token_server, jwt.encode(claims, key, "RS384", headers={"kid": KID}))

    for response, why in ((replayed, "replayed"), (wrong_aud, "aud"), (expired, "expired"), (too_long, "5 minutes")):
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_client"
        assert why in response.json()["error_description"]
    assert token_server.issued == 1


def test_check_through_smart_backend_auth_and_with_a_wrong_key(fhir_server, tmp_path, token_server, capsys):
    key, key_file = key_pair(tmp_path, "RS384")
    token_server.register_key(CLIENT_ID, KID, key.public_key())
    with Front(fhir_server.base_url, gate=token_server.check_bearer) as front:
        config = write_config(tmp_path, front.base_url, **smart_keys(key_file, token_server.url))
        assert main(["check", "--config", config]) == 0
        assert capsys.readouterr().out.rstrip().endswith("ready")
        wrong_file = write_key(rsa_key(), tmp_path / "wrong.pem")
        wrong = write_config(tmp_path, front.base_url, **smart_keys(wrong_file, token_server.url))
        assert main(["check", "--config", wrong]) == 4
        assert "[FAIL] authentication" in capsys.readouterr().out
