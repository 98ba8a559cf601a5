"""SIGTERM / SIGINT stop a run at a safe point (exit 6), even while the server hangs; a run stopped early
leaves a resume point, so a backlog drains over several runs without re-reading it each time."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapter import crashpoints
from adapter.cli import main
from adapter.state import State
from builders import anc, patient
from faultproxy import FaultProxy
from test_crash_safety import assert_exactly_right, config_file, load_cohort

pytestmark = pytest.mark.integration


def summaries(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if '"run-summary"' in line]


def committed_observations(state_path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{state_path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM observations").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_server_hangs_stops_at_a_safe_point_and_the_rerun_finishes(
        fhir_server, tmp_path, signum):
    load_cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url)
    state_path = tmp_path / "state.sqlite3"
    proxy = FaultProxy(fhir_server.base_url, rate=0.0)
    # Everything up to page 1's write passes (metadata, page 1, the prefetch of page 2, the context reads
    # — a batch, also a POST — and the Flag lookup for page 1's patients, the write); then every request
    # hangs (longer than the test waits for the process): page 1 is committed, page 2 cannot be.
    proxy.hold(120, after_method="POST", body_containing=b'"type":"transaction"')
    proxy.start()
    try:
        env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
        process = subprocess.Popen(
            [sys.executable, "-m", "adapter", "run", "--config", str(config), "--fhir-url", proxy.base_url,
             "--log-format", "json", "--metrics-file", str(tmp_path / "metrics.prom")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: (proxy.held > 0 and committed_observations(state_path) > 0)
                     or process.poll() is not None, "page 1 to commit and a request to hang")
            assert process.poll() is None, process.stderr.read()[-2000:]
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        proxy.stop()
    assert process.returncode == 6, stderr[-3000:]
    [summary] = summaries(stderr)
    assert summary["exit_code"] == 6
    assert summary["summary"]["stopped"] is True and summary["summary"]["complete"] is False
    assert 0 < summary["summary"]["observations_read"] < 24
    assert "anc_adapter_last_run_exit_code 6.0" in (tmp_path / "metrics.prom").read_text()
    state = State.open(state_path)
    assert state.watermark() is None  # the first pass did not finish: no watermark yet
    assert state.resume_point() is not None
    assert state.last_runs(1)[0]["exit_code"] == 6

    rerun = subprocess.run([sys.executable, "-m", "adapter", "run", "--config", str(config)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_exactly_right(fhir_server)
    assert State.open(state_path).resume_point() is None
    assert State.open(state_path).watermark() is not None


BACKLOG_VALUES = [(0.3, "severe"), (0.8, "moderate"), (1.2, "mild"), (2.4, None)]


def load_backlog(server, observations: int, per_request: int = 50) -> None:
    """Patients with four counts each, loaded in small transactions so lastUpdated values differ as they
    would on a live server (one transaction stamps its entries within a few milliseconds)."""
    resources = []
    for number in range(observations // 4):
        resources.append(patient(f"b{number}"))
        resources += [anc(f"ob{number}-{k}", f"b{number}", BACKLOG_VALUES[number % 4][0],
                          effective=f"2026-11-{10 + k:02d}T08:00:00Z") for k in range(4)]
    for start in range(0, len(resources), per_request):
        server.load(*resources[start:start + per_request])


def test_a_backlog_drains_over_runs_stopped_early_without_reading_it_again(fhir_server, tmp_path, capsys):
    backlog, page_size = 500, 100
    load_backlog(fhir_server, backlog)
    config = tmp_path / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{fhir_server.base_url}"\npage_size = {page_size}\n'
                      f'[state]\npath = "{tmp_path / "state.sqlite3"}"\n')
    runs = []
    for _ in range(30):
        # --max-duration 0: each run stops after its first page, the shortest budget there is.
        assert main(["run", "--config", str(config), "--max-duration", "0", "--log-format", "json"]) == 0
        runs.append(summaries(capsys.readouterr().err)[0]["summary"])
        if runs[-1]["complete"]:
            break
    assert runs[-1]["complete"] and runs[-1]["watermark"] is not None, [r["resume_at"] for r in runs]
    assert all(not r["complete"] and r["watermark"] is None and r["resume_at"] for r in runs[:-1])
    read = sum(r["observations_read"] for r in runs)
    # Each run re-reads at most the entries stamped at its resume instant, never the pages before it.
    assert backlog <= read <= backlog + 5 * len(runs), [r["observations_read"] for r in runs]
    assert len(runs) <= backlog // page_size + 1, [r["observations_read"] for r in runs]  # a page a run
    flags = fhir_server.flags()
    graded = {f["subject"]["reference"]: next(c["code"] for c in f["code"]["coding"]
                                              if "neutropenia-grade" in c["system"]) for f in flags}
    assert len(flags) == len(graded)  # one Flag per patient
    assert all(f["status"] == "active" for f in flags)
    assert graded == {f"Patient/b{n}": BACKLOG_VALUES[n % 4][1] for n in range(backlog // 4)
                      if BACKLOG_VALUES[n % 4][1]}
    # The pass is over: the next run starts from the watermark and finds nothing new to write.
    assert main(["run", "--config", str(config), "--log-format", "json"]) == 0
    last = summaries(capsys.readouterr().err)[0]["summary"]
    assert (last["created"], last["updated"], last["resume_at"]) == (0, 0, None)
