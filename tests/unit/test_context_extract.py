"""Raw context resources -> facts (adapter/context_extract.py): explicit checks, quarantine reasons, and what
no longer counts (withdrawn, not done, plans) becoming a "none" fact that replaces an earlier version."""

from __future__ import annotations

import pytest

from adapter import context_extract, mappings
from adapter.model import Quarantine, Reason

CONTEXT = mappings.load().context
STATUSES = ("final", "amended", "corrected")
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
ATC, RXNORM = "http://www.whocc.no/atc", "http://www.nlm.nih.gov/research/umls/rxnorm"


def temperature(value, unit="Cel", ucum=True, status="final", code="8310-5", **extra):
    quantity = {"value": value, "unit": unit}
    if ucum:
        quantity.update(system=UCUM, code=unit)
    return {"resourceType": "Observation", "id": "t1", "meta": {"versionId": "2"}, "status": status,
            "code": {"coding": [{"system": LOINC, "code": code}]}, "subject": {"reference": "Patient/p"},
            "effectiveDateTime": "2026-11-20T10:00:00Z", "valueQuantity": quantity, **extra}


def fact(resource, medications=None):
    return context_extract.fact(resource, CONTEXT, STATUSES, medications or {})


@pytest.mark.parametrize("resource, celsius, recorded", [
    (temperature(38.4), 38.4, ""),
    (temperature(101.5, "[degF]"), 38.611111, "101.5 °F"),
    (temperature(38.4, "°C", ucum=False), 38.4, ""),
    (temperature(100.4, "degF", ucum=False), 38.0, "100.4 °F"),
    (temperature(38.4, code="8331-1"), 38.4, ""),  # oral temperature
    (temperature(25.0), 25.0, ""),
    (temperature(45.0), 45.0, ""),
])
def test_temperatures_are_read_in_celsius(resource, celsius, recorded):
    found = fact(resource)
    assert (found.kind, found.value, found.name, found.version) == ("temperature", celsius, recorded, "2")


@pytest.mark.parametrize("resource, reason", [
    (temperature(38.4, "degrees", ucum=False), Reason.UNKNOWN_UNIT),
    (temperature(38.4, "K"), Reason.UNKNOWN_UNIT),               # UCUM, but not a unit we read
    (temperature(47.0), Reason.IMPLAUSIBLE_VALUE),
    (temperature(3.8), Reason.IMPLAUSIBLE_VALUE),
    (temperature(118.0, "[degF]"), Reason.IMPLAUSIBLE_VALUE),
    (temperature("38.4"), Reason.IMPLAUSIBLE_VALUE),
    (temperature(True), Reason.IMPLAUSIBLE_VALUE),
    (temperature(38.4, subject={"reference": "Group/g"}), Reason.NO_SUBJECT),
    (temperature(38.4, modifierExtension=[{"url": "http://example.org/x"}]), Reason.UNKNOWN_MODIFIER),
    ({**temperature(38.4), "effectiveDateTime": "2026-11"}, Reason.NO_EFFECTIVE_TIME),
    # A date alone could lie anywhere in 24 hours: the fever rule counts hours, so it is never guessed.
    ({**temperature(38.4), "effectiveDateTime": "2026-11-20"}, Reason.NO_EFFECTIVE_TIME),
    ({**{k: v for k, v in temperature(38.4).items() if k != "effectiveDateTime"}, "issued": "2026-11-20"},
     Reason.NO_EFFECTIVE_TIME),
])
def test_unreadable_temperatures_are_quarantined_with_a_reason(resource, reason):
    found = fact(resource)
    assert isinstance(found, Quarantine) and found.reason is reason


