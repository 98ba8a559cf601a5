"""Value + unit -> cells/µL, or a quarantine reason. Pure: no I/O.

UCUM count-per-volume units are parsed (a small parser limited to this dimension, see README "Units");
lab spellings that are not UCUM come from the site's alias table (mappings/units.toml)."""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction
from typing import Any, Mapping

from adapter.model import Count, Quarantine, Reason

UCUM_SYSTEM = "http://unitsofmeasure.org"
COMPARATORS = ("<", "<=", ">=", ">")
_EXACT_OR_COMPARATOR = ("", *COMPARATORS)

# UCUM metric prefixes that make sense in front of a volume (UCUM §2.1, table 1).
_PREFIX = {
    "": Fraction(1), "k": Fraction(10**3), "h": Fraction(10**2), "da": Fraction(10),
    "d": Fraction(1, 10), "c": Fraction(1, 10**2), "m": Fraction(1, 10**3),
    "u": Fraction(1, 10**6), "n": Fraction(1, 10**9), "p": Fraction(1, 10**12), "f": Fraction(1, 10**15),
}
_ANNOTATION = r"(?:\{[^{}]*\})"
# Numerator: a product of '10*N' factors, the unity '1' and annotations; bare integers such as the '3' in
# the typo '10.3/uL' are rejected on purpose, as is '10^N' (not UCUM; a site may alias it).
_NUM_TERM = re.compile(rf"^(?:10\*(?P<exp>[+-]?\d{{1,2}})|1)?{_ANNOTATION}?$")
# Denominator: exactly one volume: prefixed litre (L or l) or prefixed cubic metre (m3), maybe annotated.
_VOLUME = re.compile(rf"^(?P<prefix>da|[khdcmunpf]?)(?:(?P<litre>[Ll])|(?P<metre>m3)){_ANNOTATION}?$")
_MICROLITRES_PER_LITRE = Fraction(10**6)
_MICROLITRES_PER_CUBIC_METRE = Fraction(10**9)


@functools.lru_cache(maxsize=4096)
def ucum_factor(code: str) -> Fraction | None:
    """Factor from a UCUM count-per-volume unit to cells/µL; None when it is not one."""
    code = code.strip()
    if code.count("/") != 1:
        return None
    numerator, denominator = code.split("/")
    factor = Fraction(1)
    if numerator:
        for term in numerator.split("."):
            match = _NUM_TERM.match(term)
            if not term or not match:
                return None
            if match["exp"] is not None:
                factor *= Fraction(10) ** int(match["exp"])
    volume = _VOLUME.match(denominator)
    if not volume:
        return None
    prefix = _PREFIX[volume["prefix"]]
    microlitres = (
        prefix * _MICROLITRES_PER_LITRE if volume["litre"] else prefix**3 * _MICROLITRES_PER_CUBIC_METRE
    )
    return factor / microlitres


@functools.lru_cache(maxsize=4096)
def _ucum_float(code: str) -> float | None:
    # float(Fraction) on every Observation read cost more than the cached parse it converts.
    factor = ucum_factor(code)
    return None if factor is None else float(factor)


def unit_factor(quantity: Mapping[str, Any], aliases: Mapping[str, float]) -> float | Quarantine:
    """Prefer the UCUM code when the system is UCUM; fall back to the human-readable `unit`.
    (Reads JSON as parsed: `dict`, whose isinstance check is far cheaper than an ABC's.)"""
    # Once per count read: the two spellings are tried in turn, without a list of candidates.
    code = quantity.get("code") if quantity.get("system") == UCUM_SYSTEM else None
    unit = quantity.get("unit")
    for spelling in (code, unit):
        if isinstance(spelling, str):
            factor = _ucum_float(spelling)
            if factor is not None:
                return factor
            alias = aliases.get(spelling.strip())
            if alias is not None:
                return float(alias)
    shown = " / ".join(repr(c) for c in (code, unit) if isinstance(c, str)) or "none"
    return Quarantine(Reason.UNKNOWN_UNIT, f"unit {shown}")


def normalise(quantity: Any, aliases: Mapping[str, float], max_anc_per_ul: float) -> Count | Quarantine:
    """A FHIR Quantity (raw dict) -> Count in cells/µL, or why not."""
    if not isinstance(quantity, dict) or quantity.get("value") is None:
        return Quarantine(Reason.NO_VALUE, "no valueQuantity.value")
    value = quantity["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Quarantine(Reason.IMPLAUSIBLE_VALUE, "value is not a number")
    try:
        value = float(value)  # json.loads gives unbounded ints: a 400-digit one must not crash the run
    except OverflowError:
        return Quarantine(Reason.IMPLAUSIBLE_VALUE, "value too large")
    if not math.isfinite(value):
        return Quarantine(Reason.IMPLAUSIBLE_VALUE, "value is not a finite number")
    comparator = quantity.get("comparator", "")
    if comparator not in _EXACT_OR_COMPARATOR:
        return Quarantine(Reason.UNGRADABLE_COMPARATOR, f"comparator {comparator!r}")
    factor = unit_factor(quantity, aliases)
    if isinstance(factor, Quarantine):
        return factor
    anc_per_ul = value * factor
    if anc_per_ul < 0 or anc_per_ul > max_anc_per_ul:
        return Quarantine(Reason.IMPLAUSIBLE_VALUE, f"outside 0-{max_anc_per_ul:g} cells/uL")
    # round() to 6 places goes through a decimal conversion (about a µs); a whole number of cells, as two
    # counts in three come out after the factor, is its own rounding, so it is kept as it is.
    if not anc_per_ul.is_integer():
        anc_per_ul = round(anc_per_ul, 6)
    return Count(anc_per_ul, comparator)  # by position: keywords cost twice as much
