"""`check` says which clinical-context searches `run` will send (CONTRACT §1: check and run agree)."""

from __future__ import annotations

from adapter import config
from adapter.fhir.capability import context_searches


def statement(*declared: tuple[str, tuple[str, ...]]) -> dict:
    return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [
        {"type": kind, "interaction": [{"code": "search-type"}], "searchParam": [{"name": n} for n in names]}
        for kind, names in declared]}]}


def test_an_undeclared_context_search_is_said_not_read_and_never_fails_check():
    lines = context_searches(statement(("Observation", ("subject", "code", "date", "_lastUpdated")),
                                       ("Procedure", ("subject", "_lastUpdated"))), config.load(None))
    kinds = ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure", "Condition")
    by_kind = {next(k for k in kinds if f" {k} " in text): (ok, text) for ok, text in lines}
    assert set(by_kind) == set(kinds) and len(lines) == len(kinds)
    assert all(ok for ok, _ in lines)
    assert by_kind["Observation"][1] == "context: search Observation by _lastUpdated, code, date, subject"
    assert "not read around new counts:" in by_kind["Procedure"][1]  # no `date` declared
    assert "for late changes" not in by_kind["Procedure"][1]
    assert "not read around new counts and for late changes" in by_kind["MedicationRequest"][1]


def test_switched_off_context_is_not_listed():
    off = config.Config(context=config.ContextConfig(febrile=False, chemotherapy=False, duffy_null=False))
    assert context_searches(statement(), off) == []
