"""Derived ANC (opt-in, `[classify] derive = true`): WBC × (segmented + band neutrophils %) / 100 from
Observations of one patient at one effective time (DOMAIN.md §1, §3; CONTRACT §3). Pure.

Only when nothing is missing: a WBC and either the total neutrophil percentage or both the segmented
and the band percentage. Segs alone would understate the ANC, so they are never used alone."""

from __future__ import annotations

from adapter.model import Count, DeriveInput, InputKind


def derive(inputs: list[DeriveInput]) -> tuple[Count, tuple[str, ...]] | None:
    """The derived count and the Observation ids it came from, or None when it cannot be derived."""
    by_kind: dict[InputKind, list[DeriveInput]] = {}
    for item in inputs:
        by_kind.setdefault(item.kind, []).append(item)
    if any(len(items) > 1 for items in by_kind.values()):
        return None  # two WBCs (or two differentials) at one time: ambiguous, never pick one
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
    return Count(anc_per_ul), tuple(i.observation_id for i in wbc + parts)
