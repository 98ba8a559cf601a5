"""State: schema upgrades in place, quarantine discard keeps a graded version in effect."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from adapter.model import AgeBand, Classification, Count, Grade, Quarantine, Reading, Reason
from adapter.state import SCHEMA_VERSION, State

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE observations (observation_id TEXT PRIMARY KEY, version TEXT NOT NULL, status TEXT NOT NULL,
    patient_id TEXT NOT NULL, outcome TEXT NOT NULL, effective TEXT, anc_per_ul REAL, comparator TEXT,
    lln_per_ul REAL, grade TEXT, at_least INTEGER, age_band TEXT, notes TEXT, sources TEXT,
    processed_at TEXT NOT NULL);
CREATE TABLE written (resource_type TEXT NOT NULL, identifier TEXT NOT NULL, patient_id TEXT NOT NULL,
    status TEXT NOT NULL, content_hash TEXT NOT NULL, server_id TEXT, updated_at TEXT NOT NULL,
    PRIMARY KEY (resource_type, identifier));
INSERT INTO written VALUES ('Flag', 'p-1', 'p', 'active', 'abc', 'srv-1', '2026-11-01');
"""
NOW = "2026-11-26T00:00:00+00:00"


def reading(version: str) -> Reading:
    return Reading("o1", version, "final", "p", datetime(2026, 11, 20, tzinfo=timezone.utc), Count(300.0))


def test_a_version_1_state_file_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(V1_SCHEMA)
    state = State.open(path)
    assert state._meta("schema_version") == str(SCHEMA_VERSION)
    [flag] = state.written("p", "Flag")
    assert (flag.identifier, flag.server_id, flag.evidence) == ("p-1", "srv-1", ())
    assert state.ledger("nope") is None  # the new column is queryable


def test_discarding_an_unreadable_amendment_keeps_the_graded_version_in_effect(state):  # on SQLite and PostgreSQL (conftest)
    with state.transaction():
        state.record_classified(reading("1"), Classification(Grade.SEVERE, age_band=AgeBand.ADULT), NOW)
        state.quarantine("o1", "2", "p", Quarantine(Reason.UNKNOWN_UNIT, "unit 'x'"), {"id": "o1"}, NOW,
                         keep_reading=True)
        assert state.discard_quarantined("o1", NOW)
    assert state.quarantined() == []
    assert [r.version for r, _ in state.readings("p")] == ["1"]


def test_discarding_a_plain_quarantine_marks_it_ignored(state):  # on SQLite and PostgreSQL (conftest)
    with state.transaction():
        state.quarantine("o2", "1", "p", Quarantine(Reason.UNKNOWN_UNIT, "unit 'x'"), {"id": "o2"}, NOW)
        assert state.discard_quarantined("o2", NOW)
    assert state.ledger("o2").outcome == "ignored"


def test_a_page_of_graded_counts_is_recorded_as_each_would_be_alone(state):  # on SQLite and PostgreSQL (conftest)
    graded = Classification(Grade.MILD, age_band=AgeBand.ADULT)
    effective = datetime(2026, 11, 20, tzinfo=timezone.utc)
    page = [(Reading(f"o{i}", "1", "final", f"p{i % 7}", effective, Count(1000.0 + i)), graded, NOW, "")
            for i in range(70)]  # more than one multi-row statement holds
    with state.transaction():
        state.quarantine("o5", "1", "p5", Quarantine(Reason.UNKNOWN_UNIT, "unit 'x'"), {"id": "o5"}, NOW)
        state.record_classified_many(page)
        # An id twice in one call: in order, the later version stands.
        again = Reading("o9", "2", "final", "p2", effective, Count(450.0))
        state.record_classified_many([page[9], (again, Classification(Grade.SEVERE, age_band=AgeBand.ADULT), NOW, "")])
    assert state.counts_by_outcome() == {"classified": 70}
    assert state.quarantined() == []  # graded now: out of the quarantine
    assert (state.ledger("o9").version, state.ledger("o69").patient_id) == ("2", "p6")
    assert sorted(r.count.anc_per_ul for r, _ in state.readings("p2")) == [450.0, 1002.0, 1016.0, 1023.0, 1030.0,
                                                                           1037.0, 1044.0, 1051.0, 1058.0, 1065.0]


def test_ids_read_twice_in_one_pass_are_noticed_and_a_new_pass_starts_clean(state):  # on SQLite and PostgreSQL (conftest)
    assert state.seen_before_in_pass("o1") is False
    assert state.seen_before_in_pass("o1") is True
    state.start_pass()
    assert state.seen_before_in_pass("o1") is False


def test_a_page_of_ids_read_again_in_one_pass_is_noticed(state):  # on SQLite and PostgreSQL (conftest)
    assert state.any_seen_before_in_pass([]) is False
    assert state.any_seen_before_in_pass(["o1", "o2"]) is False
    assert state.any_seen_before_in_pass(["o3", "o4", "o3"]) is True  # twice on one page
    assert state.any_seen_before_in_pass(["o5", "o2"]) is True  # read on an earlier page
    assert state.seen_before_in_pass("o5") is True
    state.start_pass()
    assert state.any_seen_before_in_pass(["o1", "o2", "o3", "o4", "o5"]) is False


def test_written_inside_a_transaction_follows_every_write_and_a_rollback():
    from adapter.state import Written

    state = State(sqlite3.connect(":memory:", isolation_level=None))
    first = Written("Flag", "p/o1", "p", "active", "h1", None, ("o1",))
    with state.transaction():
        assert state.written("p", "Flag") == []  # asked once: kept for the transaction
        state.record_written(first, NOW)
        assert state.written("p", "Flag") == [first]
        state.written("p", "Flag").clear()  # a caller's list is its own
        moved = Written("Flag", "p/o1", "q", "active", "h2", None, ("o1",))  # the same identifier, re-filed
        state.record_written(moved, NOW)
        assert (state.written("p", "Flag"), state.written("q", "Flag")) == ([], [moved])
    try:
        with state.transaction():
            assert state.written("q", "Flag") == [moved]
            state.record_written(first, NOW)
            assert state.written("p", "Flag") == [first]
            raise RuntimeError("the server refused the page")
    except RuntimeError:
        pass
    assert (state.written("p", "Flag"), state.written("q", "Flag")) == ([], [moved])
    with state.transaction():
        assert state.written("p", "Flag") == []


def test_counts_read_back_are_their_own_when_the_caller_reuses_its_list():
    state = State(sqlite3.connect(":memory:", isolation_level=None))
    effective = datetime(2026, 11, 20, tzinfo=timezone.utc)
    grade = Classification(Grade.MILD, age_band=AgeBand.ADULT)
    page = [(Reading(f"o{i}", "1", "final", "p", effective, Count(1000.0 + i)), grade, NOW, "") for i in range(3)]
    with state.transaction():
        state.record_classified_many(page)
        page[:] = [(Reading(f"x{i}", "1", "final", "q", effective, Count(1200.0 + i)), grade, NOW, "") for i in range(3)]
        state.record_classified_many(page)
        page.reverse()  # a caller reusing the list it passed: what was recorded stays what was recorded
        inside = state.readings_of(["p", "q"])
    after = state.readings_of(["p", "q"])
    assert {p: sorted(r.observation_id for r, _ in inside[p]) for p in inside} == \
        {"p": ["o0", "o1", "o2"], "q": ["x0", "x1", "x2"]}
    assert {p: sorted(inside[p], key=repr) for p in inside} == {p: sorted(after[p], key=repr) for p in after}
