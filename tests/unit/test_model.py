"""Domain types: a Reading built by its own __init__ is the frozen value the generated one would make."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.model import Count, Reading

texts = st.text(max_size=8)
moments = st.datetimes(timezones=st.just(timezone.utc))
counts = st.builds(Count, st.floats(allow_nan=False), st.sampled_from(["", "<", ">="]))


@settings(max_examples=100, deadline=None, database=None)
@given(ids=st.tuples(texts, texts, texts, texts), effective=moments, count=counts,
       lln=st.none() | st.floats(allow_nan=False), sources=st.lists(texts, max_size=3).map(tuple))
def test_a_reading_holds_what_it_was_given_by_position_or_by_name(ids, effective, count, lln, sources):
    observation_id, version, status, patient_id = ids
    by_position = Reading(observation_id, version, status, patient_id, effective, count, lln, sources)
    by_name = Reading(observation_id=observation_id, version=version, status=status, patient_id=patient_id,
                      effective=effective, count=count, lln_per_ul=lln, sources=sources)
    assert type(by_position) is Reading
    assert dataclasses.astuple(by_position) == dataclasses.astuple(by_name) == (
        observation_id, version, status, patient_id, effective, dataclasses.astuple(count), lln, sources)
    assert by_position == by_name and hash(by_position) == hash(by_name)
    assert copy.deepcopy(by_position) == by_position == pickle.loads(pickle.dumps(by_position))
    assert dataclasses.replace(by_position, version=version + "x") != by_position


def test_a_reading_stays_frozen_and_its_defaults_hold():
    reading = Reading("o1", "1", "final", "p1", datetime(2026, 11, 1, tzinfo=timezone.utc), Count(1500.0))
    assert (reading.lln_per_ul, reading.sources) == (None, ())
    assert repr(reading).startswith("Reading(observation_id='o1', version='1', status='final'")
    with pytest.raises(dataclasses.FrozenInstanceError):
        reading.version = "2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Reading("o1", "1", "final", "p1")  # type: ignore[call-arg]
