"""Clinical context around a graded count: fever, projection, chemotherapy, Duffy-null (CONTRACT §5b).

Pure: facts in, facts out; no I/O, no clock. The rules and their sources:
- fever (IDSA, Freifeld et al. 2011; Taplitz et al. 2018): one temperature ≥ 38.3 °C, or readings
  ≥ 38.0 °C spanning at least an hour with none below 38.0 °C between them;
- projection: the same ratio per hour between the last two counts continues (log-linear);
- chemotherapy: the most recent qualifying record within the lookback before the count;
- Duffy-null (Merz et al., JAMA 2023): a lower normal bound, only for a patient the site marked."""

from __future__ import annotations

import functools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import groupby
from dataclasses import dataclass
from datetime import datetime, timedelta

from adapter.mappings import Band, FebrileRules, Thresholds
from adapter.model import AgeBand


@dataclass(frozen=True)
class Temperature:
    """One body temperature reading, normalised to °C."""

    observation_id: str
    time: datetime
    celsius: float
    recorded: str = ""  # the value as sent when it was not in °C, e.g. "101.5 °F"


@dataclass(frozen=True)
class Chemotherapy:
    """A chemotherapy record: MedicationAdministration, MedicationRequest or Procedure."""

    reference: str  # "MedicationAdministration/<id>" …
    time: datetime
    name: str


@dataclass(frozen=True)
class Context:
    """What was read around one patient's counts. Empty when nothing was read (or all switched off)."""

    temperatures: tuple[Temperature, ...] = ()
    chemotherapy: tuple[Chemotherapy, ...] = ()
    duffy_null_markers: tuple[str, ...] = ()  # Condition ids marking the patient


@dataclass(frozen=True)
class Fever:
    """The readings that make the fever: one (≥ 38.3 °C), or a sustained run (≥ 38.0 °C over an hour)."""

    readings: tuple[Temperature, ...]
    sustained: bool
    threshold: float = 38.0  # the sustained rule's threshold, said in the text of a sustained fever

    @property
    def evidence(self) -> tuple[str, ...]:
        return tuple(t.observation_id for t in self.readings)


@dataclass(frozen=True)
class Projection:
    """Log-linear: the ratio per hour between `earlier` and the count continues."""

    earlier_observation_id: str
    below_by: datetime  # when the count is projected to fall below the threshold (minute precision)


def shown_celsius(celsius: float) -> str:
    """One decimal, cut rather than rounded, so a shown value never reaches a threshold the reading does
    not: 100.9 °F is 38.28 °C, which rounded would read "38.3", the single-reading fever it is not."""
    return f"{math.floor(round(celsius * 10, 6)) / 10:.1f}"


def time_order(temperature: Temperature) -> tuple[datetime, str]:
    return temperature.time, temperature.observation_id


def fever(temperatures: Iterable[Temperature], around: datetime, rules: FebrileRules,
          in_order: bool = False) -> Fever | None:
    """A fever within `window_hours` either side of `around`, or None. Prefers a single reading
    ≥ single_celsius (the highest, then the earliest); else the longest sustained run.
    `in_order`: `temperatures` is a list sorted by time_order, in which those near `around` are found by
    bisection (a patient's temperatures are searched again for each of its low counts)."""
    window = _hours(rules.window_hours)
    if in_order:
        assert isinstance(temperatures, list)
        # Rises along the list; a difference of two instants never overflows, unlike `around - window`.
        since = lambda t: t.time - around  # noqa: E731
        near = temperatures[bisect_left(temperatures, -window, key=since):bisect_right(temperatures, window, key=since)]
    else:
        near = sorted((t for t in temperatures if abs(t.time - around) <= window), key=time_order)
    singles = [t for t in near if t.celsius >= rules.single_celsius]
    if singles:
        best = max(singles, key=lambda t: (t.celsius, -t.time.timestamp()))
        return Fever((best,), sustained=False)
    runs: list[list[Temperature]] = [[]]
    for _, same_time in groupby(near, key=lambda t: t.time):
        readings = list(same_time)
        hot = [t for t in readings if t.celsius >= rules.sustained_celsius]
        runs[-1].extend(hot)
        if len(hot) < len(readings):
            # A reading below the threshold ends the run; one at the same instant as a reading at or above
            # it is not *between* that reading and the others, so that reading both ends the run and
            # starts the next (never decided by the order of ids within the instant).
            runs.append(list(hot))
    span = _minutes(rules.sustained_minutes)
    qualifying = [run for run in runs if len(run) >= 2 and run[-1].time - run[0].time >= span]
    if not qualifying:
        return None
    longest = max(qualifying, key=lambda run: (run[-1].time - run[0].time, -run[0].time.timestamp()))
    return Fever(tuple(longest), sustained=True, threshold=rules.sustained_celsius)


