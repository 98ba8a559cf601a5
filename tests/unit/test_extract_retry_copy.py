"""What state keeps of a quarantined Observation: the same outcome on retry, and no names or free text."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter import extract, mappings
from adapter.model import Quarantine
from builders import LOINC, UCUM, anc

MAPPINGS = mappings.load()
INPUT_KINDS = MAPPINGS.input_kinds()
STATUSES = ("final", "amended", "corrected")
NAME = "Zebulon Quixote"  # a synthetic patient name, looked for in what is kept


def extracted(resource):
    return extract.observation(resource, MAPPINGS, STATUSES, INPUT_KINDS)


def with_names(resource: dict) -> dict:
    """Names and free text wherever FHIR allows them on an Observation."""
    return {
        **resource,
        "subject": {**resource.get("subject", {}), "display": NAME, "identifier": {"value": NAME}},
        "performer": [{"reference": "Practitioner/x", "display": f"Dr {NAME}"}],
        "note": [{"text": f"called {NAME} at home"}],
        "text": {"status": "generated", "div": f"<div xmlns='http://www.w3.org/1999/xhtml'>{NAME}</div>"},
        "specimen": {"reference": "Specimen/s", "display": f"blood of {NAME}"},
        "encounter": {"reference": "Encounter/e", "display": f"visit of {NAME}"},
        "contained": [{"resourceType": "Patient", "id": "c", "name": [{"text": NAME}]}],
        "extension": [{"url": "http://example.org/x", "valueString": NAME}],
        "identifier": [{"system": "urn:accession", "value": NAME}],
        "interpretation": [{"text": NAME}],
        "meta": {**resource.get("meta", {}), "versionId": "3", "lastUpdated": "2026-11-20T09:00:00Z",
                 "tag": [{"display": NAME}]},
    }


QUARANTINED = {
    "unknown unit": anc("o", "p", 1.1, unit="Giga/L"),
    "unknown unit, UCUM code": anc("o", "p", 1.1, unit="mmol/L", ucum=True),
    "implausible": anc("o", "p", 9e9, unit="/uL"),
    "value not a number": anc("o", "p", None, valueQuantity={"value": NAME, "unit": "/uL"}),
    "no value": anc("o", "p", None),
    "data absent": anc("o", "p", None, dataAbsentReason={"coding": [{"code": "error"}], "text": NAME}),
    "comparator": anc("o", "p", 0.4, comparator="~"),
    "modifier": anc("o", "p", 0.4, modifierExtension=[{"url": "http://x/m", "valueString": NAME}]),
    "quantity modifier": anc("o", "p", None, valueQuantity={
        "value": 0.4, "unit": "10*3/uL", "modifierExtension": [{"url": "http://x/q", "valueString": NAME}]}),
    "no subject": {**anc("o", "p", 0.4), "subject": {"display": NAME}},
    "no effective time": {k: v for k, v in anc("o", "p", 0.4).items() if k != "effectiveDateTime"},
    "effective time is text": anc("o", "p", 0.4, effectiveDateTime=f"when {NAME} came in"),
    "period start only": {**anc("o", "p", 0.4, unit="Giga/L"), "effectivePeriod": {"start": "2026-11-20"}},
    "percentage input in the wrong unit": anc("o", "p", 60, unit="ratio", code="26511-6"),
    "WBC input implausible": anc("o", "p", 9e9, unit="/uL", code="6690-2"),
    "reference range in an odd unit": anc("o", "p", 0.4, unit="Giga/L", referenceRange=[
        {"low": {"value": 1.5, "unit": "Giga/L"}, "text": NAME}, {"low": {"value": 1}}]),
}


@pytest.mark.parametrize("resource", QUARANTINED.values(), ids=QUARANTINED.keys())
def test_the_kept_copy_gives_the_same_outcome_and_holds_no_name(resource):
    resource = with_names(resource)
    kept = extract.kept_for_retry(resource)
    assert isinstance(extracted(resource).outcome, Quarantine)
    assert extracted(kept) == extracted(resource)
    assert NAME not in json.dumps(kept)


def test_after_a_mapping_fix_the_kept_copy_grades_like_the_original():
    fixed = mappings.Mappings(**{**vars(MAPPINGS), "unit_aliases": {**MAPPINGS.unit_aliases, "Giga/L": 1000.0}})
    resource = with_names(anc("o", "p", 0.35, unit="Giga/L", referenceRange=[{"low": {"value": 1.5, "unit": "Giga/L"}}]))
    original = extract.observation(resource, fixed, STATUSES)
    again = extract.observation(extract.kept_for_retry(resource), fixed, STATUSES)
    assert again == original
    assert (again.outcome.count.anc_per_ul, again.outcome.lln_per_ul) == (350, 1500)


def test_a_code_that_is_not_text_is_no_match_and_no_crash():
    resource = anc("o", "p", 0.4)
    resource["code"]["coding"].insert(0, {"system": LOINC, "code": ["751-8"]})
    assert extracted(resource).outcome.count.anc_per_ul == 400
    resource["code"]["coding"] = [{"system": {"x": 1}, "code": "751-8"}]
    assert extracted(resource).outcome is None


# Arbitrary Observations, from well formed to hostile: whatever extraction makes of the original, it makes
# of the kept copy too.
_junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
                     max_leaves=4)
_code = st.sampled_from(["751-8", "26499-4", "6690-2", "26511-6", "26508-2", "30451-9", "x", None])
_unit = st.sampled_from(["10*3/uL", "/uL", "10*9/L", "%", "K/uL", "Giga/L", "mmol/L", " K/uL ", None])
_time = st.sampled_from(["2026-11-20T08:00:00Z", "2026-11-20", "2026-11", "20/11/2026", NAME, None]) | _junk
_quantity = st.fixed_dictionaries({}, optional={
    "value": st.floats(allow_nan=True) | st.integers(-10, 10**7) | st.booleans() | st.just(NAME) | st.none(),
    "unit": _unit | _junk, "code": _unit, "system": st.sampled_from([UCUM, "x"]),
    "comparator": st.sampled_from(["<", ">=", "~", ""]),
    "modifierExtension": st.lists(st.fixed_dictionaries({"url": st.just("http://x/m"), "valueString": st.just(NAME)})
                                  | _junk, max_size=2) | _junk,
    "extension": st.just([{"url": "http://x/e", "valueString": NAME}]),
})
_observation = st.fixed_dictionaries(
    {
        "resourceType": st.just("Observation"), "id": st.sampled_from(["o1", "o-2.x"]),
        # Mostly an ANC (or a derived-ANC input) in a status we read, so most examples reach the value.
        "status": st.sampled_from(["final", "amended", "corrected", "preliminary", "cancelled"]),
        "code": st.fixed_dictionaries({"coding": st.lists(
            st.fixed_dictionaries({"system": st.sampled_from([LOINC, LOINC, "x"]), "code": _code},
                                  optional={"display": st.just(NAME)})
            | st.fixed_dictionaries({"system": st.just(LOINC) | _junk, "code": _code | _junk}),
            min_size=1, max_size=3)},
            optional={"text": st.just(NAME)}),
        "subject": st.fixed_dictionaries({}, optional={
            "reference": st.sampled_from(["Patient/p1", "http://h/fhir/Patient/p2/_history/3", "Group/g", NAME])
            | _junk, "display": st.just(NAME)}) | _junk,
    },
    optional={
        "meta": st.fixed_dictionaries({}, optional={"versionId": st.sampled_from(["1", "7"]),
                                                    "lastUpdated": st.just("2026-11-20T09:00:00Z")}),
        "effectiveDateTime": _time, "effectiveInstant": _time, "issued": _time,
        "effectivePeriod": st.fixed_dictionaries({}, optional={"start": _time, "end": _time}) | _junk,
        "valueQuantity": _quantity | _junk,
        "dataAbsentReason": st.just({"text": NAME}) | _junk,
        "referenceRange": st.lists(st.fixed_dictionaries({}, optional={"low": _quantity | _junk,
                                                                       "text": st.just(NAME)}) | _junk, max_size=2)
        | _junk,
        "modifierExtension": st.lists(st.fixed_dictionaries({"url": st.just("http://x/m")}) | _junk, max_size=2)
        | _junk,
        "note": st.just([{"text": NAME}]),
        "performer": st.just([{"display": NAME}]),
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_observation)
def test_any_observation_extracts_the_same_from_its_kept_copy(resource):
    kept = extract.kept_for_retry(resource)
    assert extracted(kept) == extracted(resource)
    assert NAME not in json.dumps(kept)
