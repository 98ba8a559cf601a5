"""cells/µL + age + profile -> grade. Pure: no I/O, no clock (CONTRACT §5, DOMAIN.md §3)."""

from __future__ import annotations

import functools
from datetime import date, timedelta

from adapter.mappings import Band, Thresholds
from adapter.model import AgeBand, Classification, Count, Grade, Patient, Quarantine, Reason

NEONATE_DAYS = 14
AGE_UNKNOWN_NOTE = "age unknown: adult thresholds"


def age_band(birth_date: date | None, effective: date, pediatric: bool = True) -> AgeBand:
    """Age at the Observation's effective date; the 2-week and 1-year birthdays belong to the older band."""
    if birth_date is None:
        return AgeBand.UNKNOWN
    if not pediatric:
        return AgeBand.ADULT
    infant_from, adult_from = _band_starts(birth_date)
    if effective >= adult_from:
        return AgeBand.ADULT
    if effective >= infant_from:
        return AgeBand.INFANT
    return AgeBand.NEONATE


@functools.lru_cache(maxsize=4096)
def _band_starts(birth_date: date) -> tuple[date, date]:
    # The days the infant and adult bands begin, once per birth date: a patient's counts come together
    # (a page holds several of each), and each was dated against both birthdays anew.
    # The first birthday first: a birth date it cannot follow (year 9999) raises as it did before.
    adult_from = _first_birthday(birth_date)
    return birth_date + _NEONATE_SPAN, adult_from


_NEONATE_SPAN = timedelta(days=NEONATE_DAYS)


def patient_age_band(patient: Patient | None, effective: date, pediatric: bool = True,
                     thresholds: Thresholds | None = None) -> AgeBand:
    """A partial birthDate gives a band only when every birth date it allows grades the same way: the
    same band, or (given `thresholds`) bands with identical thresholds, such as the default neonate and
    infant tables; then the younger band, whose note asks for local verification."""
    if patient is None:
        return AgeBand.UNKNOWN
    youngest = age_band(patient.born_latest, effective, pediatric)
    if patient.born_earliest == patient.born_latest:  # a full birthDate (nearly always): one band
        return youngest
    oldest = age_band(patient.born_earliest, effective, pediatric)
    if youngest == oldest:
        return youngest
    if thresholds is not None and _table(youngest, thresholds).bounds == _table(oldest, thresholds).bounds:
        return youngest
    return AgeBand.UNKNOWN


def _table(band: AgeBand, thresholds: Thresholds) -> Band:
    if band == AgeBand.NEONATE:
        return thresholds.neonate
    if band == AgeBand.INFANT:
        return thresholds.infant
    return thresholds.adult


@functools.lru_cache(maxsize=64)
def _grades(bounds: tuple[tuple[str, float], ...]) -> tuple[tuple[Grade, float], ...]:
    # A table's grades looked up once, not on every count graded.
    return tuple((Grade(name), bound) for name, bound in bounds)


def classify(
    count: Count,
    band: AgeBand,
    profile: str,
    thresholds: Thresholds,
    lln_per_ul: float,
) -> Classification | Quarantine:
    """Grade one count. `lln_per_ul` is only used by the ctcae-v5 profile (grade 1 below the LLN)."""
    if profile == "ctcae-v5":
        grades = _ctcae_band(thresholds.ctcae, lln_per_ul)
        normal = Grade.CTCAE_0
        notes = _notes("", band)
    else:
        chosen = _table(band, thresholds)
        grades = _grades(chosen.bounds)
        normal = Grade.NORMAL
        notes = _notes(chosen.note, band)
    graded = _grade_range(count, grades, normal)
    if isinstance(graded, Quarantine):
        return graded
    grade, at_least = graded
    return _classification(grade, at_least, band, notes)


