"""What `serve` fetches over HTTP (responses mocks): a trusted client's JWKS by its configured URL, cached;
and the prefetch a hook call lacks, from the FHIR server with the EHR's token, without following redirects."""

from __future__ import annotations

import json

import pytest
import responses

from adapter import mappings
from adapter.config import TrustedClient
from adapter.errors import AuthError, TransientHttpError
from adapter.serve import Refusal, Verifier
from adapter.sources import prefetch
from cdshooks import Ehr

JWKS_URL = "https://ehr.hospital.test/.well-known/jwks.json"
AUD = "https://cds.hospital.test/cds-services/anc-patient-view"
FHIR = "https://fhir.hospital.test/r4"
TEMPLATES = prefetch.templates(mappings.load())


@responses.activate
def test_jwks_url_is_fetched_once_and_cached(tmp_path):
    ehr = Ehr(tmp_path)
    responses.get(JWKS_URL, json=json.loads(ehr.jwks_file.read_text()))
    check = Verifier((TrustedClient(iss=ehr.iss, jwks_url=JWKS_URL),))
    check.verify(f"Bearer {ehr.token(aud=AUD)}", (AUD,))
    check.verify(f"Bearer {ehr.token(aud=AUD)}", (AUD,))
    assert len(responses.calls) == 1


@responses.activate
def test_an_unreachable_jwks_url_refuses_the_token(tmp_path):
    ehr = Ehr(tmp_path)
    responses.get(JWKS_URL, status=503)
    with pytest.raises(Refusal) as refused:
        Verifier((TrustedClient(iss=ehr.iss, jwks_url=JWKS_URL),)).verify(f"Bearer {ehr.token(aud=AUD)}", (AUD,))
    assert refused.value.status == 401


@responses.activate
def test_a_jwks_url_that_redirects_is_not_followed(tmp_path):
    ehr = Ehr(tmp_path)
    responses.get(JWKS_URL, status=302, headers={"Location": "https://elsewhere.test/jwks.json"})
    responses.get("https://elsewhere.test/jwks.json", json=json.loads(ehr.jwks_file.read_text()))
    with pytest.raises(Refusal):
        Verifier((TrustedClient(iss=ehr.iss, jwks_url=JWKS_URL),)).verify(f"Bearer {ehr.token(aud=AUD)}", (AUD,))
    assert [call.request.url for call in responses.calls] == [JWKS_URL]


@responses.activate
def test_fetch_sends_the_ehr_token_and_only_the_missing_keys():
    responses.get(f"{FHIR}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    responses.get(f"{FHIR}/Observation", json={"resourceType": "Bundle", "type": "searchset", "entry": []})
    found = prefetch.fetch(FHIR, "tok", ["patient", "ancCounts"], TEMPLATES, "p1", timeout_s=5)
    assert set(found) == {"patient", "ancCounts"}
    assert {call.request.headers["Authorization"] for call in responses.calls} == {"Bearer tok"}
    search = next(call.request for call in responses.calls if "/Observation" in call.request.url)
    assert "patient=p1" in search.url and "751-8" in search.url and "_sort=-date" in search.url


@responses.activate
def test_fetch_does_not_follow_a_redirect_with_the_token():
    responses.get(f"{FHIR}/Patient/p1", status=302, headers={"Location": "https://elsewhere.test/Patient/p1"})
    responses.get("https://elsewhere.test/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    with pytest.raises(TransientHttpError):  # the EHR gets a 502, and nothing went elsewhere
        prefetch.fetch(FHIR, "tok", ["patient"], TEMPLATES, "p1", timeout_s=5)
    assert [call.request.url for call in responses.calls] == [f"{FHIR}/Patient/p1"]


@responses.activate
def test_fetch_a_refused_token_on_a_required_key_is_an_auth_error_and_context_failures_are_left_out():
    responses.get(f"{FHIR}/Patient/p1", status=401)
    with pytest.raises(AuthError):
        prefetch.fetch(FHIR, "tok", ["patient"], TEMPLATES, "p1", timeout_s=5)
    responses.get(f"{FHIR}/Procedure", status=400)
    responses.get(f"{FHIR}/Condition", status=401)
    assert prefetch.fetch(FHIR, "tok", ["procedures", "conditions"], TEMPLATES, "p1", timeout_s=5) == {}


@responses.activate
def test_fetch_a_failing_server_on_a_required_key_is_transient_and_a_missing_patient_is_left_out():
    responses.get(f"{FHIR}/Patient/p1", status=503)
    with pytest.raises(TransientHttpError):
        prefetch.fetch(FHIR, "tok", ["patient"], TEMPLATES, "p1", timeout_s=5)
    responses.replace(responses.GET, f"{FHIR}/Patient/p1", status=404)
    assert prefetch.fetch(FHIR, "tok", ["patient"], TEMPLATES, "p1", timeout_s=5) == {}


@pytest.mark.parametrize("given,lacking", [
    ({}, list(TEMPLATES)),
    ({key: {"resourceType": "Bundle"} for key in TEMPLATES}, []),
    ({**{key: {"resourceType": "Bundle"} for key in TEMPLATES}, "patient": None}, ["patient"]),
    ({**{key: {"resourceType": "Bundle"} for key in TEMPLATES},
      "ancCounts": {"resourceType": "OperationOutcome"}}, ["ancCounts"]),
])
def test_missing_prefetch_keys(given, lacking):
    assert prefetch.missing(given, TEMPLATES) == lacking