def projection(counts: Iterable[tuple[str, datetime, float]], at: tuple[str, datetime, float],
               rules: FebrileRules) -> Projection | None:
    """From a count `at` = (id, time, cells/µL) ≥ the threshold and the most recent earlier count taken
    between projection_min_gap_hours and projection_max_gap_hours before it, when `at` is lower: the
    time it crosses below the threshold, when that is within projection_hours of `at`."""
    observation_id, time, value = at
    if value < rules.anc_below:
        return None
    low_gap, high_gap = _hours(rules.projection_min_gap_hours), _hours(rules.projection_max_gap_hours)
    earlier = [c for c in counts if low_gap <= time - c[1] <= high_gap]
    if not earlier:
        return None
    return _projected(max(earlier, key=lambda c: (c[1], c[0])), at, rules)


def _projected(previous: tuple[str, datetime, float], at: tuple[str, datetime, float],
               rules: FebrileRules) -> Projection | None:
    """projection() from `previous`, the most recent count in the gaps before `at`."""
    observation_id, time, value = at
    if not 0 < value < previous[2]:
        return None
    hours = (time - previous[1]).total_seconds() / 3600
    rate = math.log(value / previous[2]) / hours  # negative: the count is falling
    to_threshold = math.log(rules.anc_below / value) / rate  # hours from `at`; 0 when value is the bound
    if to_threshold > rules.projection_hours:
        return None
    crossing = time + timedelta(hours=to_threshold)
    return Projection(previous[0], crossing.replace(second=0, microsecond=0))


def projections(counts: list[tuple[str, datetime, float]], rules: FebrileRules) -> list[Projection | None]:
    """projection() for each of a patient's counts, given in time order, against the others. The counts
    between the gaps before each one form a window that only moves forward along the list, so a history
    of n counts takes n steps instead of n² (every plan asks about each count of the patient)."""
    low_gap, high_gap = _hours(rules.projection_min_gap_hours), _hours(rules.projection_max_gap_hours)
    below, total = rules.anc_below, len(counts)
    found: list[Projection | None] = []
    low = high = 0
    for at in counts:
        time = at[1]
        while high < total and time - counts[high][1] >= low_gap:
            high += 1
        while low < total and time - counts[low][1] > high_gap:
            low += 1
        # projection() answers None at once for a count already below the bound or with no earlier count in
        # the window: most counts, so asked here without the call. Else the window holds exactly the counts
        # projection() would find in the gaps, in the order of its `max` (time, then id): the most recent
        # is its last, taken without filtering and searching the window again.
        found.append(None if at[2] < below or high <= low else _projected(counts[high - 1], at, rules))
    return found


def chemotherapy(records: Iterable[Chemotherapy], before: datetime, lookback: timedelta) -> Chemotherapy | None:
    """The most recent record dated within `lookback` before the count (never one after it)."""
    candidates = [r for r in records if _NO_TIME <= before - r.time <= lookback]
    return max(candidates, key=lambda r: (r.time, r.reference), default=None)


_NO_TIME = timedelta(0)


# The rules' durations are floats, and a timedelta from a float costs ~0.75 µs: built once per value
# instead of once per count (the rules say the same few for every count of every patient).
@functools.lru_cache(maxsize=64)
def _hours(hours: float) -> timedelta:
    return timedelta(hours=hours)


@functools.lru_cache(maxsize=64)
def _minutes(minutes: float) -> timedelta:
    return timedelta(minutes=minutes)


def days_before(record: Chemotherapy, count_time: datetime) -> int:
    """Whole days between the chemotherapy and the count (0 on the same day)."""
    return math.floor((count_time - record.time).total_seconds() / 86400)


def duffy_null_thresholds(thresholds: Thresholds, band: AgeBand, floor: float) -> Thresholds | None:
    """Thresholds for a site-marked Duffy-null patient, or None where the floor would not lower the
    normal bound. Only the adult table (adults, children from 1 year, and unknown age graded as adults)
    has a bound above the floor; the infant and neonate tables start at 1000, already below 1210 —
    applying the floor there would call more infants neutropenic, the opposite of its purpose."""
    if band in (AgeBand.INFANT, AgeBand.NEONATE):
        return None
    table = thresholds.adult
    normal_from = table.bounds[-1][1]
    if floor >= normal_from:
        return None
    # Below the floor the usual grades apply: bounds under it stay; the grade it falls in now ends at it
    # (mild for 1210: 1000-1209 mild, < 1000 moderate, < 500 severe); milder grades are gone.
    kept = tuple((grade, bound) for grade, bound in table.bounds if bound < floor)
    cut = next(grade for grade, bound in table.bounds if bound >= floor)
    lowered = kept + ((cut, floor),)
    return Thresholds(adult=Band(lowered, table.note), infant=thresholds.infant, neonate=thresholds.neonate,
                      ctcae=thresholds.ctcae, max_anc_per_ul=thresholds.max_anc_per_ul)
