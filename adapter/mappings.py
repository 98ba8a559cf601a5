"""Site-editable mapping data (mappings/*.toml): ANC codes, unit aliases, thresholds.

The shipped copy is installed as the `adapter.mapping_data` package data; in a source checkout it is the
top-level mappings/ folder. `[mappings] path` points at a site's own copy."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from adapter.errors import ConfigError
from adapter.model import InputKind

Coding = tuple[str, str]  # (system, code)


@dataclass(frozen=True)
class Band:
    """Grades of one population, most severe first; a count below `bound` has that grade."""

    bounds: tuple[tuple[str, float], ...]
    note: str = ""


@dataclass(frozen=True)
class Thresholds:
    adult: Band
    infant: Band
    neonate: Band
    ctcae: Band  # grades 2-4; grade 1 depends on the LLN of each Observation
    max_anc_per_ul: float


@dataclass(frozen=True)
class Mappings:
    anc_codes: tuple[Coding, ...]
    wbc_codes: frozenset[Coding]
    segmented_percent_codes: frozenset[Coding]
    band_percent_codes: frozenset[Coding]
    neutrophil_percent_codes: frozenset[Coding]
    segmented_count_codes: frozenset[Coding]
    band_count_codes: frozenset[Coding]
    unit_aliases: dict[str, float]
    thresholds: Thresholds
    context: ContextMappings = field(default_factory=lambda: _context(_read(_shipped(), "context.toml")))

    def input_kinds(self) -> dict[Coding, InputKind]:
        """Codes of derived-ANC inputs and what each one is."""
        kinds: dict[Coding, InputKind] = {}
        for codes, kind in (
            (self.wbc_codes, InputKind.WBC),
            (self.segmented_percent_codes, InputKind.SEGMENTED_PERCENT),
            (self.band_percent_codes, InputKind.BAND_PERCENT),
            (self.neutrophil_percent_codes, InputKind.NEUTROPHIL_PERCENT),
            (self.segmented_count_codes, InputKind.SEGMENTED_COUNT),
            (self.band_count_codes, InputKind.BAND_COUNT),
        ):
            kinds.update(dict.fromkeys(codes, kind))
        return kinds


@dataclass(frozen=True)
class FebrileRules:
    """IDSA neutropenic fever (mappings/context.toml [febrile])."""

    single_celsius: float = 38.3
    sustained_celsius: float = 38.0
    sustained_minutes: float = 60.0
    window_hours: float = 24.0
    anc_below: float = 500.0
    projection_hours: float = 48.0
    projection_min_gap_hours: float = 6.0
    projection_max_gap_hours: float = 72.0


@dataclass(frozen=True)
class ContextMappings:
    """mappings/context.toml: what counts as a temperature, chemotherapy, a Duffy-null marker."""

    temperature_codes: tuple[Coding, ...]
    temperature_units: dict[str, str]  # spelling -> "Cel" | "[degF]"
    plausible_celsius: tuple[float, float]
    febrile: FebrileRules
    atc_prefixes: tuple[str, ...]
    snomed_procedures: frozenset[str]
    rxnorm: dict[str, str]  # ingredient code -> name
    duffy_null_codes: frozenset[Coding]
    duffy_null_floor: float


_SEVERITY_ORDER = ("severe", "moderate", "mild")


def load(path: str = "") -> Mappings:
    folder: Traversable | Path = Path(path) if path else _shipped()
    loinc = _read(folder, "loinc.toml")
    units = _read(folder, "units.toml")
    thresholds = _read(folder, "thresholds.toml")
    try:
        derive = loinc.get("derive", {})
        return Mappings(
            anc_codes=tuple(_coding(c) for c in loinc["anc"]),
            wbc_codes=frozenset(_coding(c) for c in derive.get("wbc", [])),
            segmented_percent_codes=frozenset(_coding(c) for c in derive.get("segmented_percent", [])),
            band_percent_codes=frozenset(_coding(c) for c in derive.get("band_percent", [])),
            neutrophil_percent_codes=frozenset(_coding(c) for c in derive.get("neutrophil_percent", [])),
            segmented_count_codes=frozenset(_coding(c) for c in derive.get("segmented_count", [])),
            band_count_codes=frozenset(_coding(c) for c in derive.get("band_count", [])),
            unit_aliases={str(k).strip(): float(v) for k, v in units["aliases"].items()},
            thresholds=_thresholds(thresholds),
            context=_context(_read_context(folder)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"mappings.path: mapping data in {folder} is incomplete or malformed: {exc!r}") from None


def _read_context(folder: Traversable | Path) -> dict[str, Any]:
    """A site's mappings copy made before context.toml existed keeps working on the shipped one."""
    if not (folder / "context.toml").is_file():
        folder = _shipped()
    return _read(folder, "context.toml")


