"""What the server's transaction-response says, read back per write: the id it gave each resource."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import writeback
from adapter.pipeline import ServerSink


@pytest.mark.parametrize(("resource_type", "location", "entry", "expected"), [
    ("Flag", "Flag/abc-1/_history/1", {}, "abc-1"),
    ("Flag", "https://fhir.example/base/Flag/x.y/_history/3", {}, "x.y"),
    ("RiskAssessment", "RiskAssessment/r9", {}, "r9"),
    ("RiskAssessment", "Flag/abc-1/_history/1", {"resource": {"id": "from-body"}}, "from-body"),  # another type
    ("Flag", "Flag/", {"resource": {"id": "from-body"}}, "from-body"),  # no id in the location
    ("Flag", None, {}, None),
    ("Flag", 42, {"resource": "not a resource"}, None),
])
def test_the_server_id_comes_from_the_location_else_the_returned_resource(resource_type, location, entry, expected):
    assert writeback._server_id(resource_type, location, entry) == expected
    assert writeback._server_id(resource_type, location, entry) == expected  # the second time, compiled


def split_between_patients(planned, per_bundle):
    """The general split of ServerSink._parts, as a reference: a new part only where the next patient's writes
    would overflow the current one."""
    parts = [[]]
    for _, group in itertools.groupby(planned, key=lambda p: p.patient_id):
        writes = list(group)
        if parts[-1] and len(parts[-1]) + len(writes) > per_bundle:
            parts.append([])
        parts[-1] += writes
    return [part for part in parts if part]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["p1", "p2", "p3", "p4"]), max_size=14), st.integers(1, 8), st.booleans())
def test_a_batch_that_fits_one_bundle_is_sent_as_one_part_exactly_as_the_general_split_has_it(patients, entries,
                                                                                              provenance):
    planned = [writeback.Planned("Flag", f"{p}/o{n}", p, "active", "h", {}) for n, p in enumerate(patients)]
    output = writeback.Output(system_base="https://h.example/anc", profile="clinical", provenance=provenance)
    sink = ServerSink(client=None, output=output, max_entries=entries)
    assert sink._parts(planned) == split_between_patients(planned, sink.writes_per_bundle)