class Grader:
    """classify() for the one profile and threshold table a run grades every count with. An exact count
    under a non-CTCAE profile (nearly every count) is graded against its band's bounds, each paired once
    with the result it gives, instead of looking up the table, its grades, notes and result per count;
    every other count goes to classify() itself (tests/unit/test_classify.py compares the two)."""

    def __init__(self, profile: str, thresholds: Thresholds):
        self.profile = profile
        self.thresholds = thresholds
        self._exact: dict[AgeBand, tuple[tuple[tuple[float, Classification], ...], Classification]] = {}
        if profile != "ctcae-v5":
            for band in AgeBand:
                chosen = _table(band, thresholds)
                notes = _notes(chosen.note, band)
                self._exact[band] = (
                    tuple((bound, _classification(grade, False, band, notes))
                          for grade, bound in _grades(chosen.bounds)),
                    _classification(Grade.NORMAL, False, band, notes))

    def grade(self, count: Count, band: AgeBand, lln_per_ul: float) -> Classification | Quarantine:
        exact = self._exact.get(band) if not count.comparator else None
        if exact is None:
            return classify(count, band, self.profile, self.thresholds, lln_per_ul)
        value = count.anc_per_ul
        bounds, normal = exact
        for bound, result in bounds:  # as _grade_at: the first bound the value lies below
            if value < bound:
                return result
        return normal


def _notes(table_note: str, band: AgeBand) -> tuple[str, ...]:
    """A grade's notes: its table's own, then, for an unknown age, that the adult table was used."""
    return ((table_note,) if table_note else ()) + ((AGE_UNKNOWN_NOTE,) if band is AgeBand.UNKNOWN else ())


@functools.lru_cache(maxsize=256)
def _classification(grade: Grade, at_least: bool, band: AgeBand, notes: tuple[str, ...]) -> Classification:
    # A handful of distinct results (grade, band, notes) for every count graded: each is built once and
    # shared, which its being frozen makes safe.
    return Classification(grade=grade, at_least=at_least, age_band=band, notes=notes)


def _ctcae_band(ctcae: Band, lln_per_ul: float) -> tuple[tuple[Grade, float], ...]:
    grades = _grades(ctcae.bounds)
    # CTCAE grade 1 is "< LLN - 1500": it exists only when the LLN lies above grade 2's bound.
    if lln_per_ul > grades[-1][1]:
        grades += ((Grade.CTCAE_1, lln_per_ul),)
    return grades


def _grade_at(value: float, grades: tuple[tuple[Grade, float], ...], normal: Grade, below_only: bool) -> Grade:
    """Grade of `value`, or with below_only the grade of values just below it (the sup of [0, value))."""
    for grade, bound in grades:
        if value < bound or (below_only and value <= bound):
            return grade
    return normal


def _grade_range(
    count: Count, grades: tuple[tuple[Grade, float], ...], normal: Grade
) -> tuple[Grade, bool] | Quarantine:
    """CONTRACT §5 comparators: grade the whole range of values the result allows."""
    value, comparator = count.anc_per_ul, count.comparator
    if comparator == "":
        return _grade_at(value, grades, normal, below_only=False), False
    if comparator in (">", ">="):
        normal_from = grades[-1][1]
        if value >= normal_from:
            return normal, False
        return Quarantine(Reason.UNGRADABLE_COMPARATOR, f"'{comparator}' below the normal bound")
    # '<V' is [0, V), '<=V' is [0, V]; counts are never negative, so the most severe end is the grade of 0.
    least_severe = _grade_at(value, grades, normal, below_only=(comparator == "<"))
    most_severe = _grade_at(0.0, grades, normal, below_only=False)
    if least_severe == most_severe:
        return least_severe, False
    if not least_severe.abnormal:
        return Quarantine(Reason.UNGRADABLE_COMPARATOR, f"'{comparator}' range spans normal and abnormal")
    return least_severe, True


def _first_birthday(birth_date: date) -> date:
    try:
        return birth_date.replace(year=birth_date.year + 1)
    except ValueError:  # born on 29 February: the first birthday is taken as 1 March
        return date(birth_date.year + 1, 3, 1)
