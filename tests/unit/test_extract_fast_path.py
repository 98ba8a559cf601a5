"""The fast paths of extraction (the common shape of a count, of a date-time) return exactly what the
general paths return, or step aside: on odd inputs near the common shape, both give the same."""

from __future__ import annotations

import copy
import math

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter import extract, mappings
from adapter.model import Reading
from builders import LOINC, UCUM, anc

MAPPINGS = mappings.load()
INPUT_KINDS = MAPPINGS.input_kinds()
STATUSES = ("final", "amended", "corrected")

_odd = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(10**400, 10**400 + 1),
    st.sampled_from([0.0, -0.0, -1.5, 1e308, math.inf, -math.inf, math.nan, "", " ", "x", [], {}, [1], {"a": 1}]),
)
_time = st.sampled_from([
    "2026-11-20T08:00:00Z", "2026-11-20T08:00:00.123+02:00", "2026-11-20T08:00:00-23:59", "2026-11-20",
    " 2026-11-20T08:00:00Z", "2026-11-20T08:00:00Z\n", "2026-11-20T08:00Z", "2026-11-20T08:00:00",
    "2026-13-20T08:00:00Z", "2026-11-20T24:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
    "２０２６-11-20T08:00:00Z", "2026-11-20t08:00:00z", "2026-11-20T08:00:00,5Z",
]) | _odd
_unit = st.sampled_from(["10*3/uL", "/uL", "10*9/L", "K/uL", " K/uL ", "cells/uL", "Giga/L", "mmol/L", "%"])
# (where, key, what): a change to one element of the common shape; None as `what` removes the key.
_change = st.one_of(
    st.tuples(st.just(()), st.sampled_from(["resourceType", "id", "status", "subject", "code", "meta",
                                            "effectiveDateTime", "valueQuantity", "referenceRange",
                                            "modifierExtension", "effectiveInstant", "issued",
                                            "effectivePeriod", "dataAbsentReason"]), _odd | _time),
    st.tuples(st.just(()), st.just("status"), st.sampled_from(["final", "amended", "preliminary", "cancelled",
                                                               "entered-in-error"])),
    st.tuples(st.just(()), st.just("id"), st.sampled_from(["o-1.x", "o/1", "o" * 65, "ó1"])),
    st.tuples(st.just(()), st.just("effectiveDateTime"), _time),
    st.tuples(st.just(()), st.just("referenceRange"),
              st.just([{"low": {"value": 1.5, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"}}])),
    st.tuples(st.just(()), st.just("modifierExtension"), st.just([{"url": "http://x/m"}])),
    st.tuples(st.just(()), st.just("meta"), st.fixed_dictionaries({}, optional={
        "versionId": st.sampled_from(["1", "7", ""]) | _odd, "lastUpdated": _time})),
    st.tuples(st.just(("subject",)), st.just("reference"), st.sampled_from([
        "Patient/p2", "http://h/fhir/Patient/p2/_history/3", "Group/g", "Patient/", "Patient/a b"]) | _odd),
    st.tuples(st.just(("code",)), st.just("coding"), st.sampled_from([
        [{"system": LOINC, "code": "751-8"}, {"system": LOINC, "code": "26499-4"}],
        [{"system": LOINC, "code": "6690-2"}], [{"system": LOINC, "code": "26511-6"}],
        [{"system": "x", "code": "751-8"}], [{"system": LOINC, "code": ["751-8"]}], [], ["751-8"],
    ]) | _odd),
    st.tuples(st.just(("valueQuantity",)), st.sampled_from(["value", "unit", "code", "system", "comparator",
                                                            "modifierExtension"]), _odd),
    st.tuples(st.just(("valueQuantity",)), st.just("value"),
              st.floats(allow_nan=True) | st.integers(-10, 10**7)),
    st.tuples(st.just(("valueQuantity",)), st.sampled_from(["unit", "code"]), _unit),
    st.tuples(st.just(("valueQuantity",)), st.just("system"), st.sampled_from([UCUM, "x"])),
    st.tuples(st.just(("valueQuantity",)), st.just("comparator"), st.sampled_from(["<", "<=", ">=", ">", "~", ""])),
)


def _changed(resource: dict, changes: list) -> dict:
    resource = copy.deepcopy(resource)
    for where, key, what in changes:
        element = resource
        for step in where:
            element = element.get(step) if isinstance(element, dict) else None
        if not isinstance(element, dict):
            continue
        if what is None:
            element.pop(key, None)
        else:
            element[key] = copy.deepcopy(what)
    return resource


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["10*3/uL", "10*9/L", "/uL", "K/uL", "cells/uL"]), st.lists(_change, max_size=3),
       st.booleans())
def test_the_common_shape_path_agrees_with_the_general_path(unit, changes, derive):
    resource = _changed(anc("o1", "p1", 0.4, unit=unit, meta={"versionId": "2",
                                                              "lastUpdated": "2026-11-20T09:00:00.5Z"}), changes)
    kinds = INPUT_KINDS if derive else None
    assert extract.observation(resource, MAPPINGS, STATUSES, kinds) == \
        extract._observation(resource, MAPPINGS, STATUSES, kinds)


def test_the_common_shape_takes_the_fast_path():
    # Not a test of speed: that the property above compares something, not only fallbacks.
    for unit in ("10*3/uL", "K/uL"):
        fast = extract._common_reading(anc("o1", "p1", 0.4, unit=unit), MAPPINGS, STATUSES)
        assert isinstance(fast.outcome, Reading) and fast.outcome.count.anc_per_ul == 400


@given(_time | st.text(alphabet="0123456789-T:.Z+ ", max_size=30)
       | st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,7})?(Z|[+-][0-9]{2}:[0-9]{2})",
                       fullmatch=True))
