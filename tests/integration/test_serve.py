"""`anc-adapter serve` as an EHR calls it: the service runs as a process, is called over HTTP with JWTs
signed by a key made here, and reads the real local FHIR server through a front that demands the EHR's
fhirAuthorization token (so a card proves the token was passed on)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
import pytest
import requests

from adapter.cli import main
from adapter.localserver import sekmet
from builders import anc, patient, transaction
from cdshooks import Ehr, RecordingListener, ServeProcess, bundle, hook_request, serve_process
from context_builders import (DUFFY_CODE, DUFFY_SYSTEM, RXNORM, duffy_null_marker, medication,
                              medication_administration, site_mappings, temperature)
from fronts import Front, bearer_gate
from pki import ec_key

pytestmark = pytest.mark.integration

FHIR_TOKEN = "ehr-issued-access-token-for-the-fhir-server"
NAME = "Testperson"  # every synthetic patient's family name: must never appear in an answer or a log
NOW = datetime.now(timezone.utc)
ATC = "http://www.whocc.no/atc"
UNREACHABLE = "http://127.0.0.1:9/fhir"  # allowlisted, but nothing listens there (discard port)


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


# Patients on the FHIR server, by what the service should say about them.
SERVER_DATA = [
    patient("sv-severe"), anc("sv-severe-1", "sv-severe", 1.8, effective=ago(days=3)),
    anc("sv-severe-2", "sv-severe", 0.8, effective=ago(days=2)), anc("sv-severe-3", "sv-severe", 0.3, effective=ago(hours=6)),
    patient("sv-moderate"), anc("sv-moderate-1", "sv-moderate", 0.8, effective=ago(days=1)),
    patient("sv-mild"), anc("sv-mild-1", "sv-mild", 1.2, effective=ago(days=1)),
    patient("sv-normal"), anc("sv-normal-1", "sv-normal", 0.4, effective=ago(days=5)),
    anc("sv-normal-2", "sv-normal", 2.5, effective=ago(days=1)),
    patient("sv-stale"), anc("sv-stale-1", "sv-stale", 2.5, effective=ago(days=10)),
    patient("sv-nocount"),
    # Another patient's severe count must never leak into these patients' cards.
    patient("sv-other"), anc("sv-other-1", "sv-other", 0.1, effective=ago(hours=1)),
    # Clinical context (CONTRACT §5b): a fever two hours after a severe count; chemotherapy ten days before
    # a moderate count, named by the Medication it points at (RxNorm); a fall projected below 500.
    patient("sv-febrile"), anc("sv-febrile-1", "sv-febrile", 0.32, effective=ago(hours=6)),
    temperature("sv-febrile-t", "sv-febrile", 38.5, ago(hours=4)),
    patient("sv-chemo"), anc("sv-chemo-1", "sv-chemo", 0.8, effective=ago(hours=6)),
    medication("sv-cyclo", {"coding": [{"system": RXNORM, "code": "3002", "display": "cyclophosphamide"}]}),
    medication_administration("sv-chemo-ma", "sv-chemo", ago(days=10, hours=6), medication_id="sv-cyclo"),
    patient("sv-proj"), anc("sv-proj-1", "sv-proj", 0.9, effective=ago(hours=18)),
    anc("sv-proj-2", "sv-proj", 0.6, effective=ago(hours=6)),
    # Site-marked Duffy-null (graded so only by the service whose mappings name the marker code).
    patient("sv-duffy-low"), anc("sv-duffy-low-1", "sv-duffy-low", 1.209, effective=ago(hours=6)),
    duffy_null_marker("sv-duffy-low-c", "sv-duffy-low"),
    patient("sv-duffy-ok"), anc("sv-duffy-ok-1", "sv-duffy-ok", 1.3, effective=ago(hours=6)),
    duffy_null_marker("sv-duffy-ok-c", "sv-duffy-ok"),
]


@pytest.fixture(scope="module")
def fhir_front():
    """One real server for the module (each test reads its own patients) behind a front that lets
    through only the EHR's access token."""
    with sekmet() as base_url:
        response = requests.post(base_url, json=transaction(*SERVER_DATA),
                                 headers={"Content-Type": "application/fhir+json"}, timeout=60)
        assert response.status_code == 200, response.text[:300]
        with Front(base_url, gate=bearer_gate(FHIR_TOKEN)) as front:
            yield front


