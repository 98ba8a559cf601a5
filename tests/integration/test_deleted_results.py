"""A lab hard-deletes Observations on the real local server (Sekmet answers 410 afterwards): what they
caused is withdrawn as for entered-in-error, once; an Observation created again is graded again."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapter.cli import main
from builders import anc, patient

pytestmark = pytest.mark.integration


@pytest.fixture
def adapter(fhir_server, tmp_path, capsys):
    config = tmp_path / "adapter.toml"
    config.write_text('[output]\nresources = ["Flag", "RiskAssessment"]\n')
    state = str(tmp_path / "state.sqlite3")

    def run(*extra: str) -> dict | list[dict]:
        """One run; its summary as `status` reports it, or for --dry-run what it printed."""
        capsys.readouterr()
        assert main(["run", "--config", str(config), "--fhir-url", fhir_server.base_url, "--state", state,
                     "--log-format", "json", *extra]) == 0
        if "--dry-run" in extra:  # not recorded in the run history
            return [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert main(["status", "--json", "--state", state]) == 0
        return json.loads(capsys.readouterr().out)["last_runs"][0]["summary"]

    return run


def grade(resource: dict) -> str:
    return next(c["code"] for c in resource["code"]["coding"] if c["system"].endswith("/neutropenia-grade"))


def delete(fhir_server, observation_id: str) -> None:
    response = fhir_server.http.delete(f"{fhir_server.base_url}/Observation/{observation_id}", timeout=30)
    assert response.status_code in (200, 204)
    assert fhir_server.http.get(f"{fhir_server.base_url}/Observation/{observation_id}", timeout=30).status_code == 410


def versions(fhir_server) -> dict[str, str]:
    return {f"{r['resourceType']}/{r['id']}": r["meta"]["versionId"]
            for r in fhir_server.search("Flag") + fhir_server.search("RiskAssessment")}


def test_deleted_results_withdraw_their_flag_and_assessment_once(fhir_server, adapter, tmp_path):
    fhir_server.load(
        patient("single"), anc("o-single", "single", 0.4),
        patient("two"), anc("o-mild", "two", 1.2, effective="2026-11-20T08:00:00Z"),
        anc("o-severe", "two", 0.3, effective="2026-11-21T08:00:00Z"),
        patient("kept"), anc("o-kept", "kept", 0.8),
    )
    first = adapter()
    assert first["evidence_requests"] == 0  # nothing live before the first run
    [flag] = fhir_server.flags("two")
    assert grade(flag) == "severe"

    delete(fhir_server, "o-single")
    delete(fhir_server, "o-severe")  # the latest of two abnormal counts
    metrics = tmp_path / "anc_adapter.prom"
    second = adapter("--metrics-file", str(metrics))
    # One `_id` search for the four ids behind live outputs, one read confirming each of the two deleted.
    assert (second["evidence_checked"], second["evidence_requests"], second["evidence_deleted"]) == (4, 3, 2)
    samples = {(s.name, tuple(s.labels.values())): s.value
               for family in text_string_to_metric_families(metrics.read_text()) for s in family.samples}
    assert samples[("anc_adapter_last_run_evidence_checked", ())] == 4
    assert samples[("anc_adapter_last_run_evidence_requests", ())] == 3
    assert samples[("anc_adapter_last_run_observations", ("evidence_deleted",))] == 2

    [single] = fhir_server.flags("single")
    assert single["status"] == "entered-in-error"  # its only evidence is gone
    [risk] = fhir_server.risk_assessments("single")
    assert risk["status"] == "entered-in-error"
    [two] = fhir_server.flags("two")
    assert two["status"] == "active" and grade(two) == "mild"  # back to the earlier count's grade
    assert two["extension"][0]["valueReference"]["reference"] == "Observation/o-mild"
    risks = {r["identifier"][0]["value"]: r["status"] for r in fhir_server.risk_assessments("two")}
    assert risks == {"two/o-mild": "final", "two/o-severe": "entered-in-error"}
    [kept] = fhir_server.flags("kept")
    assert kept["status"] == "active" and grade(kept) == "moderate"

    before = versions(fhir_server)
    third = adapter()
    assert versions(fhir_server) == before  # nothing written twice
    assert (third["created"], third["updated"], third["evidence_deleted"]) == (0, 0, 0)
    assert (third["evidence_checked"], third["evidence_requests"]) == (2, 1)  # o-mild and o-kept


def test_a_deletion_shows_in_a_dry_run_and_a_recreated_result_is_graded_again(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 0.4))
    adapter()
    delete(fhir_server, "o1")
    before = versions(fhir_server)
    printed = adapter("--dry-run")
    assert sorted((r["resourceType"], r["status"]) for r in printed) == [("Flag", "entered-in-error"),
                                                                         ("RiskAssessment", "entered-in-error")]
    assert versions(fhir_server) == before  # shown, not written
    adapter()
    [withdrawn] = fhir_server.flags("p")
    assert withdrawn["status"] == "entered-in-error"

    # Not an undelete (FHIR has none), but the lab may PUT a resource under the same id again.
    fhir_server.load(anc("o1", "p", 0.3))
    recreated = adapter()
    assert recreated["already_processed"] == 0
    flags = {f["status"]: f for f in fhir_server.flags("p")}
    assert set(flags) == {"entered-in-error", "active"}  # a retracted Flag is never revived: a new one
    assert grade(flags["active"]) == "severe"
    assert flags["active"]["extension"][0]["valueReference"]["reference"] == "Observation/o1"


def test_a_deleted_input_of_a_derived_count_withdraws_the_derived_alert(fhir_server, tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text('[classify]\nderive = true\n[output]\nresources = ["Flag", "RiskAssessment"]\n')
    args = ["run", "--config", str(config), "--fhir-url", fhir_server.base_url,
            "--state", str(tmp_path / "state.sqlite3")]
    # WBC 2.0 × 10³/µL with 25 % neutrophils = 500 cells/µL: moderate, derived from both.
    fhir_server.load(patient("p"), anc("w", "p", 2.0, code="6690-2"), anc("n", "p", 25, unit="%", code="770-8"))
    assert main(args) == 0
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "active" and grade(flag) == "moderate"
    delete(fhir_server, "w")  # the differential alone gives no count
    assert main(args) == 0
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "entered-in-error"
    [risk] = fhir_server.risk_assessments("p")
    assert risk["status"] == "entered-in-error"


@pytest.mark.parametrize("crash_at", ["classified:1", "during-write:1", "write-accepted:1", "committed:1"])
def test_killed_while_withdrawing_a_deleted_result_then_rerun_withdraws_it_once(fhir_server, tmp_path, crash_at):
    import os
    import signal
    import subprocess
    import sys

    from adapter import crashpoints

    config = tmp_path / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{fhir_server.base_url}"\nretries = 1\nretry_budget_s = 5\n'
                      f'[output]\nresources = ["Flag", "RiskAssessment"]\n'
                      f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n')

    def run(crash: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
        env.update({crashpoints.ENV: crash} if crash else {})
        return subprocess.run([sys.executable, "-m", "adapter", "run", "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=120)

    fhir_server.load(patient("a"), anc("o-a", "a", 0.4), patient("b"), anc("o-b", "b", 0.8))
    assert run().returncode == 0
    delete(fhir_server, "o-a")
    # The withdrawal is the run's first write: the crash point is reached there, before any page is read.
    assert run(crash_at).returncode == -signal.SIGKILL
    assert run().returncode == 0
    # No duplicate (a write accepted before the kill is repeated by the rerun: the same PUT, same resource).
    flags = sorted((f["subject"]["reference"], f["status"]) for f in fhir_server.flags())
    assert flags == [("Patient/a", "entered-in-error"), ("Patient/b", "active")]
    assert sorted(r["status"] for r in fhir_server.search("RiskAssessment")) == ["entered-in-error", "final"]
    again = run()
    summary = [json.loads(line) for line in again.stderr.splitlines() if '"run-summary"' in line][0]["summary"]
    assert (summary["created"], summary["updated"], summary["evidence_checked"]) == (0, 0, 1)
