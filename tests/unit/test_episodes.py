"""Neutropenia episodes from a patient's graded counts, by effective time (CONTRACT §6 Flag). Pure."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.clinical.episodes import Episode, episodes
from adapter.model import AgeBand, Classification, Count, Grade, Reading

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=timezone.utc)
N, MI, MO, S = Grade.NORMAL, Grade.MILD, Grade.MODERATE, Grade.SEVERE
C0, C1, C2, C3, C4 = Grade.CTCAE_0, Grade.CTCAE_1, Grade.CTCAE_2, Grade.CTCAE_3, Grade.CTCAE_4


def g(obs_id: str, day: float, grade: Grade, patient: str = "p1"):
    reading = Reading(
        observation_id=obs_id,
        version="1",
        status="final",
        patient_id=patient,
        effective=T0 + timedelta(days=day),
        count=Count(2000.0 if not grade.abnormal else 300.0),
    )
    return reading, Classification(grade=grade, age_band=AgeBand.ADULT)


def at(day: float) -> datetime:
    return T0 + timedelta(days=day)


def summary(found: list[Episode]):
    """(ordinal, first id, latest id, latest grade, closing id, start, end) per episode."""
    return [
        (
            e.ordinal,
            e.first[0].observation_id,
            e.latest[0].observation_id,
            e.latest[1].grade,
            e.closed_by[0].observation_id if e.closed_by else None,
            e.start,
            e.end,
        )
        for e in found
    ]


def test_no_readings_no_episodes():
    assert episodes([]) == []


@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("normal", [N, C0])
def test_normal_only_gives_no_episodes(count, normal):
    assert episodes([g(f"o{i}", i, normal) for i in range(count)]) == []


@pytest.mark.parametrize("grade", [MI, MO, S, C1, C2, C3, C4])
def test_single_abnormal_opens_an_open_episode(grade):
    found = episodes([g("o1", 0, grade)])
    assert summary(found) == [(1, "o1", "o1", grade, None, at(0), None)]


def test_open_follow_latest_abnormal_and_close_on_normal():
    readings = [
        g("a", 0, N),
        g("b", 1, MI),  # opens
        g("c", 2, S),
        g("d", 3, MO),  # latest abnormal: moderate (not the worst)
        g("e", 4, N),  # closes: end = its effective time
        g("f", 5, N),
    ]
    found = episodes(readings)
    assert summary(found) == [(1, "b", "d", MO, "e", at(1), at(4))]
    assert found[0].closed_by == readings[4]
    assert found[0].first == readings[1]
    assert found[0].latest == readings[3]


def test_a_later_abnormal_opens_episode_two():
    readings = [g("a", 0, S), g("b", 1, N), g("c", 2, N), g("d", 3, MI), g("e", 4, MO)]
    assert summary(episodes(readings)) == [
        (1, "a", "a", S, "b", at(0), at(1)),
        (2, "d", "e", MO, None, at(3), None),
    ]


def test_three_episodes_alternating():
    readings = [g(f"o{i}", i, S if i % 2 == 0 else N) for i in range(6)]
    found = episodes(readings)
    assert [e.ordinal for e in found] == [1, 2, 3]
    assert [(e.start, e.end) for e in found] == [(at(0), at(1)), (at(2), at(3)), (at(4), at(5))]
    assert all(e.closed_by is not None for e in found)


def test_ctcae_grade_0_closes_an_episode():
    readings = [g("a", 0, C3), g("b", 1, C1), g("c", 2, C0), g("d", 3, C4)]
    assert summary(episodes(readings)) == [
        (1, "a", "b", C1, "c", at(0), at(2)),
        (2, "d", "d", C4, None, at(3), None),
    ]


def test_effective_time_not_arrival_order_decides():
    # The normal count arrived last but was drawn first: the episode is still open.
    readings = [g("late-abnormal", 2, S), g("early-normal", 1, N)]
    assert summary(episodes(readings)) == [(1, "late-abnormal", "late-abnormal", S, None, at(2), None)]
    # A late-arriving normal count drawn after the abnormal one closes it.
    readings = [g("b", 2, N), g("a", 1, MO)]
    assert summary(episodes(readings)) == [(1, "a", "a", MO, "b", at(1), at(2))]


def test_out_of_order_input_gives_the_same_episodes_as_sorted_input():
    ordered = [g("a", 0, N), g("b", 1, MI), g("c", 2, S), g("d", 3, N), g("e", 4, MO), g("f", 5, MO)]
    expected = episodes(ordered)
    assert len(expected) == 2
    for seed in range(20):
        shuffled = ordered[:]
        random.Random(seed).shuffle(shuffled)
        assert episodes(shuffled) == expected
    assert episodes(list(reversed(ordered))) == expected


def test_time_zones_are_compared_as_instants():
    # 09:00+02:00 (07:00Z) is before 08:00Z: the normal count comes first, the episode stays open.
    plus_two = timezone(timedelta(hours=2))
    reading, classification = g("n", 0, N)
    normal = (replace(reading, effective=datetime(2026, 11, 1, 9, 0, tzinfo=plus_two)), classification)
    abnormal = g("x", 0, S)  # 08:00Z
    assert summary(episodes([abnormal, normal])) == [(1, "x", "x", S, None, at(0), None)]


def test_input_is_not_modified():
    readings = [g("b", 1, N), g("a", 0, S)]
    before = list(readings)
    episodes(readings)
    assert readings == before


# --- ties (same effective time) ----------------------------------------------------------------------


def test_tied_abnormal_counts_are_ordered_deterministically():
    readings = [g("x2", 1, MO), g("x1", 1, S)]
    found = episodes(readings)
    assert len(found) == 1
    assert found[0].start == at(1)
    assert episodes(list(reversed(readings))) == found
    # The latest is one of the two tied counts, and the first the other one.
    assert {found[0].first[0].observation_id, found[0].latest[0].observation_id} == {"x1", "x2"}


@pytest.mark.parametrize("ids", [("n", "x"), ("x", "n")])
def test_tie_between_normal_and_abnormal_does_not_depend_on_input_order(ids):
    normal_id, abnormal_id = ids
    readings = [g("a", 0, S), g(normal_id, 1, N), g(abnormal_id, 1, MO)]
    found = episodes(readings)
    assert episodes(list(reversed(readings))) == found
    assert episodes([readings[2], readings[0], readings[1]]) == found
    assert 1 <= len(found) <= 2
    assert found[0].start == at(0)
    assert all(e.end is None or e.end >= e.start for e in found)


def test_an_episode_closed_at_its_own_start_time_is_still_well_formed():
    found = episodes([g("a", 0, S), g("b", 0, N)])
    for e in found:
        assert e.end is None or e.end >= e.start


# --- properties ----------------------------------------------------------------------------------------

GRADES = [N, MI, MO, S]


@st.composite
def graded_histories(draw):
    size = draw(st.integers(min_value=0, max_value=12))
    days = draw(st.lists(st.integers(min_value=0, max_value=6), min_size=size, max_size=size))  # many ties
    grades = draw(st.lists(st.sampled_from(GRADES), min_size=size, max_size=size))
    return [g(f"obs-{i}", day, grade) for i, (day, grade) in enumerate(zip(days, grades))]


def reference_episodes(readings):
    """Runs of abnormal counts in (effective time, id) order; a run ends at the next normal count."""
    ordered = sorted(readings, key=lambda r: (r[0].effective, r[0].observation_id))
    runs, current = [], []
    for reading in ordered:
        if reading[1].grade.abnormal:
            current.append(reading)
        elif current:
            runs.append((current, reading))
            current = []
    if current:
        runs.append((current, None))
    return [(i + 1, run[0], run[-1], closer) for i, (run, closer) in enumerate(runs)]


@settings(max_examples=200, deadline=None, database=None)
@given(history=graded_histories(), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_property_arrival_order_does_not_matter(history, seed):
    shuffled = history[:]
    random.Random(seed).shuffle(shuffled)
    assert episodes(shuffled) == episodes(sorted(history, key=lambda r: (r[0].effective, r[0].observation_id)))


@settings(max_examples=200, deadline=None, database=None)
@given(history=graded_histories())
def test_property_episodes_are_the_abnormal_runs(history):
    found = episodes(history)
    assert [(e.ordinal, e.first, e.latest, e.closed_by) for e in found] == reference_episodes(history)
    for e in found:
        assert e.first[1].grade.abnormal and e.latest[1].grade.abnormal
        assert e.closed_by is None or not e.closed_by[1].grade.abnormal
        assert e.start == e.first[0].effective
        assert e.end == (e.closed_by[0].effective if e.closed_by else None)
        assert e.end is None or e.end >= e.start
        assert e.latest[0].effective >= e.first[0].effective
    # only the last episode may be open; episodes do not overlap
    assert all(e.closed_by is not None for e in found[:-1])
    for earlier, later in zip(found, found[1:]):
        assert earlier.end <= later.start
    if not any(r[1].grade.abnormal for r in history):
        assert found == []
