"""The state contract (CONTRACT §7), one suite run on both backends: every test takes `state` or
`state_location` (tests/conftest.py), so it runs on SQLite and on a real PostgreSQL started by the test run."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from adapter.errors import LockHeldError
from adapter.model import AgeBand, Classification, Count, DeriveInput, Grade, InputKind, Quarantine, Reading, Reason
from adapter.state import State, Written, locked

NOW = "2026-11-26T00:00:00+00:00"
LATER = "2026-11-26T01:00:00+00:00"
WHEN = datetime(2026, 11, 20, 8, tzinfo=timezone.utc)


def reading(observation_id: str, version: str = "1", value: float = 300.0, patient_id: str = "p") -> Reading:
    return Reading(observation_id, version, "final", patient_id, WHEN, Count(value, "<"), lln_per_ul=1800.25)


def graded(grade: Grade = Grade.SEVERE) -> Classification:
    return Classification(grade, at_least=True, age_band=AgeBand.ADULT, notes=("a note",))


def test_the_watermark_is_empty_then_moves(state):
    assert state.watermark() is None
    with state.transaction():
        state.set_watermark("2026-11-25T00:00:00+00:00")
    with state.transaction():
        state.set_watermark("2026-11-26T00:00:00+00:00")
    assert state.watermark() == "2026-11-26T00:00:00+00:00"


def test_a_graded_reading_comes_back_exactly(state):
    # 8-byte floats on both engines: PostgreSQL's REAL would round 1234.5678901 to 1234.568.
    with state.transaction():
        state.record_classified(reading("o1", value=1234.5678901), graded(), NOW, last_updated="2026-11-20T09:00:00Z")
    [(back, result)] = state.readings("p")
    assert back == reading("o1", value=1234.5678901)
    assert result == graded()
    ledgered = state.ledger("o1")
    assert (ledgered.version, ledgered.outcome, ledgered.effective, ledgered.last_updated) == \
        ("1", "classified", WHEN, "2026-11-20T09:00:00Z")
    assert state.processed_version("o1") == "1" and state.processed_version("nope") is None
    assert state.measured_at("p", WHEN)
    assert state.ledgered_ids({"o1", "o2"}) == {"o1"} and state.ledgered_ids(set()) == set()
    assert state.counts_by_outcome() == {"classified": 1}


def test_a_version_recorded_as_withdrawn_keeps_nothing_of_the_graded_one(state):
    with state.transaction():
        state.record_classified(reading("o1"), graded(), NOW)
        state.record_outcome("o1", "2", "entered-in-error", "p", "withdrawn", LATER)
    assert state.readings("p") == []
    assert not state.measured_at("p", WHEN)
    ledgered = state.ledger("o1")
    assert (ledgered.version, ledgered.outcome, ledgered.status, ledgered.effective) == \
        ("2", "withdrawn", "entered-in-error", None)
    row = state.db.execute("SELECT grade, anc_per_ul, sources FROM observations WHERE observation_id = ?",
                           ("o1",)).fetchone()
    assert dict(row) == {"grade": None, "anc_per_ul": None, "sources": None}


def test_quarantine_keeps_first_seen_and_no_names_and_grading_clears_it(state):
    resource = {"resourceType": "Observation", "id": "o1", "status": "final",
                "subject": {"reference": "Patient/p", "display": "Quillon Vexmoor"},
                "valueQuantity": {"value": 1.1, "unit": "mmol/L"}}
    with state.transaction():
        state.quarantine("o1", "1", "p", Quarantine(Reason.UNKNOWN_UNIT, "unit 'mmol/L'"), resource, NOW)
    with state.transaction():
        state.quarantine("o1", "2", "p", Quarantine(Reason.UNKNOWN_UNIT, "unit 'mmol/L'"), resource, LATER)
    [entry] = state.quarantined()
    assert (entry.version, entry.first_seen, entry.last_seen) == ("2", NOW, LATER)
    assert "Quillon" not in str(state.quarantined_resources())
    assert state.ledger("o1").outcome == "quarantined"
    with state.transaction():
        state.record_classified(reading("o1", "3"), graded(), LATER)
    assert state.quarantined() == []


def test_what_we_wrote_is_replaced_by_key_and_counted(state):
    with state.transaction():
        state.record_written(Written("Flag", "p/o1", "p", "active", "h1", "srv-1", ("o1",)), NOW)
        state.record_written(Written("Flag", "p/o0", "p", "inactive", "h0", "srv-0"), NOW)
        state.record_written(Written("RiskAssessment", "p/o1", "p", "final", "h2", None, ("o1",)), NOW)
    with state.transaction():  # adoption / an update: the same key, new content
        state.record_written(Written("Flag", "p/o1", "p", "active", "h3", "srv-9", ("o1", "o2")), LATER)
    assert state.written("p", "Flag") == [
        Written("Flag", "p/o0", "p", "inactive", "h0", "srv-0", ()),
        Written("Flag", "p/o1", "p", "active", "h3", "srv-9", ("o1", "o2")),
    ]
    assert state.written("other", "Flag") == []
    assert state.written_counts() == {"Flag:active": 1, "Flag:inactive": 1, "RiskAssessment:final": 1}


def test_derive_inputs_are_grouped_and_dropped_when_withdrawn(state):
    white = DeriveInput("w", "1", "p", WHEN, InputKind.WBC, 1500.5)
    with state.transaction():
        state.record_input(white, "final", NOW)
    assert state.inputs("p", WHEN) == [white]
    assert state.input_group("w") == ("p", WHEN)
    with state.transaction():
        state.record_outcome("w", "2", "entered-in-error", "p", "withdrawn", LATER)
    assert state.inputs("p", WHEN) == [] and state.input_group("w") is None


def test_write_failures_keep_first_seen_until_cleared(state):
    with state.transaction():
        state.record_write_failure("p", "422 invalid", NOW)
    with state.transaction():
        state.record_write_failure("p", "400 bad", LATER)
    assert state.write_failures() == [{"patient_id": "p", "reason": "400 bad", "first_seen": NOW, "last_seen": LATER}]
    with state.transaction():
        state.clear_write_failure("p")
    assert state.write_failures() == []


def test_runs_are_listed_newest_first_and_dry_runs_are_not_a_success(state):
    state.start_run("r1", NOW, "live")
    state.finish_run("r1", NOW, 0, {"created": 2})
    state.start_run("r2", LATER, "dry-run")
    state.finish_run("r2", "2026-11-26T02:00:00+00:00", 0, {"created": 0})
    state.start_run("r3", "2026-11-26T03:00:00+00:00", "live")  # still going
    assert [(r["run_id"], r["exit_code"], r["summary"]) for r in state.last_runs()] == \
        [("r3", None, None), ("r2", 0, {"created": 0}), ("r1", 0, {"created": 2})]
    assert state.last_success() == NOW


def test_a_pinned_setting_keeps_its_first_value(state):
    assert state.pinned("write_mode:Flag", "conditional") == "conditional"
    assert state.pinned("write_mode:Flag", "ids") == "conditional"


def test_a_failed_transaction_leaves_nothing(state):
    with pytest.raises(RuntimeError):
        with state.transaction():
            state.set_watermark("2026-11-26T00:00:00+00:00")
            state.record_classified(reading("o1"), graded(), NOW)
            raise RuntimeError("the server refused the page")
    assert state.watermark() is None and state.ledger("o1") is None
    with state.transaction():  # the connection is usable again
        state.set_watermark("2026-11-26T00:00:00+00:00")
    assert state.watermark() == "2026-11-26T00:00:00+00:00"


def test_a_committed_transaction_is_seen_by_a_new_connection(state_location):
    writer, reader = State.open(state_location), State.open(state_location)
    with writer.transaction():
        writer.record_classified(reading("o1"), graded(), NOW)
        writer.set_watermark(NOW)
        assert reader.watermark() is None  # not committed yet: invisible to others
    assert reader.watermark() == NOW and reader.processed_version("o1") == "1"
    assert State.open(state_location).ledger("o1").outcome == "classified"


def test_a_new_postgresql_session_opens_the_state_while_a_run_is_mid_transaction(pg_url, monkeypatch):
    # `status` beside a run: opening the state must not wait for the run's transaction (nor take locks).
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=10s")  # a regression fails instead of hanging
    writer = State.open(pg_url)
    with writer.transaction():
        writer.record_written(Written("Flag", "p/o1", "p", "active", "h1", "srv-1", ("o1",)), NOW)
        writer.set_watermark(NOW)
        reader = State.open(pg_url)
        assert reader.watermark() is None and reader.written("p", "Flag") == []
    assert reader.watermark() == NOW


def test_the_dry_run_copy_has_everything_and_changes_nothing(state):
    with state.transaction():
        state.record_classified(reading("o1"), graded(), NOW)
        state.set_watermark(NOW)
        state.record_written(Written("Flag", "p/o1", "p", "active", "h1", "srv-1", ("o1",)), NOW)
        state.record_write_failure("q", "422", NOW)
    state.start_run("r1", NOW, "live")
    copy = state.scratch_copy()
    assert isinstance(copy.db, sqlite3.Connection)  # in memory, whatever the backend
    assert (copy.watermark(), copy.readings("p"), copy.written("p", "Flag"), copy.write_failures(),
            copy.last_runs(), copy._meta("schema_version")) == \
        (state.watermark(), state.readings("p"), state.written("p", "Flag"), state.write_failures(),
         state.last_runs(), state._meta("schema_version"))
    with copy.transaction():
        copy.set_watermark(LATER)
        copy.record_outcome("o1", "2", "entered-in-error", "p", "withdrawn", LATER)
    assert state.watermark() == NOW and state.ledger("o1").outcome == "classified"


def test_one_run_at_a_time_per_state(state_location):
    with locked(state_location):
        with pytest.raises(LockHeldError) as held:
            with locked(state_location):
                pass  # pragma: no cover - never reached
        assert held.value.exit_code == 5
    with locked(state_location):  # released at the end of the run
        pass


def test_sql_with_and_without_parameters_reads_the_same_on_both_engines(state):
    # The dialect layer rewrites `?` and `%`; a statement without parameters must come out the same.
    assert dict(state.db.execute("SELECT 7 % 4 AS r").fetchone()) == {"r": 3}
    assert dict(state.db.execute("SELECT 7 % ? AS r", (4,)).fetchone()) == {"r": 3}


# -- what the resume point, the clinical context and the deleted-evidence check keep (both backends) --

def test_a_resume_point_is_kept_replaced_and_dropped(state):
    from adapter.state import ResumePoint

    assert state.resume_point() is None
    first = ResumePoint(search="http://loinc.org|751-8", since=NOW, resume_at=LATER, max_seen=LATER, runs=1,
                        started=NOW)
    with state.transaction():
        state.set_resume_point(first)
    assert state.resume_point() == first
    second = ResumePoint(**{**vars(first), "resume_at": "2026-11-26T02:00:00+00:00", "runs": 2})
    with state.transaction():
        state.set_resume_point(second)
    assert state.resume_point() == second
    with state.transaction():
        state.set_resume_point(None)
    assert state.resume_point() is None


def test_context_facts_are_replaced_by_a_newer_version_and_the_poll_watermark_moves(state):
    from adapter.state import ContextFact

    fever = ContextFact("Observation", "t1", "1", "p", "temperature", "final", WHEN, 38.6, "", "2026-11-20T09:00:00Z")
    chemo = ContextFact("MedicationAdministration", "m1", "1", "p", "chemotherapy", "completed", WHEN,
                        None, "cyclophosphamide", "2026-11-20T09:00:00Z")
    with state.transaction():
        state.record_context(fever, NOW)
        state.record_context(chemo, NOW)
        state.set_context_watermark(NOW)
    assert state.context_fact("Observation", "t1") == fever
    assert sorted(f.resource_id for f in state.context_facts("p")) == ["m1", "t1"]
    withdrawn = ContextFact("Observation", "t1", "2", "p", "none", "entered-in-error", WHEN, None, "",
                            "2026-11-20T10:00:00Z")
    with state.transaction():
        state.record_context(withdrawn, LATER)
        state.set_context_watermark(LATER)
    assert state.context_fact("Observation", "t1") == withdrawn
    assert state.context_watermark() == LATER


def test_readings_and_context_facts_of_many_patients_are_each_patients_own(state, monkeypatch):
    from adapter import state as state_module
    from adapter.state import ContextFact

    monkeypatch.setattr(state_module, "_IN_BATCH", 2)  # three patients: two statements
    with state.transaction():
        for patient_id in ("p", "q", "r"):
            for n in (1, 2):
                state.record_classified(reading(f"{patient_id}{n}", patient_id=patient_id), graded(), NOW)
                state.record_context(ContextFact("Observation", f"t-{patient_id}{n}", "1", patient_id, "temperature",
                                                "final", WHEN, 38.0 + n / 10, "", NOW), NOW)
        state.record_outcome("q2", "2", "entered-in-error", "q", "withdrawn", LATER)
        state.record_context(ContextFact("Observation", "t-r1", "2", "r", "none", "entered-in-error", WHEN,
                                         None, "", LATER), LATER)
    patients = ["r", "q", "p", "nobody"]
    found = state.readings_of(patients)
    assert {p: sorted(r.observation_id for r, _ in found[p]) for p in patients} == {
        "p": ["p1", "p2"], "q": ["q1"], "r": ["r1", "r2"], "nobody": []}
    by_id = lambda graded: graded[0].observation_id  # noqa: E731
    assert all(sorted(found[p], key=by_id) == sorted(state.readings(p), key=by_id) for p in patients)
    facts = state.context_facts_of(patients)
    assert {p: [f.resource_id for f in facts[p]] for p in patients} == {
        "p": ["t-p1", "t-p2"], "q": ["t-q1", "t-q2"], "r": ["t-r2"], "nobody": []}
    assert all(facts[p] == state.context_facts(p) for p in patients)
    assert state.readings_of([]) == {} and state.context_facts_of([]) == {}


def test_live_evidence_names_the_counts_behind_active_flags_and_live_assessments(state):
    with state.transaction():
        state.record_classified(reading("o1"), graded(), NOW)
        state.record_written(Written("Flag", "p/o1", "p", "active", "h", "f1", ("o1", "o2")), NOW)
        state.record_written(Written("Flag", "q/o9", "q", "inactive", "h", "f2", ("o9",)), NOW)
        state.record_written(Written("RiskAssessment", "p/o1", "p", "final", "h", "r1", ("o1",)), NOW)
        state.record_written(Written("RiskAssessment", "p/o3", "p", "entered-in-error", "h", "r3", ("o3",)), NOW)
    owners, sweep = state.live_evidence(1000)
    assert owners == {"o1": {"p"}, "o2": {"p"}}  # not the inactive Flag's, not the withdrawn assessment's
    assert sweep is None


def test_a_dry_run_review_copy_is_a_private_sqlite_file_of_the_state(state, tmp_path):
    """`run --dry-run` works on a review file that `report` reads: copied from either backend."""
    import os
    import stat

    with state.transaction():
        state.record_classified(reading("o1"), graded(), NOW)
        state.set_watermark(NOW)
    review_path = tmp_path / "review.sqlite3"
    review = state.review_copy(review_path, "run-1", NOW, None, None)
    assert stat.S_IMODE(os.stat(review_path).st_mode) == 0o600
    assert review.watermark() == NOW and [r.observation_id for r, _ in review.readings("p")] == ["o1"]
    with review.transaction():
        review.set_watermark(LATER)
    assert state.watermark() == NOW  # the live state is only read


def test_writes_recorded_together_are_recorded_as_one_by_one(state):
    """record_written_many (a part the server accepted): the rows, in order, whatever their number, and
    the same key twice (an update after a write) ends as the later one, as one record_written each would."""
    many = [Written("Flag", f"p/o{n}", "p", "active", f"h{n}", f"srv-{n}", (f"o{n}", "x")) for n in range(150)]
    again = Written("Flag", "p/o7", "p", "inactive", "h7b", "srv-7", ("o7",))
    with state.transaction():
        state.record_written_many(many, NOW)
        state.record_written_many([Written("Flag", "q/o1", "q", "active", "h", None), again], LATER)
        state.record_written_many([], LATER)
    expected = sorted([*(w for w in many if w.identifier != "p/o7"), again], key=lambda w: w.identifier)
    assert state.written("p", "Flag") == expected
    with state.transaction():
        twice = [Written("Flag", "r/o1", "r", "active", "h1", None),
                 Written("Flag", "r/o1", "r", "inactive", "h2", "s")]
        state.record_written_many(twice, NOW)
    assert state.written("r", "Flag") == [twice[1]]
    assert state.written_counts() == {"Flag:active": 150, "Flag:inactive": 2}


def test_counts_read_back_in_the_transaction_that_wrote_them_are_those_built_from_their_rows(state):
    # readings_of hands back the objects a graded row was written from while the row is unchanged: they
    # must be what building from the row gives after the commit, types and all (repr tells 300 from 300.0,
    # -0.0 from 0.0, and one timezone object from another).
    plus_two = datetime(2026, 11, 20, 10, 30, 0, 250, tzinfo=timezone(timedelta(hours=2)))
    derived = Classification(Grade.MILD, age_band=AgeBand.INFANT, notes=("derived: WBC × neutrophils %",))
    written = [
        (Reading("o1", "1", "final", "p", WHEN, Count(1234.5678901), lln_per_ul=1800.25), graded()),
        (Reading("o2", "1", "final", "p", plus_two, Count(300)), graded()),  # an int, as a caller may pass
        (Reading("o3", "1", "final", "p", WHEN, Count(-0.0, "<"), lln_per_ul=1500), graded()),
        (Reading("o4", "1", "final", "p", WHEN.replace(tzinfo=None), Count(900.0)), graded(Grade.MODERATE)),
        (Reading("o5", "1", "final", "p", WHEN, Count(700.0)), graded(Grade.MODERATE)),
        (Reading("d1", "o1+o2", "final", "p", WHEN, Count(1200.0), sources=("o1", "o2")), derived),
        (Reading("o6", "1", "final", "q", WHEN, Count(400.0)), graded()),
    ]
    with state.transaction():
        state.record_classified_many([(r, c, NOW, "") for r, c in written[:4]])
        for r, c in written[4:]:
            state.record_classified(r, c, NOW)
        # Rows changed after they were written: a newer version, one withdrawn, one moved to another patient.
        state.record_classified(reading("o5", version="2", value=450.0), graded(), LATER)
        state.record_outcome("o3", "2", "entered-in-error", "p", "withdrawn", LATER)
        state.record_classified(reading("o6", version="2", patient_id="p"), graded(), LATER)
        state.quarantine("o1", "2", "p", Quarantine(Reason.UNKNOWN_UNIT, "unit 'x'"), {"id": "o1"}, LATER,
                         keep_reading=True)
        inside = state.readings_of(["p", "q"])
        again = state.readings_of(["p", "q"])  # read a second time: built from the rows
    after = state.readings_of(["p", "q"])
    by_id = lambda graded: graded[0].observation_id  # noqa: E731
    assert {p: repr(sorted(found, key=by_id)) for p, found in inside.items()} == \
        {p: repr(sorted(found, key=by_id)) for p, found in after.items()} == \
        {p: repr(sorted(found, key=by_id)) for p, found in again.items()}
    assert sorted(r.observation_id for r, _ in after["p"]) == ["d1", "o1", "o2", "o4", "o5", "o6"]
    assert after["q"] == []


def test_what_we_wrote_read_for_many_patients_at_once_is_what_each_reads_alone(state, monkeypatch):
    from adapter import state as state_module

    monkeypatch.setattr(state_module, "_IN_BATCH", 4)  # two types and two patients a statement: several
    rows = [Written("Flag", "p/o2", "p", "active", "h1", "srv-1", ("o2", "o1")),
            Written("Flag", "p/o10", "p", "inactive", "h0", "srv-0"),
            Written("RiskAssessment", "p/o2", "p", "final", "h2", None, ("o2",)),
            Written("Flag", "q/B", "q", "active", "h3", None, ("b",)),
            Written("Flag", "q/a", "q", "inactive", "h4", None, ("a",)),
            Written("RiskAssessment", "r/x", "r", "final", "h5", None)]
    with state.transaction():
        for row in rows:
            state.record_written(row, NOW)
    patients, kinds = ["r", "q", "p", "nobody", "p"], ("Flag", "RiskAssessment")
    alone = {(p, kind): state.written(p, kind) for p in patients for kind in kinds}  # outside: no memo
    with state.transaction():
        state.read_written(patients, kinds)
        assert set(state._written_memo) == {(p, kind) for p in patients for kind in kinds}  # no statement each
        assert {(p, kind): state.written(p, kind) for p in patients for kind in kinds} == alone
        state.record_written(Written("Flag", "q/a", "p", "active", "h6", None, ("a",)), LATER)  # re-filed
        assert state.written("q", "Flag") == [rows[3]]
        assert [w.identifier for w in state.written("p", "Flag")] == ["p/o10", "p/o2", "q/a"]
    assert alone[("p", "Flag")] == [rows[1], rows[0]] and alone[("nobody", "Flag")] == []