@pytest.fixture(scope="module")
def ehr(tmp_path_factory):
    return Ehr(tmp_path_factory.mktemp("ehr"))


def _config(directory: Path, ehr: Ehr, fhir_servers: list[str], mappings: Path | None = None) -> Path:
    path = directory / "adapter.toml"
    site = f'[mappings]\npath = "{mappings}"\n' if mappings else ""
    path.write_text(f"""{site}
[output]
resources = ["Flag", "RiskAssessment"]

[serve]
fhir_servers = {json.dumps(fhir_servers)}
order_sign_recent = "P7D"
max_body_bytes = 65536

[[serve.trusted_clients]]
iss = "{ehr.iss}"
jwks_file = "{ehr.jwks_file}"
""")
    return path


@pytest.fixture(scope="module")
def service(fhir_front, ehr, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    servers = [fhir_front.base_url + "/", UNREACHABLE]
    with serve_process(_config(directory, ehr, servers), directory) as served:
        yield served


@pytest.fixture(scope="module")
def site_service(fhir_front, ehr, tmp_path_factory):
    """The same service with a site's mappings that mark Duffy-null patients by a Condition code."""
    directory = tmp_path_factory.mktemp("serve-site")
    mappings = site_mappings(directory, [f"{DUFFY_SYSTEM}|{DUFFY_CODE}"])
    with serve_process(_config(directory, ehr, [fhir_front.base_url + "/"], mappings), directory) as served:
        yield served


def call(service: ServeProcess, ehr: Ehr, service_id: str, body: dict, token: str | None = "sign") -> requests.Response:
    url = service.url(service_id)
    headers = {}
    if token == "sign":
        token = ehr.token(aud=url)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, json=body, headers=headers, timeout=60)


def patient_view(service, ehr, fhir_front, patient_id: str) -> list[dict]:
    response = call(service, ehr, "anc-patient-view",
                    hook_request("patient-view", patient_id, fhir_front.base_url, FHIR_TOKEN))
    assert response.status_code == 200, response.text
    return response.json()["cards"]


def chemotherapy_order(text: str = "Cyclophosphamide 750 mg/m2 IV") -> dict:
    return bundle({
        "resourceType": "MedicationRequest", "id": "draft-1", "status": "draft", "intent": "order",
        "subject": {"reference": "Patient/whoever"},
        "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "L01AA01", "display": "cyclophosphamide"}],
                                      "text": text},
    })


def test_discovery_lists_both_services_with_prefetch_templates(service):
    response = requests.get(service.url(), timeout=30)
    assert response.status_code == 200
    services = {s["id"]: s for s in response.json()["services"]}
    assert {s["hook"] for s in services.values()} == {"patient-view", "order-sign"}
    assert set(services) == {"anc-patient-view", "anc-order-sign"}
    prefetch = services["anc-patient-view"]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert "http://loinc.org|751-8" in prefetch["ancCounts"] and "http://loinc.org|753-4" in prefetch["ancCounts"]
    assert "http://loinc.org|8310-5" in prefetch["temperatures"]
    for key in ("medicationAdministrations", "medicationRequests", "procedures", "conditions"):
        assert "{{context.patientId}}" in prefetch[key]


@pytest.mark.parametrize("patient_id,indicator,grade,value", [
    ("sv-severe", "critical", "Severe neutropenia", "300"),
    ("sv-moderate", "warning", "Moderate neutropenia", "800"),
    ("sv-mild", "info", "Mild neutropenia", "1200"),
])
def test_patient_view_card_per_grade_fetched_with_the_ehr_token(service, ehr, fhir_front, patient_id, indicator,
                                                                grade, value):
    before = len(fhir_front.paths)
    cards = patient_view(service, ehr, fhir_front, patient_id)
    assert len(cards) == 1
    card = cards[0]
    assert card["indicator"] == indicator
    assert card["summary"].startswith(f"{grade}: ANC {value} cells/µL")
    assert len(card["summary"]) < 140
    assert card["source"]["label"] == "anc-adapter (clinical profile)"
    assert f"| {value} |" in card["detail"]
    assert "Rule: clinical profile, adult thresholds" in card["detail"] and "severe < 500" in card["detail"]
    assert "| 100 |" not in card["detail"]  # sv-other's count never shows up
    assert NAME not in json.dumps(card)
    # Read through the front with the EHR's token (the front refuses anything else).
    assert len(fhir_front.paths) > before
    assert any(path.startswith(f"/fhir/Patient/{patient_id}") for path in fhir_front.paths[before:])


