from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

from adapter.localserver import sekmet  # noqa: E402
from builders import transaction  # noqa: E402

DATA = Path(__file__).parent / "data"


class Server:
    """A fresh real FHIR server (Sekmet on loopback) with helpers to load and inspect it."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = requests.Session()
        self.http.headers["Content-Type"] = "application/fhir+json"

    def load(self, *resources: dict) -> None:
        response = self.http.post(self.base_url, json=transaction(*resources), timeout=60)
        assert response.status_code == 200, response.text[:500]

    def search(self, resource_type: str, **params: str) -> list[dict]:
        found, url, query = [], f"{self.base_url}/{resource_type}", {"_count": "500", **params}
        while url:
            bundle = self.http.get(url, params=query, timeout=60).json()
            found += [e["resource"] for e in bundle.get("entry", [])
                      if e["resource"]["resourceType"] == resource_type and e.get("search", {}).get("mode") != "include"]
            url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
            query = None
        return found

    def risk_assessments(self, patient_id: str) -> list[dict]:
        # Sekmet 0.1.1 has no search parameters for RiskAssessment: filter here.
        return [r for r in self.search("RiskAssessment") if r["subject"]["reference"] == f"Patient/{patient_id}"]

    def flags(self, patient_id: str | None = None) -> list[dict]:
        params = {"subject": f"Patient/{patient_id}"} if patient_id else {}
        return self.search("Flag", **params)

    def history_count(self, resource_type: str, resource_id: str) -> int:
        bundle = self.http.get(f"{self.base_url}/{resource_type}/{resource_id}/_history", timeout=30).json()
        return len(bundle.get("entry", []))


@pytest.fixture
def fhir_server():
    """A fresh server per test: the adapter reads every ANC on a server, so tests must not share one."""
    with sekmet() as base_url:
        yield Server(base_url)
