"""Batched searches for the clinical context of the patients being graded (CONTRACT §5b).

Never one request per patient: `subject=Patient/a,Patient/b,…` for up to BATCH patients per search, one
search per resource type. Codes are filtered on our side where a search cannot express them (an ATC
prefix, a Medication's code behind medicationReference), so the searches ask by subject and time only;
temperatures and Duffy-null Conditions are asked by code as well."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode, urlsplit

from adapter import source
from adapter.config import ContextConfig
from adapter.errors import AuthError, FhirError, PermanentHttpError
from adapter.fhir.client import FhirClient
from adapter.mappings import ContextMappings

log = logging.getLogger(__name__)

# Patients per search: comma-separated subjects, at most BATCH and SUBJECT_CHARS characters of them, so the
# URL stays well within server limits however long the ids. A search's own cost on the server is mostly
# per request (measured on Sekmet, 1,900 patients: 152 requests of 50 took 0.35 s of its CPU, 40 of 200
# took 0.18 s).
BATCH = 200
SUBJECT_CHARS = 3500
# The date search parameter of each type (R4): a bound keeps a long stay's every vital sign out of a read.
_DATE_PARAM = {"Observation": "date", "MedicationAdministration": "effective-time",
               "MedicationRequest": "authoredon", "Procedure": "date"}


@dataclass
class Found:
    resources: list[dict[str, Any]] = field(default_factory=list)
    medications: dict[str, dict[str, Any]] = field(default_factory=dict)  # included Medications by id
    max_last_updated: str = ""  # the latest meta.lastUpdated seen (server clock), for the poll watermark
    complete: bool = True  # False when a search failed: what was read is still used
    undeclared: set[str] = field(default_factory=set)  # types not searched: the server does not declare it
    batch_refused: bool = False  # the server would not answer the searches in a batch: one by one from now


def searchable(statement: Any) -> dict[str, frozenset[str]]:
    """The search parameters the server declares per resource type (search-type only), from /metadata.
    A context search is sent only when every parameter it uses is declared: servers ignore parameters
    they do not know (lenient handling is the default), and an ignored `date` or `subject` would turn a
    bounded read into every temperature or every drug given in the hospital."""
    declared: dict[str, frozenset[str]] = {}
    rests = statement.get("rest") if isinstance(statement, dict) else None
    for rest in rests if isinstance(rests, list) else []:
        if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
            continue
        for entry in rest.get("resource") or [] if isinstance(rest.get("resource"), list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                continue
            interactions = {i.get("code") for i in entry.get("interaction") or [] if isinstance(i, dict)}
            if "search-type" in interactions:
                declared[entry["type"]] = frozenset(
                    p["name"] for p in entry.get("searchParam") or [] if isinstance(p, dict)
                    and isinstance(p.get("name"), str)) | {"_count", "_include"}
    return declared


def read(client: FhirClient, patients: Mapping[str, datetime | None], mappings: ContextMappings,
         switches: ContextConfig, declared: Mapping[str, frozenset[str]],
         updated_since: datetime | None = None, batched: bool = False) -> Found:
    """Context resources of these patients. `patients` maps each to the earliest count being graded for
    it (None: no bound): temperatures are read from `window_hours` before it, chemotherapy from the
    lookback before it. `updated_since`: only what changed since then (the incremental poll).
    `declared`: see searchable(); a search the server does not declare is not sent. `batched` (the server
    declares batches): a group's searches are sent in one batch (see _read_batched)."""
    found = Found()
    ordered = sorted(patients, key=lambda p: (patients[p] is None, patients[p] or datetime.min, p))
    for batch in _batches(ordered):  # sorted by time, so one batch's bound suits all its patients
        subjects = ",".join(f"Patient/{p}" for p in batch)
        times = [patients[p] for p in batch]
        around = None if any(t is None for t in times) else min(t for t in times if t is not None)
        searches: list[tuple[str, dict[str, Any]]] = []
        for resource_type, params in _searches(mappings, switches):
            params = {**params, "subject": subjects, "_count": 1000}
            if updated_since is not None:
                params["_lastUpdated"] = f"ge{_instant(updated_since)}"
            if around is not None and resource_type in _DATE_PARAM:
                reach = (timedelta(hours=mappings.febrile.window_hours) if resource_type == "Observation"
                         else switches.chemotherapy_lookback_delta)
                params[_DATE_PARAM[resource_type]] = f"ge{_instant(around - reach)}"
            missing = set(params) - declared.get(resource_type, frozenset())
            if missing:
                found.undeclared.add(resource_type)
                continue
            searches.append((resource_type, params))
        if batched and len(searches) > 1 and not found.batch_refused:
            searches = _read_batched(client, searches, found)
        for resource_type, params in searches:
            _search(client, resource_type, params, found)
    _resolve_medications(client, found)
    return found