def test_patient_view_severe_card_lists_the_recent_counts_and_the_episode(service, ehr, fhir_front):
    card = patient_view(service, ehr, fhir_front, "sv-severe")[0]
    detail = card["detail"]
    # Newest first: the severe count, then the moderate one that opened the episode, then the normal one.
    assert detail.index("| 300 |") < detail.index("| 800 |") < detail.index("| 1800 |")
    assert "Neutropenic since" in detail and "2 abnormal counts" in detail


@pytest.mark.parametrize("patient_id", ["sv-normal", "sv-nocount"])
def test_patient_view_no_card_when_the_latest_count_is_normal_or_missing(service, ehr, fhir_front, patient_id):
    assert patient_view(service, ehr, fhir_front, patient_id) == []


def test_patient_view_from_prefetch_only_never_contacts_a_server_off_the_allowlist(service, ehr):
    prefetch = {
        "patient": patient("pf-1"),
        "ancCounts": bundle(anc("pf-1-a", "pf-1", 0.45, effective=ago(hours=3)),
                            anc("pf-1-b", "pf-1", 2.0, effective=ago(days=4)),
                            anc("pf-x", "pf-someone-else", 0.05, effective=ago(hours=1))),
        "temperatures": bundle(),
        "medicationAdministrations": bundle(), "medicationRequests": bundle(), "procedures": bundle(),
        "conditions": bundle(),
    }
    with RecordingListener() as listener:
        response = call(service, ehr, "anc-patient-view",
                        hook_request("patient-view", "pf-1", listener.base_url, "some-token", prefetch))
        assert response.status_code == 200, response.text
        cards = response.json()["cards"]
        assert [c["indicator"] for c in cards] == ["critical"]
        assert cards[0]["summary"].startswith("Severe neutropenia: ANC 450 cells/µL")
        assert "| 50 |" not in cards[0]["detail"]
        assert listener.connections == 0


def test_prefetch_without_the_context_keys_still_grades(service, ehr):
    prefetch = {"patient": patient("pf-2"), "ancCounts": bundle(anc("pf-2-a", "pf-2", 0.9, effective=ago(hours=3)))}
    with RecordingListener() as listener:
        response = call(service, ehr, "anc-patient-view",
                        hook_request("patient-view", "pf-2", listener.base_url, None, prefetch))
        assert response.status_code == 200, response.text
        assert [c["indicator"] for c in response.json()["cards"]] == ["warning"]
        assert listener.connections == 0


def order_sign(service, ehr, fhir_front, patient_id: str, orders: dict | None = None) -> list[dict]:
    response = call(service, ehr, "anc-order-sign",
                    hook_request("order-sign", patient_id, fhir_front.base_url, FHIR_TOKEN,
                                 draft_orders=orders or chemotherapy_order()))
    assert response.status_code == 200, response.text
    return response.json()["cards"]


def test_order_sign_warns_on_chemotherapy_with_an_abnormal_latest_count(service, ehr, fhir_front):
    cards = order_sign(service, ehr, fhir_front, "sv-moderate")
    assert [c["indicator"] for c in cards] == ["warning"]
    assert cards[0]["summary"].startswith("Chemotherapy order: latest ANC 800 cells/µL (moderate neutropenia)")
    assert len(cards[0]["summary"]) < 140
    assert "Cyclophosphamide 750 mg/m2 IV" in cards[0]["detail"]


@pytest.mark.parametrize("patient_id", ["sv-stale", "sv-nocount"])
def test_order_sign_warns_when_no_count_in_the_last_7_days(service, ehr, fhir_front, patient_id):
    cards = order_sign(service, ehr, fhir_front, patient_id)
    assert [c["indicator"] for c in cards] == ["warning"]
    assert cards[0]["summary"] == "Chemotherapy order: no ANC in the last 7 days"


