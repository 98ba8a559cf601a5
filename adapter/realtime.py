"""Subscription mode (CONTRACT §10): notified Observations through the same pipeline and ledger as `run`.

Flow: the notification endpoint (adapter/serve.py) checks the token, parses the body
(adapter/sources/notifications.py) and queues what it names, then answers 200 at once. One worker thread
collects a burst (until the queue has been quiet for a moment, for at most a second) and processes it as
one batch: id-only notifications are read back from the FHIR server with one `_id` search, then the state
lock is taken (never while a cron `run` holds it) and `Run.process_notified` ledgers, grades and writes.

Why answer before processing: a server's delivery threads are few (Sekmet: 4, 15 s timeout) and its
retries are few; holding them while we write would turn a slow FHIR write into failed deliveries, and
after its retries Sekmet (like HAPI) sets the Subscription to `error` and sends nothing more. The cost: a
notification queued when the process dies is not retried by the server. The cron pass is the safety net
for that, as for every notification lost or refused: it reads by `_lastUpdated` behind its watermark,
which notifications never move."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from adapter import extract
from adapter import state as state_module
from adapter import subscriptions
from adapter.config import Config
from adapter.errors import AdapterError, LockHeldError
from adapter.fhir.client import FhirClient
from adapter.mappings import Mappings
from adapter.model import Patient
from adapter.pipeline import Run, ServerSink
from adapter.sources.notifications import Notification
from adapter.state import State
from adapter.writeback import Output

log = logging.getLogger(__name__)

QUIET_S = 0.1  # a burst has ended when nothing arrived for this long...
MAX_WAIT_S = 1.0  # ...or this long after its first notification
MAX_BATCH = 500  # Observations per batch, whichever comes first
MAX_QUEUED = 20_000  # beyond this, notifications are left to the cron pass (memory stays bounded)
LOCK_WAIT_S = 5.0  # how long a batch waits for a cron run to release the state
_FETCH_CHUNK = 100  # ids per `_id` search (URL length)


@dataclass(frozen=True)
class Notified:
    subscription: str
    notification: Notification


class Batcher:
    """One worker thread: hands bursts of queued items to `handle` as lists. Generic and clock-free in
    its interface, so tests can drive it with a recording handler."""

    def __init__(self, handle: Callable[[list[Any]], None], quiet_s: float = QUIET_S,
                 max_wait_s: float = MAX_WAIT_S, max_batch: int = MAX_BATCH, max_queued: int = MAX_QUEUED):
        self.handle = handle
        self.quiet_s, self.max_wait_s, self.max_batch, self.max_queued = quiet_s, max_wait_s, max_batch, max_queued
        self._items: list[Any] = []
        self._last_added = 0.0
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="notified-batches", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, item: Any) -> bool:
        """False when the queue is full (the item is dropped: the cron pass will find it)."""
        with self._changed:
            if len(self._items) >= self.max_queued:
                return False
            self._items.append(item)
            self._last_added = time.monotonic()
            self._changed.notify()
            return True

    def stop(self, timeout_s: float = 60.0) -> None:
        """Process what is queued, then end the worker."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            batch = self._next()
            if batch is None:
                return
            try:
                self.handle(batch)
            except Exception as exc:  # a bug in one batch must not stop real time for good
                log.error("a notified batch failed; the cron pass will process it",
                          extra={"event": "notified-batch-error", "error_type": type(exc).__name__})

    def _next(self) -> list[Any] | None:
        with self._changed:
            while not self._items:
                if self._stopping:
                    return None
                self._changed.wait()
            first = time.monotonic()
            while not self._stopping and len(self._items) < self.max_batch:
                now = time.monotonic()
                remaining = min(self._last_added + self.quiet_s, first + self.max_wait_s) - now
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            batch, self._items = self._items[:self.max_batch], self._items[self.max_batch:]
            return batch