def _search(client: FhirClient, resource_type: str, params: dict[str, Any], found: Found,
            first: dict[str, Any] | None = None) -> None:
    try:
        for bundle in client.search(resource_type, params, first=first):
            _collect(bundle, found)
    except (FhirError, AuthError) as exc:
        # The counts' alerts go out without this context rather than not at all; said in the log.
        # Also a search refused (a token without this type's read scope) or down after retries:
        # raised, it would roll back the counts' page and hold every alert back until it recovers.
        found.complete = False
        log.warning("could not read clinical context; alerts are written without it",
                    extra={"event": "context-read-failed", "resource_type": resource_type, "error": str(exc)})


def _read_batched(client: FhirClient, searches: list[tuple[str, dict[str, Any]]],
                  found: Found) -> list[tuple[str, dict[str, Any]]]:
    """A group's searches in one request: a FHIR batch whose entries are the same GETs. Each search costs
    the client about 2.5 ms of CPU on its own (most of it requests and urllib3 encoding a long query,
    twice), and the server a request's overhead; the batch costs about as much as one of them (measured on
    Sekmet: 200 patients' four searches, 10 ms of client CPU apart, 3 ms in a batch; server 12.5 -> 10 ms).
    The searches and what is read of them do not change: an answer's further pages are followed with GET
    as before. Returns the searches to send on their own: an entry that did not answer with a page (that
    search then gets the usual retries and error handling), or all of them when the batch failed or its
    answers cannot be placed (`found.batch_refused`: no batch again this run)."""
    # "/", "," and ":" are left as they are (all three are allowed in a query, RFC 3986 §3.4, and mean the same
    # to the server): a subject list then needs no escaping at all, which the standard library does a byte at
    # a time, 0.2 ms for a search of 200 patients; "|" and the rest are escaped as usual.
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [{"request": {"method": "GET", "url": f"{kind}?{urlencode(params, safe='/,:')}"}}
                        for kind, params in searches]}
    try:
        answer = client.batch(bundle)
    except (FhirError, AuthError) as exc:
        # Refused, or down after its retries (a gateway may time out the larger request where the searches
        # alone pass): each group would wait out the retries again, so the rest of the run sends them alone.
        return _refused(searches, found, str(exc))
    entries = answer.get("entry") if answer.get("resourceType") == "Bundle" else None
    if not isinstance(entries, list) or len(entries) != len(searches):
        return _refused(searches, found, "not one answer per search")
    answers = [_answered(entry) for entry in entries]
    if not all(page is None or _answers(page, kind) for (kind, _), page in zip(searches, answers)):
        # The answers must come in the order of the searches (FHIR); one that is not the search's own cannot
        # be placed, and neither can a failed one then: the searches are sent alone instead.
        return _refused(searches, found, "an answer is not its search's")
    alone = []
    for (kind, params), page in zip(searches, answers):
        if page is None:
            alone.append((kind, params))  # with the usual retries and handling, as if never batched
        else:
            _search(client, kind, params, found, first=page)
    return alone


def _refused(searches: list[tuple[str, dict[str, Any]]], found: Found,
             why: str) -> list[tuple[str, dict[str, Any]]]:
    found.batch_refused = True
    log.warning("the context searches could not be read in a batch: they are sent one by one for the rest of "
                "the run", extra={"event": "context-batch-refused", "error": why})
    return searches