def test_order_sign_no_card_for_a_recent_normal_count_or_an_order_that_is_not_chemotherapy(service, ehr, fhir_front):
    assert order_sign(service, ehr, fhir_front, "sv-normal") == []
    paracetamol = bundle({"resourceType": "MedicationRequest", "id": "d2", "status": "draft", "intent": "order",
                          "subject": {"reference": "Patient/sv-moderate"},
                          "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "N02BE01"}]}})
    assert order_sign(service, ehr, fhir_front, "sv-moderate", paracetamol) == []


# --- refusals -------------------------------------------------------------------------------------------

def _refused_tokens(ehr: Ehr, url: str) -> dict[str, str | None]:
    other_key = ec_key()
    now = int(datetime.now(timezone.utc).timestamp())
    stranger = Ehr.__new__(Ehr)
    stranger.iss, stranger.kid, stranger.key = "https://stranger.test", ehr.kid, other_key
    return {
        "missing": None,
        "bad signature": ehr.token(aud=url, key=other_key),
        "wrong aud": ehr.token(aud=url + "-other"),
        "expired": ehr.token(aud=url, iat=now - 900, exp=now - 600),
        "future iat": ehr.token(aud=url, iat=now + 3600, exp=now + 3900),
        "unknown iss": stranger.token(aud=url),
        "no jti": ehr.token(aud=url, jti=None),
        "no exp": ehr.token(aud=url, exp=None),
        "HS256": jwt.encode({"iss": ehr.iss, "aud": url, "iat": now, "exp": now + 300, "jti": "h"},
                            "a-shared-secret-that-is-long-enough-for-hs256", algorithm="HS256",
                            headers={"kid": ehr.kid}),
        "alg none": jwt.encode({"iss": ehr.iss, "aud": url, "iat": now, "exp": now + 300, "jti": "n"},
                               None, algorithm="none"),
        "not a JWT": "not-a-jwt",
    }


@pytest.mark.parametrize("case", ["missing", "bad signature", "wrong aud", "expired", "future iat", "unknown iss",
                                  "no jti", "no exp", "HS256", "alg none", "not a JWT"])
def test_refused_tokens_get_401_with_nothing_about_the_patient(service, ehr, fhir_front, case):
    url = service.url("anc-patient-view")
    before = len(fhir_front.paths)
    token = _refused_tokens(ehr, url)[case]
    response = call(service, ehr, "anc-patient-view",
                    hook_request("patient-view", "sv-severe", fhir_front.base_url, FHIR_TOKEN), token=token)
    assert response.status_code == 401, (case, response.text)
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "sv-severe" not in response.text and NAME not in response.text and "cards" not in response.text
    assert len(fhir_front.paths) == before  # nothing read for a caller we do not trust


def test_a_replayed_token_is_refused(service, ehr, fhir_front):
    url = service.url("anc-patient-view")
    token = ehr.token(aud=url)
    body = hook_request("patient-view", "sv-mild", fhir_front.base_url, FHIR_TOKEN)
    assert call(service, ehr, "anc-patient-view", body, token=token).status_code == 200
    replay = call(service, ehr, "anc-patient-view", body, token=token)
    assert replay.status_code == 401 and "already used" in replay.text and "sv-mild" not in replay.text


def test_a_token_for_one_service_is_refused_by_the_other(service, ehr, fhir_front):
    token = ehr.token(aud=service.url("anc-patient-view"))
    response = call(service, ehr, "anc-order-sign",
                    hook_request("order-sign", "sv-moderate", fhir_front.base_url, FHIR_TOKEN,
                                 draft_orders=chemotherapy_order()), token=token)
    assert response.status_code == 401


@pytest.mark.parametrize("variant", ["plain", "spelled-differently", "userinfo"])
def test_a_fhir_server_off_the_allowlist_is_refused_and_never_contacted(service, ehr, fhir_front, variant):
    with RecordingListener() as listener:
        port = listener.base_url.split(":")[2].split("/")[0]
        fhir_server = {
            "plain": listener.base_url,
            "spelled-differently": f"HTTP://127.0.0.1:{port}/fhir/",
            "userinfo": f"http://{fhir_front.base_url.split('/')[2]}@127.0.0.1:{port}/fhir",
        }[variant]
        response = call(service, ehr, "anc-patient-view",
                        hook_request("patient-view", "sv-severe", fhir_server, FHIR_TOKEN))
        assert response.status_code == 412, response.text
        assert "fhir_servers" in response.json()["issue"][0]["diagnostics"]
        assert "sv-severe" not in response.text
        assert listener.connections == 0


def test_an_allowlisted_server_that_cannot_be_reached_is_502(service, ehr):
    response = call(service, ehr, "anc-patient-view", hook_request("patient-view", "sv-severe", UNREACHABLE, "t"))
    assert response.status_code == 502, response.text
    assert response.json()["resourceType"] == "OperationOutcome" and "sv-severe" not in response.text


def test_a_patient_the_fhir_server_does_not_have_is_412(service, ehr, fhir_front):
    response = call(service, ehr, "anc-patient-view",
                    hook_request("patient-view", "sv-absent", fhir_front.base_url, FHIR_TOKEN))
    assert response.status_code == 412 and "patient" in response.json()["issue"][0]["diagnostics"]


def test_a_token_the_fhir_server_refuses_is_412(service, ehr, fhir_front):
    response = call(service, ehr, "anc-patient-view",
                    hook_request("patient-view", "sv-severe", fhir_front.base_url, "a-wrong-fhir-token"))
    assert response.status_code == 412
    assert "fhirAuthorization" in response.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("case,body,message", [
    ("not JSON", b"{not json", "not valid JSON"),
    ("JSON array", b"[]", "JSON object"),
    ("NaN", b'{"hook": "patient-view", "x": NaN}', "not valid JSON"),
    ("no hook", {"hookInstance": "x", "context": {"patientId": "p"}}, "hook"),
    ("other hook", {"hook": "order-select", "hookInstance": "x", "context": {"patientId": "p"}}, "hook"),
    ("no context", {"hook": "patient-view", "hookInstance": "x"}, "context"),
    ("no patientId", {"hook": "patient-view", "hookInstance": "x", "context": {}}, "context.patientId"),
    ("bad patientId", {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "a/../b"}},
     "context.patientId"),
    ("no hookInstance", {"hook": "patient-view", "context": {"patientId": "p"}}, "hookInstance"),
    ("token without server", {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p"},
                              "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"}}, "fhirServer"),
    ("oversized", {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p"},
                   "padding": "x" * 100_000}, "max_body_bytes"),
])
def test_malformed_requests_are_400_without_a_stack_trace(service, ehr, case, body, message):
    url = service.url("anc-patient-view")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(url, data=data, timeout=60, headers={
        "Authorization": f"Bearer {ehr.token(aud=url)}", "Content-Type": "application/json"})
    assert response.status_code == 400, (case, response.text)
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert message in outcome["issue"][0]["diagnostics"]
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_an_oversized_chunked_body_is_400(service, ehr):
    url = service.url("anc-patient-view")

    def chunks():
        yield b'{"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p"}, "pad": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = requests.post(url, data=chunks(), timeout=60, headers={"Authorization": f"Bearer {ehr.token(aud=url)}"})
    assert response.status_code == 400 and "max_body_bytes" in response.text