def test_the_common_date_time_path_agrees_with_the_general_path(text):
    expected = extract._parse_datetime(text) if isinstance(text, str) else None
    parsed = extract.parse_datetime(text)
    assert parsed == expected
    assert parsed is None or parsed.utcoffset() == expected.utcoffset()


_instant = st.sampled_from(["2026-11-20T09:00:00Z", "2026-11-20T09:00:01Z", "2026-11-19T23:59:59Z",
                            "2026-11-20T09:00:00.5Z", "2026-11-20T09:00:00.55Z", "2026-11-20T09:00:00.9Z",
                            " 2026-11-20T09:00:00.9Z", " 2026-11-20T09:00:01Z", "2026-11-20T10:00:00+02:00",
                            "2026-11-20T09:00:00", "2026-13-20T09:00:00Z", "9999-12-31T23:59:59Z", "2026-11-20",
                            "2026-11-20T09:00Z", "2026-11-20T09:60:00Z", "2026-11-20T09:00:00.1234567Z", ""])
_uniform = st.from_regex(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-6][0-9]:[0-6][0-9]\.[0-9]{3}Z", fullmatch=True)


@pytest.mark.parametrize("texts", [
    ["2026-11-20T09:00:00Z", "2026-11-20T09:00:00.5Z"],  # widths differ: 'Z' sorts after '.'
    [" 2026-11-20T09:00:00.9Z", "2026-11-20T09:00:00.55Z"],  # a space sorts before the year
    ["2026-11-20T10:00:00+02:00", "2026-11-20T09:00:00+00:00"],  # offsets: text order is not time order
    ["2026-11-20T09:00:00.5Z", "2026-11-20T09:00:00.6Z", "2026-13-20T09:00:00Z"],  # the greatest is invalid
    ["2026-11-20T09:00:00.5Z", "20261120T09:00:00.5Z"], [], [""],
])
def test_the_latest_instant_of_odd_pages(texts):
    parsed = [moment for moment in map(extract.parse_datetime, texts) if moment is not None]
    assert extract.latest_datetime(dict.fromkeys(texts)) == max(parsed, default=None)


@settings(max_examples=500)
@given(st.lists(_instant, max_size=6) | st.lists(_uniform, max_size=6)
       | st.tuples(st.lists(_uniform, max_size=4), st.lists(_instant, max_size=2)).map(lambda p: p[0] + p[1]))
def test_the_latest_instant_is_the_latest_that_parses(texts):
    texts = dict.fromkeys(texts)
    parsed = [moment for moment in map(extract.parse_datetime, texts) if moment is not None]
    latest = extract.latest_datetime(texts)
    assert latest == max(parsed, default=None)
    assert latest is None or latest.utcoffset() == max(parsed).utcoffset()
