"""The state contract (CONTRACT §7): watermark, ledger of Observation versions, what we wrote, quarantine,
runs. SQLite by default; PostgreSQL for `[state] url` (adapter.state_pg).

Every change is made inside `transaction()`; the pipeline opens one only after the server confirmed the
writes it records, so a crash at any point leaves state describing only what the server accepted.

The SQL here is written once, for both engines: SQLite's spelling (`?` placeholders, `BEGIN IMMEDIATE`,
TEXT/INTEGER/REAL columns) restricted to what PostgreSQL also speaks (`INSERT … ON CONFLICT (key) DO
UPDATE/NOTHING` via `_upsert`, never `INSERT OR REPLACE/IGNORE`; no `?` or `%` inside string literals);
adapter.state_pg translates the rest. Only PRAGMAs and the file handling below are SQLite's alone."""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import logging
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from math import copysign
from pathlib import Path
from typing import Any

from adapter import extract, state_pg
from adapter.errors import AdapterError, ConfigError, LockHeldError
from adapter.model import (
    AgeBand, Classification, Count, DeriveInput, Grade, InputKind, Quarantine, Reading,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 3: the quarantine keeps only what a retry reads (extract.kept_for_retry)
DELETED = "deleted"  # the ledger status of an Observation the server no longer has (hard-deleted)
_LIVE_RISK = ("SELECT identifier, patient_id, evidence FROM written WHERE resource_type = 'RiskAssessment'"
              " AND identifier {} ? AND status NOT IN ('entered-in-error', 'cancelled') ORDER BY identifier LIMIT ?")
# Adding to the state (both engines get it from these lines): a table goes into _SCHEMA as CREATE TABLE IF
# NOT EXISTS with TEXT / INTEGER / REAL columns and a PRIMARY KEY (it is then created on SQLite and
# PostgreSQL, in new and existing states, and copied for --dry-run); a column of an existing table goes
# into _ADDED_COLUMNS; a setting goes into meta with _set_meta / _meta. Writes use _upsert (never INSERT OR
# REPLACE/IGNORE) or plain INSERT / UPDATE / DELETE with ? placeholders; rows are read by column name.
# Tests that take the `state` fixture (tests/conftest.py) run on both engines.
# Columns added after version 1, added in place to an older state file (CREATE TABLE IF NOT EXISTS keeps
# an existing table as it was).
_ADDED_COLUMNS = (
    ("observations", "last_updated", "TEXT"),
    ("written", "evidence", "TEXT"),
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS observations (
    observation_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    status TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    outcome TEXT NOT NULL,              -- classified | quarantined | withdrawn | ignored | derive-input
                                        -- (withdrawn with status 'deleted': gone from the server)
    effective TEXT,
    anc_per_ul REAL,
    comparator TEXT,
    lln_per_ul REAL,
    grade TEXT,
    at_least INTEGER,
    age_band TEXT,
    notes TEXT,
    sources TEXT,                       -- JSON list of input Observation ids for a derived ANC
    processed_at TEXT NOT NULL,
    last_updated TEXT                   -- the server's meta.lastUpdated of this version
);
CREATE INDEX IF NOT EXISTS observations_patient ON observations (patient_id, outcome);
CREATE TABLE IF NOT EXISTS derive_inputs (
    observation_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    effective TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS derive_inputs_group ON derive_inputs (patient_id, effective);
CREATE TABLE IF NOT EXISTS quarantine (
    observation_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    resource TEXT NOT NULL              -- the Observation as read, so a mapping fix can retry it offline
);
CREATE TABLE IF NOT EXISTS written (
    resource_type TEXT NOT NULL,
    identifier TEXT NOT NULL,           -- identifier.value under our system for that resource type
    patient_id TEXT NOT NULL,
    status TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    server_id TEXT,
    evidence TEXT,                      -- Flag: JSON list of the episode's abnormal Observation ids
    updated_at TEXT NOT NULL,
    PRIMARY KEY (resource_type, identifier)
);
-- (patient_id, resource_type, identifier): the planner otherwise walks the primary key to satisfy the
-- ORDER BY and scans every row of the type (measured: 725 µs a call at 15k patients, now ~5 µs).
CREATE INDEX IF NOT EXISTS written_by_patient ON written (patient_id, resource_type, identifier);
CREATE TABLE IF NOT EXISTS write_failures (  -- patients whose writes the server refused (4xx)
    patient_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS context_facts (  -- clinical context read for graded patients (CONTRACT §5b)
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- temperature | chemotherapy | duffy-null | none (withdrawn, not ours)
    time TEXT,
    value REAL,                         -- a temperature in °C
    name TEXT,                          -- chemotherapy: its name; temperature: the value as recorded if not °C
    status TEXT NOT NULL,
    last_updated TEXT,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (resource_type, resource_id)
);
CREATE INDEX IF NOT EXISTS context_facts_patient ON context_facts (patient_id, kind);
CREATE TABLE IF NOT EXISTS context_pending (  -- patients whose context read around new counts failed
    patient_id TEXT PRIMARY KEY,
    around TEXT NOT NULL                -- the earliest count it was read around (ISO instant)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    mode TEXT NOT NULL,
    exit_code INTEGER,
    summary TEXT
);
"""
# Only in a dry run's review state (`run --dry-run`): what that run would have sent, for `report`. The live
# state never has this table, so nothing in it can be mistaken for a write the server accepted.
_REVIEW_SCHEMA = """
CREATE TABLE IF NOT EXISTS planned (
    run_id TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    identifier TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    action TEXT NOT NULL,               -- create | update | withdraw
    status TEXT NOT NULL,
    resource TEXT NOT NULL,             -- the validated resource the run would have sent
    planned_at TEXT NOT NULL,
    PRIMARY KEY (run_id, resource_type, identifier)
);
"""
# The columns of a graded reading: cleared when a version is recorded as anything else.
_READING_COLUMNS = ("effective", "anc_per_ul", "comparator", "lln_per_ul", "grade", "at_least", "age_band",
                    "notes", "sources")
# Every table of the state, in schema order: what a --dry-run copy of a PostgreSQL state takes along.
_TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))


@dataclass(frozen=True)
class Written:
    resource_type: str
    identifier: str
    patient_id: str
    status: str
    content_hash: str
    server_id: str | None
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContextFact:
    """One context resource version as extracted; kind "none" when it no longer counts (withdrawn,
    not done, not a code we know) so that it replaces what an earlier version said."""

    resource_type: str
    resource_id: str
    version: str
    patient_id: str
    kind: str
    status: str
    time: datetime | None = None
    value: float | None = None
    name: str = ""
    last_updated: str = ""


@dataclass(frozen=True, slots=True)
class Ledgered:
    version: str
    patient_id: str
    outcome: str
    effective: datetime | None
    last_updated: str
    derived: bool
    status: str = ""

    @property
    def deleted(self) -> bool:
        return self.outcome == "withdrawn" and self.status == DELETED

    def covers(self, version: str, last_updated: str) -> bool:
        """Have we already processed this version (or a newer one)? After a deletion, a resource created
        again under the same id may restart its version ids (a server that purged the old history): then
        only its lastUpdated tells it from a stale copy of what was deleted."""
        if self.deleted:
            mine, theirs = _parsed(self.last_updated), _parsed(last_updated)
            if mine is None or theirs is None:
                return self.version == version and self.last_updated == last_updated
            return theirs <= mine
        return self.version == version or self.newer_than(version, last_updated)

    def newer_than(self, version: str, last_updated: str) -> bool:
        """Is what we recorded newer than this version? (A lagging replica can serve an old one.)"""
        if self.version.isdigit() and version.isdigit():
            return int(self.version) > int(version)
        mine, theirs = _parsed(self.last_updated), _parsed(last_updated)
        return mine is not None and theirs is not None and mine > theirs


@dataclass(frozen=True)
class ResumePoint:
    """A live pass that a run stopped early (--max-duration, a signal, a page cap): the next run goes on
    from `resume_at` instead of the watermark. Why that is safe: pipeline.Run._finish_live."""

    search: str  # the searched codes: a pass searching for other codes starts again from the watermark
    since: str  # where the pass began (watermark − overlap, or now − lookback)
    resume_at: str  # the next run searches _lastUpdated=ge this
    max_seen: str | None  # highest lastUpdated read so far in the pass (capped): the watermark-to-be
    runs: int  # runs the pass has taken so far
    started: str  # our clock when its first run started


@dataclass(frozen=True)
class QuarantineEntry:
    observation_id: str
    version: str
    patient_id: str
    reason: str
    detail: str
    first_seen: str
    last_seen: str


class State:
    # written() answers kept for the open transaction: a page asks for each graded patient's resources
    # twice (whether its context is needed, then its plan), and every write to the table goes through
    # record_written, which forgets them. Only within a transaction, where the lock and BEGIN IMMEDIATE
    # leave this run the only writer; dropped at its end, whether it commits or rolls back.
    _written_memo: dict[tuple[str, str], list[Written]] | None = None
    # The graded rows the open transaction wrote, with the Reading and Classification each was written from.
    # Planning reads a batch's counts back right after recording them; a row read back that is still
    # exactly the row written gives back those objects instead of new ones built from it (readings_of).
    # Kept as record_classified_many got them (a list per call: nothing to do per count on a page that
    # plans no write), indexed by observation id when a plan first reads counts back. Bounded by what one
    # transaction records; dropped at its end.
    _graded_pending: list[tuple[tuple[tuple[Reading, Classification, str, str], ...], list[tuple[Any, ...]]]] | None = None
    _graded_memo: dict[str, tuple[tuple[Any, ...], tuple[Reading, Classification, str, str]]] | None = None

    def __init__(self, connection: sqlite3.Connection | state_pg.Connection):
        self.db = connection
        self.postgres = isinstance(connection, state_pg.Connection)
        if not self.postgres:
            self.db.row_factory = sqlite3.Row
        self.db.executescript(_SCHEMA)
        self._migrate()
        self._set_meta_default("schema_version", str(SCHEMA_VERSION))
        # Observation ids read in this pass (a temporary table: bounded memory, gone with the connection).
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS pass_ids (observation_id TEXT PRIMARY KEY)")

    def _migrate(self) -> None:
        before = self._meta("schema_version")
        for table, column, kind in _ADDED_COLUMNS:
            present = self.db.columns(table) if self.postgres else \
                {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if before is not None and int(before) < 3:
            self._strip_quarantined_resources()
        self._set_meta("schema_version", str(SCHEMA_VERSION))

    def _strip_quarantined_resources(self) -> None:
        """Before version 3 the quarantine kept whole Observations (names, notes): keep only what a retry
        reads, and leave no copy of the old text in free pages or in the WAL."""
        rows = self.db.execute("SELECT observation_id, resource FROM quarantine").fetchall()
        if not rows or self.postgres:  # PostgreSQL states began at version 3: nothing to strip
            return
        # The old bytes are zeroed, not just unlinked (many SQLite builds default to this; not all).
        secure_delete = self.db.execute("PRAGMA secure_delete").fetchone()[0]
        self.db.execute("PRAGMA secure_delete = ON")
        with self.transaction():
            for row in rows:
                kept = extract.kept_for_retry(json.loads(row["resource"]))
                self.db.execute("UPDATE quarantine SET resource = ? WHERE observation_id = ?",
                                (json.dumps(kept), row["observation_id"]))
        self.db.execute(f"PRAGMA secure_delete = {int(secure_delete)}")
        # Older frames in the WAL still hold the old pages: copy the new ones back and empty the WAL.
        busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:  # another connection is reading; the WAL is emptied when the last one closes
            log.warning("old quarantine text stays in the WAL until the last connection closes",
                        extra={"event": "state-wipe-deferred"})

    def start_pass(self) -> None:
        self.db.execute("DELETE FROM pass_ids")

    def seen_before_in_pass(self, observation_id: str) -> bool:
        """Record that this pass read the Observation; True when it had already read it."""
        return self.any_seen_before_in_pass([observation_id])

    def any_seen_before_in_pass(self, observation_ids: list[str]) -> bool:
        """Record that this pass read these Observations (a page); True when it had already read one of
        them, or reads one twice here. One statement per _IN_BATCH ids: the rows it did not insert were
        there before."""
        distinct = list(dict.fromkeys(observation_ids))
        again = len(distinct) < len(observation_ids)
        for ids in _chunks(distinct):
            cursor = self.db.execute(
                f"INSERT INTO pass_ids VALUES {', '.join(['(?)'] * len(ids))} ON CONFLICT DO NOTHING", ids)
            again |= cursor.rowcount < len(ids)
        return again

    @classmethod
    def open(cls, location: Path | str) -> State:
        """The state at a SQLite file path or a postgresql:// URL (see `where`)."""
        if state_pg.is_url(location):
            return cls(state_pg.connect(str(location)))
        path = Path(location)
        try:
            private_directory(path.parent)
            _create_private(path)
            _tighten(path)
            connection = sqlite3.connect(path, isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state.path: cannot open {path}: {exc}") from None
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # a committed ledger row must survive a power cut
        state = cls(connection)
        _tighten(path)  # -wal and -shm exist now; SQLite gave them the database file's mode
        return state

    @classmethod
    def open_readonly(cls, path: Path) -> State:
        """For `report`: reads only, takes no lock, creates and migrates nothing (a cron run may be
        writing; WAL gives each read transaction a consistent snapshot)."""
        if not path.is_file():
            raise ConfigError(f"state.path: {path} does not exist (no run has used it)")
        try:
            connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                         timeout=30)
            connection.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"state.path: cannot read {path}: {exc}") from None
        state = cls.__new__(cls)
        state.db = connection
        state.postgres = False
        state.db.row_factory = sqlite3.Row
        return state

    def review_copy(self, path: Path | None, run_id: str, started: str, since: str | None,
                    until: str | None) -> State:
        """--dry-run: a copy of this state in its own file (`0600`), for the run to work on and `report`
        to read afterwards. The live file is only read; an earlier review at `path` is replaced, so a
        review always starts from the live state as it is now. `path` None: in memory, kept nowhere."""
        if path is None:
            review = self.scratch_copy()
        else:
            live = None if self.postgres else self.db.execute("PRAGMA database_list").fetchone()["file"]
            if live and Path(live).resolve() == path.resolve():
                raise ConfigError("--review-state: must not be the live state file")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                    leftover.unlink(missing_ok=True)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                connection = sqlite3.connect(path, isolation_level=None, timeout=30)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"--review-state: cannot create {path}: {exc}") from None
            review = self._copy_into(connection)
        review.db.executescript(_REVIEW_SCHEMA)
        with review.transaction():
            for key, value in (("review_run_id", run_id), ("review_started", started),
                               ("review_since", since or ""), ("review_until", until or "")):
                review._set_meta(key, value)
        return review

    def scratch_copy(self) -> State:
        """An in-memory SQLite copy for --dry-run: the same run, nothing persisted."""
        return self._copy_into(sqlite3.connect(":memory:", isolation_level=None))

    def _copy_into(self, connection: sqlite3.Connection) -> State:
        """This state copied into an (empty) SQLite connection. A PostgreSQL state is copied table by table
        (the schema is the same), rather than run in a transaction rolled back at the end: the pipeline
        commits page by page, and a copy also keeps a dry run from holding row locks on the live state."""
        if not self.postgres:
            self.db.backup(connection)
            return State(connection)
        copy = State(connection)
        with copy.transaction():
            copy.db.execute("DELETE FROM meta")  # the copy's own schema_version gives way to the original's
            for table in _TABLES:
                rows = self.db.execute(f"SELECT * FROM {table}").fetchall()
                if rows:
                    columns = list(rows[0])
                    copy.db.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        [tuple(row[c] for c in columns) for row in rows])
        return copy

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        self._written_memo, self._graded_pending, self._graded_memo = {}, [], {}
        try:
            yield
        except BaseException:
            self._written_memo = self._graded_pending = self._graded_memo = None
            self.db.execute("ROLLBACK")
            raise
        self._written_memo = self._graded_pending = self._graded_memo = None
        self.db.execute("COMMIT")

    # -- watermark -------------------------------------------------------------------------------
    def watermark(self) -> str | None:
        return self._meta("watermark")

    def set_watermark(self, value: str) -> None:
        self._set_meta("watermark", value)

    def resume_point(self) -> ResumePoint | None:
        stored = self._meta("resume_point")
        return ResumePoint(**json.loads(stored)) if stored else None

    def set_resume_point(self, point: ResumePoint | None) -> None:
        if point is None:
            self.db.execute("DELETE FROM meta WHERE key = 'resume_point'")
        else:
            self._set_meta("resume_point", json.dumps(vars(point)))

    def context_watermark(self) -> str | None:
        """The server's lastUpdated up to which the context of live patients has been polled."""
        return self._meta("context_watermark")

    def set_context_watermark(self, value: str) -> None:
        self._set_meta("context_watermark", value)

    # -- ledger ----------------------------------------------------------------------------------
    def ledger(self, observation_id: str) -> Ledgered | None:
        """What we last recorded for this Observation."""
        row = self.db.execute(
            "SELECT version, patient_id, outcome, effective, last_updated, sources, status FROM observations"
            " WHERE observation_id = ?", (observation_id,)
        ).fetchone()
        return None if row is None else _ledgered(row)

    def ledgers(self, observation_ids: list[str]) -> dict[str, Ledgered]:
        """ledger() for a page of Observations at once: one statement per 500 ids instead of one each."""
        found: dict[str, Ledgered] = {}
        for ids in _chunks(observation_ids):
            for row in self.db.execute(
                "SELECT observation_id, version, patient_id, outcome, effective, last_updated, sources, status"
                f" FROM observations WHERE observation_id IN ({_marks(ids)})", ids
            ):
                found[row["observation_id"]] = _ledgered(row)
        return found

    def processed_version(self, observation_id: str) -> str | None:
        ledgered = self.ledger(observation_id)
        return ledgered.version if ledgered else None

    def ledgered_ids(self, observation_ids: set[str]) -> set[str]:
        """Which of these Observations this state has read at all."""
        if not observation_ids:
            return set()
        ids = sorted(observation_ids)
        rows = self.db.execute(
            f"SELECT observation_id FROM observations WHERE observation_id IN ({_marks(ids)})", ids
        ).fetchall()
        return {row["observation_id"] for row in rows}

    def live_evidence(self, risk_limit: int) -> tuple[dict[str, set[str]], str | None]:
        """The Observations behind what stands on the server, each with the patients whose resources cite
        it: the evidence of every active Flag, and of at most `risk_limit` live RiskAssessments. Those pile
        up with every abnormal count, so they are taken as a sweep in identifier order (the primary key:
        no scan), after the last ones taken, wrapping round. Returns the owners and the sweep position to
        store once the check is done (None when every live RiskAssessment fitted)."""
        flags = self.db.execute(
            "SELECT patient_id, evidence FROM written WHERE resource_type = 'Flag' AND status = 'active'"
        ).fetchall()
        after = self._meta("evidence_sweep") or ""
        risks = self.db.execute(_LIVE_RISK.format(">"), (after, risk_limit)).fetchall()
        if len(risks) < risk_limit:
            risks += self.db.execute(_LIVE_RISK.format("<="), (after, risk_limit - len(risks))).fetchall()
        owners: dict[str, set[str]] = {}
        for row in flags + risks:
            for cited in json.loads(row["evidence"] or "[]"):
                for observation_id in self._on_server(cited):
                    owners.setdefault(observation_id, set()).add(row["patient_id"])
        return owners, risks[-1]["identifier"] if len(risks) == risk_limit else None

    def _on_server(self, cited: str) -> list[str]:
        """The server's Observations behind an id our resources cite: a derived count's sources (a Flag
        cites it by its own key, which no server has); nothing when it is already known deleted (a
        patient whose withdrawal the server refused is retried as a write failure) or is a derived count
        already withdrawn."""
        row = self.db.execute("SELECT outcome, status, sources FROM observations WHERE observation_id = ?",
                              (cited,)).fetchone()
        if row is None:
            return [cited]  # evidence of an adopted Flag, not read yet
        if row["outcome"] == "withdrawn" and row["status"] in (DELETED, "superseded"):
            return []
        return json.loads(row["sources"] or "[]") or [cited]

    def set_evidence_sweep(self, position: str) -> None:
        self._set_meta("evidence_sweep", position)

    def record_classified(self, reading: Reading, result: Classification, now: str,
                          last_updated: str = "") -> None:
        self.record_classified_many([(reading, result, now, last_updated)])

    def record_classified_many(self, graded: list[tuple[Reading, Classification, str, str]]) -> None:
        """record_classified for a page of counts (reading, result, now, last_updated): a few multi-row
        statements instead of two per count. The caller keeps read-after-write exact: a row not written
        yet is not in ledger()."""
        # Unpacked here, not called with *row: a call with * is not inlined by the interpreter (3.11).
        rows = [_classified_row(reading, result, now, last_updated) for reading, result, now, last_updated in graded]
        if self._graded_pending is not None:
            self._graded_pending.append((tuple(graded), rows))  # a copy: the caller may reuse its list
        self._upsert_rows(_record_classified_sql, rows, 1, _ROWS_PER_INSERT)
        ids = [row[0] for row in rows]
        for chunk in _chunks(ids):
            self.db.execute(f"DELETE FROM quarantine WHERE observation_id IN ({_marks(chunk)})", chunk)

    def record_outcome(self, observation_id: str, version: str, status: str, patient_id: str,
                       outcome: str, now: str, last_updated: str = "") -> None:
        """A version that is not (or no longer) a usable reading: quarantined, withdrawn or ignored."""
        self._upsert("observations", ("observation_id",), {
            "observation_id": observation_id, "version": version, "status": status, "patient_id": patient_id,
            "outcome": outcome, "processed_at": now, "last_updated": last_updated,
            # A replaced row keeps nothing of an earlier graded version (as INSERT OR REPLACE did).
            **dict.fromkeys(_READING_COLUMNS),
        })
        if outcome != "quarantined":
            self.db.execute("DELETE FROM quarantine WHERE observation_id = ?", (observation_id,))
        if outcome != "derive-input":
            self.db.execute("DELETE FROM derive_inputs WHERE observation_id = ?", (observation_id,))

    def record_input(self, item: DeriveInput, status: str, now: str) -> None:
        self.record_outcome(item.observation_id, item.version, status, item.patient_id, "derive-input", now)
        self._upsert("derive_inputs", ("observation_id",), {
            "observation_id": item.observation_id, "version": item.version, "patient_id": item.patient_id,
            "effective": _utc(item.effective), "kind": item.kind.value, "value": item.value,
        })

    def input_group(self, observation_id: str) -> tuple[str, datetime] | None:
        """(patient, effective) of a stored derive input, so withdrawing it re-derives its group."""
        row = self.db.execute(
            "SELECT patient_id, effective FROM derive_inputs WHERE observation_id = ?", (observation_id,)
        ).fetchone()
        return (row["patient_id"], datetime.fromisoformat(row["effective"])) if row else None

    def inputs(self, patient_id: str, effective: datetime) -> list[DeriveInput]:
        rows = self.db.execute(
            "SELECT * FROM derive_inputs WHERE patient_id = ? AND effective = ? ORDER BY observation_id",
            (patient_id, _utc(effective)),
        ).fetchall()
        return [
            DeriveInput(row["observation_id"], row["version"], row["patient_id"],
                        datetime.fromisoformat(row["effective"]), InputKind(row["kind"]), row["value"])
            for row in rows
        ]

    def measured_at(self, patient_id: str, effective: datetime) -> bool:
        """Is there a measured (not derived) ANC for this patient at this instant (whatever the offset)?"""
        rows = self.db.execute(
            "SELECT effective FROM observations WHERE patient_id = ? AND outcome = 'classified'"
            " AND (sources IS NULL OR sources = '[]')",
            (patient_id,),
        ).fetchall()
        return any(datetime.fromisoformat(row["effective"]) == effective for row in rows)

    def readings(self, patient_id: str) -> list[tuple[Reading, Classification]]:
        return self.readings_of([patient_id])[patient_id]

    def readings_of(self, patient_ids: list[str]) -> dict[str, list[tuple[Reading, Classification]]]:
        """readings() for many patients at once (each in no particular order): one statement per 500
        patients instead of one each, for planning a part of a batch."""
        found: dict[str, list[tuple[Reading, Classification]]] = {patient_id: [] for patient_id in patient_ids}
        if not patient_ids:  # a part whose patients need no plan (all normal): leave the memo as it is
            return found
        memo = self._recorded()
        for ids in _chunks(patient_ids):
            for row in self._tuples(_SELECT_READINGS + f" AND patient_id IN ({_marks(ids)})", ids):
                # Written by this transaction and unchanged since (every column it is built from compares
                # equal, so a later write of any kind, or a rollback, falls back to building it), and
                # built again exactly by the row: the objects it was written from. Checked here, for the
                # rows read back, not for every row written (most are never read back).
                recorded = memo.pop(row[0], None)
                if recorded is not None and recorded[0][:_READ_BACK] == row and _reads_back_alike(recorded[1][0]):
                    graded = recorded[1][:2]
                else:
                    graded = _reading_row(row)
                found[row[3]].append(graded)  # row[3]: the patient_id column
        return found

    def _recorded(self) -> dict[str, tuple[tuple[Any, ...], tuple[Reading, Classification, str, str]]]:
        """The graded rows this transaction wrote and no plan read back yet, each with what it was written
        from, by observation id (a later write of the same id replaces an earlier one, as in the table)."""
        memo, pending = self._graded_memo, self._graded_pending
        if memo is None or pending is None:
            return {}
        for graded, rows in pending:
            memo.update(zip([row[0] for row in rows], zip(rows, graded)))
        pending.clear()
        return memo

    def _tuples(self, sql: str, parameters: list[Any]) -> Iterator[tuple[Any, ...]]:
        """The rows of a query as plain tuples, in the order it names the columns."""
        if self.postgres:
            return (tuple(row.values()) for row in self.db.execute(sql, parameters))
        cursor = self.db.cursor()
        cursor.row_factory = None
        return cursor.execute(sql, parameters)

    def counts_by_outcome(self) -> dict[str, int]:
        rows = self.db.execute("SELECT outcome, count(*) AS n FROM observations GROUP BY outcome")
        return {row["outcome"]: row["n"] for row in rows}

    # -- quarantine ------------------------------------------------------------------------------
    def quarantine(self, observation_id: str, version: str, patient_id: str, why: Quarantine,
                   resource: dict[str, Any], now: str, keep_reading: bool = False) -> None:
        """Quarantine this version, keeping of the resource only what a retry reads (no names, no free
        text: see extract.kept_for_retry). keep_reading: an earlier version was graded and stays in effect until
        this one can be graded (a unit spelling must not retract a live alert)."""
        self.db.execute(
            "INSERT INTO quarantine VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (observation_id) DO UPDATE SET"
            " version = excluded.version, reason = excluded.reason, detail = excluded.detail,"
            " patient_id = excluded.patient_id, last_seen = excluded.last_seen, resource = excluded.resource",
            (observation_id, version, patient_id, why.reason.value, why.detail, now, now,
             json.dumps(extract.kept_for_retry(resource))),
        )
        if not keep_reading:
            self.record_outcome(observation_id, version, str(resource.get("status", "")), patient_id,
                                "quarantined", now)

    def quarantined(self, ids: list[str] | None = None) -> list[QuarantineEntry]:
        rows = self.db.execute(
            "SELECT observation_id, version, patient_id, reason, detail, first_seen, last_seen"
            " FROM quarantine ORDER BY first_seen, observation_id"
        ).fetchall()
        entries = [QuarantineEntry(**dict(row)) for row in rows]
        return [e for e in entries if ids is None or e.observation_id in ids]

    def quarantined_resources(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT resource FROM quarantine ORDER BY observation_id").fetchall()
        return [json.loads(row["resource"]) for row in rows]

    def discard_quarantined(self, observation_id: str, now: str) -> bool:
        """Give up on a quarantined version. If an earlier graded version was kept in effect, it stays
        (discarding the unreadable amendment must not silently drop a live alert's evidence)."""
        row = self.db.execute(
            "SELECT version, patient_id FROM quarantine WHERE observation_id = ?", (observation_id,)
        ).fetchone()
        if row is None:
            return False
        ledgered = self.ledger(observation_id)
        if ledgered is not None and ledgered.outcome == "classified":
            self.db.execute("DELETE FROM quarantine WHERE observation_id = ?", (observation_id,))
        else:
            self.record_outcome(observation_id, row["version"], "discarded", row["patient_id"], "ignored", now)
        return True

    # -- clinical context ------------------------------------------------------------------------
    def context_fact(self, resource_type: str, resource_id: str) -> ContextFact | None:
        row = self.db.execute("SELECT * FROM context_facts WHERE resource_type = ? AND resource_id = ?",
                              (resource_type, resource_id)).fetchone()
        return _fact_row(row) if row else None

    def record_context(self, fact: ContextFact, now: str) -> None:
        self._upsert("context_facts", ("resource_type", "resource_id"), {
            "resource_type": fact.resource_type, "resource_id": fact.resource_id, "version": fact.version,
            "patient_id": fact.patient_id, "kind": fact.kind, "time": fact.time.isoformat() if fact.time else None,
            "value": fact.value, "name": fact.name, "status": fact.status, "last_updated": fact.last_updated,
            "processed_at": now,
        })
        if fact.resource_type == "Observation":
            self.db.execute("DELETE FROM quarantine WHERE observation_id = ?", (fact.resource_id,))

    def context_facts(self, patient_id: str) -> list[ContextFact]:
        """The facts that count for this patient (kind other than "none")."""
        return self.context_facts_of([patient_id])[patient_id]

    def context_facts_of(self, patient_ids: list[str]) -> dict[str, list[ContextFact]]:
        """context_facts() for many patients at once, each patient's in the same order."""
        found: dict[str, list[ContextFact]] = {patient_id: [] for patient_id in patient_ids}
        for ids in _chunks(patient_ids):
            for row in self.db.execute(
                f"SELECT * FROM context_facts WHERE patient_id IN ({_marks(ids)})"
                " AND kind != 'none' ORDER BY patient_id, resource_type, resource_id", ids
            ):
                found[row["patient_id"]].append(_fact_row(row))
        return found

    def context_pending(self) -> dict[str, datetime]:
        """Patients whose context read around new counts was incomplete (a search refused or down): read
        again, around the same counts, until a read is complete — the incremental poll alone would never
        bring back a temperature recorded before it."""
        rows = self.db.execute("SELECT patient_id, around FROM context_pending ORDER BY patient_id").fetchall()
        return {row["patient_id"]: datetime.fromisoformat(row["around"]) for row in rows}

    def add_context_pending(self, patients: dict[str, datetime]) -> None:
        known = self.context_pending()
        for patient_id, around in patients.items():
            earliest = min(around, known[patient_id]) if patient_id in known else around
            self._upsert("context_pending", ("patient_id",), {"patient_id": patient_id,
                                                              "around": earliest.isoformat()})

    def clear_context_pending(self, patient_ids: list[str]) -> None:
        for patient_id in patient_ids:
            self.db.execute("DELETE FROM context_pending WHERE patient_id = ?", (patient_id,))

    def live_patients(self) -> list[str]:
        """Patients with an active Flag of ours: those whose context is polled on every live run."""
        rows = self.db.execute(
            "SELECT DISTINCT patient_id FROM written WHERE resource_type = 'Flag' AND status = 'active'"
            " ORDER BY patient_id"
        ).fetchall()
        return [row["patient_id"] for row in rows]

    def open_episode_patients(self) -> list[str]:
        """Patients whose latest graded count is abnormal (for outputs without a Flag)."""
        latest: dict[str, tuple[datetime, str]] = {}
        for row in self.db.execute(
            "SELECT patient_id, effective, grade FROM observations WHERE outcome = 'classified'"
        ):
            effective = datetime.fromisoformat(row["effective"])
            if row["patient_id"] not in latest or effective > latest[row["patient_id"]][0]:
                latest[row["patient_id"]] = (effective, row["grade"])
        return sorted(p for p, (_, grade) in latest.items() if grade not in (Grade.NORMAL.value, Grade.CTCAE_0.value))

    # -- what we wrote ---------------------------------------------------------------------------
    def written(self, patient_id: str, resource_type: str) -> list[Written]:
        memo = self._written_memo
        found = memo.get((patient_id, resource_type)) if memo is not None else None
        if found is not None:
            return list(found)
        rows = self.db.execute(
            "SELECT * FROM written WHERE patient_id = ? AND resource_type = ? ORDER BY identifier",
            (patient_id, resource_type),
        ).fetchall()
        found = [_written_row(row) for row in rows]
        if memo is not None:
            memo[patient_id, resource_type] = found
        return list(found)

    def read_written(self, patient_ids: list[str], resource_types: tuple[str, ...]) -> None:
        """Have written() answer for these patients and types from what one statement per 500 patients
        reads, instead of one statement per patient and type (a batch asks for each of its patients).
        Only within a transaction, where its answers are kept; until a write forgets them."""
        memo = self._written_memo
        if memo is None or not resource_types:
            return
        kinds = list(resource_types)
        # One comprehension over every (patient, type), not a generator per patient (a µs each, most of this
        # when the answers are known already).
        unknown = {p for kind in kinds for p in patient_ids if (p, kind) not in memo}
        wanted = [p for p in dict.fromkeys(patient_ids) if p in unknown]
        for ids in _chunks(wanted, _IN_BATCH - len(kinds)):
            found: dict[tuple[str, str], list[Written]] = {(p, kind): [] for p in ids for kind in kinds}
            # Each list in identifier order, as written() has it. Ordered as the written_by_patient index is, so
            # SQLite takes that index: ordered by identifier alone, it walked the primary key instead, every
            # row of those types for every statement.
            for row in self.db.execute(
                f"SELECT * FROM written WHERE patient_id IN ({_marks(ids)}) AND resource_type IN ({_marks(kinds)})"
                " ORDER BY patient_id, resource_type, identifier", ids + kinds
            ):
                found[row["patient_id"], row["resource_type"]].append(_written_row(row))
            memo.update(found)

    def record_written(self, item: Written, now: str) -> None:
        self.record_written_many([item], now)

    def record_written_many(self, items: list[Written], now: str) -> None:
        """record_written for each of `items`, in order: a few multi-row statements instead of one for each
        write the server accepted (one each was about 7 µs a write)."""
        if not items:
            return
        if self._written_memo:
            self._written_memo.clear()  # a row may also leave another patient's list (a re-filed id)
        rows = [(item.resource_type, item.identifier, item.patient_id, item.status, item.content_hash,
                 item.server_id, _to_json(item.evidence), now) for item in items]
        self._upsert_rows(_record_written_sql, rows, 2, _WRITTEN_ROWS_PER_INSERT)

    def _upsert_rows(self, sql: Callable[[int], str], rows: list[tuple[Any, ...]], key_columns: int,
                     per_statement: int) -> None:
        """Upsert `rows` (their key: the first `key_columns` values), in order, in statements of up to
        `per_statement` rows; one statement a row when a key repeats, since one statement may not upsert a
        row twice (PostgreSQL refuses it)."""
        if len({row[:key_columns] for row in rows}) < len(rows):
            for row in rows:
                self.db.execute(sql(1), row)
            return
        for chunk in _chunks(rows, per_statement):
            # Flattened in C: a comprehension over every value cost half a µs per count.
            self.db.execute(sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))

    def written_counts(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT resource_type || ':' || status AS k, count(*) AS n FROM written GROUP BY k"
        )
        return {row["k"]: row["n"] for row in rows}

    # -- writes the server refused ----------------------------------------------------------------
    def record_write_failure(self, patient_id: str, reason: str, now: str) -> None:
        self.db.execute(
            "INSERT INTO write_failures VALUES (?,?,?,?) ON CONFLICT (patient_id) DO UPDATE SET"
            " reason = excluded.reason, last_seen = excluded.last_seen",
            (patient_id, reason, now, now),
        )

    def clear_write_failure(self, patient_id: str) -> None:
        self.db.execute("DELETE FROM write_failures WHERE patient_id = ?", (patient_id,))

    def write_failures(self) -> list[dict[str, str]]:
        rows = self.db.execute("SELECT * FROM write_failures ORDER BY first_seen, patient_id").fetchall()
        return [dict(row) for row in rows]

    # -- settings fixed at first use -------------------------------------------------------------
    def pinned(self, key: str, value: str) -> str:
        """The value stored under `key`, storing `value` first if there is none."""
        with self.transaction():
            self._set_meta_default(key, value)
        return self._meta(key) or value

    # -- runs ------------------------------------------------------------------------------------
    def start_run(self, run_id: str, started: str, mode: str) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO runs (run_id, started, mode) VALUES (?,?,?)", (run_id, started, mode))

    def finish_run(self, run_id: str, finished: str, exit_code: int, summary: dict[str, Any]) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE runs SET finished = ?, exit_code = ?, summary = ? WHERE run_id = ?",
                (finished, exit_code, json.dumps(summary), run_id),
            )

    def last_success(self) -> str | None:
        row = self.db.execute(
            "SELECT max(finished) AS f FROM runs WHERE exit_code = 0 AND mode != 'dry-run'"
        ).fetchone()
        return row["f"] if row else None

    def last_runs(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,)
        ).fetchall()
        return [{**dict(row), "summary": json.loads(row["summary"] or "null")} for row in rows]

    # -- review (a dry run's plans; what `report` reads) --------------------------------------------
    def record_planned(self, run_id: str, item: Written, resource: dict[str, Any], now: str) -> str:
        """Record a write a dry run would send; return its action (create, update or withdraw)."""
        known = self.db.execute(
            "SELECT 1 FROM written WHERE resource_type = ? AND identifier = ?", (item.resource_type, item.identifier)
        ).fetchone()
        action = "withdraw" if item.status == "entered-in-error" else "update" if known else "create"
        # A resource planned twice in one run (two pages of one patient) keeps its first action: the
        # server would have seen a create, then an update of what was just created.
        self.db.execute(
            "INSERT INTO planned VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (run_id, resource_type, identifier)"
            " DO UPDATE SET status = excluded.status, resource = excluded.resource,"
            " planned_at = excluded.planned_at,"
            " action = CASE WHEN excluded.action = 'withdraw' THEN 'withdraw' ELSE planned.action END",
            (run_id, item.resource_type, item.identifier, item.patient_id, action, item.status,
             json.dumps(resource, ensure_ascii=False), now),
        )
        return action

    def planned(self) -> list[dict[str, Any]]:
        """A review state's planned writes (none in a live state)."""
        if not self._has_table("planned"):
            return []
        rows = self.db.execute("SELECT * FROM planned ORDER BY patient_id, resource_type, identifier").fetchall()
        return [{**dict(row), "resource": json.loads(row["resource"])} for row in rows]

    def review(self) -> dict[str, str] | None:
        """Which dry run this review state holds (None for a live state)."""
        run_id = self._meta("review_run_id")
        if run_id is None:
            return None
        return {key: self._meta(f"review_{key}") or "" for key in ("run_id", "started", "since", "until")}

    def all_readings(self) -> list[tuple[Reading, Classification]]:
        return [_reading_row(row) for row in self._tuples(_SELECT_READINGS, [])]

    def all_written(self) -> list[tuple[Written, str]]:
        """Every resource we wrote (or, in a review state, would write), with when it was recorded."""
        rows = self.db.execute("SELECT * FROM written ORDER BY patient_id, resource_type, identifier").fetchall()
        return [
            (Written(row["resource_type"], row["identifier"], row["patient_id"], row["status"],
                     row["content_hash"], row["server_id"], _json_list(row["evidence"])),
             row["updated_at"])
            for row in rows
        ]

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY started, run_id").fetchall()
        return [{**dict(row), "summary": json.loads(row["summary"] or "null")} for row in rows]

    def quarantined_effective(self) -> dict[str, str]:
        """Observation id -> the effective time of the quarantined version, where it has one."""
        found = {}
        for resource in self.quarantined_resources():
            period = resource.get("effectivePeriod")
            effective = resource.get("effectiveDateTime") or resource.get("effectiveInstant") \
                or (period.get("start") if isinstance(period, dict) else None)
            if isinstance(effective, str) and isinstance(resource.get("id"), str):
                found[resource["id"]] = effective
        return found

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (name,)).fetchone() is not None

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def _set_meta_default(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))

    def _set_meta(self, key: str, value: str) -> None:
        self._upsert("meta", ("key",), {"key": key, "value": value})

    def _upsert(self, table: str, key: tuple[str, ...], row: dict[str, Any]) -> None:
        """Insert `row`, or overwrite the columns it names in the row with the same `key`: the portable
        form of INSERT OR REPLACE (give every column, None for those to clear, for a whole new row)."""
        self.db.execute(_upsert_sql(table, key, tuple(row)), tuple(row.values()))


def where(config: Any) -> Path | str:
    """The state a `[state]` config names: its postgresql:// URL, else its SQLite file path."""
    return config.url or Path(config.path)


@functools.lru_cache(maxsize=128)
def _upsert_sql(table: str, key: tuple[str, ...], columns: tuple[str, ...], rows: int = 1) -> str:
    # Built once per statement shape: record_classified runs once per Observation read. `rows` rows in
    # one statement (their keys must differ).
    changes = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    values = ", ".join([f"({', '.join('?' * len(columns))})"] * rows)
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}"
            f" ON CONFLICT ({', '.join(key)}) DO " + (f"UPDATE SET {changes}" if changes else "NOTHING"))


_WRITTEN_COLUMNS = ("resource_type", "identifier", "patient_id", "status", "content_hash", "server_id", "evidence",
                    "updated_at")


def _record_written_sql(rows: int) -> str:
    return _upsert_sql("written", ("resource_type", "identifier"), _WRITTEN_COLUMNS, rows)


_CLASSIFIED_COLUMNS = (
    "observation_id", "version", "status", "patient_id", "outcome", "effective", "anc_per_ul", "comparator",
    "lln_per_ul", "grade", "at_least", "age_band", "notes", "sources", "processed_at", "last_updated")


@functools.lru_cache(maxsize=None)
def _record_classified_sql(rows: int) -> str:
    # At most _ROWS_PER_INSERT texts, each a few kB: built once, and the same string object each time, whose
    # hash the statement cache then finds already computed.
    return _upsert_sql("observations", ("observation_id",), _CLASSIFIED_COLUMNS, rows)


def _classified_row(reading: Reading, result: Classification, now: str, last_updated: str) -> tuple[Any, ...]:
    # Once per Observation read: the row is a plain tuple, and the enums give their plain `_value_`
    # (`.value` is a descriptor call, a quarter µs each).
    count = reading.count
    return (
        reading.observation_id, reading.version, reading.status, reading.patient_id, "classified",
        _instant_text(reading.effective), count.anc_per_ul, count.comparator, reading.lln_per_ul,
        result.grade._value_, int(result.at_least), result.age_band._value_,
        _to_json(result.notes) if result.notes else "[]", _to_json(reading.sources) if reading.sources else "[]",
        now, last_updated,
    )


def _instant_text(moment: datetime) -> str:
    """moment.isoformat(). Once per count written, and for nearly all of them a whole-second UTC instant,
    which extract.utc_text puts together from its parts in half the time isoformat() takes."""
    text = extract.utc_text(moment)
    return moment.isoformat() if text is None else text + "+00:00"


@contextmanager
def locked(location: Path | str) -> Iterator[None]:
    """One run at a time per state (CONTRACT §7); a second run fails at once with exit 5. SQLite: fcntl on
    a lock file beside the state; PostgreSQL: an advisory lock (adapter.state_pg)."""
    if state_pg.is_url(location):
        with state_pg.advisory_lock(str(location)):
            yield
        return
    path = Path(location)
    lock_path = path.with_name(path.name + ".lock")
    try:
        private_directory(lock_path.parent)
        _create_private(lock_path)
        handle = os.open(lock_path, os.O_RDWR)
    except OSError as exc:
        raise ConfigError(f"state.path: cannot create the lock file {lock_path}: {exc}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(f"another run holds the lock on {path}; nothing was done") from None
        yield
    finally:
        os.close(handle)


def backup(location: str, destination: Path, replace: bool = False) -> int:
    """`anc-adapter state backup`: a consistent copy of the state, taken while runs go on; its size in
    bytes. Only SQLite today; a PostgreSQL state has its own tool."""
    if location.startswith(("postgresql://", "postgres://")):
        raise ConfigError("state backup: a PostgreSQL state is backed up with pg_dump "
                          "(e.g. pg_dump --format=custom --file BACKUP DBNAME), not by the adapter")
    return _backup_sqlite(Path(location), destination, replace)


def _backup_sqlite(source: Path, destination: Path, replace: bool) -> int:
    """SQLite's online backup, through a read-only connection of its own: a run in progress keeps its
    lock and its write transaction; the copy is the last committed state, whole (one backup step is one
    read snapshot). The copy is written beside the destination and then put in place, so a half-written
    copy never bears the name, and an existing file is never clobbered unless `replace`."""
    if not source.is_file():
        raise ConfigError(f"state.path: {source} does not exist (no run has used it): nothing to back up")
    live = {source.resolve(), *(source.resolve().with_name(source.name + s) for s in (*COMPANIONS, ".lock"))}
    if destination.resolve() in live:
        raise ConfigError(f"state backup: {destination} is the live state itself; give another path")
    if destination.exists() and not replace:
        raise ConfigError(f"state backup: {destination} already exists; give a new path, or --force to replace it")
    private_directory(destination.parent)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        _create_private(partial)
        reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        copy = sqlite3.connect(partial)
        try:
            reader.backup(copy)
            # One self-contained file (no -wal beside it); State.open switches a restored copy back to WAL.
            copy.execute("PRAGMA journal_mode=DELETE")
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            copy.close()
            reader.close()
        if check != "ok":
            raise AdapterError(f"state backup: the copy failed SQLite's integrity check ({check}); "
                               f"the state file {source} may be damaged")
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        _put_in_place(partial, destination, replace)
    except sqlite3.Error as exc:
        raise ConfigError(f"state.path: cannot back up {source}: {exc}") from None
    except FileExistsError:
        raise ConfigError(f"state backup: {destination} already exists; give a new path, or --force") from None
    except OSError as exc:
        raise ConfigError(f"state backup: cannot write {destination}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return destination.stat().st_size


def _put_in_place(partial: Path, destination: Path, replace: bool) -> None:
    if replace:
        os.replace(partial, destination)
    else:
        try:
            os.link(partial, destination)  # fails if a file appeared there meanwhile: never clobbers
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: check, then rename
            if destination.exists():
                raise FileExistsError(destination) from None
            os.replace(partial, destination)
    directory = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name survives a power cut too
    finally:
        os.close(directory)


# The state holds patient data (CONTRACT §7): readable by the adapter's own user only.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700
# SQLite creates these beside the database, with the database file's mode (so a 0600 database gets
# 0600 companions whatever the umask); they hold recent pages, i.e. the same data.
COMPANIONS = ("-wal", "-shm")


def private_directory(directory: Path) -> None:
    """Create the missing part of `directory`, each new level 0700. A directory that already exists is the
    site's (it may be shared, e.g. /var/lib): left as it is."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for level in reversed(missing):
        try:
            level.mkdir(mode=PRIVATE_DIRECTORY_MODE)
        except FileExistsError:  # another process made it first
            continue
        os.chmod(level, PRIVATE_DIRECTORY_MODE)  # mkdir's mode is masked by the umask


def _create_private(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists: created with its final mode, it is never
    readable by others, not even for an instant."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(handle, PRIVATE_FILE_MODE)  # the umask may have taken the owner's bits too
    finally:
        os.close(handle)


def _tighten(path: Path) -> None:
    """A state file readable or writable by group or others (made before this check existed, or copied
    with a loose umask) is set back to 0600, with a warning naming the file (never its content)."""
    for file in (path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)):
        try:
            mode = stat.S_IMODE(os.stat(file).st_mode)
        except FileNotFoundError:
            continue
        if not mode & 0o077:
            continue
        try:
            os.chmod(file, PRIVATE_FILE_MODE)
        except OSError as exc:
            # Not ours to change (another owner, a filesystem without modes): alerts matter more than
            # stopping here, so run on, but say so loudly.
            log.error("a state file is readable by others and could not be tightened",
                      extra={"event": "state-permissions-loose", "file": str(file), "mode": f"{mode:04o}",
                             "error": type(exc).__name__})
            continue
        log.warning("a state file was readable by others: set to 0600",
                    extra={"event": "state-permissions-tightened", "file": str(file), "mode": f"{mode:04o}"})


_IN_BATCH = 500  # ids per `IN (…)`: well within every backend's limit on bound parameters
# Graded counts per upsert statement: its bound parameters stay within _IN_BATCH, well within every
# backend's limit (SQLite before 3.32 allowed 999). One statement of many rows costs SQLite about 0.6 µs
# less per row than one statement each.
_ROWS_PER_INSERT = _IN_BATCH // len(_CLASSIFIED_COLUMNS)
_WRITTEN_ROWS_PER_INSERT = _IN_BATCH // len(_WRITTEN_COLUMNS)


def _chunks(values: list[Any], size: int = _IN_BATCH) -> Iterator[list[Any]]:
    """Consecutive slices of at most `size`: one statement each, within the backends' parameter limits."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _marks(values: list[Any]) -> str:
    """The placeholders of an `IN (…)` list for these values."""
    return ",".join("?" * len(values))


def _ledgered(row: sqlite3.Row) -> Ledgered:
    return Ledgered(row["version"], row["patient_id"], row["outcome"],
                    datetime.fromisoformat(row["effective"]) if row["effective"] else None,
                    row["last_updated"] or "", _json_list(row["sources"]) != (), row["status"])


def _written_row(row: sqlite3.Row) -> Written:
    return Written(row["resource_type"], row["identifier"], row["patient_id"], row["status"], row["content_hash"],
                   row["server_id"], _json_list(row["evidence"]))


def _json_list(text: str | None) -> tuple[Any, ...]:
    """A JSON list column; most are empty, and "[]" needs no parser."""
    return () if not text or text == "[]" else tuple(json.loads(text))


def _to_json(items: tuple[Any, ...] | list[Any]) -> str:
    if not items:
        return "[]"
    # Ids (a write's evidence, once per write): json.dumps writes printable ASCII other than '"' and '\\' as
    # it is, so joining gives its text at a fifth of its cost. Anything else goes through json.dumps.
    try:
        joined = "".join(items)
    except TypeError:  # not all strings
        return json.dumps(list(items))
    if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
        return '["' + '", "'.join(items) + '"]'
    return json.dumps(list(items))


# Every stored count a plan reads back goes through _reading_row, so it reads the row by position, as a
# plain tuple (the one exception to reading rows by column name: a name lookup on an SQLite row searches its
# columns, ~0.25 µs each), and maps grade and age band with a dict instead of the Enum call
# (EnumType.__call__, ~0.7 µs). The columns are those record_classified_many writes, in its order, so a row
# read back compares equal to the start of the row written while it is unchanged (State._graded_memo); all
# but the last two, processed_at and last_updated, which no Reading holds (two columns fewer a row to read).
_READ_BACK = len(_CLASSIFIED_COLUMNS) - 2
_SELECT_READINGS = (f"SELECT {', '.join(_CLASSIFIED_COLUMNS[:_READ_BACK])} FROM observations"
                    " WHERE outcome = 'classified'")
_GRADES = {grade.value: grade for grade in Grade}
_AGE_BANDS = {band.value: band for band in AgeBand}


def _reads_back_alike(reading: Reading) -> bool:
    """Does the row written for this reading build it again exactly, types included? The REAL columns give
    back a float (never an int) and 0.0 for -0.0; the effective time comes back with a fixed-offset
    timezone (fromisoformat of its isoformat). Anything else is built from the row, as always."""
    anc, lln = reading.count.anc_per_ul, reading.lln_per_ul
    return (type(anc) is float and copysign(1.0, anc) > 0
            and (lln is None or (type(lln) is float and copysign(1.0, lln) > 0))
            and type(reading.effective.tzinfo) is timezone)


def _reading_row(row: tuple[Any, ...]) -> tuple[Reading, Classification]:
    (observation_id, version, status, patient_id, _, effective, anc_per_ul, comparator, lln_per_ul, grade,
     at_least, age_band, notes, sources) = row
    reading = Reading(
        observation_id=observation_id,
        version=version,
        status=status,
        patient_id=patient_id,
        effective=datetime.fromisoformat(effective),
        count=Count(anc_per_ul, comparator or ""),
        lln_per_ul=lln_per_ul,
        sources=_json_list(sources),
    )
    return reading, _classification(grade, bool(at_least), age_band, notes)


@functools.lru_cache(maxsize=256)
def _classification(grade: str, at_least: bool, age_band: str, notes: str | None) -> Classification:
    """A stored grade, built once per combination: rows repeat a handful of grades, age bands and notes,
    and a Classification is immutable, so every row with the same columns can share one."""
    return Classification(
        grade=_GRADES.get(grade) or Grade(grade),  # Grade(x) for what the table lacks: the same error
        at_least=at_least,
        age_band=_AGE_BANDS.get(age_band) or AgeBand(age_band),
        notes=_json_list(notes),
    )


def _fact_row(row: sqlite3.Row) -> ContextFact:
    return ContextFact(row["resource_type"], row["resource_id"], row["version"], row["patient_id"], row["kind"],
                       row["status"], datetime.fromisoformat(row["time"]) if row["time"] else None,
                       row["value"], row["name"] or "", row["last_updated"] or "")


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def _parsed(instant: str) -> datetime | None:
    try:
        return datetime.fromisoformat(instant.replace("Z", "+00:00")) if instant else None
    except ValueError:
        return None
