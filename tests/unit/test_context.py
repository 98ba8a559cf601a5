"""The context rules, pure: fever (IDSA), projection, chemotherapy window, Duffy-null thresholds."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter import mappings
from adapter.clinical import classify
from adapter.clinical.context import (
    Chemotherapy, Temperature, chemotherapy, days_before, duffy_null_thresholds, fever, projection, projections,
    time_order,
)
from adapter.mappings import FebrileRules
from adapter.model import AgeBand, Classification, Count, Grade

RULES = FebrileRules()
COUNT_AT = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
THRESHOLDS = mappings.load().thresholds


def at(hours: float) -> datetime:
    return COUNT_AT + timedelta(hours=hours)


def temps(*readings: tuple[float, float]) -> list[Temperature]:
    """(hours from the count, °C) -> Temperatures t0, t1, …"""
    return [Temperature(f"t{i}", at(h), c) for i, (h, c) in enumerate(readings)]


@pytest.mark.parametrize("readings, expected", [
    ([(2, 38.3)], ("t0",)),                                  # one reading at the IDSA single threshold
    ([(2, 38.29)], None),                                    # just below it, alone
    ([(-23.9, 38.5)], ("t0",)),                              # within 24 h before the count
    ([(24.1, 39.0)], None),                                  # just outside 24 h after
    ([(-25, 39.0)], None),
    ([(1, 38.0), (2, 38.1)], ("t0", "t1")),                  # sustained: 38.0 over exactly an hour
    ([(1, 38.0), (1.9, 38.1)], None),                        # 54 minutes is not an hour
    ([(1, 38.0), (1.5, 37.9), (2, 38.1)], None),             # a reading below 38.0 between them
    ([(1, 38.1), (1.5, 38.2), (2.5, 38.0)], ("t0", "t1", "t2")),
    ([(1, 38.4), (3, 39.1), (5, 38.6)], ("t1",)),            # several singles: the highest
    ([(1, 37.0)], None),
])
def test_fever_table(readings, expected):
    found = fever(temps(*readings), COUNT_AT, RULES)
    assert (found.evidence if found else None) == expected


def test_a_single_reading_is_preferred_to_a_sustained_run():
    found = fever(temps((0, 38.0), (1, 38.1), (2, 38.5)), COUNT_AT, RULES)
    assert found is not None and not found.sustained and found.evidence == ("t2",)


@given(st.lists(st.tuples(st.floats(-30, 30), st.floats(30, 42)), max_size=8),
       st.integers(0, 7), st.floats(0, 3))
def test_a_higher_temperature_never_removes_a_fever(readings, which, rise):
    before = temps(*readings)
    if not before:
        return
    index = which % len(before)
    after = list(before)
    after[index] = Temperature(before[index].observation_id, before[index].time, before[index].celsius + rise)
    if fever(before, COUNT_AT, RULES) is not None:
        assert fever(after, COUNT_AT, RULES) is not None


@given(st.lists(st.tuples(st.floats(-30, 30), st.floats(30, 42)), max_size=8),
       st.tuples(st.floats(-30, 30), st.floats(30, 42)))
def test_an_added_reading_at_or_above_38_never_removes_a_fever(readings, extra):
    before = temps(*readings)
    after = before + [Temperature("extra", at(extra[0]), max(extra[1], 38.0))]
    if fever(before, COUNT_AT, RULES) is not None:
        assert fever(after, COUNT_AT, RULES) is not None


@pytest.mark.parametrize("ids", [("a", "b", "z"), ("z", "y", "a")])
def test_a_reading_below_38_at_the_same_instant_as_a_runs_end_is_not_between(ids):
    # Two devices at one instant (38.1 and 37.5 at +1 h): the low one is not *between* the readings of
    # the run 0 h -> 1 h, whatever the ids (which once decided it: the order within an instant was by id).
    readings = [Temperature(ids[0], at(0), 38.1), Temperature(ids[1], at(1), 38.1), Temperature(ids[2], at(1), 37.5)]
    found = fever(readings, COUNT_AT, RULES)
    assert found is not None and found.sustained and found.evidence == (ids[0], ids[1])


def test_a_reading_below_38_inside_a_run_still_breaks_it_when_it_shares_an_instant():
    readings = [Temperature("a", at(0), 38.1), Temperature("b", at(0.5), 38.1), Temperature("c", at(0.5), 37.5),
                Temperature("d", at(1), 38.1)]
    assert fever(readings, COUNT_AT, RULES) is None


@given(st.lists(st.tuples(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0]), st.sampled_from([37.5, 38.0, 38.1])),
                max_size=8), st.permutations(range(8)))
def test_the_fever_found_never_depends_on_the_ids(readings, order):
    # Same instants, same values, ids handed out in another order: the same fever (or none).
    first = temps(*readings)
    renamed = [Temperature(f"r{order[i]}", t.time, t.celsius) for i, t in enumerate(first)]
    found, again = fever(first, COUNT_AT, RULES), fever(renamed, COUNT_AT, RULES)
    assert (found is None) == (again is None)
    if found is not None:
        assert found.sustained == again.sustained
        assert sorted((t.time, t.celsius) for t in found.readings) == sorted((t.time, t.celsius) for t in again.readings)


@given(st.lists(st.tuples(st.sampled_from([-30.0, -24.0, -23.5, -1.0, 0.0, 0.5, 1.0, 2.0, 24.0, 24.5]),
                          st.sampled_from([37.5, 38.0, 38.1, 38.3, 39.0])), max_size=12),
       st.sampled_from([-1.0, 0.0, 1.0, 24.0]), st.sampled_from([0.0, 24.0, 48.0]))
def test_a_fever_found_in_time_ordered_temperatures_is_the_one_found_in_any_order(readings, around, window):
    # assess hands fever() the patient's temperatures sorted once; they are cut by bisection there.
    rules = FebrileRules(window_hours=window)
    given_order = temps(*readings)
    assert fever(sorted(given_order, key=time_order), at(around), rules, in_order=True) == \
        fever(given_order, at(around), rules)


def test_projection_log_linear_crossing():
    # 2000 -> 1000 over 24 h halves per day: 1000 -> 500 takes another 24 h.
    found = projection([("a", at(-24), 2000.0)], ("b", COUNT_AT, 1000.0), RULES)
    assert found is not None and found.earlier_observation_id == "a"
    assert found.below_by == at(24)


@pytest.mark.parametrize("earlier, later, expected", [
    ((-24, 2000.0), 1000.0, True),
    ((-24, 4000.0), 1000.0, True),      # crosses in 12 h
    ((-24, 1100.0), 1000.0, False),     # too slow: beyond 48 h
    ((-5, 2000.0), 1000.0, False),      # less than 6 h apart
    ((-73, 9000.0), 1000.0, False),     # more than 72 h apart
    ((-24, 900.0), 1000.0, False),      # rising
    ((-24, 1000.0), 1000.0, False),     # flat
    ((-24, 2000.0), 400.0, False),      # already below 500: no projection, the count says it
    ((-24, 2000.0), 500.0, True),       # at the bound: crosses at once
])
def test_projection_table(earlier, later, expected):
    hours, value = earlier
    found = projection([("a", at(hours), value)], ("b", COUNT_AT, later), RULES)
    assert (found is not None) == expected


def test_projection_uses_the_most_recent_earlier_count_in_the_window():
    counts = [("old", at(-60), 8000.0), ("recent", at(-12), 1500.0), ("too-close", at(-2), 5000.0)]
    found = projection(counts, ("now", COUNT_AT, 1000.0), RULES)
    assert found is not None and found.earlier_observation_id == "recent"


@given(st.lists(st.tuples(st.integers(-100, 100), st.sampled_from([400.0, 500.0, 900.0, 1500.0, 3000.0, 8000.0])),
                max_size=25),
       st.tuples(st.sampled_from([-6.0, 0.0, 0.5, 6.0, 24.0]), st.sampled_from([0.0, 6.0, 12.0, 72.0, 100.0])))
def test_projections_of_a_history_in_time_order_are_each_counts_projection_against_all(history, gaps):
    # The sliding window must find what comparing every count with every other finds, whatever the gaps
    # (even none, negative, or a minimum above the maximum) and with counts at the same instant.
    rules = FebrileRules(projection_min_gap_hours=gaps[0], projection_max_gap_hours=gaps[1])
    counts = sorted(((f"o{i}", at(hours), value) for i, (hours, value) in enumerate(history)),
                    key=lambda c: (c[1], c[0]))
    try:
        expected = [projection(counts, count, rules) for count in counts]
    except ZeroDivisionError:  # a zero minimum gap lets a count be compared with one at its instant
        with pytest.raises(ZeroDivisionError):
            projections(counts, rules)
        return
    assert projections(counts, rules) == expected


def test_chemotherapy_window_and_days():
    records = [Chemotherapy("Procedure/old", at(-24 * 43), "old"),
               Chemotherapy("MedicationAdministration/a", at(-24 * 10 - 1), "cyclophosphamide"),
               Chemotherapy("MedicationAdministration/after", at(1), "later")]
    found = chemotherapy(records, COUNT_AT, timedelta(days=42))
    assert found is not None and found.reference == "MedicationAdministration/a"
    assert days_before(found, COUNT_AT) == 10
    same_day = Chemotherapy("Procedure/p", datetime(2026, 11, 20, tzinfo=timezone.utc), "x")
    assert days_before(same_day, COUNT_AT) == 0
    assert chemotherapy([records[0]], COUNT_AT, timedelta(days=42)) is None


def grade(anc: float, band: AgeBand, thresholds) -> Grade:
    result = classify.classify(Count(anc), band, "clinical", thresholds, 2000)
    assert isinstance(result, Classification)
    return result.grade


@pytest.mark.parametrize("anc, usual, marked", [
    (1500, Grade.NORMAL, Grade.NORMAL),
    (1300, Grade.MILD, Grade.NORMAL),
    (1210, Grade.MILD, Grade.NORMAL),
    (1209, Grade.MILD, Grade.MILD),
    (1000, Grade.MILD, Grade.MILD),
    (999, Grade.MODERATE, Grade.MODERATE),
    (499, Grade.SEVERE, Grade.SEVERE),
])
def test_duffy_null_floor_for_adults(anc, usual, marked):
    lowered = duffy_null_thresholds(THRESHOLDS, AgeBand.ADULT, 1210)
    assert grade(anc, AgeBand.ADULT, THRESHOLDS) == usual
    assert grade(anc, AgeBand.ADULT, lowered) == marked


def test_duffy_null_never_applies_where_it_would_not_lower_the_bound():
    assert duffy_null_thresholds(THRESHOLDS, AgeBand.INFANT, 1210) is None
    assert duffy_null_thresholds(THRESHOLDS, AgeBand.NEONATE, 1210) is None
    assert duffy_null_thresholds(THRESHOLDS, AgeBand.ADULT, 1500) is None
    assert duffy_null_thresholds(THRESHOLDS, AgeBand.UNKNOWN, 1210) is not None  # graded as an adult


def test_a_floor_below_the_moderate_bound_keeps_moderate():
    lowered = duffy_null_thresholds(THRESHOLDS, AgeBand.ADULT, 900)
    assert grade(899, AgeBand.ADULT, lowered) == Grade.MODERATE
    assert grade(900, AgeBand.ADULT, lowered) == Grade.NORMAL


@given(st.floats(0, 5000), st.floats(0, 5000))
def test_with_the_floor_a_lower_count_never_lowers_severity(first, second):
    lowered = duffy_null_thresholds(THRESHOLDS, AgeBand.ADULT, 1210)
    low, high = sorted((first, second))
    assert grade(low, AgeBand.ADULT, lowered).severity >= grade(high, AgeBand.ADULT, lowered).severity


@pytest.mark.parametrize("low, high", [(0, 72), (-1, 72), (72, 72), (80, 72)])
def test_a_site_copy_with_projection_gaps_that_cannot_work_is_refused_at_load(tmp_path, low, high):
    import shutil

    from adapter.errors import ConfigError

    site = tmp_path / "mappings"
    shutil.copytree(Path(mappings.__file__).resolve().parent.parent / "mappings", site)
    text = (site / "context.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^projection_min_gap_hours = .*$", f"projection_min_gap_hours = {low}", text)
    text = re.sub(r"(?m)^projection_max_gap_hours = .*$", f"projection_max_gap_hours = {high}", text)
    (site / "context.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="projection_min_gap_hours"):
        mappings.load(str(site))
