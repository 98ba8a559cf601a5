"""One run: wires the stages and owns the commit order (CONTRACT §7).

For each page: extract -> normalise -> classify -> record in a SQLite transaction -> plan the writes ->
send them as one FHIR transaction -> commit. The SQLite transaction commits only after the server
accepted every write, so a crash anywhere leaves state with only what the server has; writes are
conditional updates keyed by our identifiers, so the rerun repeats them without duplicating anything.
The watermark moves only at the end of a complete, stable pass."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from adapter import classify, crashpoints, derive, extract, source, writeback
from adapter.config import Config
from adapter.errors import PermanentHttpError, SearchTruncated
from adapter.extract import WITHDRAWN_STATUSES
from adapter.fhir.client import FhirClient
from adapter.mappings import Mappings
from adapter.model import Classification, DeriveInput, Quarantine, Reading
from adapter.state import State, Written

log = logging.getLogger(__name__)


# Refusals of the bundle as such (wrong endpoint, method not allowed, too large, not implemented): sending
# patient by patient would only repeat them, and would hide a broken server behind exit 0.
_NOT_ABOUT_A_PATIENT = frozenset({404, 405, 413, 415, 501})
_ADOPT_BATCH = 50  # patients per Flag lookup (comma-separated subject, kept well within URL limits)


class Sink(Protocol):
    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]: ...


class ServerSink:
    """Writes to the FHIR server: one transaction per page, split when it would exceed the largest
    bundle the server takes. State commits once for the page, after every part was accepted; a crash
    between parts makes the rerun repeat them, harmlessly (every write is an idempotent PUT)."""

    def __init__(self, client: FhirClient, output: writeback.Output, max_entries: int = 500):
        self.client = client
        self.output = output
        self.writes_per_bundle = max(1, max_entries // (2 if output.provenance else 1))

    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]:
        accepted: list[tuple[Written, bool]] = []
        for part in self._parts(planned):
            bundle = writeback.transaction(part, self.output)
            crashpoints.reach("during-write")
            response = self.client.transaction(bundle)
            accepted += writeback.accepted(part, response, self.output)
            crashpoints.reach("write-accepted")
        return accepted

    def _parts(self, planned: list[writeback.Planned]) -> list[list[writeback.Planned]]:
        """Split only between patients: one patient's writes (closing one Flag, opening the next) must
        land together, or a failure between parts would leave two active Flags on the server."""
        parts: list[list[writeback.Planned]] = [[]]
        for _, group in itertools.groupby(planned, key=lambda p: p.patient_id):
            writes = list(group)
            if parts[-1] and len(parts[-1]) + len(writes) > self.writes_per_bundle:
                parts.append([])
            parts[-1] += writes
        return [part for part in parts if part]


class DryRunSink:
    """--dry-run: keeps what would be written; sends nothing."""

    def __init__(self) -> None:
        self.planned: list[writeback.Planned] = []

    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]:
        self.planned += planned
        return [(p.written(None), True) for p in planned]


@dataclass
class Summary:
    observations_read: int = 0
    already_processed: int = 0
    grades: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    quarantine_retried: int = 0
    withdrawn: int = 0
    ignored: int = 0
    malformed: int = 0
    created: int = 0
    updated: int = 0
    write_failures: int = 0
    adopted: int = 0  # Flags found on the server that state did not know
    unchanged: int = 0
    pages: int = 0
    http_requests: int = 0
    complete: bool = False
    watermark: str | None = None
    duration_s: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)  # per classified count, for the demo table

    def as_dict(self) -> dict[str, Any]:
        return {
            "observations_read": self.observations_read,
            "already_processed": self.already_processed,
            "classified": dict(sorted(self.grades.items())),
            "quarantined": self.quarantined,
            "quarantine_retried": self.quarantine_retried,
            "withdrawn": self.withdrawn,
            "ignored": self.ignored,
            "malformed": self.malformed,
            "created": self.created,
            "updated": self.updated,
            "write_failures": self.write_failures,
            "adopted": self.adopted,
            "unchanged": self.unchanged,
            "pages": self.pages,
            "http_requests": self.http_requests,
            "complete": self.complete,
            "watermark": self.watermark,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass(frozen=True)
class Window:
    """What to read: a backfill window (since/until) leaves the live watermark alone."""

    since: datetime | None = None
    until: datetime | None = None

    @property
    def backfill(self) -> bool:
        return self.since is not None


class Run:
    def __init__(
        self,
        config: Config,
        mappings: Mappings,
        client: FhirClient,
        state: State,
        sink: Sink,
        output: writeback.Output,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        max_duration_s: float | None = None,
        collect_rows: bool = False,
        on_page: Callable[[Summary, int | None], None] | None = None,
    ):
        self.config = config
        self.mappings = mappings
        self.client = client
        self.state = state
        self.sink = sink
        self.now = now
        self.max_duration_s = max_duration_s
        self.collect_rows = collect_rows
        self.on_page = on_page
        self.patients = source.Patients(client)
        self.output = output
        self.input_kinds = mappings.input_kinds() if config.classify.derive else None
        self.summary = Summary()
        self._abnormal: set[str] = set()
        self._failing: set[str] = set()  # patients whose writes the server refused
        self._max_seen: datetime | None = None
        self._stable = True

    def execute(self, window: Window = Window()) -> Summary:
        started = time.monotonic()
        self._pass_started = self.now()
        self.state.start_pass()
        self._retry_quarantine()
        self._retry_write_failures()
        since = window.since if window.backfill else self._live_since()
        codes = self.mappings.anc_codes + tuple(sorted(self.input_kinds or {}))
        params = source.search_params(codes, since, window.until, self.config.fhir.page_size)
        complete = True
        try:
            complete = self._read(params, started)
        except SearchTruncated as exc:
            log.warning("the search stopped early; the watermark stays", extra={"event": "search-truncated",
                                                                                 "error": str(exc)})
            complete = False
        self.summary.complete = complete
        if complete and not window.backfill and self._stable and self._max_seen is not None:
            with self.state.transaction():
                self.state.set_watermark(_iso(self._max_seen))
        elif not self._stable:
            log.warning("watermark kept: an Observation changed while we paged, the window is read again",
                        extra={"event": "unstable-pass"})
        self.summary.watermark = self.state.watermark()
        self.summary.http_requests = self.client.request_count
        self.summary.duration_s = time.monotonic() - started
        return self.summary

    def _read(self, params: dict[str, Any], started: float) -> bool:
        """Process every page; False when --max-duration stopped it first."""
        for page in source.pages(self.client, params):
            self.summary.pages += 1
            crashpoints.reach("page-read")
            self.patients.add(page.patients)
            self.summary.malformed += page.malformed
            self._process(page.observations, retry=False)
            if self.on_page:
                self.on_page(self.summary, page.total)
            if self.max_duration_s is not None and time.monotonic() - started > self.max_duration_s:
                log.warning("stopping early: --max-duration reached", extra={"event": "max-duration"})
                return False
        return True

    def execute_batches(self, pages: Iterable[source.Page]) -> Summary:
        """A backfill from another source (Bulk Data NDJSON): every page takes the same steps as a search
        page (ledger, quarantine, adoption, planning, one commit per page), so idempotence and crash
        safety are the same; like `run --since` it never moves the live watermark."""
        started = time.monotonic()
        self._pass_started = self.now()
        self.state.start_pass()
        self._retry_quarantine()
        self._retry_write_failures()
        self.summary.complete = True
        for page in pages:
            self.summary.pages += 1
            self.patients.add(page.patients)
            self.summary.malformed += page.malformed
            self._process(page.observations, retry=False)
            if self.on_page:
                self.on_page(self.summary, page.total)
            if self.max_duration_s is not None and time.monotonic() - started > self.max_duration_s:
                log.warning("stopping early: --max-duration reached", extra={"event": "max-duration"})
                self.summary.complete = False
                break
        self.summary.watermark = self.state.watermark()
        self.summary.http_requests = self.client.request_count
        self.summary.duration_s = time.monotonic() - started
        return self.summary

    def _retry_write_failures(self) -> None:
        self._failing = {f["patient_id"] for f in self.state.write_failures()}
        if self._failing:
            self._process([], retry=True, also_plan=sorted(self._failing))

    def _live_since(self) -> datetime:
        watermark = self.state.watermark()
        if watermark is None:
            return self.now() - self.config.poll.lookback
        return datetime.fromisoformat(watermark) - self.config.poll.overlap_delta

    def retry_quarantine(self, ids: tuple[str, ...] = ()) -> Summary:
        """`anc-adapter quarantine retry [ID…]`: grade quarantined Observations again, nothing else."""
        started = time.monotonic()
        self._retry_quarantine(ids)
        self.summary.watermark = self.state.watermark()
        self.summary.http_requests = self.client.request_count
        self.summary.duration_s = time.monotonic() - started
        return self.summary

    def _retry_quarantine(self, ids: tuple[str, ...] = ()) -> None:
        """Quarantined Observations are graded again on every run, so a mapping fix clears the backlog."""
        resources = [r for r in self.state.quarantined_resources() if not ids or r.get("id") in ids]
        if resources:
            self.summary.quarantine_retried = len(resources)
            self._process(resources, retry=True)

    def _process(self, observations: Iterable[dict[str, Any]], retry: bool,
                 also_plan: Iterable[str] = ()) -> None:
        now = _iso(self.now())
        touched: set[str] = set(also_plan)
        self._abnormal = set()  # patients with an abnormal count graded in this batch
        groups: set[tuple[str, datetime]] = set()
        with self.state.transaction():
            for resource in observations:
                touched |= self._record(resource, retry, now, groups)
            for patient_id, effective in sorted(groups):
                if self._derive(patient_id, effective, now):
                    touched.add(patient_id)
            touched.discard("")
            crashpoints.reach("classified")
            self._adopt_flags(sorted(p for p in touched if p in self._abnormal))
            planned: list[writeback.Planned] = []
            for patient_id in sorted(touched):
                planned += self._plan(patient_id)
            if planned:
                self._write(planned, now)
        crashpoints.reach("committed")

    def _adopt_flags(self, patient_ids: list[str]) -> None:
        """Before a patient's first Flag is written, look on the server for Flags of ours that state does
        not know (state lost or restored from an old backup): they are adopted, so the episode keeps its
        Flag instead of getting a second one under a newly computed identifier."""
        if "Flag" not in self.output.resources:
            return
        unknown = [p for p in patient_ids if not self.state.written(p, "Flag")]
        for start in range(0, len(unknown), _ADOPT_BATCH):
            batch = unknown[start:start + _ADOPT_BATCH]
            params = {"subject": ",".join(f"Patient/{p}" for p in batch), "_count": 1000,
                      "_tag": f"{self.output.system_base}/tag|anc-adapter"}
            try:
                found = [r for page in self.client.search("Flag", params)
                         for r in (e.get("resource") for e in page.get("entry") or [] if isinstance(e, dict))
                         if isinstance(r, dict)]
            except (PermanentHttpError, SearchTruncated) as exc:
                log.warning("could not look for existing Flags; new ones are named from their evidence",
                            extra={"event": "flag-lookup-failed", "error": str(exc)})
                return
            for written in writeback.adoptable(found, self.output):
                self.state.record_written(written, _iso(self.now()))
                self.summary.adopted += 1

    def _plan(self, patient_id: str) -> list[writeback.Planned]:
        previously = {kind: self.state.written(patient_id, kind) for kind in self.output.resources}
        if not any(previously.values()) and patient_id not in self._abnormal \
                and not self.output.risk_assessment_for_normal and patient_id not in self._failing:
            return []  # only normal counts and nothing written before: nothing can change
        evidence = {e for w in previously.get("Flag", []) for e in w.evidence}
        unread = frozenset(evidence - self.state.ledgered_ids(evidence))
        mine = writeback.plan_patient(patient_id, self.state.readings(patient_id), previously, self.output,
                                      unread)
        rewritten = {(p.resource_type, p.identifier) for p in mine if p.send}
        self.summary.unchanged += sum(
            (kind, w.identifier) not in rewritten for kind, items in previously.items() for w in items
        )
        if not mine and patient_id in self._failing:  # nothing left to write: the failure is over
            self.state.clear_write_failure(patient_id)
            self._failing.discard(patient_id)
        return mine

    def _write(self, planned: list[writeback.Planned], now: str) -> None:
        """Send the page's writes as one bundle. If the server refuses it for good (a 4xx), send each
        patient's writes alone, so one patient the server will not accept (a merged Patient, a validator
        rule) does not stop every other patient's alerts; the refused ones are kept in state with the
        reason, shown by `status`, and tried again on every run."""
        to_send = [p for p in planned if p.send]
        refused: set[str] = set()
        try:
            results = self.sink.send(to_send) if to_send else []
        except PermanentHttpError as exc:
            if exc.status in _NOT_ABOUT_A_PATIENT:
                raise  # the endpoint or the bundle itself was refused: no patient is to blame
            log.warning("the server refused a write bundle: sending patient by patient",
                        extra={"event": "write-refused", "error": str(exc)})
            results = []
            for patient_id, group in itertools.groupby(to_send, key=lambda p: p.patient_id):
                writes = list(group)
                try:
                    results += self.sink.send(writes)
                except PermanentHttpError as exc:
                    self.state.record_write_failure(patient_id, str(exc), now)
                    self._failing.add(patient_id)
                    refused.add(patient_id)
                    self.summary.write_failures += 1
                    log.error("the server refused this patient's writes; kept for the next run",
                              extra={"event": "write-failure", "patient_id": patient_id, "error": str(exc)})
        for written, created in results:
            self.state.record_written(written, now)
            if written.patient_id in self._failing:
                self.state.clear_write_failure(written.patient_id)
                self._failing.discard(written.patient_id)
            if created:
                self.summary.created += 1
            else:
                self.summary.updated += 1
        for bookkeeping in (p for p in planned if not p.send and p.patient_id not in refused):
            self.state.record_written(bookkeeping.written(None), now)

    def _record(self, resource: dict[str, Any], retry: bool, now: str,
                groups: set[tuple[str, datetime]]) -> set[str]:
        """Ledger one Observation version; return the patients whose outputs may change (two when the
        lab moved the result to another patient). With derived ANC on, add the (patient, effective time)
        groups whose derivation may change."""
        extracted = extract.observation(resource, self.mappings, self.config.poll.statuses, self.input_kinds)
        if extracted is None:
            self.summary.malformed += 1
            return set()
        seen = extracted.seen
        if not retry:
            self.summary.observations_read += 1
            self._note_pass(seen)
        prior = self.state.ledger(seen.observation_id)
        if not retry and prior is not None and (
            prior.version == seen.version or prior.newer_than(seen.version, seen.last_updated)
        ):
            self.summary.already_processed += 1
            return set()
        # The patient it was filed to before must be re-planned too (a result moved to another patient).
        touched = {prior.patient_id} if prior is not None and prior.patient_id else set()
        outcome = extracted.outcome
        if self.input_kinds is not None:
            self._note_groups(seen.observation_id, prior, outcome, groups)
        if isinstance(outcome, DeriveInput):
            self.state.record_input(outcome, seen.status, now)
            return touched
        if outcome is None:
            withdrawn = seen.status in WITHDRAWN_STATUSES
            self.summary.withdrawn += withdrawn
            self.summary.ignored += not withdrawn
            self.state.record_outcome(seen.observation_id, seen.version, seen.status, seen.patient_id,
                                      "withdrawn" if withdrawn else "ignored", now, seen.last_updated)
            return touched
        if isinstance(outcome, Reading):
            graded = self._classify(outcome)
            if isinstance(graded, Classification):
                self.state.record_classified(outcome, graded, now, seen.last_updated)
                self._graded(outcome.patient_id, graded)
                self._row(outcome, graded)
                return touched | {outcome.patient_id}
            outcome = graded
        self.summary.quarantined += 1
        # A new version we cannot grade leaves the last graded one in effect for the same patient: a unit
        # spelling must not retract a live alert. Moved to another patient, it can no longer stand.
        keep = prior is not None and prior.outcome == "classified" and prior.patient_id == seen.patient_id
        self.state.quarantine(seen.observation_id, seen.version, seen.patient_id, outcome, resource, now,
                              keep_reading=keep)
        log.info("observation quarantined", extra={
            "event": "quarantined", "observation_id": seen.observation_id, "reason": outcome.reason.value,
            "previous_grade_kept": keep,
        })
        return set() if keep else touched

    def _note_groups(self, observation_id: str, prior: Any, outcome: Any,
                     groups: set[tuple[str, datetime]]) -> None:
        """A derived ANC depends on its inputs and on whether a measured ANC exists at the same time:
        re-derive where this Observation was, and where it is now."""
        before = self.state.input_group(observation_id)
        if before is not None:
            groups.add(before)
        if prior is not None and prior.outcome == "classified" and not prior.derived and prior.effective:
            groups.add((prior.patient_id, prior.effective))
        if isinstance(outcome, (Reading, DeriveInput)):
            groups.add((outcome.patient_id, outcome.effective))

    def _derive(self, patient_id: str, effective: datetime, now: str) -> bool:
        """Recompute the derived ANC of one group; True when the patient's readings changed."""
        key = "derived-" + writeback.stable_id(patient_id, _iso(effective))[4:28]
        prior = self.state.processed_version(key)
        derived = None
        if not self.state.measured_at(patient_id, effective):
            derived = derive.derive(self.state.inputs(patient_id, effective))
        if derived is None:
            if prior is None:
                return False
            self.state.record_outcome(key, prior, "superseded", patient_id, "withdrawn", now)
            return True
        count, sources, how = derived
        reading = Reading(observation_id=key, version="+".join(sources), status="final", patient_id=patient_id,
                          effective=effective, count=count, sources=sources)
        result = self._classify(reading)
        if isinstance(result, Quarantine):  # a derived count has no comparator; cannot happen
            raise AssertionError("derived ANC could not be graded")
        result = dataclasses.replace(result, notes=result.notes + (how,))
        self.state.record_classified(reading, result, now)
        self._graded(patient_id, result)
        self._row(reading, result)
        return True

    def _graded(self, patient_id: str, result: Classification) -> None:
        self.summary.grades[result.grade.value] += 1
        if result.grade.abnormal:
            self._abnormal.add(patient_id)

    def _classify(self, reading: Reading) -> Classification | Quarantine:
        patient = self.patients.get(reading.patient_id)
        band = classify.patient_age_band(patient, reading.effective.date(), self.config.classify.pediatric,
                                         self.mappings.thresholds)
        lln = reading.lln_per_ul if reading.lln_per_ul is not None else self.config.classify.default_lln
        return classify.classify(reading.count, band, self.config.classify.profile,
                                 self.mappings.thresholds, lln)

    def _note_pass(self, seen: extract.Seen) -> None:
        # An id read twice in one pass means the result set changed under offset paging: everything after
        # its old place slid back, and an entry may have slid past a page boundary unseen. Such a pass must
        # not move the watermark. (The ids live in a temporary SQLite table, not in our memory.)
        if self.state.seen_before_in_pass(seen.observation_id):
            self._stable = False
        updated = extract.parse_datetime(seen.last_updated)
        if updated is None:
            return
        if updated > self._pass_started:
            # Stamped after this pass began (a clock ahead of ours, or a bogus date): a watermark there
            # would hide everything written before it, so it never moves past the pass start.
            updated = self._pass_started
        if self._max_seen is None or updated > self._max_seen:
            self._max_seen = updated

    def _row(self, reading: Reading, result: Classification) -> None:
        if not self.collect_rows:
            return
        self.summary.rows.append({
            "observation_id": reading.observation_id,
            "patient_id": reading.patient_id,
            "anc_per_ul": str(reading.count),
            "grade": ("at least " if result.at_least else "") + result.grade.value,
            "age_band": result.age_band.value,
        })


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


