"""FHIR JSON builders for the clinical-context scenarios (CONTRACT §5b): temperatures, chemotherapy records,
the site's Duffy-null marker, a Patient with the US Core race extension. Everything here is synthetic.

Every builder returns a resource that the local server (Sekmet, strict inbound validation) accepts."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from builders import LOINC, UCUM, patient

SNOMED = "http://snomed.info/sct"
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
OMB_RACE = "urn:oid:2.16.840.1.113883.6.238"

# The site marker the Duffy-null scenarios configure (CONTRACT §5b: "system|code" strings).
DUFFY_SYSTEM, DUFFY_CODE = "http://example.org/site", "duffy-null"

# The moment every scenario's (latest) count is taken; other times are said relative to it.
COUNT_TIME = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
SHIPPED_MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"


def at(hours: float = 0, minutes: float = 0, days: float = 0) -> str:
    """An instant relative to COUNT_TIME, as FHIR dateTime with Z."""
    moment = COUNT_TIME + timedelta(days=days, hours=hours, minutes=minutes)
    return moment.isoformat().replace("+00:00", "Z")


def temperature(
    observation_id: str,
    patient_id: str,
    value: float,
    effective: str,
    unit: str = "Cel",
    status: str = "final",
    ucum: bool | None = None,
) -> dict[str, Any]:
    """A vital-signs body temperature (LOINC 8310-5). `Cel` and `[degF]` are sent as UCUM codes; any other
    unit string is sent as text only (how a feed with a local spelling looks)."""
    quantity: dict[str, Any] = {"value": value, "unit": {"Cel": "°C", "[degF]": "°F"}.get(unit, unit)}
    if ucum if ucum is not None else unit in ("Cel", "[degF]"):
        quantity.update(system=UCUM, code=unit)
    return {
        "resourceType": "Observation",
        "id": observation_id,
        "status": status,
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "8310-5", "display": "Body temperature"}],
                 "text": "Body temperature"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
        "valueQuantity": quantity,
    }


def atc(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": ATC, "code": code, "display": display}], "text": display}


def medication(medication_id: str, concept: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Medication", "id": medication_id, "code": concept}


def _medication_choice(concept: dict[str, Any] | None, reference: str | None) -> dict[str, Any]:
    if reference:
        return {"medicationReference": {"reference": f"Medication/{reference}"}}
    return {"medicationCodeableConcept": concept}


def medication_administration(
    resource_id: str,
    patient_id: str,
    effective: str,
    concept: dict[str, Any] | None = None,
    medication_id: str | None = None,
    status: str = "completed",
) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": resource_id,
        "status": status,
        **_medication_choice(concept, medication_id),
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
    }


def medication_request(
    resource_id: str,
    patient_id: str,
    authored: str,
    concept: dict[str, Any] | None = None,
    medication_id: str | None = None,
    status: str = "active",
    intent: str = "order",
) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": resource_id,
        "status": status,
        "intent": intent,
        **_medication_choice(concept, medication_id),
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored,
    }


def chemotherapy_procedure(resource_id: str, patient_id: str, performed: str,
                           status: str = "completed") -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": resource_id,
        "status": status,
        "code": {"coding": [{"system": SNOMED, "code": "367336001", "display": "Chemotherapy (procedure)"}],
                 "text": "Chemotherapy (procedure)"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "performedDateTime": performed,
    }


def duffy_null_marker(condition_id: str, patient_id: str, clinical_status: str = "active") -> dict[str, Any]:
    """The site's own marker for a Duffy-null phenotype (a Condition with the configured code)."""
    return {
        "resourceType": "Condition",
        "id": condition_id,
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": clinical_status}]},
        "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION, "code": "confirmed"}]},
        "code": {"coding": [{"system": DUFFY_SYSTEM, "code": DUFFY_CODE, "display": "Duffy-null phenotype"}],
                 "text": "Duffy-null phenotype Fy(a-b-)"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def patient_with_race(patient_id: str, omb_code: str = "2054-5",
                      display: str = "Black or African American") -> dict[str, Any]:
    """A Patient with the US Core race extension (OMB category). Race is never a Duffy-null marker."""
    resource = patient(patient_id)
    resource["extension"] = [{
        "url": US_CORE_RACE,
        "extension": [
            {"url": "ombCategory", "valueCoding": {"system": OMB_RACE, "code": omb_code, "display": display}},
            {"url": "text", "valueString": display},
        ],
    }]
    return resource


def site_mappings(root: Path, duffy_condition_codes: list[str]) -> Path:
    """A site's copy of the shipped mappings with its Duffy-null marker codes configured.

    The ONE place that knows the layout of mappings/context.toml. Assumed (CONTRACT §5b and the agreed
    wording): a table `[duffy_null]` with `condition_codes` (a list of "system|code" strings) and
    `normal_floor` (1210). When the shipped copy has a context.toml, only its `condition_codes` list is
    replaced so every other list (temperature codes, chemotherapy codes) stays as shipped; without one, a
    minimal file with just `[duffy_null]` is written."""
    site = root / "site-mappings"
    shutil.copytree(SHIPPED_MAPPINGS, site)
    context = site / "context.toml"
    assignment = f"condition_codes = {json.dumps(duffy_condition_codes)}"
    text = context.read_text(encoding="utf-8") if context.exists() else ""
    existing = re.compile(r"(?ms)^condition_codes\s*=\s*\[.*?\]")
    header = re.compile(r"(?m)^\[duffy_null\][^\n]*\n")
    if existing.search(text):
        text = existing.sub(lambda _: assignment, text, count=1)
    elif header.search(text):
        text = header.sub(lambda m: m.group(0) + assignment + "\n", text, count=1)
    else:
        text += f"\n[duffy_null]\n{assignment}\nnormal_floor = 1210\n"
    context.write_text(text, encoding="utf-8")
    configured = tomllib.loads(text)["duffy_null"]["condition_codes"]
    assert configured == duffy_condition_codes, "context.toml layout changed: adjust site_mappings()"
    return site
