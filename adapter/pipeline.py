"""One run: wires the stages and owns the commit order (CONTRACT §7).

For each batch of pages (a page, or the pages that share a patient, or `[poll] batch_observations`
counts): extract -> normalise -> classify -> record in a SQLite transaction -> plan the writes -> send them
as one FHIR transaction -> commit. The SQLite transaction commits only after the server accepted every
write, so a crash anywhere leaves state with only what the server has; writes are conditional updates
keyed by our identifiers, so the rerun repeats them without duplicating anything.
The watermark moves only at the end of a complete, stable pass; a pass stopped early (--max-duration, a
signal) leaves a resume point, so a backlog drains over several runs (see Run._finish_live)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from adapter import context_extract, context_source, crashpoints, extract, source, writeback
from adapter.clinical import assess, classify, derive
from adapter.clinical.episodes import Graded
from adapter.config import Config
from adapter.errors import FhirError, PermanentHttpError, SearchTruncated, Stopped
from adapter.extract import WITHDRAWN_STATUSES
from adapter.fhir import capability
from adapter.fhir.client import FhirClient, in_background
from adapter.mappings import Mappings
from adapter.model import Classification, DeriveInput, Quarantine, Reading
from adapter.state import DELETED, ContextFact, ResumePoint, State, Written

log = logging.getLogger(__name__)


# Refusals of the bundle as such (wrong endpoint, method not allowed, too large, not implemented): sending
# patient by patient would only repeat them, and would hide a broken server behind exit 0.
_NOT_ABOUT_A_PATIENT = frozenset({404, 405, 413, 415, 501})
_ADOPT_BATCH = 50  # patients per Flag lookup (comma-separated subject, kept well within URL limits)
# Live RiskAssessments whose Observations are checked for deletion per run (about 10 searches): they pile
# up with every abnormal count, so a long history is swept over several runs; active Flags every run.
_RISK_SWEEP = 1000
# Counts in one batch at most (`Run._read_batch`), so memory stays bounded; a search matching at least this
# many is a backlog, batched by size.
_BATCH_OBSERVATIONS = 10_000
_PATIENTS_PER_READ = 100  # patients whose counts and context are read together for planning (memory: ~ a part)
_WRITES_PER_PART = 500  # planned writes sent together while the next part is planned (`Run._settle`)


class Sink(Protocol):
    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]: ...


class ServerSink:
    """Writes to the FHIR server: one transaction per batch, split when it would exceed the largest
    bundle the server takes. State commits once for the batch, after every part was accepted; a crash
    between parts makes the rerun repeat them, harmlessly (every write is an idempotent PUT)."""

    overlaps = True  # touches no state: may send while the run extracts the next page

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
        if len(planned) <= self.writes_per_bundle:
            return [planned] if planned else []  # what the run plans a part at a time mostly fits in one
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


class ReviewSink(DryRunSink):
    """--dry-run with a review state: also records each planned write there (create, update or
    withdraw), so `report` can show what the run would have written."""

    def __init__(self, review: State, run_id: str, now: Callable[[], str]):
        super().__init__()
        self.review = review
        self.run_id = run_id
        self.now = now

    def send(self, planned: list[writeback.Planned]) -> list[tuple[Written, bool]]:
        self.planned += planned
        results = []
        for p in planned:
            action = self.review.record_planned(self.run_id, p.written(None), p.resource, self.now())
            results.append((p.written(None), action == "create"))
        return results


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
    evidence_checked: int = 0  # Observations behind live Flags / RiskAssessments checked for deletion
    evidence_requests: int = 0  # the requests that check took
    evidence_deleted: int = 0  # of those, found deleted on the server: what they caused is withdrawn
    unchanged: int = 0
    pages: int = 0
    http_requests: int = 0
    complete: bool = False
    stopped: bool = False  # a SIGTERM/SIGINT cut the pass short (exit 6)
    watermark: str | None = None
    resume_at: str | None = None  # where the next run goes on, when the pass is not finished
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
            "evidence_checked": self.evidence_checked,
            "evidence_requests": self.evidence_requests,
            "evidence_deleted": self.evidence_deleted,
            "unchanged": self.unchanged,
            "pages": self.pages,
            "http_requests": self.http_requests,
            "complete": self.complete,
            "stopped": self.stopped,
            "watermark": self.watermark,
            "resume_at": self.resume_at,
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
        stop: threading.Event | None = None,
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
        self.stop = stop
        self.patients = source.Patients(client)
        self.output = output
        self.input_kinds = mappings.input_kinds() if config.classify.derive else None
        self.summary = Summary()
        self._abnormal: set[str] = set()
        self._failing: set[str] = set()  # patients whose writes the server refused
        self._resumed: ResumePoint | None = None
        self._max_seen: datetime | None = None  # highest lastUpdated of the pass's committed pages
        self._run_max: datetime | None = None  # … of this run's committed pages
        self._batch_max: datetime | None = None  # … of the batch being processed (not committed yet)
        self._reread_from: datetime | None = None  # the result set moved under us: read again from here
        self.rules = assess.Rules.from_config(config, mappings)
        self._graded_at: dict[str, datetime] = {}  # patient -> earliest count graded in this batch
        self._priors: dict[str, Any] = {}  # ledger rows of the batch being recorded, read at once
        self._classified: list[tuple[Reading, Classification, str, str]] = []  # see _write_classified
        self._ahead: dict[int, tuple[dict[str, Any], Any]] = {}  # the next page, extracted during a write
        self._stored: dict[str, list[Graded]] = {}  # counts of the chunk of patients being planned
        self._facts: dict[str, list[ContextFact]] = {}  # … and their context facts
        self._backlog = False  # the search matches _BATCH_OBSERVATIONS or more: batched by size
        self._flags_of_ours: bool | None = None  # any Flag of ours on the server? asked once, when needed
        self._declared: dict[str, frozenset[str]] | None = None  # context searches the server declares
        self._batch_reads = False  # … and whether they can go in one batch (context_source._read_batched)
        self._undeclared_said: set[str] = set()

    def execute(self, window: Window = Window()) -> Summary:
        started = time.monotonic()
        self._run_started = self.now()
        self.state.start_pass()
        codes = self.mappings.anc_codes + tuple(sorted(self.input_kinds or {}))
        search = source.code_param(codes)
        if window.backfill:
            self._pass_since = self._run_since = window.since
        else:
            self._begin_live(search)
        params = source.search_params(codes, self._run_since, window.until, self.config.fhir.page_size)
        stopped_early = True
        try:
            self._retry_quarantine()
            self._retry_write_failures()
            if not window.backfill:
                self._withdraw_deleted()
                self._poll_context(self._pass_since)
            stopped_early = self._read(source.pages(self.client, params), started)
        except SearchTruncated as exc:
            log.warning("the search stopped early; the watermark stays", extra={"event": "search-truncated",
                                                                                 "error": str(exc)})
        except Stopped:
            self.summary.stopped = True  # a wait on the server was given up; that page rolled back
        self.summary.complete = not stopped_early
        if self.summary.stopped:
            log.warning("stopped at a safe point; the next run resumes", extra={
                "event": "stopped", "signal": getattr(self.stop, "signal_name", None)})
        if not window.backfill:
            self._finish_live(search, complete=not stopped_early)
        elif self._reread_from is not None:
            log.warning("an Observation changed while we paged: run this backfill again to be sure",
                        extra={"event": "unstable-pass"})
        self.summary.watermark = self.state.watermark()
        self.summary.http_requests = self.client.request_count
        self.summary.duration_s = time.monotonic() - started
        return self.summary

    def _read(self, pages: Iterable[source.Page], started: float) -> bool:
        """Process every page (of a search, or of a Bulk Data export); True when a stop or --max-duration
        ended it first. Pages go in batches (`_read_batch`); the checks come after a batch committed (or
        before any of it was processed): the safe points."""
        pages = iter(pages)
        ahead: source.Page | None = None  # read, not yet recorded: it opens the next batch
        while True:
            if self._stop_requested():
                return True
            if ahead is None:
                ahead = self._next_page(pages)
                if ahead is None:
                    return False
                # The server's count of what the search matches, when it gives one (on its first page).
                self._backlog = (ahead.total or 0) >= _BATCH_OBSERVATIONS
            ahead, ended = self._read_batch(ahead, pages, started)
            if ended is not None:
                return ended

    def _next_page(self, pages: Iterator[source.Page]) -> source.Page | None:
        page = next(pages, None)
        if page is not None:
            crashpoints.reach("page-read")
        return page

    def _read_batch(self, first: source.Page, pages: Iterator[source.Page],
                    started: float) -> tuple[source.Page | None, bool | None]:
        """Record `first` and the pages after it that belong in the same batch, in one transaction; then
        plan, write each resource once, commit. So a patient whose counts are spread over the batch's pages
        is written once, with all of them, instead of once a page, and the commit still follows the
        server's acceptance of every write the batch caused (a kill rolls back just this batch).

        Which pages belong together (`[poll] batch_observations`): by default, a page joins the batch when
        it has a count for a patient already in it (a page boundary cut that patient's counts); pages with
        no patient in common are written page by page, so no alert of a routine poll waits for pages it
        does not depend on. A backlog — a search whose Bundle.total is at least _BATCH_OBSERVATIONS — is
        batched by size instead: its patients' counts are spread over many pages, and a patient written once
        a batch is written once instead of once a page; a few seconds more for its first alerts matter less
        than a backlog's share of the server. With N > 0, pages join until N counts were recorded, whatever
        their patients. What a batch holds in memory is bounded by its counts (the touched patients'
        ids, their earliest counts, the derivation groups), never by the pass: the recorded rows wait in
        the state's open transaction, and a patient in two batches is written twice.

        Returns the next page, read but not recorded (it opens the next batch), and whether the reading
        ends: None to go on, True when a stop or --max-duration ended it early, False at the last page."""
        size = self.config.poll.batch_observations or (_BATCH_OBSERVATIONS if self._backlog else 0)
        cap = size or _BATCH_OBSERVATIONS
        self._begin_batch()
        subjects: set[Any] = set()
        recorded = 0
        page, ahead, ended = first, None, None
        failed: Exception | None = None
        with self.state.transaction():
            while True:
                self.summary.pages += 1
                self.patients.add(page.patients)
                self.summary.malformed += page.malformed
                self._record_all(page.observations, retry=False)
                if not size:  # only batching by shared patients asks who they are
                    subjects.update(_subject(r) for r in page.observations)
                recorded += len(page.observations)
                if self.on_page:
                    self.on_page(self.summary, page.total)
                if page.last:
                    ended = False
                    break
                if self._stop_requested():
                    # Nothing new is sent after a stop: the batch rolls back, the resume point stays
                    # after the last committed one, and the rerun reads these pages again.
                    raise Stopped("stop requested")
                if self.max_duration_s is not None and time.monotonic() - started > self.max_duration_s:
                    log.warning("stopping early: --max-duration reached", extra={"event": "max-duration"})
                    ended = True  # what was read is written and committed first
                    break
                try:
                    # The page after it is not fetched yet: if this batch ends here, its lookups and writes
                    # go to the server first, and that fetch overlaps the next batch's CPU instead.
                    with self.client.prefetch_held():
                        ahead = self._next_page(pages)
                except Exception as exc:  # noqa: BLE001 - raised again below
                    # The search failed or ended early on the next page: the pages read are written and
                    # committed first, as they were before it was asked for.
                    failed = exc
                    break
                if ahead is None:
                    ended = False
                    break
                if recorded >= cap or (not size and subjects.isdisjoint(_subject(r) for r in ahead.observations)):
                    break
                self.client.release_prefetch()
                page, ahead = ahead, None
            try:
                self._settle(ahead=ahead.observations if ahead is not None else ())
            finally:
                self.client.release_prefetch()
        crashpoints.reach("committed")
        self._run_max = _later(self._run_max, self._batch_max)  # committed: it may be resumed after
        self._max_seen = _later(self._max_seen, self._batch_max)
        if failed is not None:
            raise failed
        return ahead, ended

    def _stop_requested(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            self.summary.stopped = True
        return self.summary.stopped

    def _begin_live(self, search: str) -> None:
        point = self.state.resume_point()
        if point is not None and point.search != search:
            # Codes added since: the part of the pass already read never searched for them, and the
            # watermark at its end would pass them by.
            log.warning("the searched codes changed: the resume point is dropped, reading from the watermark",
                        extra={"event": "resume-point-dropped"})
            point = None
        self._resumed = point
        if point is None:
            self._pass_since = self._run_since = self._live_since()
            return
        self._pass_since = datetime.fromisoformat(point.since)
        self._run_since = datetime.fromisoformat(point.resume_at)
        self._max_seen = datetime.fromisoformat(point.max_seen) if point.max_seen else None
        log.info("resuming the pass a previous run stopped", extra={
            "event": "resumed", "resume_at": point.resume_at, "runs_so_far": point.runs})

    def _finish_live(self, search: str, complete: bool) -> None:
        """Move the watermark at the end of a complete, stable pass; otherwise keep a resume point.

        Why resuming at `_lastUpdated=ge<R>` is safe, R being the highest lastUpdated of the pages this run
        committed (never later than this run's start):
        - The search is sorted by _lastUpdated ascending, so every entry before R was on a committed page;
          entries stamped exactly R are read again and the ledger skips them. (R is sent to the
          millisecond, rounded down: rounding down only re-reads more.)
        - Commit lag (an entry committed late with an older lastUpdated) is covered exactly as in one long
          pass: the watermark at the end of the pass is the highest lastUpdated of the whole pass, and the
          next pass reads from it minus the overlap.
        - The result set moving under offset paging: each run's search is a new query, so only a change
          during a run's own paging can make it skip an entry. Within a run, an id read twice (the
          existing check) means its set moved: read again from where the run began. An entry changed
          after an earlier run of this pass read it (a new version whose previous version's lastUpdated
          lies in the part of the pass already read) may have moved while that run paged, sliding the
          next entry back past a page boundary; that entry's lastUpdated is after the changed entry's
          old one, so reading again from that old lastUpdated finds it.
        - The cap: a lastUpdated later than the start of the run that read it (a server clock ahead of
          ours, a bogus date) counts as that start, for the resume point as for the watermark: each run
          is a pass of its own as far as clocks go, and the watermark at the end is at most the start of
          the last run.
        - A pass whose re-read point is set is not finished even when its search reached the end."""
        if complete and self._reread_from is None:
            with self.state.transaction():
                if self._max_seen is not None:
                    self.state.set_watermark(_iso(self._max_seen))
                self.state.set_resume_point(None)
            return
        resume = self._run_since if complete else (self._run_max or self._run_since)
        if self._reread_from is not None:
            log.warning("an Observation changed while we paged: part of the window is read again",
                        extra={"event": "unstable-pass", "reread_from": _iso(self._reread_from)})
            resume = min(resume, self._reread_from)
        previous = self._resumed
        point = ResumePoint(search=search, since=_iso(self._pass_since), resume_at=_iso(resume),
                            max_seen=_iso(self._max_seen) if self._max_seen else None,
                            runs=(previous.runs if previous else 0) + 1,
                            started=previous.started if previous else _iso(self._run_started))
        with self.state.transaction():
            self.state.set_resume_point(point)
        self.summary.resume_at = point.resume_at

    def process_notified(self, observations: list[dict[str, Any]],
                         temperatures: list[dict[str, Any]] = ()) -> Summary:
        """Observations a Subscription notified (`serve`, CONTRACT §10): ledgered and written exactly as
        a page of a pass, so the next pass finds their versions processed and writes nothing twice; the
        notified temperatures go in as context, as the live-patient poll of a run would bring them (a fever
        escalates a live Flag). The watermark and the resume point stay: only a complete pass may move
        them, and a notification says nothing about what was missed before it."""
        started = time.monotonic()
        # A batch is not a pass: nothing here reads the pass bounds, they only keep _note_pass quiet.
        self._run_started = self.now()
        self._pass_since = self._run_since = self._run_started
        self.state.start_pass()
        self._process(observations, retry=False,
                      context=context_source.Found(resources=list(temperatures)) if temperatures else None)
        self.summary.watermark = self.state.watermark()
        self.summary.http_requests = self.client.request_count
        self.summary.duration_s = time.monotonic() - started
        return self.summary

    def execute_batches(self, pages: Iterable[source.Page]) -> Summary:
        """A backfill from another source (Bulk Data NDJSON): every page takes the same steps as a search
        page (ledger, quarantine, adoption, planning, one commit per page), so idempotence and crash
        safety are the same; like `run --since` it never moves the live watermark, and keeps no resume
        point (the rerun exports again and the ledger skips what was done). A stop (a signal) ends it at
        the same safe points as a pass."""
        started = time.monotonic()
        # Not a pass: nothing here reads the pass bounds, they only keep _note_pass quiet.
        self._run_started = self.now()
        self._pass_since = self._run_since = self._run_started
        self.state.start_pass()
        stopped_early = False
        try:
            self._retry_quarantine()
            self._retry_write_failures()
            stopped_early = self._read(pages, started)
        except Stopped:
            self.summary.stopped = True  # a wait on the server was given up; that page rolled back
        self.summary.complete = not stopped_early and not self.summary.stopped
        if self.summary.stopped:
            log.warning("stopped at a safe point", extra={
                "event": "stopped", "signal": getattr(self.stop, "signal_name", None)})
        self.summary.watermark = self.state.watermark()
        self.summary.http_requests = self.client.request_count
        self.summary.duration_s = time.monotonic() - started
        return self.summary

    def _retry_write_failures(self) -> None:
        self._failing = {f["patient_id"] for f in self.state.write_failures()}
        if self._failing:
            self._process([], retry=True, also_plan=sorted(self._failing))

    def _withdraw_deleted(self) -> None:
        """A hard-deleted Observation leaves no version for the poll to read: look for the evidence of
        what stands on the server, and withdraw what a deleted one caused, as for entered-in-error."""
        owners, sweep = self.state.live_evidence(_RISK_SWEEP)
        if not owners:
            return
        before = self.client.request_count
        try:
            gone = source.deleted(self.client, sorted(owners))
        except FhirError as exc:
            # Even after retries: a server that cannot answer this check must not also stop the poll
            # that brings new alerts. Nothing is withdrawn on a guess; the next run checks again.
            log.warning("could not check for deleted Observations; nothing withdrawn",
                        extra={"event": "evidence-check-failed", "error": str(exc)})
            return
        finally:
            self.summary.evidence_checked += len(owners)
            self.summary.evidence_requests += self.client.request_count - before
        if gone:
            self._process([], retry=True, deleted={i: owners[i] for i in gone})
        if sweep is not None:
            with self.state.transaction():
                self.state.set_evidence_sweep(sweep)

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
            # Temperatures are context, not counts: they go back through the context path.
            codes = set(self.mappings.context.temperature_codes)
            temperatures = [r for r in resources if extract.has_code(r, codes)]
            counts = [r for r in resources if not extract.has_code(r, codes)]
            self._process(counts, retry=True,
                          context=context_source.Found(resources=temperatures) if temperatures else None)

    def _process(self, observations: Iterable[dict[str, Any]], retry: bool,
                 also_plan: Iterable[str] = (), deleted: Mapping[str, set[str]] | None = None,
                 context: context_source.Found | None = None) -> None:
        """One batch outside the paged read (retries, notifications, deletions, context): the same steps
        in one transaction."""
        self._begin_batch(also_plan)
        with self.state.transaction():
            self._record_all(observations, retry)
            self._settle(deleted=deleted, context=context)
        crashpoints.reach("committed")

    def _begin_batch(self, also_plan: Iterable[str] = ()) -> None:
        self._now = _iso(self.now())
        self._touched: set[str] = set(also_plan)
        self._abnormal = set()  # patients with an abnormal count graded in this batch
        self._graded_at = {}
        self._groups: set[tuple[str, datetime]] = set()
        self._batch_max = None
        self._stored, self._facts = {}, {}  # nothing left from a batch whose planning was cut short

    def _record_all(self, observations: Iterable[dict[str, Any]], retry: bool) -> None:
        observations = list(observations)
        self._classified = []  # anything left by a batch that failed went with its rollback
        extracted = [self._extracted(resource) for resource in observations]
        read = [one.seen for one in extracted if one is not None]
        # The ledger rows in one statement, not one each (each is used once: an Observation twice in a
        # batch is looked up again, after its first version was recorded). Only what was extracted is
        # looked up: _record counts anything else as malformed before it asks.
        ids = list(dict.fromkeys([seen.observation_id for seen in read]))
        self._priors = dict.fromkeys(ids)
        self._priors.update(self.state.ledgers(ids))
        if not retry:
            self._note_pass(read)
        for resource, one in zip(observations, extracted):
            self._touched |= self._record(resource, one, retry, self._now, self._groups)
        self._write_classified()
        self._priors = {}
        self._ahead = {}

    def _write_classified(self) -> None:
        # The page's graded counts go to state in one statement at its end, not one each. Until then
        # they are not in the ledger: _record writes them first whenever it must read one back.
        self.state.record_classified_many(self._classified)
        self._classified = []

    def _settle(self, deleted: Mapping[str, set[str]] | None = None, context: context_source.Found | None = None,
                ahead: list[dict[str, Any]] = ()) -> None:
        """The end of a batch, inside its transaction: derive, read the context, adopt, plan and write.
        `ahead` (the next page, already read) is extracted while the writes are in flight."""
        now, touched, groups = self._now, self._touched, self._groups
        for observation_id, patients in sorted((deleted or {}).items()):
            touched |= self._record_deleted(observation_id, patients, now, groups)
        for patient_id, effective in sorted(groups):
            if self._derive(patient_id, effective, now):
                touched.add(patient_id)
        # Context facts commit with the writes they cause: a crash before the server accepted them
        # leaves the facts unread, so the rerun finds them new and plans the same writes again.
        if context is not None:
            touched |= self._record_context(context, now)
        around = self._context_needed()
        if around:
            found = self._read_context(around)
            if not found.complete:  # read again next run, around the same counts (_poll_context)
                self.state.add_context_pending(around)
            touched |= self._record_context(found, now)
        touched.discard("")
        crashpoints.reach("classified")
        self._adopt_flags(sorted(p for p in touched if p in self._abnormal))
        # Planned and sent a part at a time: what the run holds is one part's resources, however large the
        # batch, and the next part is planned (or, after the last, the next page extracted) while the
        # server works on this one. Parts are whole patients, so planning one never reads what another's
        # writes change; the batch still commits once, after the server accepted every part.
        parts = self._planned_parts(sorted(touched), ahead)
        part = next(parts, None)
        while part is not None:
            following: list[list[writeback.Planned] | None] = []
            self._write(part, now, lambda: following.append(next(parts, None)))
            part = following[0] if following else next(parts, None)  # the send failed before `meanwhile`

    def _planned_parts(self, patient_ids: list[str],
                       ahead: list[dict[str, Any]]) -> Iterator[list[writeback.Planned]]:
        part: list[writeback.Planned] = []
        for start in range(0, len(patient_ids), _PATIENTS_PER_READ):
            chunk = patient_ids[start:start + _PATIENTS_PER_READ]
            # What we wrote for them, then the stored counts and context of those that may need a write, in
            # one statement each instead of one per patient. Read before earlier parts' writes are
            # recorded, and still exact: planning and writing change only `written` rows (read again per
            # patient in _plan, once a write forgot them), never the counts or the context.
            self.state.read_written(chunk, self.output.resources)
            assessed = [p for p in chunk if self._may_change(p, self._previously(p))]
            self._stored = self.state.readings_of(assessed)
            self._facts = self.state.context_facts_of(assessed)
            for patient_id in chunk:
                part += self._plan(patient_id)
                if len(part) >= _WRITES_PER_PART:
                    yield part
                    part = []
        if part:
            yield part
        # Asked for the part after the last while that one is in flight: the next page's turn.
        self._ahead = {id(r): (r, self._extract(r)) for r in ahead}

    def _adopt_flags(self, patient_ids: list[str]) -> None:
        """Before a patient's first Flag is written, look on the server for Flags of ours that state does
        not know (state lost or restored from an old backup): they are adopted, so the episode keeps its
        Flag instead of getting a second one under a newly computed identifier."""
        if "Flag" not in self.output.resources:
            return
        self.state.read_written(patient_ids, ("Flag",))
        unknown = [p for p in patient_ids if not self.state.written(p, "Flag")]
        if unknown and self._flags_of_ours is None:
            self._flags_of_ours = self._any_flag_of_ours()
        if not self._flags_of_ours:
            return  # the server had no Flag of ours when this run began to need one: nothing to adopt
        for batch in source.url_batches(unknown, _ADOPT_BATCH, context_source.SUBJECT_CHARS, prefix="Patient/"):
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

    def _any_flag_of_ours(self) -> bool:
        """One request per run instead of one per 50 newly flagged patients: can the server hold a Flag of
        ours that this state does not know? It counts the Flags carrying our tag: none, or exactly as many
        as the state has recorded (every one it wrote or adopted, whatever their status), and no patient can
        have one the state does not know, for the rest of the run (the Flags this run writes are recorded as
        the server accepts them). So a first run, a backfill onto a server we never wrote to, and every run
        of an intact state need no lookups; a lost or restored state (the server holds more) still gets
        them. Anything but a clear answer means: look. (Equal counts could hide an unknown Flag only if
        someone also deleted one of ours from the server; the cost would be a second Flag, never a lost
        alert.)"""
        params = {"_tag": f"{self.output.system_base}/tag|anc-adapter", "_summary": "count", "_count": 1}
        try:
            bundle = self.client.get("Flag", params)
        except PermanentHttpError:
            return True
        if bundle.get("resourceType") != "Bundle":
            return True
        total = bundle.get("total")
        if isinstance(total, int) and not isinstance(total, bool):
            known = sum(n for key, n in self.state.written_counts().items() if key.startswith("Flag:"))
            return total != known
        entries = bundle.get("entry", [])  # no total: an empty searchset may leave `entry` out
        return not isinstance(entries, list) or bool(entries)

    def _previously(self, patient_id: str) -> dict[str, list[Written]]:
        return {kind: self.state.written(patient_id, kind) for kind in self.output.resources}

    def _may_change(self, patient_id: str, previously: dict[str, list[Written]]) -> bool:
        """False for a patient with only normal counts and nothing written before: nothing can change."""
        return any(previously.values()) or patient_id in self._abnormal \
            or self.output.risk_assessment_for_normal or patient_id in self._failing

    def _plan(self, patient_id: str) -> list[writeback.Planned]:
        previously = self._previously(patient_id)
        if not self._may_change(patient_id, previously):
            return []
        # Most patients planned have nothing written before: no earlier evidence to look up (below), nothing
        # to count as unchanged (after planning).
        written_before = any(previously.values())
        unread: frozenset[str] = frozenset()
        if written_before:
            evidence = {e for w in previously.get("Flag", []) for e in w.evidence}
            unread = frozenset(evidence - self.state.ledgered_ids(evidence))
        # Read with the other patients of its chunk (_planned_parts), else here.
        stored = self._stored.pop(patient_id, None)
        if stored is None:
            stored = self.state.readings(patient_id)
        facts = self._facts.pop(patient_id, None)
        if facts is None:
            facts = self.state.context_facts(patient_id)
        assessment = assess.assess(stored, context_extract.context(facts), self.rules)
        mine = writeback.plan_patient(patient_id, assessment, previously, self.output, unread)
        if written_before:
            rewritten = {(p.resource_type, p.identifier) for p in mine if p.send}
            self.summary.unchanged += sum(
                (kind, w.identifier) not in rewritten for kind, items in previously.items() for w in items
            )
        if not mine and patient_id in self._failing:  # nothing left to write: the failure is over
            self.state.clear_write_failure(patient_id)
            self._failing.discard(patient_id)
        return mine

    def _write(self, planned: list[writeback.Planned], now: str, meanwhile: Callable[[], None] = lambda: None) -> None:
        """Send these writes as one bundle (split only when larger than the server takes), doing `meanwhile`
        while it is in flight. If the server refuses it for good (a 4xx), send each
        patient's writes alone, so one patient the server will not accept (a merged Patient, a validator
        rule) does not stop every other patient's alerts; the refused ones are kept in state with the
        reason, shown by `status`, and tried again on every run."""
        to_send = [p for p in planned if p.send]
        refused: set[str] = set()
        try:
            results = self._send(to_send, meanwhile)
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
        # What the server accepted, then the bookkeeping (a Flag's evidence grew, its content did not), in
        # that order as before, in as few statements as the rows allow.
        self.state.record_written_many(
            [written for written, _ in results]
            + [p.written(None) for p in planned if not p.send and p.patient_id not in refused], now)
        for written, created in results:
            if written.patient_id in self._failing:
                self.state.clear_write_failure(written.patient_id)
                self._failing.discard(written.patient_id)
            if created:
                self.summary.created += 1
            else:
                self.summary.updated += 1

    def _send(self, to_send: list[writeback.Planned], meanwhile: Callable[[], None]) -> list[tuple[Written, bool]]:
        """Send, and do `meanwhile` (plan the next part, extract the next page) while the server works on
        the writes, so our CPU and the server's overlap instead of taking turns: nothing it does depends on
        whether the server accepts. What the send raises is raised here, after `meanwhile`. A sink that
        touches state (a dry run's review) sends first, in this thread."""
        if not to_send or not getattr(self.sink, "overlaps", False):
            results = self.sink.send(to_send) if to_send else []
            meanwhile()
            return results
        pending = in_background(self.sink.send, to_send)
        meanwhile()
        return pending.result()

    def _extract(self, resource: dict[str, Any]) -> extract.Extracted | None:
        return extract.observation(resource, self.mappings, self.config.poll.statuses, self.input_kinds)

    def _extracted(self, resource: dict[str, Any]) -> extract.Extracted | None:
        """What extract.observation makes of it: taken while the previous writes were in flight, or now."""
        early = self._ahead.pop(id(resource), None)
        return early[1] if early is not None and early[0] is resource else self._extract(resource)

    def _record(self, resource: dict[str, Any], extracted: extract.Extracted | None, retry: bool, now: str,
                groups: set[tuple[str, datetime]]) -> set[str]:
        """Ledger one Observation version; return the patients whose outputs may change (two when the
        lab moved the result to another patient). With derived ANC on, add the (patient, effective time)
        groups whose derivation may change."""
        if extracted is None:
            self.summary.malformed += 1
            return set()
        seen = extracted.seen
        if not retry:
            self.summary.observations_read += 1
        if seen.observation_id in self._priors:
            prior = self._priors.pop(seen.observation_id)
        else:  # read twice in this page (or not looked up with it): its first version may be unwritten
            self._write_classified()
            prior = self.state.ledger(seen.observation_id)
        if not retry and prior is not None and prior.covers(seen.version, seen.last_updated):
            self.summary.already_processed += 1
            return set()
        if not retry and prior is not None:
            self._note_changed(prior)
        # The patient it was filed to before must be re-planned too (a result moved to another patient).
        touched = {prior.patient_id} if prior is not None and prior.patient_id else set()
        outcome = extracted.outcome
        if self.input_kinds is not None:
            self._note_groups(seen.observation_id, prior, outcome, groups)
        if type(outcome) is Reading:  # nearly every one: asked first
            graded = self._classify(outcome)
            if type(graded) is Classification:
                self._classified.append((outcome, graded, now, seen.last_updated))
                self._graded(outcome.patient_id, graded, outcome.effective)
                if self.collect_rows:
                    self._row(outcome, graded)
                touched.add(outcome.patient_id)
                return touched
            outcome = graded
        elif isinstance(outcome, DeriveInput):
            self.state.record_input(outcome, seen.status, now)
            return touched
        elif outcome is None:
            withdrawn = seen.status in WITHDRAWN_STATUSES
            self.summary.withdrawn += withdrawn
            self.summary.ignored += not withdrawn
            self.state.record_outcome(seen.observation_id, seen.version, seen.status, seen.patient_id,
                                      "withdrawn" if withdrawn else "ignored", now, seen.last_updated)
            return touched
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

    def _record_deleted(self, observation_id: str, patients: set[str], now: str,
                        groups: set[tuple[str, datetime]]) -> set[str]:
        """Ledger an Observation the server no longer has as withdrawn; return the patients to re-plan:
        those whose resources cite it, and the one it was filed to."""
        prior = self.state.ledger(observation_id)
        touched = set(patients) | ({prior.patient_id} if prior is not None and prior.patient_id else set())
        if self.input_kinds is not None:
            self._note_groups(observation_id, prior, None, groups)  # before the input row goes
        # Never read by this state (evidence of an adopted Flag): no version, no lastUpdated, so the
        # resource created again under this id later is graded whatever its version.
        self.state.record_outcome(observation_id, prior.version if prior else "0", DELETED,
                                  prior.patient_id if prior else min(patients), "withdrawn", now,
                                  prior.last_updated if prior else "")
        self.summary.evidence_deleted += 1
        log.info("observation deleted on the server: what it caused is withdrawn",
                 extra={"event": "observation-deleted", "observation_id": observation_id})
        return touched

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
        self._graded(patient_id, result, effective)
        self._row(reading, result)
        return True

    def _context_needed(self) -> dict[str, datetime]:
        """The patients graded in this batch whose context can change what we write, each with its earliest
        count: one with an abnormal count, or with something of ours already written, or every one when
        normal counts get a RiskAssessment too. A patient with only normal counts and nothing written gets
        no write (`_plan`), and a later abnormal count reads its own context around itself."""
        if not self._graded_at or not self._context_wanted():
            return {}
        if not self.output.risk_assessment_for_normal:
            self.state.read_written([p for p in self._graded_at if p not in self._abnormal], self.output.resources)
        return {patient_id: effective for patient_id, effective in self._graded_at.items()
                if patient_id in self._abnormal or self.output.risk_assessment_for_normal
                or any(self.state.written(patient_id, kind) for kind in self.output.resources)}

    def _graded(self, patient_id: str, result: Classification, effective: datetime) -> None:
        self.summary.grades[result.grade._value_] += 1  # `_value_`: `.value` is a descriptor call per count
        earliest = self._graded_at.get(patient_id)
        if earliest is None or effective < earliest:
            self._graded_at[patient_id] = effective
        if result.grade.abnormal:
            self._abnormal.add(patient_id)

    # -- clinical context (CONTRACT §5b) -------------------------------------------------------------
    def _context_wanted(self) -> bool:
        switches = self.config.context
        return switches.febrile or switches.chemotherapy or (
            switches.duffy_null and bool(self.mappings.context.duffy_null_codes))

    def _poll_context(self, since: datetime) -> None:
        """A fever (or a withdrawal) that arrives after the count must reach the live Flag on the next
        run, though no new count brings the patient back. Each live run asks, for the patients with an
        active Flag only, what changed in their context since the last poll (`_lastUpdated`, with the
        usual overlap): bounded by live patients, not by the hospital's volume of vital signs."""
        if not self._context_wanted():
            return
        pending = self.state.context_pending()
        if pending:
            # A read around new counts that failed: the poll below asks only what changed since its
            # watermark, and would never bring back a temperature recorded before the count.
            again = self._read_context(dict(pending))
            self._process([], retry=True, context=again)
            if again.complete:
                with self.state.transaction():
                    self.state.clear_context_pending(sorted(pending))
        live = self.state.live_patients() if "Flag" in self.output.resources else self.state.open_episode_patients()
        watermark = self.state.context_watermark()
        polled_since = datetime.fromisoformat(watermark) - self.config.poll.overlap_delta if watermark else since
        found = context_source.Found()
        if live:
            found = self._read_context(dict.fromkeys(live), updated_since=polled_since)
            self._process([], retry=True, context=found)
        seen = extract.parse_datetime(found.max_last_updated)
        if found.complete and seen is not None:
            # The server's own clock, never past this pass's start (as for the main watermark).
            moved = min(seen, self._run_started)
            if watermark is None or moved > datetime.fromisoformat(watermark):
                with self.state.transaction():
                    self.state.set_context_watermark(_iso(moved))

    def _read_context(self, patients: dict[str, datetime | None],
                      updated_since: datetime | None = None) -> context_source.Found:
        if self._declared is None:
            try:
                statement = self.client.get("metadata")
                self._declared = context_source.searchable(statement)
                self._batch_reads = capability.declares_batch(statement)
            except PermanentHttpError as exc:
                log.warning("no CapabilityStatement: clinical context is not read",
                            extra={"event": "context-not-searchable", "error": str(exc)})
                self._declared = {}
        found = context_source.read(self.client, patients, self.mappings.context, self.config.context,
                                    self._declared, updated_since=updated_since, batched=self._batch_reads)
        if found.batch_refused:
            self._batch_reads = False
        for resource_type in sorted(found.undeclared - self._undeclared_said):
            self._undeclared_said.add(resource_type)
            log.warning("the server does not declare the search this context needs: not read",
                        extra={"event": "context-not-searchable", "resource_type": resource_type})
        return found

    def _record_context(self, found: context_source.Found, now: str) -> set[str]:
        """Store what changed; return the patients whose context changed."""
        touched: set[str] = set()
        for resource in found.resources:
            extracted = context_extract.fact(resource, self.mappings.context, self.config.poll.statuses,
                                             found.medications)
            if extracted is None:
                continue
            if isinstance(extracted, Quarantine):
                self._quarantine_context(resource, extracted, now)
                continue
            prior = self.state.context_fact(extracted.resource_type, extracted.resource_id)
            if prior is not None and (prior == extracted or _newer(prior.version, extracted.version)):
                continue
            self.state.record_context(extracted, now)
            touched |= {extracted.patient_id} | ({prior.patient_id} if prior is not None else set())
        return touched

    def _quarantine_context(self, resource: dict[str, Any], why: Quarantine, now: str) -> None:
        """A temperature we cannot read: quarantined like a count; an earlier readable version stays."""
        seen = extract.observation(resource, self.mappings, self.config.poll.statuses)
        if seen is None:
            return
        self.summary.quarantined += 1
        self.state.quarantine(seen.seen.observation_id, seen.seen.version, seen.seen.patient_id, why, resource,
                              now, keep_reading=True)
        log.info("temperature quarantined", extra={"event": "quarantined", "observation_id": seen.seen.observation_id,
                                                   "reason": why.reason.value})

    def _classify(self, reading: Reading) -> Classification | Quarantine:
        patient = self.patients.get(reading.patient_id)
        band = classify.patient_age_band(patient, reading.effective.date(), self.config.classify.pediatric,
                                         self.mappings.thresholds)
        lln = reading.lln_per_ul if reading.lln_per_ul is not None else self.config.classify.default_lln
        return self._grader.grade(reading.count, band, lln)

    @functools.cached_property
    def _grader(self) -> classify.Grader:
        # classify.classify for this run's profile and thresholds, which stay for its whole life.
        return classify.Grader(self.config.classify.profile, self.mappings.thresholds)

    def _note_pass(self, read: list[extract.Seen]) -> None:
        # An id read twice in one run's search means the result set changed under offset paging:
        # everything after its old place slid back, and an entry may have slid past a page boundary
        # unseen. The window this run searched is read again before the watermark may move. (The ids
        # live in a temporary SQLite table, not in our memory; a page's go in with one statement.)
        if self.state.any_seen_before_in_pass([seen.observation_id for seen in read]):
            self._reread(self._run_since)
        # Each distinct lastUpdated once: a page often repeats one (a server may stamp a whole
        # transaction, a bulk load, with the same instant).
        updated = extract.latest_datetime(dict.fromkeys(seen.last_updated for seen in read))
        if updated is None:
            return
        if updated > self._run_started:
            # Stamped after this run began (a clock ahead of ours, or a bogus date): a watermark there
            # would hide everything written before it, so it never moves past the run's start.
            updated = self._run_started
        self._batch_max = _later(self._batch_max, updated)

    def _note_changed(self, prior: Any) -> None:
        """A new version of an Observation this state had read. If its previous version lay in the part of
        this pass that earlier runs read, it may have moved while one of them paged (see _finish_live)."""
        if self._run_since <= self._pass_since:
            return  # the pass's first run: the check above covers it
        before = extract.parse_datetime(prior.last_updated)
        if before is None:  # not known (an older state row): the whole pass is read again
            self._reread(self._pass_since)
        elif self._pass_since <= before < self._run_since:
            self._reread(before)

    def _reread(self, moment: datetime) -> None:
        self._reread_from = moment if self._reread_from is None else min(self._reread_from, moment)

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


def _subject(resource: dict[str, Any]) -> Any:
    """The subject reference as the server wrote it: pages of one search spell it alike."""
    subject = resource.get("subject")
    return subject.get("reference") if isinstance(subject, dict) else None


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _newer(mine: str, theirs: str) -> bool:
    """Is the stored version newer than the one read? (A lagging replica can serve an old one.)"""
    return mine.isdigit() and theirs.isdigit() and int(mine) > int(theirs)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


