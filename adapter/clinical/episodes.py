"""A patient's classified counts -> neutropenia episodes, by effective time (never arrival order). Pure.

An episode opens on the first abnormal count after a normal one (or the first count ever), follows the
grade of its latest abnormal count, and closes on the next normal count (CONTRACT §6 Flag)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from adapter.model import Classification, Reading

Graded = tuple[Reading, Classification]


@dataclass(frozen=True)
class Episode:
    ordinal: int  # 1 = the patient's first episode we know of
    first: Graded  # the abnormal count that opened it
    latest: Graded  # the latest abnormal count: the grade the Flag shows
    closed_by: Graded | None  # the normal count that closed it; None while it is open
    evidence: frozenset[str] = frozenset()  # ids of every abnormal reading in it

    @property
    def start(self) -> datetime:
        return self.first[0].effective

    @property
    def end(self) -> datetime | None:
        return self.closed_by[0].effective if self.closed_by else None


def episodes(readings: list[Graded], in_order: bool = False) -> list[Episode]:
    """`in_order`: `readings` is already sorted by (effective time, observation id), as assess has them."""
    ordered = readings if in_order else sorted(readings, key=lambda g: (g[0].effective, g[0].observation_id))
    found: list[Episode] = []
    members: list[Graded] = []
    for graded in ordered:
        if graded[1].grade.abnormal:
            members.append(graded)
        elif members:
            found.append(_episode(len(found) + 1, members, closed_by=graded))
            members = []
    if members:
        found.append(_episode(len(found) + 1, members, closed_by=None))
    return found


def _episode(ordinal: int, members: list[Graded], closed_by: Graded | None) -> Episode:
    return Episode(ordinal, members[0], members[-1], closed_by,
                   frozenset(reading.observation_id for reading, _ in members))
