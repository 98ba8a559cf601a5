"""The naive poller the adapter is compared with: the same search, but one Patient read and one POST per
Observation, and full fhir.resources validation of every resource read. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import time

import requests
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

FACTORS = {"10*3/uL": 1000, "10*9/L": 1000, "/uL": 1, "K/uL": 1000, "x10E3/uL": 1000, "cells/uL": 1}


def main(base_url: str, page_size: int, budget_s: float) -> None:
    session = requests.Session()
    started = time.monotonic()
    requests_made = processed = 0
    url, params = f"{base_url}/Observation", {"code": "http://loinc.org|751-8", "_count": page_size,
                                              "_sort": "_lastUpdated"}
    while url and time.monotonic() - started < budget_s:
        bundle = session.get(url, params=params, timeout=60).json()
        requests_made += 1
        params = None
        for entry in bundle.get("entry", []):
            observation = Observation.model_validate(entry["resource"])
            reference = observation.subject.reference
            patient = Patient.model_validate(session.get(f"{base_url}/{reference}", timeout=60).json())
            requests_made += 1
            quantity = observation.valueQuantity
            factor = FACTORS.get(quantity.unit) if quantity else None
            processed += 1
            if factor is None or patient is None:
                continue
            anc = float(quantity.value) * factor
            if anc < 1500:
                flag = Flag.model_validate({"resourceType": "Flag", "status": "active", "code": {"text": f"ANC {anc:.0f}"},
                                            "subject": {"reference": reference}})
                session.post(f"{base_url}/Flag", data=flag.model_dump_json(exclude_none=True),
                             headers={"Content-Type": "application/fhir+json"}, timeout=60)
                requests_made += 1
            if time.monotonic() - started >= budget_s:
                break
        url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
    print(json.dumps({"processed": processed, "http_requests": requests_made,
                      "stopped_by_budget": time.monotonic() - started >= budget_s}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
