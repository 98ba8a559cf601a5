"""Unit normalisation to cells/µL (CONTRACT §4, DOMAIN.md §2). Pure: no server, no files but mappings/."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import mappings
from adapter.model import Count, Quarantine, Reason
from adapter.clinical.units import UCUM_SYSTEM, normalise, ucum_factor, unit_factor

MAPPINGS = mappings.load()
ALIASES = MAPPINGS.unit_aliases
MAX = MAPPINGS.thresholds.max_anc_per_ul

# DOMAIN.md §2: UCUM units, parsed (not looked up).
UCUM_UNITS = [
    ("10*3/uL", 1000),
    ("10*3/mm3", 1000),
    ("10*9/L", 1000),
    ("/uL", 1),
    ("/mm3", 1),
    ("10*6/L", 1),
    ("/L", 1e-6),
    ("{cells}/uL", 1),
    ("10*3{cells}/uL", 1000),
]
# DOMAIN.md §2: lab spellings that are not UCUM, from mappings/units.toml aliases.
ALIAS_UNITS = [
    ("K/uL", 1000),
    ("k/uL", 1000),
    ("x10E3/uL", 1000),
    ("x10(3)/uL", 1000),
    ("10^3/uL", 1000),
    ("10^3/µL", 1000),
    ("thou/uL", 1000),
    ("THOU/uL", 1000),
    ("10^9/L", 1000),
    ("x10E9/L", 1000),
    ("G/L", 1000),
    ("Gpt/L", 1000),
    ("cells/uL", 1),
    ("cells/µL", 1),
    ("cells/mm3", 1),
    ("/cmm", 1),
    ("cu mm", 1),
]
ALL_UNITS = UCUM_UNITS + ALIAS_UNITS
REJECTED_UNITS = [
    "10.3/uL",  # the classic typo for 10*3/uL: never assumed
    "mmol/L",
    "%",
    "10*3/kg",
    "",
    "uL/10*3",
    "/uL/uL",
    "10*3",
    "10^3",
    "cells",
    "10*3/{cells}",
    "10*3/UL",  # UCUM is case-sensitive and no such alias is listed
    "kg/uL",
    "10*3./uL",
    "%/uL",
]


def quantity(value, unit: str | None = None, *, ucum: bool = False, code: str | None = None, **extra):
    q = {"value": value}
    if unit is not None:
        q["unit"] = unit
    if ucum:
        q["system"] = UCUM_SYSTEM
        q["code"] = code if code is not None else unit
    q.update(extra)
    return q


def norm(q):
    return normalise(q, ALIASES, MAX)


# --- factors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("unit", "factor"), UCUM_UNITS)
def test_ucum_units_are_parsed_to_their_factor(unit, factor):
    assert float(ucum_factor(unit)) == pytest.approx(factor, rel=1e-12)
    # Parsed, not looked up: the UCUM spellings are not in the alias table.
    assert unit not in ALIASES


@pytest.mark.parametrize(
    ("unit", "factor"),
    [
        ("10*3/L", 1e-3),
        ("10*9/mL", 1e6),
        ("/mL", 1e-3),
        ("/dL", 1e-5),
        ("/cm3", 1e-3),
        ("/m3", 1e-9),
        ("10*3/nL", 1e6),
    ],
)
def test_ucum_parser_handles_other_prefixes(unit, factor):
    assert float(ucum_factor(unit)) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("unit", ["10*3/ul", "10*9/l", "10*3/uL{blood}", " 10*3/uL "])
def test_ucum_lowercase_litre_annotations_and_whitespace(unit):
    assert float(ucum_factor(unit)) == pytest.approx(1000)


@pytest.mark.parametrize(("unit", "factor"), ALIAS_UNITS)
def test_aliases_from_mappings_have_their_factor(unit, factor):
    assert ucum_factor(unit) is None  # not UCUM: only the alias table knows them
    assert ALIASES[unit] == factor
    assert unit_factor({"unit": unit}, ALIASES) == factor


def test_every_shipped_alias_is_a_thousand_or_one():
    # units.toml only carries the two families of DOMAIN.md §2 (10^3/µL and cells/µL spellings).
    assert ALIASES, "no aliases loaded"
    assert set(ALIASES.values()) <= {1.0, 1000.0}


@pytest.mark.parametrize(("unit", "factor"), ALL_UNITS)
def test_unit_factor_from_unit_text(unit, factor):
    assert unit_factor({"unit": unit}, ALIASES) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize(("unit", "factor"), UCUM_UNITS)
def test_unit_factor_from_ucum_code(unit, factor):
    assert unit_factor({"system": UCUM_SYSTEM, "code": unit}, ALIASES) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("unit", REJECTED_UNITS)
def test_rejected_units_are_quarantined_as_unknown_unit(unit):
    if unit.strip():
        assert ucum_factor(unit) is None
    for q in (quantity(1.2, unit), quantity(1.2, unit, ucum=True)):
        result = norm(q)
        assert isinstance(result, Quarantine)
        assert result.reason is Reason.UNKNOWN_UNIT


def test_missing_unit_is_unknown_unit():
    result = norm({"value": 1.2})
    assert isinstance(result, Quarantine) and result.reason is Reason.UNKNOWN_UNIT


def test_non_string_unit_is_unknown_unit():
    result = norm({"value": 1.2, "unit": 1000, "system": UCUM_SYSTEM, "code": None})
    assert isinstance(result, Quarantine) and result.reason is Reason.UNKNOWN_UNIT


def test_alias_match_trims_white_space_but_is_case_sensitive():
    assert unit_factor({"unit": "  K/uL\t"}, ALIASES) == 1000
    assert "Cells/uL" not in ALIASES
    result = unit_factor({"unit": "Cells/uL"}, ALIASES)
    assert isinstance(result, Quarantine) and result.reason is Reason.UNKNOWN_UNIT


# --- system + code preferred, unit as fallback ----------------------------------------------------------


def test_ucum_code_is_preferred_over_unit_text():
    q = {"system": UCUM_SYSTEM, "code": "10*3/uL", "unit": "cells/uL"}
    assert unit_factor(q, ALIASES) == 1000
    q = {"system": UCUM_SYSTEM, "code": "/uL", "unit": "K/uL"}
    assert unit_factor(q, ALIASES) == 1


def test_ucum_code_wins_over_a_typo_in_unit_text():
    result = norm(quantity(1.2, "10.3/uL", ucum=True, code="10*3/uL"))
    assert result == Count(1200.0)


def test_unit_text_is_the_fallback_when_the_code_is_unusable():
    assert unit_factor({"system": UCUM_SYSTEM, "code": "10.3/uL", "unit": "K/uL"}, ALIASES) == 1000
    assert unit_factor({"system": UCUM_SYSTEM, "unit": "10*3/uL"}, ALIASES) == 1000


def test_code_is_ignored_when_the_system_is_not_ucum():
    q = {"system": "http://example.org/lab-units", "code": "10*3/uL", "unit": "cells/uL"}
    assert unit_factor(q, ALIASES) == 1
    q = {"system": "http://example.org/lab-units", "code": "10*3/uL"}
    result = unit_factor(q, ALIASES)
    assert isinstance(result, Quarantine) and result.reason is Reason.UNKNOWN_UNIT


# --- normalise: values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("unit", "factor"), ALL_UNITS)
def test_normalise_multiplies_by_the_unit_factor(unit, factor):
    value = 1500 / factor  # 1500 cells/µL in that unit
    result = norm(quantity(value, unit, ucum=unit in dict(UCUM_UNITS)))
    assert isinstance(result, Count)
    assert result.anc_per_ul == pytest.approx(1500, abs=1e-6)
    assert result.comparator == ""


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (1.5, "10*3/uL", 1500.0),
        (0.32, "K/uL", 320.0),
        (3.2, "10*9/L", 3200.0),
        (320, "/uL", 320.0),
        (320, "cells/mm3", 320.0),
        (320, "10*6/L", 320.0),
        (1_500_000_000, "/L", 1500.0),  # × 10⁻⁶ without float dust (rounded)
        (0, "10*3/uL", 0.0),
        (0, "/uL", 0.0),
        (100, "K/uL", 100_000.0),  # the plausibility bound itself is plausible
        (100_000, "/uL", 100_000.0),
    ],
)
def test_normalise_values(value, unit, expected):
    result = norm(quantity(value, unit, ucum=not unit[0].isalpha() and "^" not in unit))
    assert result == Count(expected)


@pytest.mark.parametrize(
    "value",
    [-1, -0.001, -1e-9, float("nan"), float("inf"), float("-inf"), True, False, "1.5", "abc", [1.5], {"v": 1}],
    ids=repr,
)
def test_non_numbers_and_negatives_are_implausible(value):
    result = norm(quantity(value, "10*3/uL", ucum=True))
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.IMPLAUSIBLE_VALUE


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (100.001, "10*3/uL"),
        (100_000.01, "/uL"),
        (100_001, "cells/uL"),
        (1e308, "K/uL"),  # overflows to inf when multiplied
        (10**30, "/uL"),
        (100_000_001, "10*6/L"),
    ],
)
def test_above_100000_cells_per_ul_is_implausible(value, unit):
    result = norm(quantity(value, unit, ucum=unit.startswith(("10*", "/"))))
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.IMPLAUSIBLE_VALUE


def test_huge_integer_value_is_implausible_not_a_crash():
    result = norm(quantity(10**400, "/uL", ucum=True))
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.IMPLAUSIBLE_VALUE


@pytest.mark.parametrize("value", [250, 333.3, 500])
def test_synthea_thousand_fold_unit_slip_is_implausible(value):
    # Synthea's AML module: 751-8 with 250-500 in 10*3/uL = 250,000-500,000 cells/µL; never graded.
    result = norm(quantity(value, "10*3/uL", ucum=True))
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.IMPLAUSIBLE_VALUE


@pytest.mark.parametrize("q", [None, {}, {"unit": "10*3/uL"}, {"unit": "10*3/uL", "system": UCUM_SYSTEM}, "1.5", 1.5])
def test_missing_value_is_no_value(q):
    result = norm(q)
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.NO_VALUE


def test_null_value_is_quarantined():
    # JSON null is no value at all (FHIR JSON forbids null; a lenient reader treats it as absent).
    result = norm({"value": None, "unit": "10*3/uL"})
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.NO_VALUE


def test_value_is_checked_even_with_an_unknown_unit():
    result = norm(quantity(1.2, "mmol/L"))
    assert isinstance(result, Quarantine) and result.reason is Reason.UNKNOWN_UNIT
    result = norm(quantity(float("nan"), "10*3/uL", ucum=True))
    assert isinstance(result, Quarantine) and result.reason is Reason.IMPLAUSIBLE_VALUE


# --- comparators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_comparators_are_kept(comparator):
    result = norm(quantity(0.5, "10*3/uL", ucum=True, comparator=comparator))
    assert result == Count(500.0, comparator)


@pytest.mark.parametrize("comparator", ["~", "ad", "=", "<<", None])
def test_unknown_comparators_are_not_graded(comparator):
    result = norm(quantity(0.5, "10*3/uL", ucum=True, comparator=comparator))
    assert isinstance(result, Quarantine)
    assert result.reason is Reason.UNGRADABLE_COMPARATOR


# --- rounding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (1.2345678912, "/uL", 1.234568),
        (1234.5678912345, "cells/uL", 1234.567891),
        (1.23456789123, "10*3/uL", 1234.567891),
        (1, "/L", 0.000001),
        (0.4, "/L", 0.0),
        (1234567, "/L", 1.234567),
    ],
)
def test_results_are_rounded_to_six_decimals(value, unit, expected):
    result = norm(quantity(value, unit, ucum=unit.startswith(("10*", "/"))))
    assert isinstance(result, Count)
    assert result.anc_per_ul == expected


def _decimals(x: float) -> int:
    text = repr(x)
    if "e" in text or "E" in text:
        mantissa, exponent = text.lower().split("e")
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return max(0, digits - int(exponent))
    return len(text.split(".")[1]) if "." in text else 0


@settings(max_examples=200, deadline=None, database=None)
@given(
    value=st.floats(min_value=0, max_value=1e11, allow_nan=False, allow_infinity=False),
    unit_factor_pair=st.sampled_from(ALL_UNITS),
)
def test_property_normalised_value_has_at_most_six_decimals_and_is_within_bounds(value, unit_factor_pair):
    unit, factor = unit_factor_pair
    result = norm(quantity(value, unit, ucum=unit in dict(UCUM_UNITS)))
    if value * factor > MAX:
        assert isinstance(result, Quarantine) and result.reason is Reason.IMPLAUSIBLE_VALUE
    else:
        assert isinstance(result, Count)
        assert 0 <= result.anc_per_ul <= MAX
        assert result.anc_per_ul == round(result.anc_per_ul, 6)
        assert _decimals(result.anc_per_ul) <= 6
        assert math.isclose(result.anc_per_ul, value * factor, abs_tol=5e-7, rel_tol=1e-12)


@settings(max_examples=200, deadline=None, database=None)
@given(
    millicells=st.integers(min_value=0, max_value=100_000_000),
    unit_factor_pair=st.sampled_from(ALL_UNITS),
)
def test_property_same_count_in_any_unit_normalises_to_the_same_value(millicells, unit_factor_pair):
    unit, factor = unit_factor_pair
    cells = millicells / 1000
    direct = norm(quantity(cells, "/uL", ucum=True))
    converted = norm(quantity(cells / factor, unit, ucum=unit in dict(UCUM_UNITS)))
    assert isinstance(direct, Count) and isinstance(converted, Count)
    assert converted.anc_per_ul == direct.anc_per_ul


@settings(max_examples=300, deadline=None, database=None)
@given(value=st.one_of(st.floats(min_value=0, max_value=100_000, allow_nan=False),
                       st.integers(min_value=0, max_value=100_000),
                       st.sampled_from([0.0, -0.0, 3.2, 0.092, 2.675, 1e-7, 4.9999995, 99999.9999995])),
       unit=st.sampled_from(["10*3/uL", "10*9/L", "/uL", "/mm3", "10*6/L", "cells/uL", "K/uL"]))
def test_property_the_count_is_the_product_rounded_to_six_places(value, unit):
    # A whole product skips round(): it must come out exactly (to the bit, -0.0 included) as round() gives.
    count = normalise({"value": value, "unit": unit}, ALIASES, 100_000)
    factor = unit_factor({"unit": unit}, ALIASES)
    assert isinstance(factor, float)
    expected = round(float(value) * factor, 6)
    if isinstance(count, Quarantine):  # above the plausible maximum only
        assert count.reason is Reason.IMPLAUSIBLE_VALUE and expected > 100_000
        return
    assert math.copysign(1, count.anc_per_ul) == math.copysign(1, expected)
    assert count.anc_per_ul == expected and count.comparator == ""
