"""Derived ANC: only when nothing is missing, never from segs alone, never from an ambiguous pair."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from adapter.clinical.derive import FROM_DIFFERENTIAL, FROM_PARTS, derive
from adapter.model import DeriveInput, InputKind as K

AT = datetime(2026, 11, 20, 8, tzinfo=timezone.utc)


def item(observation_id: str, kind: K, value: float) -> DeriveInput:
    return DeriveInput(observation_id, "1", "p", AT, kind, value)


@pytest.mark.parametrize("inputs,expected", [
    ([item("w", K.WBC, 2000), item("s", K.SEGMENTED_PERCENT, 20), item("b", K.BAND_PERCENT, 5)],
     (500, ("w", "s", "b"), FROM_DIFFERENTIAL)),
    ([item("w", K.WBC, 1000), item("n", K.NEUTROPHIL_PERCENT, 30)], (300, ("w", "n"), FROM_DIFFERENTIAL)),
    ([item("w", K.WBC, 1000), item("n", K.NEUTROPHIL_PERCENT, 30), item("s", K.SEGMENTED_PERCENT, 10),
      item("b", K.BAND_PERCENT, 1)], (300, ("w", "n"), FROM_DIFFERENTIAL)),  # the total wins over parts
    ([item("s", K.SEGMENTED_COUNT, 350), item("b", K.BAND_COUNT, 50)], (400, ("s", "b"), FROM_PARTS)),
])
def test_derived_counts(inputs, expected):
    count, sources, how = derive(inputs)
    assert (count.anc_per_ul, sources, how) == expected
    assert count.comparator == ""


@pytest.mark.parametrize("inputs", [
    [],
    [item("w", K.WBC, 2000)],
    [item("w", K.WBC, 2000), item("s", K.SEGMENTED_PERCENT, 20)],  # segs without bands understate
    [item("s", K.SEGMENTED_PERCENT, 20), item("b", K.BAND_PERCENT, 5)],  # no WBC
    [item("s", K.SEGMENTED_COUNT, 350)],  # a segs count alone is not the ANC
    [item("w1", K.WBC, 2000), item("w2", K.WBC, 3000), item("n", K.NEUTROPHIL_PERCENT, 30)],  # ambiguous
    [item("w", K.WBC, 2000), item("s", K.SEGMENTED_PERCENT, 90), item("b", K.BAND_PERCENT, 20)],  # > 100 %
])
def test_not_derivable(inputs):
    assert derive(inputs) is None
