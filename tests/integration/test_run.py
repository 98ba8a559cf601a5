"""End to end against the real local FHIR server: load, run, assert the Flags; run again, nothing new."""

from __future__ import annotations

import json

import pytest

from adapter.cli import main
from builders import anc, patient

pytestmark = pytest.mark.integration


def run(server, tmp_path, *extra: str) -> int:
    return main(["run", "--fhir-url", server.base_url, "--state", str(tmp_path / "state.sqlite3"),
                 "--log-format", "json", *extra])


def grade_of(flag: dict) -> str:
    return next(c["code"] for c in flag["code"]["coding"] if c["system"].endswith("/neutropenia-grade"))


def test_flags_written_for_each_abnormal_patient_and_second_run_writes_nothing(fhir_server, tmp_path):
    fhir_server.load(
        patient("p-normal"), anc("o-normal", "p-normal", 2.5),
        patient("p-mild"), anc("o-mild", "p-mild", 1.2),
        patient("p-moderate"), anc("o-moderate", "p-moderate", 800, unit="/uL"),
        patient("p-severe"), anc("o-severe", "p-severe", 0.3, unit="10*9/L"),
        patient("p-alias"), anc("o-alias", "p-alias", 0.4, unit="K/uL"),
    )
    assert run(fhir_server, tmp_path) == 0

    flags = {f["subject"]["reference"]: f for f in fhir_server.flags()}
    assert {ref: grade_of(f) for ref, f in flags.items()} == {
        "Patient/p-mild": "mild",
        "Patient/p-moderate": "moderate",
        "Patient/p-severe": "severe",
        "Patient/p-alias": "severe",
    }
    severe = flags["Patient/p-severe"]
    assert severe["status"] == "active"
    assert severe["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "165517008",
                                           "display": "Neutropenia"}
    assert severe["code"]["text"] == "Severe neutropenia: ANC 300 cells/µL on 2026-11-20"
    assert severe["category"][0]["coding"][0]["code"] == "clinical"
    assert severe["period"]["start"].startswith("2026-11-20T08:00:00")
    assert severe["extension"][0]["valueReference"]["reference"] == "Observation/o-severe"
    assert severe["meta"]["tag"][0]["code"] == "anc-adapter"
    versions = {f["id"]: f["meta"]["versionId"] for f in fhir_server.flags()}

    assert run(fhir_server, tmp_path) == 0
    again = fhir_server.flags()
    assert len(again) == 4
    assert {f["id"]: f["meta"]["versionId"] for f in again} == versions  # untouched, not re-written


def test_rerun_with_lost_state_creates_no_duplicate(fhir_server, tmp_path):
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.4))
    assert run(fhir_server, tmp_path) == 0
    (tmp_path / "state.sqlite3").unlink()  # as if the state had been lost after the server accepted
    assert run(fhir_server, tmp_path) == 0
    assert len(fhir_server.flags("p1")) == 1


def test_unknown_unit_is_quarantined_and_visible_in_status(fhir_server, tmp_path, capsys):
    fhir_server.load(patient("p1"), anc("o-bad", "p1", 1.1, unit="mmol/L"))
    assert run(fhir_server, tmp_path) == 0
    assert fhir_server.flags() == []
    capsys.readouterr()
    assert main(["status", "--json", "--state", str(tmp_path / "state.sqlite3")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(q["observation_id"], q["reason"]) for q in report["quarantine"]] == [("o-bad", "unknown-unit")]


def test_child_and_adult_with_the_same_count_are_graded_differently(fhir_server, tmp_path):
    fhir_server.load(
        patient("adult", "1980-05-05"), anc("o-adult", "adult", 1.2, effective="2026-11-20T08:00:00Z"),
        patient("infant", "2026-05-01"), anc("o-infant", "infant", 1.2, effective="2026-11-20T08:00:00Z"),
    )
    assert run(fhir_server, tmp_path) == 0
    assert [grade_of(f) for f in fhir_server.flags("adult")] == ["mild"]
    assert fhir_server.flags("infant") == []  # 1200 is normal from 2 weeks to 1 year


def test_dry_run_prints_the_flags_but_writes_nothing(fhir_server, tmp_path, capsys):
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.4))
    assert run(fhir_server, tmp_path, "--dry-run") == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["resourceType"] for r in printed] == ["Flag"]
    assert fhir_server.flags() == []
    assert run(fhir_server, tmp_path) == 0  # the dry run moved no watermark and recorded nothing
    assert len(fhir_server.flags()) == 1


def test_unreachable_server_exits_3_after_retries(tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text('[fhir]\nbase_url = "http://127.0.0.1:9/fhir"\nretries = 1\nretry_budget_s = 5\n')
    code = main(["run", "--config", str(config), "--state", str(tmp_path / "s.sqlite3")])
    assert code == 3


def test_metrics_file_in_prometheus_text_format(fhir_server, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    fhir_server.load(patient("p1"), anc("o1", "p1", 0.4), anc("o2", "p1", 1.0, unit="mmol/L",
                                                              effective="2026-11-19T08:00:00Z"))
    metrics_file = tmp_path / "textfile" / "anc_adapter.prom"
    assert run(fhir_server, tmp_path, "--metrics-file", str(metrics_file)) == 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics_file.read_text())
        for s in family.samples
    }
    assert samples[("anc_adapter_last_run_exit_code", ())] == 0
    assert samples[("anc_adapter_quarantine_size", ())] == 1
    assert samples[("anc_adapter_last_run_graded", (("grade", "severe"),))] == 1
    assert samples[("anc_adapter_last_run_observations", (("outcome", "created"),))] == 1
    assert samples[("anc_adapter_last_run_http_requests", (("status", "200"),))] >= 3
    assert samples[("anc_adapter_last_success_timestamp_seconds", ())] > 1.7e9
    assert list(metrics_file.parent.iterdir()) == [metrics_file]  # written by rename: no temporary left

    failing = tmp_path / "fail.toml"
    failing.write_text('[fhir]\nbase_url = "http://127.0.0.1:9/fhir"\nretries = 0\n')
    assert main(["run", "--config", str(failing), "--state", str(tmp_path / "state.sqlite3"),
                 "--metrics-file", str(metrics_file)]) == 3
    samples = {s.name: s.value for family in text_string_to_metric_families(metrics_file.read_text())
               for s in family.samples if not s.labels}
    assert samples["anc_adapter_last_run_exit_code"] == 3
    assert samples["anc_adapter_last_success_timestamp_seconds"] > 1.7e9  # still the earlier success


def test_risk_assessment_outcome_carries_snomed_infectious_disease_beside_our_code(fhir_server, tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text('[output]\nresources = ["Flag", "RiskAssessment"]\n')
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.3))
    assert run(fhir_server, tmp_path, "--config", str(config)) == 0
    [assessment] = fhir_server.risk_assessments("p1")
    outcome = assessment["prediction"][0]["outcome"]
    assert outcome["text"] == "Serious infection"
    codings = {(c["system"], c["code"]): c.get("display") for c in outcome["coding"]}
    assert codings[("http://snomed.info/sct", "40733004")] == "Infectious disease"
    assert any(system.endswith("/CodeSystem/outcome") and code == "serious-infection"
               for system, code in codings)
