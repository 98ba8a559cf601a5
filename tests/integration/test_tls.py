"""TLS end to end: `anc-adapter run` through an HTTPS front (tests/fronts.py, certificates from a test CA
made by tests/pki.py) before the real local FHIR server. [fhir] verify as a CA bundle path, true (the
system store, which does not know our CA), false; mutual TLS with client_cert / client_key.

Without the client certificate the front ends the TLS handshake. We expect exit 3, not 4: exit 4 is for
refusals the server states in HTTP (401/403, token endpoint errors), and a TLS refusal reaches the client
as a broken connection (TLS 1.3 reports it as an alert on the first read; other servers simply reset),
which the client cannot tell apart from a network fault with certainty. Gateways that want to say
"certificate missing" in HTTP answer 400 or 403 instead, and those map to 3 and 4 as usual."""

from __future__ import annotations

import json
import re

import certifi
import pytest

from adapter.cli import main
from builders import anc, patient
from fronts import Front, tls_context
from pki import make_pki

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def ca_bundle_in_the_environment(monkeypatch):
    """Many hosts set these; requests lets them override Session.verify (psf/requests#3829). The
    configured [fhir] verify must win all the same."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", certifi.where())


@pytest.fixture
def loaded(fhir_server):
    """Five patients with a low count each: with page_size 2 the search takes three pages."""
    fhir_server.load(*[r for n in range(5) for r in (patient(f"p{n}"), anc(f"o{n}", f"p{n}", 0.4 + n / 10))])
    return fhir_server


def write_config(tmp_path, base_url: str, **fhir_keys: object) -> str:
    lines = ["[fhir]", f"base_url = {json.dumps(base_url)}", "page_size = 2", "retries = 1", "retry_budget_s = 2"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in fhir_keys.items()]
    path = tmp_path / "adapter.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run(tmp_path, config: str) -> int:
    return main(["run", "--config", config, "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json"])


def logged_error(captured: str) -> dict:
    return next(json.loads(line) for line in captured.splitlines() if '"event": "error"' in line)


def searches(front: Front) -> list[str]:
    return [p for p in front.paths if p.startswith("/fhir/Observation")]


def test_verify_with_the_ca_bundle_path_pages_through_the_front(loaded, tmp_path, pki):
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key)) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, verify=str(pki.ca_file))) == 0
    assert len(loaded.flags()) == 5
    assert len(searches(front)) >= 3  # every page came through the front: the next links were rewritten
    assert front.statuses.keys() <= {200, 201}


def test_default_verify_with_an_unknown_ca_exits_3_naming_tls(loaded, tmp_path, pki, capsys):
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key)) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url)) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"SSL|TLS", logged_error(err)["msg"])
    assert front.paths == []  # no request ever got past the handshake
    assert loaded.flags() == []


def test_certificate_verification_failure_is_not_retried_and_names_fhir_verify(loaded, tmp_path, pki, capsys):
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key)) as front:
        config = write_config(tmp_path, front.base_url).replace("retries = 1", "retries = 3")
        assert run(tmp_path, config) == 3
    message = logged_error(capsys.readouterr().err)["msg"]
    assert "verif" in message and "fhir.verify" in message
    assert front.handshake_failures == 1


def test_verify_false_accepts_the_unknown_ca(loaded, tmp_path, pki):
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key)) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, verify=False)) == 0
    assert len(loaded.flags()) == 5


def test_mutual_tls_with_the_client_certificate(loaded, tmp_path, pki):
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key, client_ca=pki.ca_file)) as front:
        config = write_config(tmp_path, front.base_url, verify=str(pki.ca_file), client_cert=str(pki.client_cert),
                              client_key=str(pki.client_key))
        assert run(tmp_path, config) == 0
    assert len(loaded.flags()) == 5
    assert front.handshake_failures == 0


def test_mutual_tls_without_the_client_certificate_exits_3(loaded, tmp_path, pki, capsys):
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key, client_ca=pki.ca_file)) as front:
        assert run(tmp_path, write_config(tmp_path, front.base_url, verify=str(pki.ca_file))) == 3
    assert "Traceback" not in capsys.readouterr().err
    assert front.paths == [] and front.handshake_failures >= 1
    assert loaded.flags() == []


@pytest.mark.parametrize(("keys", "named"), [
    ({"verify": ""}, "fhir.verify"),  # requests would read "" as "do not verify"
    ({"verify": "/nonexistent/ca.pem"}, "fhir.verify"),
    ({"client_cert": "/nonexistent/client.pem"}, "fhir.client_cert"),
    ({"client_key": "KEY"}, "fhir.client_key"),
])
def test_tls_settings_that_cannot_work_are_config_errors(tmp_path, pki, capsys, keys, named):
    keys = {k: str(pki.client_key) if v == "KEY" else v for k, v in keys.items()}
    assert run(tmp_path, write_config(tmp_path, "https://127.0.0.1:9/fhir", **keys)) == 2
    assert named in logged_error(capsys.readouterr().err)["msg"]
