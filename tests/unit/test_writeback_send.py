"""What the server's transaction-response says, read back per write: the id it gave each resource."""

from __future__ import annotations

import pytest

from adapter import writeback


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
