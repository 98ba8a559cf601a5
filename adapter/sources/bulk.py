"""Bulk Data `$export` as a source (CONTRACT §10, FHIR Bulk Data IG 2.0): kick-off, status polling,
manifest, and the NDJSON files streamed line by line into pages for the same pipeline as paged search.

Why a second source: paged search makes a server count and match the whole result set again for every
page, so a backfill of years costs pages × N; `$export` is the server's own engine for reading a lot once.
Memory stays flat in the size of the Observation files: one line at a time is parsed and at most one
page (`[fhir] page_size` Observations) is held; the Patient lookup is bounded by PATIENT_LOOKUP_MAX."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from adapter import extract
from adapter.errors import ConfigError, FhirError, PermanentHttpError, TransientHttpError
from adapter.fhir.client import FHIR_JSON, FhirClient, _retry_after
from adapter.mappings import Coding
from adapter.model import Patient
from adapter.source import Page

if TYPE_CHECKING:
    from adapter.pipeline import Run, Summary

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
# Without --max-duration, how long the server may take to prepare the files before we cancel and exit 3.
# A constant rather than a config key: whoever needs longer gives --max-duration, which bounds it all.
DEFAULT_WAIT_S = 3600.0
# Patients kept for grading (id -> birth date range, ~200 bytes each): beyond this, the others are read
# one by one when needed (as for paged search), so memory stays bounded whatever the export's size.
PATIENT_LOOKUP_MAX = 100_000
_NO_EXPORT = frozenset({404, 405, 501})  # the kick-off endpoint or operation does not exist
_POLL_DEFAULT_S = 5.0  # when a 202 carries no Retry-After
_POLL_MAX_S = 300.0
_CHUNK_BYTES = 64 * 1024
_BROKEN_STREAM = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                  requests.exceptions.ContentDecodingError)


class ExportUnavailable(ConfigError):
    """The server has no `$export`. Exit 2 and no automatic fallback to paged search: the operator chose
    bulk because a paged backfill of that size is what the server handles worst."""


class ExportNotReady(FhirError):
    """The export was not ready within the time budget (it was cancelled)."""


@dataclass(frozen=True)
class Output:
    resource_type: str
    url: str
    count: int | None = None


@dataclass(frozen=True)
class Manifest:
    transaction_time: str | None
    outputs: tuple[Output, ...]  # Patient files first: grading needs the birth date
    error_files: int = 0


def kickoff_params(codes: tuple[Coding, ...], since: datetime | None) -> dict[str, str]:
    # The comma-separated code list is URL-encoded inside the _typeFilter query: a bare comma is the
    # separator between _typeFilter queries, and a server that splits on it (Sekmet 0.1.1 does) would
    # silently lose every code but the first.
    params = {
        "_type": "Observation,Patient",
        "_typeFilter": "Observation?" + urlencode({"code": ",".join(f"{s}|{c}" for s, c in codes)}),
    }
    if since is not None:
        params["_since"] = since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return params


@contextlib.contextmanager
def export(client: FhirClient, params: dict[str, str], budget_s: float,
           sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> Iterator[Manifest]:
    """Kick off an export and wait for its manifest. Leaving the block DELETEs the job: early (an error,
    --max-duration, an interrupt) it cancels the work; after the last file it lets the server drop them."""
    deadline = clock() + budget_s
    status_url = _kick_off(client, params)
    finished = False
    try:
        yield _wait(client, status_url, deadline, budget_s, sleep, clock)
        finished = True
    finally:
        _delete(client, status_url, finished)


def pages(client: FhirClient, manifest: Manifest, page_size: int,
          lookup_max: int = PATIENT_LOOKUP_MAX) -> Iterator[Page]:
    """The export as search-like pages of at most `page_size` Observations, each carrying the Patient
    lookup read from the Patient files first. Lines that are not JSON or not the file's resource type
    are counted as malformed; the rest of the file goes on."""
    patients: dict[str, Patient] = {}
    malformed = not_kept = 0
    for output in (o for o in manifest.outputs if o.resource_type == "Patient"):
        for line in lines(client, output.url):
            resource = _parse(line, "Patient")
            patient = extract.patient(resource) if resource is not None else None
            if patient is None:
                malformed += 1
            elif len(patients) < lookup_max or patient.patient_id in patients:
                patients[patient.patient_id] = patient
            else:
                not_kept += 1
    if not_kept:
        log.info("more Patients than the lookup keeps; the others are read when needed",
                 extra={"event": "bulk-patient-lookup-full", "kept": lookup_max, "not_kept": not_kept})
    observations = [o for o in manifest.outputs if o.resource_type == "Observation"]
    counts = [o.count for o in observations]
    total = sum(c for c in counts if c is not None) if None not in counts else None
    batch: list[dict[str, Any]] = []
    for output in observations:
        for line in lines(client, output.url):
            resource = _parse(line, "Observation")
            if resource is None:
                malformed += 1
                continue
            batch.append(resource)
            if len(batch) >= page_size:
                yield Page(observations=batch, patients=patients, malformed=malformed, total=total)
                batch, malformed = [], 0
    if batch or malformed:
        yield Page(observations=batch, patients=patients, malformed=malformed, total=total)


def lines(client: FhirClient, url: str) -> Iterator[bytes]:
    """The non-blank lines of one NDJSON file, read from the stream as they arrive."""
    response = client.send("GET", url, headers={"Accept": NDJSON}, stream=True)
    with response:
        try:
            for line in response.iter_lines(chunk_size=_CHUNK_BYTES):
                if line.strip():
                    yield line
        except _BROKEN_STREAM as exc:
            # Pages already committed stay committed; the rerun exports again and the ledger skips them.
            raise TransientHttpError(f"an export file download broke off ({type(exc).__name__})") from None


def backfill(run: Run, client: FhirClient, since: datetime | None, page_size: int,
             max_duration_s: float | None, sleep: Callable[[float], None] = time.sleep) -> Summary:
    """`run --bulk`: export, then feed the files through `run` page by page. --max-duration bounds the
    whole of it, waiting included."""
    started = time.monotonic()
    codes = run.mappings.anc_codes + tuple(sorted(run.input_kinds or {}))
    budget_s = max_duration_s if max_duration_s is not None else DEFAULT_WAIT_S
    with _sigterm_interrupts(), export(client, kickoff_params(codes, since), budget_s, sleep) as manifest:
        if max_duration_s is not None:
            run.max_duration_s = max(0.0, max_duration_s - (time.monotonic() - started))
        with contextlib.closing(pages(client, manifest, page_size)) as stream:
            return run.execute_batches(stream)


def _kick_off(client: FhirClient, params: dict[str, str]) -> str:
    try:
        response = client.send("GET", "$export", params=params,
                               headers={"Prefer": "respond-async", "Accept": FHIR_JSON})
    except PermanentHttpError as exc:
        if exc.status in _NO_EXPORT:
            raise ExportUnavailable(
                f"run --bulk: this server offers no Bulk Data $export (the kick-off answered {exc.status}); "
                "backfill with paged search instead: anc-adapter run --since <start>") from None
        raise
    with response:
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise PermanentHttpError(f"the $export kick-off answered {response.status_code} without a status "
                                     "URL (expected 202 and Content-Location)")
    status_url = urljoin(client.base_url + "/", location)
    _same_server(client, status_url, "the export status URL")
    log.info("export started", extra={"event": "bulk-kickoff"})
    return status_url


def _wait(client: FhirClient, status_url: str, deadline: float, budget_s: float,
          sleep: Callable[[float], None], clock: Callable[[], float]) -> Manifest:
    progress: str | None = None
    while True:
        response = client.send("GET", status_url, headers={"Accept": "application/json"})
        with response:
            if response.status_code == 200:
                return _manifest(client, response)
            if response.status_code != 202:
                raise PermanentHttpError(f"the export status answered {response.status_code}")
            wait = _retry_after(response)
            now_progress = (response.headers.get("X-Progress") or "")[:100]
        if now_progress != progress:
            progress = now_progress
            log.info("export in progress", extra={"event": "bulk-progress", "progress": progress})
        wait = min(_POLL_DEFAULT_S if wait is None else wait, _POLL_MAX_S)
        if clock() + wait > deadline:
            # Polling sooner than the server asked would be rude; it told us it will not be ready in time.
            raise ExportNotReady(f"the export was not ready within {budget_s:g} s (last progress: "
                                 f"{progress or '-'}); cancelled. Give a larger --max-duration")
        sleep(wait)


def _manifest(client: FhirClient, response: requests.Response) -> Manifest:
    try:
        body = response.json()
    except ValueError:
        raise PermanentHttpError("the export manifest is not JSON") from None
    entries = body.get("output") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise PermanentHttpError("the export manifest has no output list")
    outputs: list[Output] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise PermanentHttpError("the export manifest has an output without a url")
        url = urljoin(client.base_url + "/", entry["url"])
        # Credentials never leave the configured server (as for next links): a file elsewhere (a
        # pre-signed storage URL) is refused rather than fetched with or without them.
        _same_server(client, url, "an export file")
        count = entry.get("count")
        outputs.append(Output(str(entry.get("type")), url, count if isinstance(count, int) else None))
    skipped = sorted({o.resource_type for o in outputs} - {"Observation", "Patient"})
    if skipped:
        log.warning("the export holds types we did not ask for; skipped",
                    extra={"event": "bulk-unexpected-types", "types": skipped})
    errors = body.get("error")
    error_files = len(errors) if isinstance(errors, list) else 0
    if error_files:
        # Not read: their diagnostics may quote patient data. Ignored parameters show up here.
        log.warning("the server reported errors with the export", extra={"event": "bulk-export-errors",
                                                                         "error_files": error_files})
    ordered = sorted(outputs, key=lambda o: o.resource_type != "Patient")
    transaction_time = body.get("transactionTime")
    log.info("export ready", extra={"event": "bulk-manifest", "files": len(outputs),
                                    "transaction_time": transaction_time})
    return Manifest(transaction_time if isinstance(transaction_time, str) else None, tuple(ordered),
                    error_files)


def _delete(client: FhirClient, status_url: str, finished: bool) -> None:
    """Best effort: a failure here must not hide why we stopped; the server expires jobs anyway."""
    try:
        client.send("DELETE", status_url, after_stop=True).close()
    except Exception as exc:  # noqa: BLE001 - logged, never raised over the real outcome
        log.warning("could not delete the export job", extra={"event": "bulk-delete-failed",
                                                               "error": str(exc)})
        return
    log.info("export files released" if finished else "export cancelled",
             extra={"event": "bulk-released" if finished else "bulk-cancelled"})


def _same_server(client: FhirClient, url: str, what: str) -> None:
    if not client.on_this_server(url):
        raise PermanentHttpError(f"{what} is on another server ({urlsplit(url).netloc}); refused: "
                                 "our credentials stay with the configured FHIR server")


def _parse(line: bytes, resource_type: str) -> dict[str, Any] | None:
    try:
        resource = json.loads(line)
    except ValueError:
        return None
    if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
        return resource
    return None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """By default SIGTERM ends the process on the spot, leaving the export job running on the server;
    raised as KeyboardInterrupt instead, it unwinds through export(), which cancels the job. Only when
    nobody else handles SIGTERM (a graceful-stop handler takes precedence)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
