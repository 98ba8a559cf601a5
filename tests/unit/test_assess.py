"""The assessment core, pure: graded counts + context -> episodes, standing grade, febrile, projection."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter import mappings
from adapter.clinical import classify
from adapter.clinical.assess import Rules, assess, priority
from adapter.clinical.context import Chemotherapy, Context, Temperature
from adapter.model import AgeBand, Classification, Count, Grade, Reading

THRESHOLDS = mappings.load().thresholds
RULES = Rules(profile="clinical", thresholds=THRESHOLDS)
START = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def at(hours: float) -> datetime:
    return START + timedelta(hours=hours)


def graded(observation_id: str, hours: float, anc: float, band: AgeBand = AgeBand.ADULT, comparator: str = ""):
    reading = Reading(observation_id, "1", "final", "p", at(hours), Count(anc, comparator))
    result = classify.classify(reading.count, band, "clinical", THRESHOLDS, 2000)
    assert isinstance(result, Classification)
    return reading, result


def temp(observation_id: str, hours: float, celsius: float) -> Temperature:
    return Temperature(observation_id, at(hours), celsius)


def test_febrile_when_a_fever_is_near_a_count_below_500():
    result = assess([graded("o1", 0, 320)], Context(temperatures=(temp("t1", 2, 38.4),)), RULES)
    [episode] = result.episodes
    assert episode.fever is not None and episode.fever.evidence == ("t1",)
    assert episode.priority == "PH"


def test_no_febrile_neutropenia_at_moderate_without_a_projection():
    result = assess([graded("o1", 0, 800)], Context(temperatures=(temp("t1", 2, 39.0),)), RULES)
    assert result.episodes[0].fever is None and result.episodes[0].priority == "PM"


def test_a_projection_below_500_makes_a_fever_febrile_neutropenia():
    counts = [graded("o1", 0, 2000), graded("o2", 24, 900)]
    result = assess(counts, Context(temperatures=(temp("t1", 25, 38.5),)), RULES)
    latest = result.count("o2")
    assert latest.projection is not None and latest.fever is not None
    assert result.episodes[0].fever is not None


def test_febrile_stays_on_the_episode_until_it_closes():
    counts = [graded("o1", 0, 300), graded("o2", 72, 400)]
    result = assess(counts, Context(temperatures=(temp("t1", 1, 38.6),)), RULES)
    [episode] = result.episodes
    assert result.count("o2").fever is None  # the fever was 71 h before the later count
    assert episode.latest.reading.observation_id == "o2" and episode.fever.evidence == ("t1",)
    closed = assess(counts + [graded("o3", 96, 2500)], Context(temperatures=(temp("t1", 1, 38.6),)), RULES)
    assert closed.episodes[0].episode.closed_by is not None
    again = assess(counts + [graded("o3", 96, 2500), graded("o4", 120, 300)],
                   Context(temperatures=(temp("t1", 1, 38.6),)), RULES)
    assert again.episodes[1].fever is None  # a new episode starts without it


def test_switches_turn_each_part_off():
    facts = Context(temperatures=(temp("t1", 1, 39.0),),
                    chemotherapy=(Chemotherapy("Procedure/c", at(-240), "chemo"),), duffy_null_markers=("c1",))
    counts = [graded("o0", -24, 4000), graded("o1", 0, 1300)]
    on = assess(counts, facts, RULES).count("o1")
    assert on.chemotherapy is not None and on.projection is not None and on.duffy_null_floor == 1210
    assert on.result.grade is Grade.NORMAL
    off = assess(counts, facts, dataclasses.replace(RULES, febrile=False, projection=False, chemotherapy=False,
                                                    duffy_null=False)).count("o1")
    assert (off.fever, off.projection, off.chemotherapy, off.duffy_null_floor) == (None, None, None, None)
    assert off.result.grade is Grade.MILD


def test_duffy_null_marker_is_used_only_in_the_clinical_profile_and_only_for_adults():
    marked = Context(duffy_null_markers=("c1",))
    adult = assess([graded("o1", 0, 1300)], marked, RULES)
    assert adult.episodes == () and adult.count("o1").result.grade is Grade.NORMAL
    infant = assess([graded("o1", 0, 900, band=AgeBand.INFANT)], marked, RULES).count("o1")
    assert infant.duffy_null_floor is None and infant.result.grade is Grade.MODERATE
    ctcae = dataclasses.replace(RULES, profile="ctcae-v5")
    reading, _ = graded("o1", 0, 1300)
    result = classify.classify(reading.count, AgeBand.ADULT, "ctcae-v5", THRESHOLDS, 2000)
    assert assess([(reading, result)], marked, ctcae).count("o1").duffy_null_floor is None


@pytest.mark.parametrize("grade, febrile, expected", [
    (Grade.SEVERE, False, "PH"), (Grade.CTCAE_4, False, "PH"), (Grade.MODERATE, True, "PH"),
    (Grade.MODERATE, False, "PM"), (Grade.CTCAE_3, False, "PM"),
    (Grade.MILD, False, "PL"), (Grade.CTCAE_2, False, "PL"), (Grade.CTCAE_1, False, "PL"),
])
def test_priority(grade, febrile, expected):
    assert priority(grade, febrile) == expected


counts_strategy = st.lists(st.tuples(st.integers(0, 200), st.floats(0, 6000)), min_size=1, max_size=6,
                           unique_by=lambda c: c[0])
temps_strategy = st.lists(st.tuples(st.integers(-30, 230), st.floats(35, 41)), max_size=6)


def build(counts, temperatures):
    readings = [graded(f"o{h}", h, v) for h, v in counts]
    facts = Context(temperatures=tuple(temp(f"t{i}", h, c) for i, (h, c) in enumerate(temperatures)))
    return readings, facts


@given(counts_strategy, temps_strategy, st.integers(0, 5), st.floats(0, 1))
def test_a_lower_count_never_lowers_severity_or_removes_febrile(counts, temperatures, which, factor):
    readings, facts = build(counts, temperatures)
    index = which % len(readings)
    lowered = list(counts)
    lowered[index] = (counts[index][0], counts[index][1] * factor)
    before = assess(readings, facts, RULES).count(readings[index][0].observation_id)
    after_readings, _ = build(lowered, temperatures)
    after = assess(after_readings, facts, RULES).count(readings[index][0].observation_id)
    assert after.result.grade.severity >= before.result.grade.severity
    if before.fever is not None and before.projection is None:
        assert after.fever is not None


@given(counts_strategy, temps_strategy, st.integers(0, 5), st.floats(0, 3))
def test_a_higher_temperature_never_removes_febrile(counts, temperatures, which, rise):
    readings, facts = build(counts, temperatures)
    if not temperatures:
        return
    index = which % len(temperatures)
    raised = list(temperatures)
    raised[index] = (temperatures[index][0], temperatures[index][1] + rise)
    _, hotter = build(counts, raised)
    before, after = assess(readings, facts, RULES), assess(readings, hotter, RULES)
    for old, new in zip(before.episodes, after.episodes):
        if old.fever is not None:
            assert new.fever is not None


@given(counts_strategy, temps_strategy)
def test_unrelated_context_never_changes_the_assessment(counts, temperatures):
    readings, facts = build(counts, temperatures)
    # Facts outside every count's window: a fever weeks later, chemotherapy after the last count.
    unrelated = Context(
        temperatures=facts.temperatures + (temp("far", 10_000, 40.0),),
        chemotherapy=(Chemotherapy("Procedure/future", at(10_000), "later"),),
    )
    assert assess(readings, facts, RULES) == assess(readings, unrelated, RULES)


def test_assessment_is_a_pure_function_of_its_inputs():
    readings, facts = build([(0, 300), (30, 1200)], [(1, 38.4)])
    assert assess(readings, facts, RULES) == assess(list(reversed(readings)), facts, RULES)
