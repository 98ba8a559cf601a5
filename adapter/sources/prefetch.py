"""CDS Hooks prefetch -> one patient's records (CONTRACT §8): the templates `serve` advertises, what a
hook call's `prefetch` lacks, fetching exactly that from the EHR's FHIR server, and sorting it all into
`cards.PatientRecords`. The allowlist decision is the caller's: this module fetches from the base URL it
is given."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

import requests

from adapter.errors import AuthError, FhirError, TransientHttpError
from adapter.fhir import client as client_module
from adapter.fhir.client import FhirClient, RetryPolicy
from adapter.mappings import Mappings
from adapter.outputs.cards import PatientRecords

log = logging.getLogger(__name__)

TOKEN = "{{context.patientId}}"
REQUIRED = ("patient", "ancCounts")  # without these there is nothing to grade: 412
_OBSERVATION_KEYS = ("ancCounts", "temperatures")
_CHEMOTHERAPY_KEYS = ("medicationAdministrations", "medicationRequests", "procedures")


def templates(mappings: Mappings) -> dict[str, str]:
    """Prefetch templates (CDS Hooks 2.0: FHIR read/search relative to fhirServer, `{{context.patientId}}`).
    Newest first and bounded, so a patient with years of counts does not make the EHR send them all."""
    anc = ",".join(f"{system}|{code}" for system, code in mappings.anc_codes)
    # The temperature codes `run` reads (mappings/context.toml), so a card sees the fevers a Flag would.
    temperatures = ",".join(f"{system}|{code}" for system, code in mappings.context.temperature_codes)
    return {
        "patient": f"Patient/{TOKEN}",
        "ancCounts": f"Observation?patient={TOKEN}&code={anc}&_sort=-date&_count=50",
        "temperatures": f"Observation?patient={TOKEN}&code={temperatures}&_sort=-date&_count=50",
        # With the Medication a medicationReference points at: its code is what says chemotherapy.
        "medicationAdministrations": f"MedicationAdministration?patient={TOKEN}&_count=100"
                                     "&_include=MedicationAdministration:medication",
        "medicationRequests": f"MedicationRequest?patient={TOKEN}&_count=100&_include=MedicationRequest:medication",
        "procedures": f"Procedure?patient={TOKEN}&_count=100",
        "conditions": f"Condition?patient={TOKEN}&clinical-status=active&_count=100",
    }


def missing(prefetch: Mapping[str, Any], wanted: Mapping[str, str]) -> list[str]:
    """Keys the EHR did not prefetch. CDS Hooks 2.0: a key may be absent, null (the EHR could not get it)
    or an OperationOutcome (the EHR's query failed); each means "fetch it yourself"."""
    return [key for key in wanted
            if not isinstance(prefetch.get(key), dict) or prefetch[key].get("resourceType") == "OperationOutcome"]


def fetch(base_url: str, access_token: str | None, keys: list[str], wanted: Mapping[str, str],
          patient_id: str, timeout_s: float) -> dict[str, Any]:
    """Run the templates of `keys` against `base_url` with the EHR's token; one page each, in parallel
    (the EHR is waiting). A key whose query failed is left out; the caller decides what that means.
    For a required key, a refused token raises AuthError and an unreachable or failing server raises
    TransientHttpError; a server that answered but has nothing usable (404, 400) leaves the key out."""
    def one(key: str) -> tuple[str, Any]:
        path, _, query = wanted[key].replace(TOKEN, patient_id).partition("?")
        client = _client(base_url, access_token, timeout_s)
        try:
            return key, client.get(path, dict(parse_qsl(query)) if query else None)
        except (FhirError, AuthError) as exc:
            log.warning("a prefetch query failed", extra={"event": "fetch-failed", "prefetch_key": key,
                                                          "error_type": type(exc).__name__})
            return key, exc

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch") as pool:
        results = dict(pool.map(one, keys))
    for key in REQUIRED:
        if isinstance(results.get(key), (AuthError, TransientHttpError)):
            raise results[key]
    return {key: value for key, value in results.items() if isinstance(value, dict)}


def records(patient_id: str, found: Mapping[str, Any]) -> PatientRecords:
    """Sort prefetched or fetched resources into a patient's records; Bundles are searchsets (their
    `include` entries included: a server may add the Medication an order points to)."""
    patient = found.get("patient")
    return PatientRecords(
        patient_id=patient_id,
        patient=patient if isinstance(patient, dict) and patient.get("resourceType") == "Patient" else None,
        observations=_resources(found, _OBSERVATION_KEYS, ("Observation",)),
        chemotherapy=_resources(found, _CHEMOTHERAPY_KEYS,
                                ("MedicationAdministration", "MedicationRequest", "Procedure", "Medication")),
        conditions=_resources(found, ("conditions",), ("Condition",)),
    )


def _resources(found: Mapping[str, Any], keys: tuple[str, ...], kinds: tuple[str, ...]) -> tuple[dict, ...]:
    out = []
    for key in keys:
        value = found.get(key)
        if not isinstance(value, dict):
            continue
        if value.get("resourceType") == "Bundle":
            entries = value.get("entry") if isinstance(value.get("entry"), list) else []
            candidates = [e.get("resource") for e in entries if isinstance(e, dict)]
        else:
            candidates = [value]
        out += [r for r in candidates if isinstance(r, dict) and r.get("resourceType") in kinds]
    return tuple(out)


class _NoRedirects(client_module.ConfiguredSession):
    """An allowlisted server must not be able to send us, with the EHR's token, somewhere else."""

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["allow_redirects"] = False
        response = super().request(method, url, *args, **kwargs)
        if response.is_redirect:
            # A transport failure to FhirClient: the key counts as not fetched.
            raise requests.exceptions.ConnectionError("the FHIR server answered a redirect; not followed")
        return response


def _client(base_url: str, access_token: str | None, timeout_s: float) -> FhirClient:
    session = _NoRedirects()
    if access_token:
        session.headers["Authorization"] = f"Bearer {access_token}"
    # One try: the EHR is waiting for the card, and it retries the hook itself if it wants to.
    return FhirClient(base_url, session, timeout_s=timeout_s, max_pages=1, retry=RetryPolicy(attempts=1))
