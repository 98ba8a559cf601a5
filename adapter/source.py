"""The query and its pages -> raw Observation dicts with their Patients (CONTRACT §3)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from adapter import extract
from adapter.errors import PermanentHttpError
from adapter.fhir.client import FhirClient
from adapter.mappings import Coding
from adapter.model import Patient

log = logging.getLogger(__name__)


@dataclass
class Page:
    observations: list[dict[str, Any]]
    patients: dict[str, Patient] = field(default_factory=dict)
    malformed: int = 0  # entries that are neither an Observation nor a Patient we can use
    total: int | None = None  # Bundle.total when the server gives it (for the progress bar)
    last: bool = False  # no next link: a stop after this page would not cut the pass short


def search_params(codes: tuple[Coding, ...], since: datetime | None, until: datetime | None,
                  page_size: int) -> dict[str, Any]:
    params: dict[str, Any] = {
        "code": code_param(codes),
        "_count": page_size,
        "_include": "Observation:subject",
        "_sort": "_lastUpdated",
    }
    bounds = []
    if since is not None:
        bounds.append(f"ge{_instant(since)}")
    if until is not None:
        bounds.append(f"le{_instant(until)}")
    if bounds:
        params["_lastUpdated"] = bounds if len(bounds) > 1 else bounds[0]
    return params


def code_param(codes: tuple[Coding, ...]) -> str:
    return ",".join(f"{system}|{code}" for system, code in codes)


def pages(client: FhirClient, params: dict[str, Any]) -> Iterator[Page]:
    for bundle in client.search("Observation", params):
        total = bundle.get("total")
        links = bundle.get("link") if isinstance(bundle.get("link"), list) else []
        page = Page(observations=[], total=total if isinstance(total, int) else None,
                    last=not any(isinstance(link, dict) and link.get("relation") == "next" for link in links))
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            kind = resource.get("resourceType") if isinstance(resource, dict) else None
            if kind == "Observation":
                page.observations.append(resource)
            elif kind == "Patient" and (patient := extract.patient(resource)):
                page.patients[patient.patient_id] = patient
            elif kind != "OperationOutcome":  # servers may add warnings as OperationOutcome entries
                page.malformed += 1
        yield page


class Patients:
    """The Patients a page needs: those _included with it, else one read per distinct patient, kept in a
    bounded cache for the run. Included Patients live only as long as their page, so memory does not
    grow with the size of a backfill."""

    def __init__(self, client: FhirClient, cache_size: int = 10_000):
        self.client = client
        self.cache_size = cache_size
        self._page: dict[str, Patient] = {}
        self._read_cache: OrderedDict[str, Patient | None] = OrderedDict()

    def add(self, patients: dict[str, Patient]) -> None:
        """The Patients included with the page now being processed (replacing the previous page's)."""
        self._page = patients

    def get(self, patient_id: str) -> Patient | None:
        if patient_id in self._page:
            return self._page[patient_id]
        if patient_id in self._read_cache:
            self._read_cache.move_to_end(patient_id)
            return self._read_cache[patient_id]
        patient = self._read(patient_id)
        self._read_cache[patient_id] = patient
        if len(self._read_cache) > self.cache_size:
            self._read_cache.popitem(last=False)
        return patient

    def _read(self, patient_id: str) -> Patient | None:
        try:
            resource = self.client.get(f"Patient/{patient_id}")
        except PermanentHttpError as exc:
            if exc.status in (404, 410):
                log.warning("patient not found: graded with adult thresholds",
                            extra={"event": "patient-missing", "patient_id": patient_id})
                return None
            raise
        return extract.patient(resource)


def _instant(moment: datetime) -> str:
    """UTC, to the millisecond when there is one (a resume point sits between two entries a few ms
    apart), rounded down: a lower bound that is early only re-reads what the ledger skips."""
    utc = moment.astimezone(timezone.utc)
    if utc.microsecond // 1000:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
