"""Kill the adapter (SIGKILL) at each stage boundary, rerun, and check the server: no duplicate, no gap.
Also: one run at a time (exit 5), --max-duration, and no PHI in any log line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from adapter import crashpoints
from adapter.cli import main
from adapter.state import locked
from builders import anc, patient

pytestmark = pytest.mark.integration

# 24 patients; every third normal. Grades cycle so every grade is represented.
VALUES = [(0.3, "severe"), (0.8, "moderate"), (2.4, None), (1.2, "mild")]
PATIENTS = [(f"p{i:02d}", *VALUES[i % len(VALUES)]) for i in range(24)]


def load_cohort(server) -> None:
    resources = []
    for number, (patient_id, value, _) in enumerate(PATIENTS):
        resources += [patient(patient_id, "1975-06-01", name=f"Crashtest{number}"),
                      anc(f"o-{patient_id}", patient_id, value)]
    server.load(*resources)


def config_file(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "adapter.toml"
    path.write_text(
        f'[fhir]\nbase_url = "{base_url}"\npage_size = 5\nretries = 1\nretry_budget_s = 5\n'
        f'[output]\nresources = ["Flag", "RiskAssessment"]\n[state]\npath = "{tmp_path / "state.sqlite3"}"\n'
    )
    return path


def run_subprocess(config: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    if crash_at:
        env[crashpoints.ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "adapter", "run", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=120)


def assert_exactly_right(server) -> None:
    flags = server.flags()
    by_patient = Counter(f["subject"]["reference"] for f in flags)
    assert all(n == 1 for n in by_patient.values()), f"duplicate Flags: {by_patient}"
    expected = {f"Patient/{pid}": grade for pid, _, grade in PATIENTS if grade}
    got = {
        f["subject"]["reference"]: next(c["code"] for c in f["code"]["coding"] if "neutropenia-grade" in c["system"])
        for f in flags if f["status"] == "active"
    }
    assert got == expected
    risks = Counter(r["identifier"][0]["value"] for r in server.search("RiskAssessment"))
    assert risks == Counter({f"{pid}/o-{pid}": 1 for pid, _, grade in PATIENTS if grade})


@pytest.mark.parametrize("crash_at", [f"{point}:{nth}" for point in crashpoints.POINTS for nth in (1, 3)])
def test_killed_at_any_stage_then_rerun_leaves_no_duplicate_and_no_gap(fhir_server, tmp_path, crash_at):
    load_cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url)
    killed = run_subprocess(config, crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = run_subprocess(config)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_exactly_right(fhir_server)
    again = run_subprocess(config)
    summary = [json.loads(line) for line in again.stderr.splitlines() if '"run-summary"' in line][0]["summary"]
    assert (summary["created"], summary["updated"]) == (0, 0)


def test_a_second_concurrent_run_exits_5_and_does_nothing(state_location):  # SQLite and PostgreSQL
    state = state_location
    with locked(state):
        code = main(["run", "--fhir-url", "http://127.0.0.1:9/fhir", "--state", str(state)])
    assert code == 5


def test_max_duration_stops_cleanly_and_the_next_run_finishes(fhir_server, tmp_path, capsys):
    load_cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url)
    assert main(["run", "--config", str(config), "--max-duration", "0", "--log-format", "json"]) == 0
    first = [json.loads(l) for l in capsys.readouterr().err.splitlines() if '"run-summary"' in l][0]["summary"]
    assert first["complete"] is False and first["pages"] == 1
    assert first["watermark"] is None  # an incomplete pass does not move the watermark
    assert 0 < len(fhir_server.flags()) < 18  # the first page's writes were committed
    assert main(["run", "--config", str(config)]) == 0
    assert_exactly_right(fhir_server)


def test_no_patient_data_in_any_log_line(fhir_server, tmp_path, capsys):
    names = [f"Crashtest{n}" for n in range(len(PATIENTS))]
    load_cohort(fhir_server)
    fhir_server.load(patient("q1", "1961-02-03", name="Zyxwvutsrq"),
                     anc("o-q1", "q1", 1.1, unit="mmol/L"),  # quarantined
                     anc("o-q2", "q1", None))  # no value
    config = config_file(tmp_path, fhir_server.base_url)
    for fmt in ("json", "text"):
        assert main(["run", "--config", str(config), "--log-format", fmt, "--log-level", "DEBUG"]) == 0
        assert main(["status", "--config", str(config), "--json"]) == 0
    logs = capsys.readouterr()
    everything = logs.err + logs.out
    assert "o-q1" in everything  # ids are logged, so the check below is not vacuous
    for secret in names + ["Zyxwvutsrq", "1975-06-01", "1961-02-03", "Alex"]:
        assert secret not in everything


def test_lost_state_after_an_episode_grew_backwards_adopts_the_existing_flag(fhir_server, tmp_path):
    # Flag named after o5; then an older abnormal o3 joins the same episode; then the state is lost.
    # Recomputed from scratch the episode would be named after o3: without looking on the server first,
    # the patient would get a second active Flag.
    fhir_server.load(patient("p"), anc("o5", "p", 0.3, effective="2026-11-20T08:00:00Z"))
    config = config_file(tmp_path, fhir_server.base_url)
    assert main(["run", "--config", str(config)]) == 0
    fhir_server.load(anc("o3", "p", 0.8, effective="2026-11-18T08:00:00Z"))
    assert main(["run", "--config", str(config)]) == 0
    (tmp_path / "state.sqlite3").unlink()
    assert main(["run", "--config", str(config)]) == 0
    flags = fhir_server.flags("p")
    assert [(f["status"], f["identifier"][0]["value"]) for f in flags] == [("active", "p/o5")]
    assert flags[0]["period"]["start"].startswith("2026-11-18")