def test_a_port_already_in_use_is_a_configuration_error(ehr, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [sys.executable, "-m", "adapter", "serve", "--config", str(_config(tmp_path, ehr, [])),
             "--port", str(port), "--log-format", "json"], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "serve.port" in finished.stderr


def test_order_sign_without_draft_orders_is_400(service, ehr):
    response = call(service, ehr, "anc-order-sign", hook_request("order-sign", "sv-moderate"))
    assert response.status_code == 400 and "draftOrders" in response.text


def test_unknown_service_is_404(service, ehr):
    url = service.url("anc-nothing")
    response = requests.post(url, json={}, headers={"Authorization": f"Bearer {ehr.token(aud=url)}"}, timeout=30)
    assert response.status_code == 404


def test_feedback_is_accepted(service, ehr):
    url = service.url("anc-patient-view") + "/feedback"
    body = {"feedback": [{"card": "0d4a7b7e-0000-4000-8000-000000000001", "outcome": "accepted",
                          "outcomeTimestamp": ago(minutes=1)}]}
    response = requests.post(url, json=body, headers={"Authorization": f"Bearer {ehr.token(aud=url)}"}, timeout=30)
    assert response.status_code == 200
    unsigned = requests.post(url, json=body, timeout=30)
    assert unsigned.status_code == 401


def test_health_and_metrics(service, ehr, fhir_front):
    assert requests.get(f"{service.base_url}/healthz", timeout=30).json() == {"status": "ok"}
    patient_view(service, ehr, fhir_front, "sv-moderate")
    call(service, ehr, "anc-patient-view", hook_request("patient-view", "sv-moderate"), token=None)
    metrics = requests.get(f"{service.base_url}/metrics", timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'anc_adapter_cds_requests_total{service="anc-patient-view",status="200"}' in text
    assert 'anc_adapter_cds_requests_total{service="anc-patient-view",status="401"}' in text
    assert 'anc_adapter_cds_request_duration_seconds_count{service="anc-patient-view"}' in text
    assert 'anc_adapter_cds_cards_total{indicator="warning",service="anc-patient-view"}' in text


def test_logs_hold_no_names_no_patient_ids_and_no_stack_traces(service, ehr, fhir_front):
    patient_view(service, ehr, fhir_front, "sv-severe")
    log = service.log()
    assert '"event": "cds-call"' in log
    assert NAME not in log and "Traceback" not in log
    assert not any(p["id"] in log for p in SERVER_DATA if p["resourceType"] == "Patient")


def test_sigterm_stops_the_service_with_exit_0(ehr, tmp_path):
    with serve_process(_config(tmp_path, ehr, []), tmp_path) as served:
        assert requests.get(f"{served.base_url}/healthz", timeout=30).status_code == 200
        served.process.send_signal(signal.SIGTERM)
        try:
            code = served.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not stop on SIGTERM")
        assert code == 0
        assert any(e.get("event") == "serve-stop" for e in served.events())


# --- clinical context: cards from the same assessment core as `run` (CONTRACT §5b, §8) ---------------------

def test_a_febrile_patient_gets_a_critical_febrile_neutropenia_card(service, ehr, fhir_front):
    [card] = patient_view(service, ehr, fhir_front, "sv-febrile")
    assert card["indicator"] == "critical"
    assert card["summary"].startswith("Febrile neutropenia: 38.5 °C with severe neutropenia: ANC 320 cells/µL")
    assert len(card["summary"]) < 140
    fever_at = ago(hours=4)
    assert f"**Febrile neutropenia**: temperature 38.5 °C at {fever_at[:10]} {fever_at[11:16]} UTC" in card["detail"]
    assert "Febrile neutropenia (IDSA)" in card["detail"]
    assert NAME not in json.dumps(card)
    assert any(path.startswith("/fhir/Observation?") and "8310-5" in path for path in fhir_front.paths)


def test_a_febrile_patient_from_prefetch_only(service, ehr):
    prefetch = {
        "patient": patient("pf-fn"),
        "ancCounts": bundle(anc("pf-fn-a", "pf-fn", 0.32, effective=ago(hours=6))),
        "temperatures": bundle(temperature("pf-fn-t", "pf-fn", 38.5, ago(hours=4)),
                               temperature("pf-x-t", "pf-someone-else", 40.0, ago(hours=5))),
        "medicationAdministrations": bundle(), "medicationRequests": bundle(), "procedures": bundle(),
        "conditions": bundle(),
    }
    with RecordingListener() as listener:
        response = call(service, ehr, "anc-patient-view",
                        hook_request("patient-view", "pf-fn", listener.base_url, "some-token", prefetch))
        assert response.status_code == 200, response.text
        [card] = response.json()["cards"]
        assert card["indicator"] == "critical"
        assert card["summary"].startswith("Febrile neutropenia: 38.5 °C with severe neutropenia: ANC 320 cells/µL")
        assert "40.0 °C" not in card["detail"]  # another patient's fever
        assert listener.connections == 0


def test_chemotherapy_via_its_medication_is_in_the_detail(service, ehr, fhir_front):
    [card] = patient_view(service, ehr, fhir_front, "sv-chemo")
    assert card["indicator"] == "warning"
    given = ago(days=10, hours=6)[:10]
    assert f"After chemotherapy: cyclophosphamide on {given} (10 days before this count)." in card["detail"]


def test_a_projection_is_in_the_detail(service, ehr, fhir_front):
    [card] = patient_view(service, ehr, fhir_front, "sv-proj")
    assert card["indicator"] == "warning"
    assert re.search(r"Projected to fall below 500 cells/µL by \d{4}-\d\d-\d\d \d\d:\d\d UTC", card["detail"])


def test_a_site_marked_duffy_null_patient_is_graded_from_the_site_threshold(site_service, service, ehr, fhir_front):
    [card] = patient_view(site_service, ehr, fhir_front, "sv-duffy-low")
    assert card["indicator"] == "info" and card["summary"].startswith("Mild neutropenia: ANC 1209 cells/µL")
    assert "Site-marked Duffy-null threshold: normal from 1210 cells/µL" in card["detail"]
    assert patient_view(site_service, ehr, fhir_front, "sv-duffy-ok") == []
    # Without the site's marker code the same 1300 is mild, as for anyone else.
    [usual] = patient_view(service, ehr, fhir_front, "sv-duffy-ok")
    assert usual["indicator"] == "info" and "Duffy" not in usual["detail"]


def test_order_sign_warns_on_an_rxnorm_coded_chemotherapy_order(service, ehr, fhir_front):
    rxnorm = bundle({"resourceType": "MedicationRequest", "id": "d3", "status": "draft", "intent": "order",
                     "subject": {"reference": "Patient/sv-moderate"},
                     "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "3002"}],
                                                   "text": "cyclophosphamide 600 mg/m2"}})
    cards = order_sign(service, ehr, fhir_front, "sv-moderate", rxnorm)
    assert [c["indicator"] for c in cards] == ["warning"]
    assert "cyclophosphamide 600 mg/m2" in cards[0]["detail"]


FLAG_PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority"
INDICATOR_OF_PRIORITY = {"PH": "critical", "PM": "warning", "PL": "info"}


def test_cards_and_run_agree_on_the_same_data(site_service, ehr, fhir_front, tmp_path):
    """`run` writes Flags for the server's patients; the card for each says what its Flag says."""
    upstream = f"http://{fhir_front.upstream.netloc}{fhir_front.upstream.path}"
    config = tmp_path / "adapter.toml"
    mappings = site_mappings(tmp_path, [f"{DUFFY_SYSTEM}|{DUFFY_CODE}"])
    config.write_text(f'[mappings]\npath = "{mappings}"\n[output]\nresources = ["Flag"]\n')
    assert main(["run", "--config", str(config), "--fhir-url", upstream,
                 "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json"]) == 0
    checked, context_said = 0, set()
    for patient_id in ("sv-febrile", "sv-chemo", "sv-proj", "sv-severe", "sv-moderate", "sv-mild",
                       "sv-duffy-low", "sv-duffy-ok", "sv-normal"):
        found = requests.get(f"{upstream}/Flag", params={"subject": f"Patient/{patient_id}"}, timeout=30).json()
        active = [e["resource"] for e in found.get("entry", []) if e["resource"]["status"] == "active"]
        cards = patient_view(site_service, ehr, fhir_front, patient_id)
        if not active:
            assert cards == [], patient_id
            continue
        [flag], [card] = active, cards
        [priority] = [c["code"] for e in flag["extension"] if e["url"] == FLAG_PRIORITY
                      for c in e["valueCodeableConcept"]["coding"]]
        assert card["indicator"] == INDICATOR_OF_PRIORITY[priority], patient_id
        text = flag["code"]["text"]
        febrile = any(c["code"] == "409089005" for c in flag["code"]["coding"])
        assert card["summary"].startswith("Febrile neutropenia: ") is febrile, patient_id
        # The grade and count the Flag names are the card's (after "with " when febrile).
        graded = text.split("; ")[0].split(" with ", 1)[1] if febrile else text.split("; ")[0]
        assert card["summary"].endswith(graded[0].lower() + graded[1:] if febrile else graded), patient_id
        for part in text.split("; ")[1:]:
            said = re.sub(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d)Z", r"\1 \2 UTC", part)
            assert said[0].upper() + said[1:] in card["detail"], (patient_id, part)
            context_said.add(part.split(":")[0].split(" by ")[0])
        checked += 1 + febrile
    assert checked == 8  # every patient but the normal ones was flagged and compared; one of them febrile
    assert context_said == {"after chemotherapy", "projected to fall below 500 cells/µL",
                            "site-marked Duffy-null threshold"}