def _answered(entry: Any) -> dict[str, Any] | None:
    """The page a batch entry answered, or None when it did not answer with one."""
    page = entry.get("resource") if isinstance(entry, dict) else None
    response = entry.get("response") if isinstance(entry, dict) else None
    status = response.get("status") if isinstance(response, dict) else None
    if isinstance(status, str) and status.startswith("2") and isinstance(page, dict) \
            and page.get("resourceType") == "Bundle":
        return page
    return None


def _answers(page: dict[str, Any], kind: str) -> bool:
    """Can this page be the answer to a search of `kind`? Its resources are of that kind (or included
    Medications, or an OperationOutcome), and its self link, when it has one, is a search of that kind."""
    for entry in page.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") not in (kind, "Medication", "OperationOutcome"):
            return False
    links = page.get("link") if isinstance(page.get("link"), list) else []
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "self" and isinstance(link.get("url"), str):
            path = urlsplit(link["url"]).path.rstrip("/").removesuffix("/_search")
            return path.rsplit("/", 1)[-1] == kind
    # (Two empty answers swapped, with no self links, cannot be told apart: nothing is lost by them, and a
    # failed entry beside them would be sent alone under the wrong type. FHIR requires the order.)
    return True


def _batches(patient_ids: list[str]) -> Iterator[list[str]]:
    return source.url_batches(patient_ids, BATCH, SUBJECT_CHARS, prefix="Patient/")


def coverage(declared: Mapping[str, frozenset[str]],
             switches: ContextConfig) -> list[tuple[str, list[str], bool, bool]]:
    """For `check`: per context search, whether the read around new counts and the poll of live patients
    will be sent (the run sends only what the server declares)."""
    kinds = []
    if switches.febrile:
        kinds.append(("Observation", {"code"}))
    if switches.chemotherapy:
        kinds += [("MedicationAdministration", set()), ("MedicationRequest", set()), ("Procedure", set())]
    if switches.duffy_null:
        kinds.append(("Condition", {"code"}))
    rows = []
    for kind, extra in kinds:
        have = declared.get(kind, frozenset())
        around = {"subject", *extra} | ({_DATE_PARAM[kind]} if kind in _DATE_PARAM else set())
        poll = {"subject", "_lastUpdated", *extra}
        rows.append((kind, sorted(around | poll), around <= have, poll <= have))
    return rows


def _searches(mappings: ContextMappings, switches: ContextConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    if switches.febrile:
        yield "Observation", {"code": ",".join(f"{s}|{c}" for s, c in mappings.temperature_codes)}
    if switches.chemotherapy:
        yield "MedicationAdministration", {"_include": "MedicationAdministration:medication"}
        yield "MedicationRequest", {"_include": "MedicationRequest:medication"}
        yield "Procedure", {}
    if switches.duffy_null and mappings.duffy_null_codes:
        yield "Condition", {"code": ",".join(f"{s}|{c}" for s, c in sorted(mappings.duffy_null_codes))}


def _collect(bundle: dict[str, Any], found: Found) -> None:
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Medication" and isinstance(resource.get("id"), str):
            found.medications[resource["id"]] = resource
            continue
        if resource.get("resourceType") == "OperationOutcome":
            continue
        found.resources.append(resource)
        meta = resource.get("meta")
        updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
        if isinstance(updated, str) and _later(updated, found.max_last_updated):
            found.max_last_updated = updated


def _resolve_medications(client: FhirClient, found: Found) -> None:
    """A server that ignored _include: read each referenced Medication once."""
    wanted = set()
    for resource in found.resources:
        reference = resource.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if isinstance(target, str) and "Medication/" in target:
            medication_id = target.rsplit("Medication/", 1)[1].split("/_history")[0]
            if medication_id and medication_id not in found.medications:
                wanted.add(medication_id)
    for medication_id in sorted(wanted):
        try:
            found.medications[medication_id] = client.get(f"Medication/{medication_id}")
        except (FhirError, AuthError) as exc:
            log.warning("a referenced Medication could not be read", extra={
                "event": "medication-missing", "medication_id": medication_id, "error": str(exc)})


def _later(instant: str, than: str) -> bool:
    try:
        mine = datetime.fromisoformat(instant.replace("Z", "+00:00"))
        return not than or mine > datetime.fromisoformat(than.replace("Z", "+00:00"))
    except ValueError:
        return False


def _instant(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