class Receiver:
    """What `serve` does with notifications: authenticate, queue, batch, process."""

    def __init__(self, config: Config, mappings: Mappings, client: FhirClient, output: Output,
                 tokens: dict[str, str], registry: CollectorRegistry):
        self.config, self.mappings, self.client, self.output = config, mappings, client, output
        self._tokens = {name: secret.encode() for name, secret in tokens.items()}
        self.notifications = Counter("anc_adapter_notifications", "Subscription notifications received, "
                                     "by subscription and type (or refusal)", ("subscription", "kind"),
                                     registry=registry)
        self.batches = Counter("anc_adapter_notified_batches", "Batches of notified Observations by outcome "
                               "(processed, deferred to the cron pass, failed)", ("outcome",), registry=registry)
        self.observations = Counter("anc_adapter_notified_observations",
                                    "Notified Observations by route (pipeline, temperature)", ("route",),
                                    registry=registry)
        self._graded = set(mappings.anc_codes) | set(mappings.input_kinds())
        self._temperature_codes = set(mappings.context.temperature_codes)
        self.batcher = Batcher(self.process)

    def known(self, name: str) -> bool:
        return name in self._tokens

    def authentic(self, name: str, authorization: str | None) -> bool:
        """The header the server sends back is exactly `Bearer <token>` (constant-time comparison)."""
        expected = b"Bearer " + self._tokens[name]
        return hmac.compare_digest((authorization or "").strip().encode(), expected)

    def accept(self, name: str, notification: Notification) -> bool:
        """Count it and queue its work; False when the queue is full."""
        self.notifications.labels(subscription=name, kind=notification.kind).inc()
        if not notification.work:
            return True
        return self.batcher.add(Notified(name, notification))

    def refused(self, name: str, why: str) -> None:
        self.notifications.labels(subscription=name, kind=why).inc()

    # -- one batch ---------------------------------------------------------------------------------
    def process(self, batch: list[Notified]) -> None:
        started = time.monotonic()
        before = self.client.request_count
        outcome, summary, graded, temperatures = "processed", {}, [], []
        try:
            observations = self._observations(batch)
        except AdapterError as exc:
            outcome = "failed"
            log.error("notified Observations could not be read; the cron pass will process them", extra={
                "event": "notified-failed", "error_type": type(exc).__name__, "error": str(exc)})
        else:
            # Temperatures are context (CONTRACT §5b: a fever escalates a live Flag); everything else (ANC,
            # derived-ANC inputs, and what the server sent that is neither) is graded, its extraction
            # deciding as in a pass. Both go through one pipeline batch under the state lock.
            temperatures = [o for o in observations if self._temperature(o)]
            graded = [o for o in observations if not self._temperature(o)]
            if graded or temperatures:
                outcome, summary = self._pipeline(graded, temperatures)
        self.batches.labels(outcome=outcome).inc()
        self.observations.labels(route="pipeline").inc(len(graded))
        log.info("notified batch", extra={
            "event": "notified-batch", "outcome": outcome, "notifications": len(batch),
            "observations": len(graded), "temperatures": len(temperatures),
            "http_requests": self.client.request_count - before,
            "duration_s": round(time.monotonic() - started, 3), "summary": summary})

    def _temperature(self, observation: dict[str, Any]) -> bool:
        codes = _codes(observation)
        return bool(codes & self._temperature_codes) and not codes & self._graded

    def _observations(self, batch: list[Notified]) -> list[dict[str, Any]]:
        """The notified Observations, one per id (the most recently updated when a burst names an id
        twice); id-only ones read from the FHIR server, which has the current version."""
        given: dict[str, dict[str, Any]] = {}
        wanted: list[str] = []
        for item in batch:
            for resource in item.notification.observations:
                known = given.get(resource["id"])
                if known is None or _updated(resource) >= _updated(known):
                    given[resource["id"]] = resource
            wanted += item.notification.observation_ids
        given.update(self._by_id("Observation", sorted(set(wanted) - set(given))))
        return list(given.values())

    def _patients(self, observations: list[dict[str, Any]]) -> dict[str, Patient]:
        """The batch's Patients in one search (a pass gets them _included with each page); any the search
        does not return are read one by one by the pipeline, as in a pass."""
        wanted = sorted({patient_id for o in observations if (patient_id := extract.patient_reference_id(o.get("subject")))})
        return {patient_id: patient for patient_id, resource in self._by_id("Patient", wanted).items()
                if (patient := extract.patient(resource))}

    def _by_id(self, resource_type: str, ids: list[str]) -> dict[str, dict[str, Any]]:
        """These resources by id, in `_id` searches of at most _FETCH_CHUNK ids; only what was asked for."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _FETCH_CHUNK):
            chunk = set(ids[start:start + _FETCH_CHUNK])
            params = {"_id": ",".join(sorted(chunk)), "_count": len(chunk)}
            for page in self.client.search(resource_type, params):
                for entry in page.get("entry") or []:
                    resource = entry.get("resource") if isinstance(entry, dict) else None
                    if isinstance(resource, dict) and resource.get("resourceType") == resource_type \
                            and resource.get("id") in chunk:
                        found[resource["id"]] = resource
        return found

    def _pipeline(self, observations: list[dict[str, Any]],
                  temperatures: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        path = state_module.where(self.config.state)  # a SQLite file or a postgresql:// URL
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                with state_module.locked(path):
                    state = State.open(path)
                    try:
                        run = Run(self.config, self.mappings, self.client, state,
                                  ServerSink(self.client, self.output, self.config.fhir.max_bundle_entries),
                                  self.output)
                        run.patients.add(self._patients(observations))
                        summary = run.process_notified(observations, temperatures)
                    finally:
                        state.db.close()
                    return "processed", _counts(summary.as_dict())
            except LockHeldError:
                if time.monotonic() >= deadline:
                    # A cron pass is running: it, or the one after it, reads these by _lastUpdated.
                    log.warning("the state stayed locked by a run; this batch is left to the cron pass",
                                extra={"event": "notified-deferred",
                                       "observations": len(observations) + len(temperatures)})
                    return "deferred", {}
                time.sleep(0.25)
            except AdapterError as exc:
                log.error("a notified batch could not be processed; the cron pass will", extra={
                    "event": "notified-failed", "error_type": type(exc).__name__, "error": str(exc)})
                return "failed", {}


def start(config: Config, mappings: Mappings, client: FhirClient, output: Output, state: State,
          public_url: str, registry: CollectorRegistry) -> Receiver:
    """Put our Subscriptions in place (tokens from the state) and start the batch worker."""
    tokens = {}
    system_base = config.output.system_base
    for spec in subscriptions.specs(mappings, config.classify.derive):
        tokens[spec.name] = subscriptions.token(state, spec.name)
        resource = subscriptions.build(spec, system_base, public_url, tokens[spec.name])
        action = subscriptions.ensure(client, resource)
        log.info("subscription in place", extra={
            "event": "subscription", "subscription": spec.name, "id": resource["id"], "action": action,
            "endpoint": resource["channel"]["endpoint"]})
    receiver = Receiver(config, mappings, client, output, tokens, registry)
    receiver.batcher.start()
    return receiver


def _codes(observation: dict[str, Any]) -> set[tuple[str, str]]:
    codings = (observation.get("code") or {}).get("coding") if isinstance(observation.get("code"), dict) else None
    return {(c.get("system"), c.get("code")) for c in codings or [] if isinstance(c, dict)}


def _updated(resource: dict[str, Any]) -> datetime:
    """meta.lastUpdated as an instant (offsets differ between notifications: text would misorder them);
    the earliest possible when absent or unreadable."""
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    return extract.parse_datetime(meta.get("lastUpdated")) or datetime.min.replace(tzinfo=timezone.utc)


def _counts(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("observations_read", "already_processed", "classified", "quarantined", "withdrawn", "ignored",
            "malformed", "created", "updated", "write_failures", "unchanged")
    return {key: summary[key] for key in keep if key in summary}
