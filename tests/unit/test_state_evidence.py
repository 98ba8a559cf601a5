"""State for the deletion check: which Observations stand behind live outputs, the RiskAssessment sweep,
and the ledger after a deletion (a resource created again under the same id is graded again)."""

from __future__ import annotations

import pytest

from adapter.state import DELETED, Ledgered, State, Written

NOW = "2026-11-26T00:00:00+00:00"


def wrote(state: State, kind: str, identifier: str, patient_id: str, status: str, *evidence: str) -> None:
    state.record_written(Written(kind, identifier, patient_id, status, "hash", None, evidence), NOW)


def test_live_evidence_is_what_active_flags_and_live_risk_assessments_cite(state):  # on SQLite and PostgreSQL (conftest)
    wrote(state, "Flag", "a/o1", "a", "active", "o1", "o2")
    wrote(state, "Flag", "a/o0", "a", "inactive", "o0")  # a closed episode: not live
    wrote(state, "Flag", "b/o3", "b", "entered-in-error", "o3")
    wrote(state, "RiskAssessment", "a/o2", "a", "final", "o2")
    wrote(state, "RiskAssessment", "c/o4", "c", "amended", "o4")
    wrote(state, "RiskAssessment", "c/o5", "c", "entered-in-error", "o5")
    wrote(state, "RiskAssessment", "d/o1", "d", "final", "o1")  # o1 re-filed: both patients cite it
    owners, sweep = state.live_evidence(risk_limit=100)
    assert owners == {"o1": {"a", "d"}, "o2": {"a"}, "o4": {"c"}}
    assert sweep is None  # everything fits in one run


def test_an_observation_already_known_deleted_is_not_checked_again(state):  # on SQLite and PostgreSQL (conftest)
    wrote(state, "Flag", "a/o1", "a", "active", "o1", "o2")
    state.record_outcome("o1", "1", DELETED, "a", "withdrawn", NOW)
    state.record_outcome("o2", "1", "entered-in-error", "a", "withdrawn", NOW)  # withdrawn, not deleted
    assert state.live_evidence(risk_limit=100)[0] == {"o2": {"a"}}


def test_risk_assessment_evidence_is_swept_over_runs_and_active_flags_every_run(state):  # on SQLite and PostgreSQL (conftest)
    wrote(state, "Flag", "z/f", "z", "active", "f")
    for n in range(5):
        wrote(state, "RiskAssessment", f"p/r{n}", "p", "final", f"r{n}")
    checked = []
    for _ in range(4):
        owners, sweep = state.live_evidence(risk_limit=2)
        assert "f" in owners and len(owners) == 3  # the Flag's evidence, then 2 of the 5
        checked.append(sorted(set(owners) - {"f"}))
        state.set_evidence_sweep(sweep)
    assert checked == [["r0", "r1"], ["r2", "r3"], ["r0", "r4"], ["r1", "r2"]]  # wraps round


@pytest.mark.parametrize("status,version,last_updated,covered", [
    # Not deleted: the version id decides, as before.
    ("final", "2", "2026-11-20T10:00:00Z", True),
    ("final", "1", "2026-11-20T11:00:00Z", True),  # an older version id from a lagging replica
    ("final", "3", "2026-11-20T09:00:00Z", False),
    # Deleted: the same version seen again (a stale copy) stays withdrawn ...
    (DELETED, "2", "2026-11-20T10:00:00Z", True),
    (DELETED, "1", "2026-11-20T09:00:00Z", True),
    # ... but the resource created again is graded, even when its version ids restart at 1.
    (DELETED, "1", "2026-11-25T08:00:00Z", False),
    (DELETED, "4", "2026-11-25T08:00:00Z", False),
])
def test_the_ledger_after_a_deletion_grades_a_recreated_observation(status, version, last_updated, covered):
    outcome = "withdrawn" if status == DELETED else "classified"
    prior = Ledgered("2", "p", outcome, None, "2026-11-20T10:00:00Z", False, status)
    assert prior.covers(version, last_updated) is covered


def test_a_deleted_observation_never_read_covers_nothing():
    prior = Ledgered("0", "p", "withdrawn", None, "", False, DELETED)  # evidence of an adopted Flag
    assert not prior.covers("1", "2026-11-25T08:00:00Z")


def test_a_derived_count_is_checked_by_its_source_observations(state):  # on SQLite and PostgreSQL (conftest)
    from datetime import datetime, timezone

    from adapter.model import AgeBand, Classification, Count, Grade, Reading

    derived = Reading("derived-abc", "w+n", "final", "p", datetime(2026, 11, 20, tzinfo=timezone.utc),
                      Count(500.0), sources=("n", "w"))
    state.record_classified(derived, Classification(Grade.MODERATE, age_band=AgeBand.ADULT), NOW)
    wrote(state, "Flag", "p/derived-abc", "p", "active", "derived-abc")  # a Flag cites the reading's key
    wrote(state, "RiskAssessment", "p/derived-abc", "p", "final", "n", "w")  # an assessment its sources
    assert state.live_evidence(risk_limit=100)[0] == {"n": {"p"}, "w": {"p"}}
    state.record_outcome("derived-abc", "w+n", "superseded", "p", "withdrawn", NOW)  # no longer derivable
    wrote(state, "RiskAssessment", "p/derived-abc", "p", "entered-in-error", "n", "w")
    assert state.live_evidence(risk_limit=100)[0] == {}  # never looked up on the server by its key
