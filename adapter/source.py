"""The query and its pages -> raw Observation dicts with their Patients (CONTRACT §3)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from adapter import extract
from adapter.errors import AuthError, PermanentHttpError
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


ID_BATCH = 100  # Observation ids per `_id` search
_ID_CHARS = 4000  # and at most this many characters of ids, so the URL stays well within server limits
GONE = frozenset({404, 410})


def deleted(client: FhirClient, observation_ids: Iterable[str], max_reads: int = ID_BATCH) -> set[str]:
    """Which of these Observations the server positively no longer has (hard-deleted, so no version of
    it will ever reach the poll). A batched `_id` search narrows them down; each id the search did not
    return is then read, and only a 404 or 410 counts. A search can leave a resource out for reasons of
    its own (a page limit, an index that lags behind writes), and withdrawing a live alert on that guess
    would be worse than keeping it one more run. At most `max_reads` reads per call: a mass deletion
    drains over a few runs instead of one burst."""
    missing: list[str] = []
    for batch in url_batches(observation_ids, ID_BATCH, _ID_CHARS):
        params = {"_id": ",".join(batch), "_count": len(batch), "_elements": "id"}
        found = {r.get("id") for bundle in client.search("Observation", params)
                 for r in (e.get("resource") for e in bundle.get("entry") or [] if isinstance(e, dict))
                 if isinstance(r, dict) and r.get("resourceType") == "Observation"}
        if found - set(batch):
            # Observations we did not ask for: the server did not apply `_id`, so what it left out
            # says nothing about what exists.
            raise PermanentHttpError("the server does not restrict an Observation search by _id")
        missing += [i for i in batch if i not in found]
    gone = set()
    for observation_id in missing[:max_reads]:
        try:
            client.get(f"Observation/{observation_id}")
        except PermanentHttpError as exc:
            if exc.status in GONE:
                gone.add(observation_id)
        except AuthError:
            pass  # hidden from us is not deleted; a credential problem fails the search that follows
    if len(gone) < len(missing):
        log.warning("the id search left out Observations the server still has or we could not confirm yet",
                    extra={"event": "evidence-unconfirmed", "count": len(missing) - len(gone)})
    return gone


def url_batches(values: Iterable[str], most: int, max_chars: int, prefix: str = "") -> Iterator[list[str]]:
    """Consecutive groups of at most `most` values whose comma-separated list (each value after `prefix`,
    as in `subject=Patient/a,Patient/b`) stays within `max_chars`: a search parameter that keeps the URL
    well within server limits however long the ids."""
    batch: list[str] = []
    chars = 0
    for value in values:
        width = len(prefix) + len(value) + 1
        if batch and (len(batch) == most or chars + width > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(value)
        chars += width
    if batch:
        yield batch


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
