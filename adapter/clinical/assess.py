"""A patient's graded counts + the context read for them -> the patient's clinical assessment. Pure.

One place for the clinical reasoning every output shares (writeback, CDS Hooks cards, the report): the
grade that stands (with a site-marked Duffy-null threshold applied), the episodes, febrile neutropenia
with its evidence, the projection, the chemotherapy context. No I/O, no state, no clock: "now" is never
read, so the same inputs always give the same assessment."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from adapter.clinical import classify, context
from adapter.clinical.context import Chemotherapy, Context, Fever, Projection
from adapter.clinical.episodes import Episode, Graded, episodes
from adapter.mappings import FebrileRules, Thresholds
from adapter.model import Classification, Grade, Reading

if TYPE_CHECKING:  # the core reads a Config, it does not load one
    from adapter.config import Config
    from adapter.mappings import Mappings

PRIORITY_HIGH, PRIORITY_MEDIUM, PRIORITY_LOW = "PH", "PM", "PL"


@dataclass(frozen=True)
class Rules:
    """What [classify], [context] and mappings/context.toml say; switched-off parts find nothing."""

    profile: str
    thresholds: Thresholds
    default_lln: float = 2000.0
    febrile_rules: FebrileRules = FebrileRules()
    febrile: bool = True
    projection: bool = True
    chemotherapy: bool = True
    duffy_null: bool = True
    chemotherapy_lookback: timedelta = timedelta(days=42)
    duffy_null_floor: float = 1210.0

    @classmethod
    def from_config(cls, config: Config, mappings: Mappings) -> Rules:
        """The one way every output (run's writeback, serve's cards, the report) builds its rules, so
        that a card, a Flag and a report timeline can never grade the same counts differently."""
        switches = config.context
        return cls(
            profile=config.classify.profile, thresholds=mappings.thresholds,
            default_lln=config.classify.default_lln, febrile_rules=mappings.context.febrile,
            febrile=switches.febrile, projection=switches.projection, chemotherapy=switches.chemotherapy,
            duffy_null=switches.duffy_null, chemotherapy_lookback=switches.chemotherapy_lookback_delta,
            duffy_null_floor=mappings.context.duffy_null_floor,
        )


@dataclass(frozen=True)
class AssessedCount:
    reading: Reading
    result: Classification  # the grade that stands for this count (Duffy-null threshold applied)
    fever: Fever | None = None  # febrile neutropenia at this count: a fever, and < 500 or projected so
    projection: Projection | None = None
    chemotherapy: Chemotherapy | None = None
    duffy_null_floor: float | None = None  # the site-marked threshold used for this count

    @property
    def graded(self) -> Graded:
        return self.reading, self.result


@dataclass(frozen=True)
class AssessedEpisode:
    episode: Episode
    latest: AssessedCount  # the count whose grade the episode shows
    fever: Fever | None  # febrile neutropenia seen in the episode: it stays until the episode closes

    @property
    def priority(self) -> str:
        return priority(self.latest.result.grade, self.fever is not None)


@dataclass(frozen=True)
class Assessment:
    counts: tuple[AssessedCount, ...]  # every graded count, by effective time
    episodes: tuple[AssessedEpisode, ...]

    def count(self, observation_id: str) -> AssessedCount | None:
        return next((c for c in self.counts if c.reading.observation_id == observation_id), None)


def priority(grade: Grade, febrile: bool) -> str:
    """flag-priority (CONTRACT §6): febrile or the most severe grade high, the next medium, else low."""
    if febrile or grade in _MOST_SEVERE:
        return PRIORITY_HIGH
    if grade in _NEXT_MOST_SEVERE:
        return PRIORITY_MEDIUM
    return PRIORITY_LOW


# Looked up once: reading an Enum member off its class costs a tenth of a µs, four of them were most of
# `priority`, which every Flag asks for.
_MOST_SEVERE = (Grade.SEVERE, Grade.CTCAE_4)
_NEXT_MOST_SEVERE = (Grade.MODERATE, Grade.CTCAE_3)


def assess(readings: Iterable[Graded], facts: Context, rules: Rules) -> Assessment:
    ordered = sorted(readings, key=_time_order)
    marked = rules.duffy_null and bool(facts.duffy_null_markers)
    # Without a temperature or a chemotherapy record read for the patient there is nothing to find near
    # any count: asked once per patient instead of once per count.
    febrile = rules.febrile and bool(facts.temperatures)
    temperatures = sorted(facts.temperatures, key=context.time_order) if febrile else []
    after_chemotherapy = rules.chemotherapy and bool(facts.chemotherapy)
    anc_below = rules.febrile_rules.anc_below
    counts = []
    by_id: dict[str, AssessedCount] = {}
    any_fever = False
    for (reading, result), projected in zip(ordered, _projections(ordered, rules)):
        floor = None
        if marked:
            result, floor = _duffy_null(reading, result, rules)
        found = None
        if febrile and (_below(reading, anc_below) or projected is not None):
            found = context.fever(temperatures, reading.effective, rules.febrile_rules, in_order=True)
            any_fever = any_fever or found is not None
        chemo = None
        if after_chemotherapy:
            chemo = context.chemotherapy(facts.chemotherapy, reading.effective, rules.chemotherapy_lookback)
        counts.append(assessed := AssessedCount(reading, result, found, projected, chemo, floor))
        by_id[reading.observation_id] = assessed
    assessed = []
    # In time order already; a site-marked threshold may have changed a grade, and with it the episodes.
    graded = [c.graded for c in counts] if marked else ordered
    for episode in episodes(graded, in_order=True):
        latest = by_id[episode.latest[0].observation_id]
        fever = latest.fever
        if fever is None and any_fever:  # else no member can have one
            members = sorted((by_id[i] for i in episode.evidence), key=lambda c: (c.reading.effective,
                                                                                  c.reading.observation_id))
            fever = next((c.fever for c in reversed(members) if c.fever), None)
        assessed.append(AssessedEpisode(episode, latest, fever))
    return Assessment(tuple(counts), tuple(assessed))


def _time_order(graded: Graded) -> tuple[datetime, str]:
    return graded[0].effective, graded[0].observation_id


def _projections(ordered: list[Graded], rules: Rules) -> list[Projection | None]:
    """The projection at each count, in the order given (time order): none for a count with a comparator,
    which is not projected from nor to."""
    if not rules.projection:
        return [None] * len(ordered)
    exact = [(r.observation_id, r.effective, r.count.anc_per_ul) for r, _ in ordered if not r.count.comparator]
    found = context.projections(exact, rules.febrile_rules)
    if len(exact) == len(ordered):
        return found
    in_order = iter(found)
    return [None if r.count.comparator else next(in_order) for r, _ in ordered]


def _below(reading: Reading, bound: float) -> bool:
    """Is every value the result allows below `bound`? ('<500' is; '<=500' is not.)"""
    value, comparator = reading.count.anc_per_ul, reading.count.comparator
    if comparator == "<":
        return value <= bound
    if comparator in ("", "<="):
        return value < bound
    return False


def _duffy_null(reading: Reading, result: Classification, rules: Rules) -> tuple[Classification, float | None]:
    """Grade again with the site-marked lower limit of normal (clinical profile only: CTCAE grades
    against the lab's own LLN, which a site sets on the Observation)."""
    if rules.profile != "clinical":
        return result, None
    lowered = context.duffy_null_thresholds(rules.thresholds, result.age_band, rules.duffy_null_floor)
    if lowered is None:
        return result, None
    lln = reading.lln_per_ul if reading.lln_per_ul is not None else rules.default_lln
    regraded = classify.classify(reading.count, result.age_band, rules.profile, lowered, lln)
    if not isinstance(regraded, Classification):
        # A comparator range that the lowered bound splits: keep the usual grade rather than drop it.
        return result, None
    return dataclasses.replace(result, grade=regraded.grade, at_least=regraded.at_least), rules.duffy_null_floor
