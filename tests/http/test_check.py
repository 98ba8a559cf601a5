"""`anc-adapter check` against each shape of CapabilityStatement (served by `responses`): [ok] for what the
server declares, [warn] for what it does not declare but run will still try (exit 0, "ready, with
warnings"), [FAIL] only for what will make run fail (CONTRACT §1). The run side of the same shapes is in
tests/integration/test_commands.py (against the real server behind a front)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from adapter.cli import main

BASE = "https://fhir.example.org/r4"
DATA = Path(__file__).parents[1] / "data"
FHIR_JSON = "application/fhir+json"
EMPTY = {"resourceType": "Bundle", "type": "searchset", "entry": []}


def minimal() -> dict[str, Any]:
    """A server that declares everything `run` sends: the minimal statement plus the context searches
    (clinical context, CONTRACT §5b: temperatures, chemotherapy records, Duffy-null Conditions)."""
    statement = json.loads((DATA / "capability-minimal.json").read_text())
    declared = statement["rest"][0]["resource"]
    context = {"Observation": ["date", "subject"], "MedicationAdministration": ["effective-time"],
               "MedicationRequest": ["authoredon"], "Procedure": ["date"], "Condition": ["code"]}
    for kind, params in context.items():
        entry = next((r for r in declared if r["type"] == kind), None)
        if entry is None:
            entry = {"type": kind, "interaction": [{"code": "search-type"}], "searchParam": []}
            declared.append(entry)
        have = {p["name"] for p in entry.setdefault("searchParam", [])}
        for name in sorted({*params, "subject", "_lastUpdated"} - have):
            entry["searchParam"].append({"name": name, "type": "token"})
    return statement


def resource(statement: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(r for r in statement["rest"][0]["resource"] if r["type"] == kind)


def check(tmp_path, capsys, statement: dict[str, Any], config: str = "", search: Any = None,
          search_status: int = 200) -> tuple[int, list[str], list[responses.Call]]:
    """Run `check`; the exit code, the output lines (the last is the verdict), and the searches sent."""
    path = tmp_path / "adapter.toml"
    path.write_text("[fhir]\nretries = 1\nretry_budget_s = 1\n" + config)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=statement, content_type=FHIR_JSON)
        mock.get(f"{BASE}/Observation", json=EMPTY if search is None else search, status=search_status,
                 content_type=FHIR_JSON)
        code = main(["check", "--config", str(path), "--fhir-url", BASE, "--log-format", "json"])
        searches = [c for c in mock.calls if urlsplit(c.request.url).path.endswith("/Observation")]
    return code, capsys.readouterr().out.splitlines(), searches


def line(lines: list[str], prefix: str) -> str:
    """The one output line whose text (after [ok]/[warn]/[FAIL]) starts with `prefix`."""
    found = [entry for entry in lines if entry.split("] ", 1)[-1].startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


def test_everything_declared_is_ready(tmp_path, capsys):
    code, lines, searches = check(tmp_path, capsys, minimal(), '[output]\nresources = ["Flag", "RiskAssessment"]\n')
    assert code == 0 and lines[-1] == "ready"
    assert all(entry.startswith("[ok] ") for entry in lines[:-1]), lines
    assert line(lines, "write Flag").startswith("[ok] write Flag: conditional update by identifier")
    assert line(lines, "write bundles") == "[ok] write bundles: transaction"


def test_the_live_search_is_the_query_run_sends(tmp_path, capsys):
    """A server that refuses _include, _sort or _lastUpdated fails check as it would fail run."""
    _, _, searches = check(tmp_path, capsys, minimal())
    query = parse_qs(urlsplit(searches[0].request.url).query)
    assert query["_include"] == ["Observation:subject"] and query["_sort"] == ["_lastUpdated"]
    assert query["_lastUpdated"][0].startswith("ge") and "http://loinc.org|751-8" in query["code"][0]


def test_a_statement_that_declares_nothing_is_ready_with_warnings(tmp_path, capsys):
    statement = json.loads((DATA / "capability-undeclared.json").read_text())
    code, lines, _ = check(tmp_path, capsys, statement, '[output]\nresources = ["Flag", "RiskAssessment"]\n')
    assert code == 0 and lines[-1] == "ready, with warnings"
    assert not any(entry.startswith("[FAIL]") for entry in lines)
    for prefix in ("search Observation:", "search Observation by code", "search Observation by _lastUpdated",
                   "read Patient", "write bundles", "write Flag", "write RiskAssessment"):
        assert line(lines, prefix).startswith("[warn] "), prefix
    assert line(lines, "write Flag") == (
        "[warn] write Flag: Flag is not in the CapabilityStatement; run will PUT Flag/<id derived from our "
        "identifier> — if the server refuses, the patient's writes are kept in state and retried every run, "
        "and run exits 3")
    assert "run will POST a transaction bundle" in line(lines, "write bundles")


def _no_conditional(statement, kind="Flag"):
    resource(statement, kind).pop("conditionalUpdate")


def _update_create(value):
    def change(statement):
        _no_conditional(statement)
        resource(statement, "Flag")["updateCreate"] = value
    return change


def _flag_without_update(statement):
    _no_conditional(statement)
    resource(statement, "Flag")["interaction"] = [{"code": "read"}, {"code": "create"}]


def _flag_without_identifier_param(statement):
    resource(statement, "Flag")["searchParam"] = [{"name": "subject", "type": "reference"}]


def _observation_params(*names):
    def change(statement):
        resource(statement, "Observation")["searchParam"] = [{"name": n, "type": "token"} for n in names]
    return change


def _system(*codes):
    def change(statement):
        statement["rest"][0]["interaction"] = [{"code": c} for c in codes]
    return change


def _no_patient(statement):
    statement["rest"][0]["resource"] = [r for r in statement["rest"][0]["resource"] if r["type"] != "Patient"]


@pytest.mark.parametrize("change, config, prefix, expected, exit_code", [
    # writes: declared, undeclared, declared absent
    (_update_create(True), "", "write Flag", "[ok] write Flag: update-as-create", 0),
    (_no_conditional, "", "write Flag", "[warn] write Flag: the server declares neither conditional update "
                                        "by identifier nor updateCreate; run will PUT Flag/<id", 0),
    (_flag_without_identifier_param, "", "write Flag", "[warn] write Flag: the server declares neither", 0),
    (_update_create(False), "", "write Flag", "[FAIL] write Flag: the server declares updateCreate false", 2),
    (_flag_without_update, "", "write Flag", "[FAIL] write Flag: the server declares no update interaction", 2),
    # search parameters: run searches by them whether declared or not
    (_observation_params("_lastUpdated"), "", "search Observation by code", "[warn] search Observation by "
                                                                            "code: not declared", 0),
    (_observation_params("code"), "", "search Observation by _lastUpdated", "[warn] search Observation by "
                                                                            "_lastUpdated: not declared", 0),
    (_no_patient, "", "read Patient", "[warn] read Patient: not declared", 0),
    # bundles: run POSTs a transaction unless the server offers only batch
    (_system("batch"), "", "write bundles", "[ok] write bundles: batch", 0),
    (_system(), "", "write bundles", "[warn] write bundles: the server declares neither transaction nor "
                                     "batch; run will POST a transaction bundle", 0),
    (_system("batch"), "[output]\nprovenance = true\n", "write bundles",
     "[FAIL] write bundles: the server declares batch but not transaction, and output.provenance = true", 2),
    (_system("transaction"), "[output]\nprovenance = true\n", "write Provenance",
     "[warn] write Provenance: Provenance is not in the CapabilityStatement; run will PUT Provenance/<id", 0),
])
def test_each_capability_shape(tmp_path, capsys, change, config, prefix, expected, exit_code):
    statement = minimal()
    change(statement)
    code, lines, _ = check(tmp_path, capsys, statement, config)
    assert line(lines, prefix).startswith(expected)
    assert code == exit_code
    assert lines[-1] == {0: "ready, with warnings" if expected.startswith("[warn]") else "ready",
                         2: "NOT ready (exit 2)"}[exit_code]


@pytest.mark.parametrize("status, body, exit_code", [
    (400, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported"}]}, 2),
    (503, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}, 3),
    (200, {"resourceType": "OperationOutcome", "issue": []}, 2),  # run stops on a search that is no Bundle
])
def test_a_failing_live_search_is_a_failure_even_when_declared(tmp_path, capsys, status, body, exit_code):
    code, lines, _ = check(tmp_path, capsys, minimal(), search=body, search_status=status)
    assert code == exit_code and lines[-1] == f"NOT ready (exit {exit_code})"
    assert line(lines, "search Observation:").startswith("[FAIL] search Observation:")


def test_metadata_that_is_no_capability_statement_warns_and_the_live_search_decides(tmp_path, capsys):
    """run reads nothing from such an answer and writes the undeclared way; only a failing search fails."""
    not_a_statement = {"resourceType": "Basic", "code": {"text": "gateway status"}}
    code, lines, _ = check(tmp_path, capsys, not_a_statement)
    assert code == 0 and lines[-1] == "ready, with warnings"
    assert line(lines, "/metadata").startswith("[warn] /metadata answered a 'Basic'")
    assert line(lines, "write Flag").startswith("[warn] write Flag: Flag is not in the CapabilityStatement")
    code, lines, _ = check(tmp_path, capsys, not_a_statement, search=not_a_statement)
    assert code == 2 and lines[-1] == "NOT ready (exit 2)"