def _context(raw: dict[str, Any]) -> ContextMappings:
    temperature, chemo, duffy = raw["temperature"], raw["chemotherapy"], raw["duffy_null"]
    units = {str(k).strip(): str(v) for k, v in temperature["unit_aliases"].items()}
    if set(units.values()) - {"Cel", "[degF]"}:
        raise ValueError("temperature.unit_aliases must map to 'Cel' or '[degF]'")
    low, high = (float(temperature["plausible_celsius"][k]) for k in ("low", "high"))
    febrile = raw.get("febrile", {})
    codes = set()
    for entry in duffy.get("condition_codes", []):
        system, sep, code = str(entry).rpartition("|")
        if not sep or not system or not code:
            raise ValueError(f"duffy_null.condition_codes: {entry!r} is not 'system|code'")
        codes.add((system, code))
    floor = float(duffy.get("normal_floor", 1210))
    if floor <= 0:
        raise ValueError("duffy_null.normal_floor must be > 0")
    rules = FebrileRules(**{k: float(v) for k, v in febrile.items()})
    if not 0 < rules.projection_min_gap_hours < rules.projection_max_gap_hours:
        # The projection divides by the hours between two counts: a zero gap would stop every run.
        raise ValueError("febrile: projection_min_gap_hours must be > 0 and below projection_max_gap_hours")
    return ContextMappings(
        temperature_codes=tuple(_coding(c) for c in temperature["codes"]),
        temperature_units=units,
        plausible_celsius=(low, high),
        febrile=rules,
        atc_prefixes=tuple(str(p) for p in chemo.get("atc_prefixes", [])),
        snomed_procedures=frozenset(str(c) for c in chemo.get("snomed_procedures", [])),
        rxnorm={str(e["code"]): str(e.get("name", "")) for e in chemo.get("rxnorm", [])},
        duffy_null_codes=frozenset(codes),
        duffy_null_floor=floor,
    )


def _shipped() -> Traversable | Path:
    try:
        return resources.files("adapter.mapping_data")
    except ModuleNotFoundError:  # source checkout: mappings/ beside adapter/
        return Path(__file__).resolve().parent.parent / "mappings"


def _read(folder: Traversable | Path, name: str) -> dict[str, Any]:
    try:
        return tomllib.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"mappings.path: {folder} has no {name}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"mappings.path: {folder}/{name} is not valid TOML: {exc}") from None


def _coding(entry: dict[str, Any]) -> Coding:
    return (str(entry["system"]), str(entry["code"]))


def _band(table: dict[str, Any], order: tuple[str, ...]) -> Band:
    bounds = tuple((grade, float(table[grade])) for grade in order if grade in table)
    values = [bound for _, bound in bounds]
    if not bounds or values != sorted(values):
        raise ValueError(f"thresholds must rise from the most severe grade: {bounds}")
    return Band(bounds=bounds, note=str(table.get("verify_note", "")))


def _thresholds(raw: dict[str, Any]) -> Thresholds:
    clinical = raw["clinical"]
    return Thresholds(
        adult=_band(clinical["adult"], _SEVERITY_ORDER),
        infant=_band(clinical["infant"], _SEVERITY_ORDER),
        neonate=_band(clinical["neonate"], _SEVERITY_ORDER),
        ctcae=_band(raw["ctcae-v5"], ("ctcae-4", "ctcae-3", "ctcae-2")),
        max_anc_per_ul=float(raw["plausibility"]["max_anc_per_ul"]),
    )
