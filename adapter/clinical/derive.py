"""Derived ANC (opt-in, `[classify] derive = true`) from Observations of one patient at one effective
time (DOMAIN.md §1, §3; CONTRACT §3). Pure.

Either segmented + band neutrophil counts (a manual differential's absolute parts: their sum is the ANC),
or WBC × (segmented + band neutrophils %, or the total neutrophil %) / 100. Only when nothing is missing:
segs alone would understate the ANC, so they are never used alone."""

from __future__ import annotations

from adapter.model import Count, DeriveInput, InputKind


FROM_PARTS = "derived from segmented and band neutrophil counts"
FROM_DIFFERENTIAL = "derived from WBC and differential"


def derive(inputs: list[DeriveInput]) -> tuple[Count, tuple[str, ...], str] | None:
    """The derived count, the Observation ids it came from and how; None when it cannot be derived."""
    by_kind: dict[InputKind, list[DeriveInput]] = {}
    for item in inputs:
        by_kind.setdefault(item.kind, []).append(item)
    if any(len(items) > 1 for items in by_kind.values()):
        return None  # two WBCs (or two differentials) at one time: ambiguous, never pick one
    seg_count, band_count = by_kind.get(InputKind.SEGMENTED_COUNT), by_kind.get(InputKind.BAND_COUNT)
    if seg_count and band_count:
        parts = seg_count + band_count
        return Count(round(sum(p.value for p in parts), 6)), tuple(p.observation_id for p in parts), FROM_PARTS
    wbc = by_kind.get(InputKind.WBC)
    if not wbc:
        return None
    total = by_kind.get(InputKind.NEUTROPHIL_PERCENT)
    segs, bands = by_kind.get(InputKind.SEGMENTED_PERCENT), by_kind.get(InputKind.BAND_PERCENT)
    if total:
        parts = total
    elif segs and bands:
        parts = segs + bands
    else:
        return None
    percent = sum(p.value for p in parts)
    if percent > 100:
        return None
    anc_per_ul = round(wbc[0].value * percent / 100, 6)
    return Count(anc_per_ul), tuple(i.observation_id for i in wbc + parts), FROM_DIFFERENTIAL
