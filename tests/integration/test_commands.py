"""check / status / quarantine / config commands against the real local server."""

from __future__ import annotations

import json

import pytest

from adapter.cli import main
from builders import anc, patient

pytestmark = pytest.mark.integration


def test_check_reports_ready_against_the_local_server(fhir_server, capsys, tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text('[output]\nresources = ["Flag", "RiskAssessment"]\n')
    assert main(["check", "--config", str(config), "--fhir-url", fhir_server.base_url]) == 0
    out = capsys.readouterr().out
    # Sekmet 0.1.1 lists no RiskAssessment in its CapabilityStatement, yet writes it: since check agrees
    # with run (CONTRACT §1), that is a [warn] and "ready, with warnings", no longer [ok] and "ready".
    assert "FAIL" not in out and out.rstrip().endswith("ready, with warnings")
    assert "[ok] write Flag: conditional update by identifier" in out
    assert "[warn] write RiskAssessment: RiskAssessment is not in the CapabilityStatement; run will PUT" in out
    # Clinical context: every search `run` will send is declared by the local server (issue 11).
    assert "[ok] context: search Observation by _lastUpdated, code, date, subject" in out
    assert "[ok] context: search MedicationAdministration by _lastUpdated, effective-time, subject" in out
    assert "not read" not in out
    config.write_text('[output]\nresources = ["Flag"]\n')
    assert main(["check", "--config", str(config), "--fhir-url", fhir_server.base_url]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "[warn]" not in out and out.rstrip().endswith("\nready")


def test_check_exit_codes_for_unreachable_and_bad_config(tmp_path, capsys):
    config = tmp_path / "adapter.toml"
    config.write_text('[fhir]\nbase_url = "http://127.0.0.1:9/fhir"\nretries = 0\n')
    assert main(["check", "--config", str(config)]) == 3
    assert "[FAIL] server reachable" in capsys.readouterr().out
    config.write_text('[fhir]\nbase_url = "http://127.0.0.1:9/fhir"\npage_sise = 10\n')
    assert main(["check", "--config", str(config)]) == 2
    assert "page_sise" in capsys.readouterr().err


@pytest.mark.parametrize("toml,key", [
    ('[fhir]\npage_size = "many"\n', "fhir.page_size"),
    ('[classify]\nprofile = "who"\n', "classify.profile"),
    ('[poll]\noverlap = "5 minutes"\n', "poll.overlap"),
    ('[output]\nresources = ["Flag", "Condition"]\n', "output.resources"),
    ('[nonsense]\nx = 1\n', "nonsense"),
    ('not toml at all [', "not valid TOML"),
])
def test_config_errors_exit_2_and_name_the_key(tmp_path, capsys, toml, key):
    config = tmp_path / "adapter.toml"
    config.write_text(toml)
    assert main(["run", "--config", str(config), "--fhir-url", "http://127.0.0.1:9/fhir",
                 "--state", str(tmp_path / "s.sqlite3"), "--log-format", "json"]) == 2
    assert key in capsys.readouterr().err


def test_status_and_quarantine_commands(fhir_server, tmp_path, capsys):
    state = str(tmp_path / "state.sqlite3")
    fhir_server.load(patient("p1"), anc("o-ok", "p1", 0.4), anc("o-bad", "p1", 0.4, unit="furlongs",
                                                                  effective="2026-11-19T08:00:00Z"))
    assert main(["run", "--fhir-url", fhir_server.base_url, "--state", state]) == 0
    capsys.readouterr()
    assert main(["status", "--json", "--state", state]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["watermark"] is not None and report["watermark_age_s"] >= 0
    assert report["last_runs"][0]["exit_code"] == 0
    assert report["last_runs"][0]["summary"]["classified"] == {"severe": 1}
    assert report["quarantine"][0]["observation_id"] == "o-bad"
    assert report["quarantine"][0]["reason"] == "unknown-unit"

    assert main(["quarantine", "list", "--state", state]) == 0
    assert json.loads(capsys.readouterr().out)["observation_id"] == "o-bad"
    assert main(["quarantine", "discard", "o-nope", "--state", state]) == 2
    assert main(["quarantine", "discard", "o-bad", "--state", state]) == 0
    capsys.readouterr()
    assert main(["quarantine", "list", "--state", state]) == 0
    assert capsys.readouterr().out == ""


def test_config_show_prints_the_effective_config_without_secrets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ANC_TEST_TOKEN", "s3cr3t-token-value")
    config = tmp_path / "adapter.toml"
    config.write_text('[auth]\ntype = "bearer"\ntoken_env = "ANC_TEST_TOKEN"\n')
    assert main(["config", "--show", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["auth"]["token_env"] == "ANC_TEST_TOKEN"
    assert shown["poll"]["overlap"] == "PT5M"
    assert "s3cr3t" not in json.dumps(shown)


def test_backfill_shows_a_progress_bar_on_a_tty_only(fhir_server, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    fhir_server.load(*[r for i in range(12) for r in (patient(f"p{i}"), anc(f"o{i}", f"p{i}", 0.4))])
    config = tmp_path / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{fhir_server.base_url}"\npage_size = 5\n'
                      f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n')
    command = [sys.executable, "-m", "adapter", "run", "--config", str(config), "--since", "2020-01-01T00:00:00Z"]
    primary, secondary = pty.openpty()
    subprocess.run(command, stderr=secondary, stdout=subprocess.DEVNULL, timeout=120, check=True)
    os.close(secondary)
    on_tty = os.read(primary, 65536).decode()
    os.close(primary)
    assert "[##############################] 12/12 observations" in on_tty
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert "observations, " not in piped.stderr.replace('"observations_read"', "")
    assert all(line.startswith("{") for line in piped.stderr.splitlines())  # JSON lines only


def test_demo_runs_the_main_job_on_the_embedded_default(capsys):
    assert main(["demo", "--log-format", "json"]) == 0
    out = capsys.readouterr().out
    assert "demo-adult-severe" in out and "severe" in out
    assert "Flags on the server with our tag, read back: 5" in out
    assert "Second run (idempotence): read=8 created=0 updated=0; Flags on the server: 5" in out
    # The febrile sample after chemotherapy (issue 11): the emergency is said first, with its evidence.
    assert "priority PH" in out and "Febrile neutropenia: temperature 38.6 °C at " in out
    assert "after chemotherapy: cyclophosphamide on " in out and "(10 days before this count)" in out
    assert "quarantined" in out  # the sample with an unknown unit
