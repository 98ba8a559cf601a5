"""One run: wires the stages and owns the commit order (CONTRACT §7).

For each page: extract -> normalise -> classify -> record in a SQLite transaction -> plan the writes ->
send them as one FHIR transaction -> commit. The SQLite transaction commits only after the server
accepted every write, so a crash anywhere leaves state with only what the server has; writes are
conditional updates keyed by our identifiers, so the rerun repeats them without duplicating anything.
The watermark moves only at the end of a complete, stable pass."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from adapter import classify, crashpoints, derive, extract, source, writeback
from adapter.config import Config
from adapter.extract import WITHDRAWN_STATUSES
from adapter.fhir.client import FhirClient
from adapter.mappings import Mappings
from adapter.model import Classification, DeriveInput, Quarantine, Reading
from adapter.state import State, Written

log = logging.getLogger(__name__)


class Sink(Protocol):
    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]: ...


class ServerSink:
    """Writes to the FHIR server: one transaction per page."""

    def __init__(self, client: FhirClient, output: writeback.Output):
        self.client = client
        self.output = output

    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]:
        bundle = writeback.transaction(planned, self.output)
        crashpoints.reach("during-write")
        response = self.client.transaction(bundle)
        accepted = writeback.accepted(planned, response)
        crashpoints.reach("write-accepted")
        return accepted


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
        self._max_seen: datetime | None = None
        self._ids_this_pass: set[str] = set()
        self._stable = True

    def execute(self, window: Window = Window()) -> Summary:
        started = time.monotonic()
        self._pass_started = self.now()
        self._retry_quarantine()
        since = window.since if window.backfill else self._live_since()
        codes = self.mappings.anc_codes + tuple(sorted(self.input_kinds or {}))
        params = source.search_params(codes, since, window.until, self.config.fhir.page_size)
        complete = True
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
                complete = False
                break
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

    def _live_since(self) -> datetime:
        watermark = self.state.watermark()
        if watermark is None:
            return self.now() - self.config.poll.lookback
        return datetime.fromisoformat(watermark) - self.config.poll.overlap_delta

    def _retry_quarantine(self) -> None:
        """Quarantined Observations are graded again on every run, so a mapping fix clears the backlog."""
        resources = self.state.quarantined_resources()
        if resources:
            self.summary.quarantine_retried = len(resources)
            self._process(resources, retry=True)

    def _process(self, observations: Iterable[dict[str, Any]], retry: bool) -> None:
        now = _iso(self.now())
        touched: set[str] = set()
        self._abnormal = set()  # patients with an abnormal count graded in this batch
        groups: set[tuple[str, datetime]] = set()
        with self.state.transaction():
            for resource in observations:
                patient_id = self._record(resource, retry, now, groups)
                if patient_id:
                    touched.add(patient_id)
            for patient_id, effective in sorted(groups):
                if self._derive(patient_id, effective, now):
                    touched.add(patient_id)
            crashpoints.reach("classified")
            planned: list[writeback.Planned] = []
            for patient_id in sorted(touched):
                previously = {kind: self.state.written(patient_id, kind) for kind in self.output.resources}
                if not any(previously.values()) and patient_id not in self._abnormal \
                        and not self.output.risk_assessment_for_normal:
                    continue  # only normal counts and nothing written before: nothing can change
                mine = writeback.plan_patient(patient_id, self.state.readings(patient_id), previously, self.output)
                rewritten = {(p.resource_type, p.identifier) for p in mine}
                self.summary.unchanged += sum(
                    (kind, w.identifier) not in rewritten for kind, items in previously.items() for w in items
                )
                planned += mine
            if planned:
                for written, created in self.sink.send(planned):
                    self.state.record_written(written, now)
                    if created:
                        self.summary.created += 1
                    else:
                        self.summary.updated += 1
        crashpoints.reach("committed")

    def _record(self, resource: dict[str, Any], retry: bool, now: str,
                groups: set[tuple[str, datetime]]) -> str | None:
        """Ledger one Observation version; return its patient when that patient's outputs may change.
        With derived ANC on, add the (patient, effective time) groups whose derivation may change."""
        extracted = extract.observation(resource, self.mappings, self.config.poll.statuses, self.input_kinds)
        if extracted is None:
            self.summary.malformed += 1
            return None
        seen = extracted.seen
        if not retry:
            self.summary.observations_read += 1
            self._note_pass(seen)
        prior = self.state.processed_version(seen.observation_id)
        if not retry and prior == seen.version:
            self.summary.already_processed += 1
            return None
        outcome = extracted.outcome
        if self.input_kinds is not None:
            self._note_groups(seen.observation_id, outcome, groups)
        if isinstance(outcome, DeriveInput):
            self.state.record_input(outcome, seen.status, now)
            return None
        if outcome is None:
            withdrawn = seen.status in WITHDRAWN_STATUSES
            self.summary.withdrawn += withdrawn
            self.summary.ignored += not withdrawn
            self.state.record_outcome(seen.observation_id, seen.version, seen.status, seen.patient_id,
                                      "withdrawn" if withdrawn else "ignored", now)
            return seen.patient_id if prior is not None else None
        if isinstance(outcome, Reading):
            graded = self._classify(outcome)
            if isinstance(graded, Classification):
                self.state.record_classified(outcome, graded, now)
                self._graded(outcome.patient_id, graded)
                self._row(outcome, graded)
                return outcome.patient_id
            outcome = graded
        self.summary.quarantined += 1
        self.state.quarantine(seen.observation_id, seen.version, seen.patient_id, outcome, resource, now)
        log.info("observation quarantined", extra={
            "event": "quarantined", "observation_id": seen.observation_id, "reason": outcome.reason.value,
        })
        return seen.patient_id if prior is not None else None

    def _note_groups(self, observation_id: str, outcome: Any, groups: set[tuple[str, datetime]]) -> None:
        """A derived ANC depends on its inputs and on whether a measured ANC exists at the same time."""
        before = self.state.input_group(observation_id)
        if before is not None:
            groups.add(before)
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
        count, sources = derived
        reading = Reading(observation_id=key, version="+".join(sources), status="final", patient_id=patient_id,
                          effective=effective, count=count, sources=sources)
        result = self._classify(reading)
        if isinstance(result, Quarantine):  # a derived count has no comparator; cannot happen
            raise AssertionError("derived ANC could not be graded")
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
        band = classify.patient_age_band(patient, reading.effective.date(), self.config.classify.pediatric)
        lln = reading.lln_per_ul if reading.lln_per_ul is not None else self.config.classify.default_lln
        return classify.classify(reading.count, band, self.config.classify.profile,
                                 self.mappings.thresholds, lln)

    def _note_pass(self, seen: extract.Seen) -> None:
        # An id seen twice in one pass means the result set changed under offset paging: an entry may have
        # slid past a page boundary unseen, so this pass must not move the watermark.
        if seen.observation_id in self._ids_this_pass:
            self._stable = False
        self._ids_this_pass.add(seen.observation_id)
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


