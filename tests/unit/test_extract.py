"""Lenient reading: the fields we need, with explicit checks; an odd element elsewhere changes nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from adapter import extract, mappings
from adapter.model import Reading, Reason, Quarantine
from builders import anc

MAPPINGS = mappings.load()
STATUSES = ("final", "amended", "corrected")


def outcome(resource, statuses=STATUSES):
    result = extract.observation(resource, MAPPINGS, statuses)
    assert result is not None
    return result.outcome


def test_an_observation_with_unrelated_odd_elements_is_still_read():
    resource = anc("o1", "p1", 0.4)
    resource["extension"] = [{"url": "http://example.org/odd", "valueString": "whatever"}]
    resource["note"] = [{"text": 42}]  # not even valid FHIR
    resource["interpretation"] = "LL"
    reading = outcome(resource)
    assert isinstance(reading, Reading)
    assert reading.count.anc_per_ul == 400


@pytest.mark.parametrize("field,value,expected", [
    ("effectiveDateTime", "2026-11-20T08:00:00+02:00", datetime(2026, 11, 20, 6, tzinfo=timezone.utc)),
    ("effectiveDateTime", "2026-11-20", datetime(2026, 11, 20, tzinfo=timezone.utc)),
    ("effectiveInstant", "2026-11-20T08:00:00.123Z", datetime(2026, 11, 20, 8, 0, 0, 123000, tzinfo=timezone.utc)),
    ("effectivePeriod", {"start": "2026-11-19T23:00:00Z"}, datetime(2026, 11, 19, 23, tzinfo=timezone.utc)),
    ("issued", "2026-11-21T10:00:00Z", datetime(2026, 11, 21, 10, tzinfo=timezone.utc)),
])
def test_effective_time_sources_in_contract_order(field, value, expected):
    resource = anc("o1", "p1", 0.4)
    del resource["effectiveDateTime"]
    resource[field] = value
    assert outcome(resource).effective == expected


@pytest.mark.parametrize("value", ["2026", "2026-11", "yesterday", "2026-13-01", "2026-11-20T25:00:00Z", 20261120])
def test_imprecise_or_unparseable_effective_time_is_quarantined(value):
    resource = anc("o1", "p1", 0.4, effectiveDateTime=value)
    result = outcome(resource)
    assert isinstance(result, Quarantine) and result.reason is Reason.NO_EFFECTIVE_TIME


def test_no_effective_time_at_all_is_quarantined():
    resource = anc("o1", "p1", 0.4)
    del resource["effectiveDateTime"]
    assert outcome(resource) == Quarantine(Reason.NO_EFFECTIVE_TIME, "no effective[x] and no issued")


@pytest.mark.parametrize("subject,patient_id", [
    ({"reference": "Patient/abc"}, "abc"),
    ({"reference": "https://fhir.example.org/r4/Patient/abc"}, "abc"),
    ({"reference": "Patient/abc/_history/3"}, "abc"),
])
def test_subject_reference_forms(subject, patient_id):
    assert outcome(anc("o1", "x", 0.4, subject=subject)).patient_id == patient_id


@pytest.mark.parametrize("subject", [None, {}, {"reference": "Group/abc"}, {"display": "Jane"}, "Patient/abc"])
def test_observation_without_a_patient_subject_is_quarantined(subject):
    resource = anc("o1", "x", 0.4)
    resource["subject"] = subject
    result = outcome(resource)
    assert isinstance(result, Quarantine) and result.reason is Reason.NO_SUBJECT


def test_data_absent_reason_is_no_value():
    resource = anc("o1", "p1", None, dataAbsentReason={"text": "haemolysed"})
    assert outcome(resource) == Quarantine(Reason.NO_VALUE, "dataAbsentReason")


@pytest.mark.parametrize("code", ["754-2", "758-3", "32709-8", "770-8"])
def test_non_blood_counts_and_percentages_are_never_graded(code):
    assert outcome(anc("o1", "p1", 0.4, code=code)) is None


def test_status_filter_and_withdrawals():
    assert outcome(anc("o1", "p1", 0.4, status="preliminary")) is None
    assert isinstance(outcome(anc("o1", "p1", 0.4, status="preliminary"), ("final", "preliminary")), Reading)
    result = extract.observation(anc("o1", "p1", 0.4, status="entered-in-error"), MAPPINGS, STATUSES)
    assert result.outcome is None and result.seen.status == "entered-in-error"


def test_reference_range_low_becomes_the_lln_in_cells_per_ul():
    resource = anc("o1", "p1", 1.7, referenceRange=[{"low": {"value": 1.8, "unit": "10*3/uL",
                                                             "system": "http://unitsofmeasure.org",
                                                             "code": "10*3/uL"}}])
    assert outcome(resource).lln_per_ul == 1800


@pytest.mark.parametrize("resource", [{"resourceType": "Condition", "id": "c1"}, {"resourceType": "Observation"},
                                      {"resourceType": "Observation", "id": "bad id with spaces"}])
def test_not_an_identifiable_observation(resource):
    assert extract.observation(resource, MAPPINGS, STATUSES) is None


def test_version_falls_back_to_last_updated():
    resource = anc("o1", "p1", 0.4, meta={"lastUpdated": "2026-11-20T08:00:00Z"})
    assert extract.observation(resource, MAPPINGS, STATUSES).seen.version == "2026-11-20T08:00:00Z"


@pytest.mark.parametrize("birth,earliest,latest", [
    ("2020-02-29", "2020-02-29", "2020-02-29"),
    ("2020-02", "2020-02-01", "2020-02-29"),
    ("2019", "2019-01-01", "2019-12-31"),
    ("not a date", None, None),
])
def test_patient_birth_date_as_a_range(birth, earliest, latest):
    found = extract.patient({"resourceType": "Patient", "id": "p", "birthDate": birth})
    assert (str(found.born_earliest) if found.born_earliest else None) == earliest
    assert (str(found.born_latest) if found.born_latest else None) == latest


UTC = timezone.utc


@pytest.mark.parametrize("text,expected", [
    ("2026-11-20T08:00:00Z", datetime(2026, 11, 20, 8, tzinfo=UTC)),
    (" 2026-11-20T08:00Z\n", datetime(2026, 11, 20, 8, tzinfo=UTC)),
    ("2026-11-20T08:00:00.25+01:00", datetime(2026, 11, 20, 8, 0, 0, 250000,
                                                tzinfo=timezone(timedelta(hours=1)))),
    ("2026-11-20T08:00:00", datetime(2026, 11, 20, 8, tzinfo=UTC)),  # no offset: taken as UTC
    ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
    ("2026-11", None),  # less precise than a day
    ("2026-11-20T08", None),
    ("2026-11-20 08:00:00Z", None),  # Python reads it; FHIR does not allow it
    ("20261120T080000Z", None),
    ("2026-02-30T08:00:00Z", None),
    ("9999-12-31T23:00:00-05:00", None),  # cannot be ordered against UTC times
    (20261120, None),
])
def test_fhir_date_times_are_read_at_day_precision_or_finer(text, expected):
    parsed = extract.parse_datetime(text)
    assert parsed == expected
    if expected is not None:
        assert parsed.utcoffset() == expected.utcoffset()
