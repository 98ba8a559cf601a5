"""Small FHIR JSON builders for tests. Patient names and birth dates here are synthetic."""

from __future__ import annotations

from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def patient(patient_id: str, birth_date: str | None = "1970-01-01", name: str = "Testperson") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": patient_id,
        "name": [{"family": name, "given": ["Alex"]}],
    }
    if birth_date:
        resource["birthDate"] = birth_date
    return resource


def anc(
    observation_id: str,
    patient_id: str,
    value: float | None,
    unit: str = "10*3/uL",
    effective: str = "2026-11-20T08:00:00Z",
    status: str = "final",
    code: str = "751-8",
    comparator: str | None = None,
    ucum: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
    }
    if value is not None:
        quantity: dict[str, Any] = {"value": value, "unit": unit}
        if ucum if ucum is not None else unit.startswith(("10*", "/")):
            quantity.update(system=UCUM, code=unit)
        if comparator:
            quantity["comparator"] = comparator
        resource["valueQuantity"] = quantity
    resource.update(extra)
    return resource


def transaction(*resources: dict[str, Any]) -> dict[str, Any]:
    """PUT each resource at its id, so tests control ids."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }
