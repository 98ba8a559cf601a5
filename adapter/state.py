"""SQLite state (CONTRACT §7): watermark, ledger of Observation versions, what we wrote, quarantine, runs.

Every change is made inside `transaction()`; the pipeline opens one only after the server confirmed the
writes it records, so a crash at any point leaves state describing only what the server accepted."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapter.errors import ConfigError, LockHeldError
from adapter.model import (
    AgeBand, Classification, Count, DeriveInput, Grade, InputKind, Quarantine, Reading,
)

SCHEMA_VERSION = 2
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
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    mode TEXT NOT NULL,
    exit_code INTEGER,
    summary TEXT
);
"""


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


@dataclass(frozen=True)
class Ledgered:
    version: str
    patient_id: str
    outcome: str
    effective: datetime | None
    last_updated: str
    derived: bool

    def newer_than(self, version: str, last_updated: str) -> bool:
        """Is what we recorded newer than this version? (A lagging replica can serve an old one.)"""
        if self.version.isdigit() and version.isdigit():
            return int(self.version) > int(version)
        mine, theirs = _parsed(self.last_updated), _parsed(last_updated)
        return mine is not None and theirs is not None and mine > theirs


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
    def __init__(self, connection: sqlite3.Connection):
        self.db = connection
        self.db.row_factory = sqlite3.Row
        self.db.executescript(_SCHEMA)
        self._migrate()
        self._set_meta_default("schema_version", str(SCHEMA_VERSION))
        # Observation ids read in this pass (a temporary table: bounded memory, gone with the connection).
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS pass_ids (observation_id TEXT PRIMARY KEY)")

    def _migrate(self) -> None:
        for table, column, kind in _ADDED_COLUMNS:
            present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def start_pass(self) -> None:
        self.db.execute("DELETE FROM pass_ids")

    def seen_before_in_pass(self, observation_id: str) -> bool:
        """Record that this pass read the Observation; True when it had already read it."""
        cursor = self.db.execute("INSERT OR IGNORE INTO pass_ids VALUES (?)", (observation_id,))
        return cursor.rowcount == 0

    @classmethod
    def open(cls, path: Path) -> State:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state.path: cannot open {path}: {exc}") from None
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # a committed ledger row must survive a power cut
        return cls(connection)

    def scratch_copy(self) -> State:
        """An in-memory copy for --dry-run: the same run, nothing persisted."""
        memory = sqlite3.connect(":memory:", isolation_level=None)
        self.db.backup(memory)
        return State(memory)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- watermark -------------------------------------------------------------------------------
    def watermark(self) -> str | None:
        return self._meta("watermark")

    def set_watermark(self, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('watermark', ?)", (value,))

    def context_watermark(self) -> str | None:
        """The server's lastUpdated up to which the context of live patients has been polled."""
        return self._meta("context_watermark")

    def set_context_watermark(self, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('context_watermark', ?)", (value,))

    # -- ledger ----------------------------------------------------------------------------------
    def ledger(self, observation_id: str) -> Ledgered | None:
        """What we last recorded for this Observation."""
        row = self.db.execute(
            "SELECT version, patient_id, outcome, effective, last_updated, sources FROM observations"
            " WHERE observation_id = ?", (observation_id,)
        ).fetchone()
        if row is None:
            return None
        return Ledgered(row["version"], row["patient_id"], row["outcome"],
                        datetime.fromisoformat(row["effective"]) if row["effective"] else None,
                        row["last_updated"] or "", bool(json.loads(row["sources"] or "[]")))

    def processed_version(self, observation_id: str) -> str | None:
        ledgered = self.ledger(observation_id)
        return ledgered.version if ledgered else None

    def ledgered_ids(self, observation_ids: set[str]) -> set[str]:
        """Which of these Observations this state has read at all."""
        if not observation_ids:
            return set()
        ids = sorted(observation_ids)
        rows = self.db.execute(
            f"SELECT observation_id FROM observations WHERE observation_id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
        return {row["observation_id"] for row in rows}

    def record_classified(self, reading: Reading, result: Classification, now: str,
                          last_updated: str = "") -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO observations VALUES (?,?,?,?, 'classified', ?,?,?,?,?,?,?,?,?,?,?)",
            (
                reading.observation_id, reading.version, reading.status, reading.patient_id,
                reading.effective.isoformat(), reading.count.anc_per_ul, reading.count.comparator,
                reading.lln_per_ul, result.grade.value, int(result.at_least), result.age_band.value,
                json.dumps(list(result.notes)), json.dumps(list(reading.sources)), now, last_updated,
            ),
        )
        self.db.execute("DELETE FROM quarantine WHERE observation_id = ?", (reading.observation_id,))

    def record_outcome(self, observation_id: str, version: str, status: str, patient_id: str,
                       outcome: str, now: str, last_updated: str = "") -> None:
        """A version that is not (or no longer) a usable reading: quarantined, withdrawn or ignored."""
        self.db.execute(
            "INSERT OR REPLACE INTO observations (observation_id, version, status, patient_id, outcome,"
            " processed_at, last_updated) VALUES (?,?,?,?,?,?,?)",
            (observation_id, version, status, patient_id, outcome, now, last_updated),
        )
        if outcome != "quarantined":
            self.db.execute("DELETE FROM quarantine WHERE observation_id = ?", (observation_id,))
        if outcome != "derive-input":
            self.db.execute("DELETE FROM derive_inputs WHERE observation_id = ?", (observation_id,))

    def record_input(self, item: DeriveInput, status: str, now: str) -> None:
        self.record_outcome(item.observation_id, item.version, status, item.patient_id, "derive-input", now)
        self.db.execute(
            "INSERT OR REPLACE INTO derive_inputs VALUES (?,?,?,?,?,?)",
            (item.observation_id, item.version, item.patient_id, _utc(item.effective),
             item.kind.value, item.value),
        )

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
        rows = self.db.execute(
            "SELECT * FROM observations WHERE patient_id = ? AND outcome = 'classified'", (patient_id,)
        ).fetchall()
        return [_reading_row(row) for row in rows]

    def counts_by_outcome(self) -> dict[str, int]:
        rows = self.db.execute("SELECT outcome, count(*) AS n FROM observations GROUP BY outcome")
        return {row["outcome"]: row["n"] for row in rows}

    # -- quarantine ------------------------------------------------------------------------------
    def quarantine(self, observation_id: str, version: str, patient_id: str, why: Quarantine,
                   resource: dict[str, Any], now: str, keep_reading: bool = False) -> None:
        """Quarantine this version. keep_reading: an earlier version was graded and stays in effect until
        this one can be graded (a unit spelling must not retract a live alert)."""
        self.db.execute(
            "INSERT INTO quarantine VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (observation_id) DO UPDATE SET"
            " version = excluded.version, reason = excluded.reason, detail = excluded.detail,"
            " patient_id = excluded.patient_id, last_seen = excluded.last_seen, resource = excluded.resource",
            (observation_id, version, patient_id, why.reason.value, why.detail, now, now, json.dumps(resource)),
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
        self.db.execute(
            "INSERT OR REPLACE INTO context_facts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (fact.resource_type, fact.resource_id, fact.version, fact.patient_id, fact.kind,
             fact.time.isoformat() if fact.time else None, fact.value, fact.name, fact.status,
             fact.last_updated, now),
        )
        if fact.resource_type == "Observation":
            self.db.execute("DELETE FROM quarantine WHERE observation_id = ?", (fact.resource_id,))

    def context_facts(self, patient_id: str) -> list[ContextFact]:
        """The facts that count for this patient (kind other than "none")."""
        rows = self.db.execute(
            "SELECT * FROM context_facts WHERE patient_id = ? AND kind != 'none'"
            " ORDER BY resource_type, resource_id", (patient_id,)
        ).fetchall()
        return [_fact_row(row) for row in rows]

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
        rows = self.db.execute(
            "SELECT * FROM written WHERE patient_id = ? AND resource_type = ? ORDER BY identifier",
            (patient_id, resource_type),
        ).fetchall()
        return [
            Written(row["resource_type"], row["identifier"], row["patient_id"], row["status"],
                    row["content_hash"], row["server_id"], tuple(json.loads(row["evidence"] or "[]")))
            for row in rows
        ]

    def record_written(self, item: Written, now: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO written VALUES (?,?,?,?,?,?,?,?)",
            (item.resource_type, item.identifier, item.patient_id, item.status, item.content_hash,
             item.server_id, json.dumps(list(item.evidence)), now),
        )

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

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def _set_meta_default(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One run at a time per state file (CONTRACT §7); a second run fails at once with exit 5."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
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


def _reading_row(row: sqlite3.Row) -> tuple[Reading, Classification]:
    reading = Reading(
        observation_id=row["observation_id"],
        version=row["version"],
        status=row["status"],
        patient_id=row["patient_id"],
        effective=datetime.fromisoformat(row["effective"]),
        count=Count(row["anc_per_ul"], row["comparator"] or ""),
        lln_per_ul=row["lln_per_ul"],
        sources=tuple(json.loads(row["sources"] or "[]")),
    )
    result = Classification(
        grade=Grade(row["grade"]),
        at_least=bool(row["at_least"]),
        age_band=AgeBand(row["age_band"]),
        notes=tuple(json.loads(row["notes"] or "[]")),
    )
    return reading, result


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
