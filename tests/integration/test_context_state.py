"""Clinical context and the guarantees that hold for counts (issue 11, item 6), on the real server: a late
fever's escalation survives a kill at any stage; a lost state adopts the febrile Flag instead of writing a
second one; a withdrawn chemotherapy record takes back what it caused; a rerun writes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from adapter.cli import main
from builders import anc, patient
from context_builders import at, atc, medication_administration, temperature
from test_crash_safety import run_subprocess as run  # the CLI as a subprocess, killed at a crash point

pytestmark = pytest.mark.integration
FEBRILE = ("http://snomed.info/sct", "409089005")
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"


def config_file(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "adapter.toml"
    path.write_text(f'[fhir]\nbase_url = "{base_url}"\nretries = 1\nretry_budget_s = 5\n'
                    f'[output]\nresources = ["Flag", "RiskAssessment"]\n'
                    f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n')
    return path


def summary(result: subprocess.CompletedProcess) -> dict:
    return [json.loads(line) for line in result.stderr.splitlines() if '"run-summary"' in line][0]["summary"]


def febrile(flag: dict) -> bool:
    return FEBRILE in {(c["system"], c["code"]) for c in flag["code"]["coding"]}


def details(flag: dict) -> list[str]:
    return [e["valueReference"]["reference"] for e in flag.get("extension", []) if e["url"] == FLAG_DETAIL]


@pytest.mark.parametrize("crash_at", [f"{point}:1" for point in
                                      ("classified", "during-write", "write-accepted", "committed")])
def test_a_late_fever_escalates_exactly_once_whatever_stage_the_run_is_killed_at(fhir_server, tmp_path, crash_at):
    config = config_file(tmp_path, fhir_server.base_url)
    fhir_server.load(patient("p"), anc("o1", "p", 0.3, effective=at()))
    assert run(config).returncode == 0
    [before] = fhir_server.flags("p")
    assert not febrile(before)

    fhir_server.load(temperature("t1", "p", 38.9, at(hours=3)))
    killed = run(config, crash_at)  # the first batch of this run is the context poll's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert run(config).returncode == 0
    [after] = fhir_server.flags("p")
    assert after["id"] == before["id"] and after["status"] == "active" and febrile(after)
    assert details(after) == ["Observation/o1", "Observation/t1"]
    again = summary(run(config))
    assert (again["created"], again["updated"]) == (0, 0)


def test_a_lost_state_adopts_the_febrile_flag_instead_of_writing_a_second(fhir_server, tmp_path):
    config = config_file(tmp_path, fhir_server.base_url)
    fhir_server.load(patient("p"), anc("o1", "p", 0.3, effective=at()),
                     temperature("t1", "p", 38.6, at(hours=1)),
                     medication_administration("ma1", "p", at(days=-9), atc("L01XA01", "cisplatin")))
    assert run(config).returncode == 0
    [before] = fhir_server.flags("p")
    assert febrile(before) and details(before) == ["Observation/o1", "Observation/t1", "MedicationAdministration/ma1"]

    for leftover in tmp_path.glob("state.sqlite3*"):
        leftover.unlink()
    result = run(config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary(result)["adopted"] == 1
    [after] = fhir_server.flags("p")
    assert after["id"] == before["id"] and after["status"] == "active" and febrile(after)
    assert after["code"]["text"] == before["code"]["text"]
    again = summary(run(config))
    assert (again["created"], again["updated"]) == (0, 0)


def test_a_withdrawn_chemotherapy_record_takes_back_what_it_caused(fhir_server, tmp_path):
    config = config_file(tmp_path, fhir_server.base_url)
    cisplatin = atc("L01XA01", "cisplatin")
    fhir_server.load(patient("p"), anc("o1", "p", 0.8, effective=at()),
                     medication_administration("ma1", "p", at(days=-9), cisplatin))
    assert run(config).returncode == 0
    [before] = fhir_server.flags("p")
    assert "after chemotherapy: cisplatin on 2026-11-11 (9 days before this count)" in before["code"]["text"]
    assert "MedicationAdministration/ma1" in details(before)

    fhir_server.load(medication_administration("ma1", "p", at(days=-9), cisplatin, status="entered-in-error"))
    assert run(config).returncode == 0
    [after] = fhir_server.flags("p")
    assert after["id"] == before["id"]
    assert after["code"]["text"] == "Moderate neutropenia: ANC 800 cells/µL on 2026-11-20"
    assert details(after) == ["Observation/o1"]
    [risk] = fhir_server.risk_assessments("p")
    assert "MedicationAdministration/ma1" not in {b["reference"] for b in risk["basis"]}


def test_context_switched_off_says_nothing(fhir_server, tmp_path, capsys):
    config = config_file(tmp_path, fhir_server.base_url)
    config.write_text(config.read_text() + "[context]\nfebrile = false\nchemotherapy = false\nprojection = false\n")
    fhir_server.load(patient("p"), anc("o0", "p", 2.0, effective=at(hours=-24)), anc("o1", "p", 0.9, effective=at()),
                     temperature("t1", "p", 39.2, at(hours=1)),
                     medication_administration("ma1", "p", at(days=-9), atc("L01XA01", "cisplatin")))
    assert main(["run", "--config", str(config), "--log-format", "json"]) == 0
    [flag] = fhir_server.flags("p")
    assert flag["code"]["text"] == "Moderate neutropenia: ANC 900 cells/µL on 2026-11-20"
    assert details(flag) == ["Observation/o1"] and not febrile(flag)


def test_without_flags_a_late_fever_still_reaches_the_open_episode_s_risk_assessment(fhir_server, tmp_path):
    config = config_file(tmp_path, fhir_server.base_url)
    config.write_text(config.read_text().replace('resources = ["Flag", "RiskAssessment"]',
                                                 'resources = ["RiskAssessment"]'))
    fhir_server.load(patient("p"), anc("o1", "p", 0.3, effective=at()))
    assert run(config).returncode == 0
    [before] = fhir_server.risk_assessments("p")
    assert before["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"
    assert not before["code"]["text"].startswith("Febrile")

    fhir_server.load(temperature("t1", "p", 38.5, at(hours=6)))
    assert run(config).returncode == 0
    [after] = fhir_server.risk_assessments("p")
    assert after["status"] == "amended"
    assert after["code"]["text"].startswith("Febrile neutropenia: temperature 38.5 °C at 2026-11-20T14:00Z")
    assert "Observation/t1" in {b["reference"] for b in after["basis"]}
