"""Issue 13: pages written as one batch write each Flag and RiskAssessment once, with the same crash
safety as page-by-page writing: a kill at any point, then a rerun, leaves no duplicate and no gap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from adapter import crashpoints
from adapter.localserver import sekmet
from builders import anc, patient
from conftest import Server
from test_crash_safety import run_subprocess

pytestmark = pytest.mark.integration

# Twelve patients, each with three counts loaded in three rounds: a patient's counts are pages apart
# (page size 5), the way a backlog spreads a patient's results over a pass.
PATIENTS = [f"s{i:02d}" for i in range(12)]
ROUNDS = [(1.2, "2026-11-18T08:00:00Z"), (0.8, "2026-11-19T08:00:00Z"), (0.3, "2026-11-20T08:00:00Z")]


def load_spread(server: Server) -> None:
    server.load(*[patient(p, "1975-06-01", name=f"Batchtest{n}") for n, p in enumerate(PATIENTS)])
    for k, (value, effective) in enumerate(ROUNDS):  # one load a round: each round stamped later
        server.load(*[anc(f"o-{p}-{k}", p, value, effective=effective) for p in PATIENTS])


def config_file(tmp_path: Path, base_url: str, batch: int) -> Path:
    path = tmp_path / "adapter.toml"
    path.write_text(
        f'[fhir]\nbase_url = "{base_url}"\npage_size = 5\nretries = 1\nretry_budget_s = 5\n'
        f'[poll]\nbatch_observations = {batch}\n'
        f'[output]\nresources = ["Flag", "RiskAssessment"]\n[state]\npath = "{tmp_path / "state.sqlite3"}"\n'
    )
    return path


def outcome(server: Server) -> tuple[dict[str, tuple[str, str]], Counter]:
    """What the server ends with: each patient's Flags (status, grade) and the RiskAssessment identifiers."""
    flags: dict[str, list[tuple[str, str]]] = {}
    for f in server.flags():
        grade = next(c["code"] for c in f["code"]["coding"] if "neutropenia-grade" in c["system"])
        flags.setdefault(f["subject"]["reference"], []).append((f["status"], grade))
    risks = Counter(r["identifier"][0]["value"] for r in server.search("RiskAssessment"))
    return {subject: tuple(sorted(items)) for subject, items in flags.items()}, risks


def summary_of(completed) -> dict:
    return [json.loads(line) for line in completed.stderr.splitlines() if '"run-summary"' in line][0]["summary"]


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> tuple[dict, Counter]:
    """The outcome of an undisturbed page-by-page run on a server of its own: batching and kills must
    not change what the server ends with."""
    tmp_path = tmp_path_factory.mktemp("reference")
    with sekmet() as base_url:
        server = Server(base_url)
        load_spread(server)
        assert run_subprocess(config_file(tmp_path, base_url, 0)).returncode == 0
        return outcome(server)


def test_one_batch_writes_each_flag_and_risk_assessment_once(fhir_server, tmp_path, expected):
    load_spread(fhir_server)
    done = run_subprocess(config_file(tmp_path, fhir_server.base_url, 1000))
    assert done.returncode == 0, done.stderr[-2000:]
    assert outcome(fhir_server) == expected
    flags = fhir_server.flags()
    assert len(flags) == len(PATIENTS)
    assert [fhir_server.history_count("Flag", f["id"]) for f in flags] == [1] * len(flags)  # written once
    risks = fhir_server.search("RiskAssessment")
    assert len(risks) == len(PATIENTS) * len(ROUNDS)
    assert all(fhir_server.history_count("RiskAssessment", r["id"]) == 1 for r in risks)
    summary = summary_of(done)
    assert (summary["pages"], summary["created"], summary["updated"]) == (8, len(flags) + len(risks), 0)


def test_page_by_page_writes_a_flag_again_on_each_page_that_changes_it(fhir_server, tmp_path, expected):
    """The default, for contrast: pages with no patient in common are written as they come, so a patient
    whose counts are pages apart has their Flag written more than once (what batch_observations saves)."""
    load_spread(fhir_server)
    assert run_subprocess(config_file(tmp_path, fhir_server.base_url, 0)).returncode == 0
    assert outcome(fhir_server) == expected
    assert max(fhir_server.history_count("Flag", f["id"]) for f in fhir_server.flags()) > 1


@pytest.mark.parametrize("crash_at", [f"{point}:{nth}" for point in crashpoints.POINTS for nth in (1, 2)])
def test_killed_in_a_batch_then_rerun_leaves_no_duplicate_and_no_gap(fhir_server, tmp_path, crash_at, expected):
    load_spread(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url, 12)  # three batches of 15, 15 and 6 counts
    killed = run_subprocess(config, crash_at)
    assert killed.returncode < 0, killed.stderr[-2000:]  # SIGKILL
    rerun = run_subprocess(config)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert outcome(fhir_server) == expected
    again = summary_of(run_subprocess(config))
    assert (again["created"], again["updated"]) == (0, 0)
