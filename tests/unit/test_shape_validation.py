"""Each Flag / RiskAssessment shape is validated by the R4B model once, yet every resource that leaves is
valid: whatever ids, texts and dates fill the varying leaves, writeback._validated accepts exactly what
the model accepts."""

from __future__ import annotations

import copy
from datetime import timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapter import writeback

SYSTEM = "https://hospital.example/fhir/anc-adapter"


def flag(reference="Patient/p1", value="p1/o5", text="Severe neutropenia: ANC 450 cells/µL",
         start="2026-11-01T08:00:00Z", detail="Observation/o5") -> dict:
    """The shape writeback._flag builds."""
    return {
        "resourceType": "Flag",
        "meta": {"tag": [{"system": f"{SYSTEM}/tag", "code": "anc-adapter"}]},
        "identifier": [{"system": f"{SYSTEM}/Flag", "value": value}],
        "extension": [{"url": writeback.FLAG_DETAIL, "valueReference": {"reference": detail}},
                      {"url": writeback.FLAG_PRIORITY, "valueCodeableConcept": {"coding": [
                          {"system": writeback.FLAG_PRIORITY_SYSTEM, "code": "PH"}]}}],
        "status": "active",
        "category": [{"coding": [writeback.FLAG_CATEGORY]}],
        "code": {"coding": [writeback.NEUTROPENIA], "text": text},
        "subject": {"reference": reference},
        "period": {"start": start},
        "author": writeback.AUTHOR,
    }


def risk(reference="Patient/p1", occurrence="2026-11-01T08:00:00Z", basis="Observation/o5") -> dict:
    return {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": f"{SYSTEM}/RiskAssessment", "value": "p1/o5"}],
        "status": "final",
        "code": {"text": "Severe neutropenia"},
        "subject": {"reference": reference},
        "occurrenceDateTime": occurrence,
        "basis": [{"reference": basis}],
    }


def model_accepts(resource_type: str, resource: dict) -> bool:
    try:
        writeback._MODELS[resource_type].model_validate(resource)
    except ValidationError:
        return False
    return True


def cached_accepts(resource_type: str, resource: dict) -> bool:
    try:
        writeback._validated(resource_type, resource)
    except ValidationError:
        return False
    return True


instants = st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.isoformat().replace("+00:00", "Z"))
any_date = st.one_of(instants, st.text(max_size=30), st.from_regex(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z",
                                                                    fullmatch=True))


@settings(max_examples=300, deadline=None, database=None)
@given(reference=st.text(max_size=20), value=st.text(max_size=20), text=st.text(max_size=40), start=any_date,
       detail=st.text(max_size=20))
def test_a_flag_passes_the_shape_cache_exactly_when_the_model_accepts_it(reference, value, text, start, detail):
    writeback._validated("Flag", flag())  # the shape is known valid from here on
    resource = flag(reference, value, text, start, detail)
    assert cached_accepts("Flag", resource) == model_accepts("Flag", resource)


@settings(max_examples=200, deadline=None, database=None)
@given(reference=st.text(max_size=20), occurrence=any_date, basis=st.text(max_size=20))
def test_a_risk_assessment_passes_the_shape_cache_exactly_when_the_model_accepts_it(reference, occurrence, basis):
    writeback._validated("RiskAssessment", risk())
    resource = risk(reference, occurrence, basis)
    assert cached_accepts("RiskAssessment", resource) == model_accepts("RiskAssessment", resource)


def test_the_model_runs_once_per_shape_and_again_for_a_new_shape(monkeypatch):
    calls = []
    real = writeback._MODELS["Flag"]

    class Counting:
        @staticmethod
        def model_validate(resource):
            calls.append(resource)
            return real.model_validate(resource)

    monkeypatch.setattr(writeback, "_VALID_SHAPES", set())
    monkeypatch.setitem(writeback._MODELS, "Flag", Counting)
    for n in range(50):
        writeback._validated("Flag", flag(f"Patient/p{n}", f"p{n}/o{n}", f"ANC {n} cells/µL",
                                          f"2026-11-{n % 28 + 1:02d}T08:00:00Z", f"Observation/o{n}"))
    assert len(calls) == 1
    ended = flag()
    ended["period"]["end"] = "2026-11-05T08:00:00Z"  # a closed episode: another shape
    writeback._validated("Flag", ended)
    changed = flag()
    changed["status"] = "inactive"  # a fixed leaf differs: another shape
    writeback._validated("Flag", changed)
    assert len(calls) == 3


def test_an_invalid_resource_is_refused_even_after_its_shape_was_seen_valid():
    writeback._validated("Flag", flag())
    for broken in (flag(reference=""), flag(start="2026-02-30T08:00:00Z"), flag(value=""),
                   {**flag(), "status": "not a code  "}):
        with pytest.raises(ValidationError):
            writeback._validated("Flag", copy.deepcopy(broken))