@pytest.mark.parametrize("when", ["2026-11-20T10:00:00Z", "2026-11-20T10:00+01:00", "2026-11-20T10:00:00.5-05:00"])
def test_a_temperature_with_a_time_of_day_is_read(when):
    assert not isinstance(fact({**temperature(38.4), "effectiveDateTime": when}), Quarantine)


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "preliminary"])
def test_a_withdrawn_or_unused_temperature_version_counts_for_nothing(status):
    found = fact(temperature(39.0, status=status))
    assert found.kind == "none" and found.resource_id == "t1"


def test_a_code_that_is_not_a_temperature_counts_for_nothing():
    assert fact(temperature(39.0, code="751-8")).kind == "none"


def administration(status="completed", **medication):
    return {"resourceType": "MedicationAdministration", "id": "ma", "status": status,
            "subject": {"reference": "Patient/p"}, "effectiveDateTime": "2026-11-10", **medication}


def concept(system, code, display=None, text=None):
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {"coding": [coding], **({"text": text} if text else {})}


@pytest.mark.parametrize("resource, name", [
    (administration(medicationCodeableConcept=concept(ATC, "L01XA01", "cisplatin")), "cisplatin"),
    (administration(medicationCodeableConcept=concept(ATC, "L01XA01", text="Cisplatin 50 mg")), "Cisplatin 50 mg"),
    (administration(medicationCodeableConcept=concept(RXNORM, "3002")), "cyclophosphamide"),  # our list's name
    (administration("in-progress", medicationCodeableConcept=concept(RXNORM, "40048", "carboplatin")), "carboplatin"),
    (administration(medicationCodeableConcept=concept(ATC, "J01CA04", "amoxicillin")), None),
    (administration(medicationCodeableConcept=concept(RXNORM, "6851", "methotrexate")), None),  # not shipped
    (administration("not-done", medicationCodeableConcept=concept(ATC, "L01XA01", "cisplatin")), None),
    (administration("entered-in-error", medicationCodeableConcept=concept(ATC, "L01XA01", "cisplatin")), None),
    (administration(medicationReference={"reference": "Medication/m1"}), "carboplatin"),
    (administration(medicationReference={"reference": "Medication/unknown"}), None),
])
def test_chemotherapy_administrations(resource, name):
    medications = {"m1": {"resourceType": "Medication", "id": "m1",
                          "code": concept(ATC, "L01XA02", "carboplatin")}}
    found = fact(resource, medications)
    assert (found.name if found.kind == "chemotherapy" else None) == name


@pytest.mark.parametrize("status, intent, counts", [
    ("active", "order", True), ("completed", "original-order", True), ("active", "plan", False),
    ("active", "proposal", False), ("cancelled", "order", False), ("draft", "order", False),
])
def test_chemotherapy_requests_count_when_ordered(status, intent, counts):
    resource = {"resourceType": "MedicationRequest", "id": "mr", "status": status, "intent": intent,
                "medicationCodeableConcept": concept(ATC, "L01BC02", "fluorouracil"),
                "subject": {"reference": "Patient/p"}, "authoredOn": "2026-11-13"}
    assert (fact(resource).kind == "chemotherapy") is counts


@pytest.mark.parametrize("clinical, verification, marked", [
    ("active", "confirmed", True), ("relapse", "confirmed", True), ("resolved", "confirmed", False),
    ("active", "refuted", False), ("active", "entered-in-error", False), (None, "confirmed", False),
])
def test_duffy_null_marker_needs_an_active_condition_with_a_configured_code(clinical, verification, marked):
    import dataclasses
    configured = dataclasses.replace(CONTEXT, duffy_null_codes=frozenset({("http://example.org/site", "dn")}))
    resource = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"},
                "code": concept("http://example.org/site", "dn"),
                "verificationStatus": concept("http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                              verification)}
    if clinical:
        resource["clinicalStatus"] = concept("http://terminology.hl7.org/CodeSystem/condition-clinical", clinical)
    assert (context_extract.fact(resource, configured, STATUSES, {}).kind == "duffy-null") is marked
    assert fact(resource).kind == "none"  # the shipped list is empty: nothing is a marker
