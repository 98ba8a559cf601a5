"""Domain types shared by the stages: what a reading is, what a grade is, why something was quarantined."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from enum import Enum


class Grade(str, Enum):
    NORMAL = "normal"
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"
    CTCAE_0 = "ctcae-0"  # not decreased under CTCAE (at or above the LLN)
    CTCAE_1 = "ctcae-1"
    CTCAE_2 = "ctcae-2"
    CTCAE_3 = "ctcae-3"
    CTCAE_4 = "ctcae-4"

    @property
    def abnormal(self) -> bool:
        return self not in _NOT_DECREASED

    @property
    def severity(self) -> int:
        """0 = normal … 4 = the most severe grade of the profile; comparable within one profile."""
        return _SEVERITY[self]

    @property
    def label(self) -> str:
        return _LABEL[self]


# Looked up once: reading an Enum member off its class costs a tenth of a µs each, and `abnormal` is
# asked for every count graded.
_NOT_DECREASED = (Grade.NORMAL, Grade.CTCAE_0)
_SEVERITY = {
    Grade.NORMAL: 0, Grade.MILD: 1, Grade.MODERATE: 2, Grade.SEVERE: 3,
    Grade.CTCAE_0: 0, Grade.CTCAE_1: 1, Grade.CTCAE_2: 2, Grade.CTCAE_3: 3, Grade.CTCAE_4: 4,
}
_LABEL = {
    Grade.NORMAL: "No neutropenia",
    Grade.MILD: "Mild neutropenia",
    Grade.MODERATE: "Moderate neutropenia",
    Grade.SEVERE: "Severe neutropenia",
    Grade.CTCAE_0: "Neutrophil count not decreased (CTCAE v5)",
    Grade.CTCAE_1: "Neutrophil count decreased, CTCAE v5 grade 1",
    Grade.CTCAE_2: "Neutrophil count decreased, CTCAE v5 grade 2",
    Grade.CTCAE_3: "Neutrophil count decreased, CTCAE v5 grade 3",
    Grade.CTCAE_4: "Neutrophil count decreased, CTCAE v5 grade 4",
}


class Reason(str, Enum):
    """Why an Observation was quarantined instead of classified (visible in `status`)."""

    UNKNOWN_UNIT = "unknown-unit"
    IMPLAUSIBLE_VALUE = "implausible-value"
    NO_VALUE = "no-value"
    NO_EFFECTIVE_TIME = "no-effective-time"
    NO_SUBJECT = "no-subject"
    UNGRADABLE_COMPARATOR = "ungradable-comparator"
    UNKNOWN_MODIFIER = "unknown-modifier"  # a modifierExtension may change the meaning: never guess


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: Reason
    detail: str = ""  # codes and units only, never a patient's data


@dataclass(frozen=True, slots=True)
class Count:
    """An ANC normalised to cells/µL, with the comparator the lab sent ('' when exact)."""

    anc_per_ul: float
    comparator: str = ""

    def __str__(self) -> str:
        return f"{self.comparator}{self.anc_per_ul:g}"


class AgeBand(str, Enum):
    NEONATE = "neonate"  # < 2 weeks
    INFANT = "infant"  # 2 weeks to < 1 year
    ADULT = "adult"  # 1 year and older (children >= 1 y share the adult thresholds)
    UNKNOWN = "unknown"  # no usable birthDate: adult thresholds, said in the output


@dataclass(frozen=True, slots=True)
class Classification:
    grade: Grade
    at_least: bool = False  # a comparator left the exact grade open; this is the least severe it can be
    age_band: AgeBand = AgeBand.UNKNOWN
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, init=False)
class Reading:
    """The fields of one ANC Observation version that the pipeline needs, extracted leniently."""

    observation_id: str
    version: str
    status: str
    patient_id: str
    effective: datetime
    count: Count
    lln_per_ul: float | None = None  # referenceRange.low, normalised
    sources: tuple[str, ...] = ()  # a derived ANC: the Observations it was computed from

    def __init__(self, observation_id: str, version: str, status: str, patient_id: str, effective: datetime,
                 count: Count, lln_per_ul: float | None = None, sources: tuple[str, ...] = ()):
        # One is built for every count read. The generated __init__ of a frozen class sets each field
        # through object.__setattr__, eight calls of a tenth of a µs; this one lends the new instance
        # for its fields to an unfrozen class of the same slots (two plain assignments of __class__),
        # then gives it back: under half the cost, and the instance is a Reading, frozen, from the
        # moment it is returned (tests/unit/test_model.py).
        object.__setattr__(self, "__class__", _ReadingFields)
        self.observation_id = observation_id
        self.version = version
        self.status = status
        self.patient_id = patient_id
        self.effective = effective
        self.count = count
        self.lln_per_ul = lln_per_ul
        self.sources = sources
        self.__class__ = Reading

    @property
    def evidence(self) -> tuple[str, ...]:
        """The Observation ids on the server behind this reading."""
        return self.sources or (self.observation_id,)


class _ReadingFields:
    """Reading's slots without its frozen __setattr__: only Reading.__init__ uses it, to fill them."""

    __slots__ = Reading.__slots__


class InputKind(str, Enum):
    """Inputs of a derived ANC (DOMAIN.md §1, §3: ANC = WBC × (segs + bands) % / 100)."""

    WBC = "wbc"  # cells/µL
    SEGMENTED_PERCENT = "segmented-percent"
    BAND_PERCENT = "band-percent"
    NEUTROPHIL_PERCENT = "neutrophil-percent"  # segs and bands together
    SEGMENTED_COUNT = "segmented-count"  # cells/µL (manual differential, absolute)
    BAND_COUNT = "band-count"  # cells/µL

    @property
    def is_count(self) -> bool:
        return self in (InputKind.WBC, InputKind.SEGMENTED_COUNT, InputKind.BAND_COUNT)


@dataclass(frozen=True, slots=True)
class DeriveInput:
    observation_id: str
    version: str
    patient_id: str
    effective: datetime
    kind: InputKind
    value: float  # cells/µL for counts, percent (0-100) otherwise


@dataclass(frozen=True)
class Patient:
    """Only what grading needs. A partial birthDate (YYYY or YYYY-MM) is kept as the range it allows."""

    patient_id: str
    born_earliest: date | None = None
    born_latest: date | None = None
