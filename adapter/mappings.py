"""Site-editable mapping data (mappings/*.toml): ANC codes, unit aliases, thresholds.

The shipped copy is installed as the `adapter.mapping_data` package data; in a source checkout it is the
top-level mappings/ folder. `[mappings] path` points at a site's own copy."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"mappings.path: mapping data in {folder} is incomplete or malformed: {exc!r}") from None


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
