"""Synthetic ANC Observations with their Patients for the benchmark (deterministic for a seed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
UNITS = [("10*3/uL", 1000, True), ("10*9/L", 1000, True), ("/uL", 1, True), ("K/uL", 1000, False),
         ("x10E3/uL", 1000, False), ("cells/uL", 1, False)]
OBSERVATIONS_PER_PATIENT = 4


def patients_and_observations(n: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Yield each Patient followed by its Observations. About 30 % children, 1 % unknown units."""
    rng = random.Random(seed)
    today = date(2026, 11, 25)
    for number in range((n + OBSERVATIONS_PER_PATIENT - 1) // OBSERVATIONS_PER_PATIENT):
        patient_id = f"bp{number}"
        age_days = rng.randint(60, 17 * 365) if rng.random() < 0.3 else rng.randint(18 * 365, 90 * 365)
        yield {"resourceType": "Patient", "id": patient_id, "name": [{"family": f"Bench{number}"}],
               "birthDate": (today - timedelta(days=age_days)).isoformat()}
        for k in range(OBSERVATIONS_PER_PATIENT):
            index = number * OBSERVATIONS_PER_PATIENT + k
            if index >= n:
                return
            anc_per_ul = rng.choice([rng.uniform(1500, 6000)] * 7 + [rng.uniform(1000, 1499), rng.uniform(500, 999),
                                                                      rng.uniform(50, 499)])
            unit, factor, ucum = rng.choice(UNITS)
            if rng.random() < 0.01:
                unit, factor, ucum = "mmol/L", 1, False
            quantity: dict[str, Any] = {"value": round(anc_per_ul / factor, 3), "unit": unit}
            if ucum:
                quantity.update(system=UCUM, code=unit)
            effective = datetime(2026, 11, 1, tzinfo=timezone.utc) + timedelta(days=k * 3, hours=rng.randint(0, 23))
            yield {
                "resourceType": "Observation", "id": f"bo{index}", "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "751-8"}]},
                "subject": {"reference": f"Patient/{patient_id}"},
                "effectiveDateTime": effective.isoformat().replace("+00:00", "Z"),
                "valueQuantity": quantity,
            }
