"""`[state] url = "postgresql://…"` end to end: real runs against Sekmet with the state in a real PostgreSQL
(started by the test run), the advisory lock between two processes, a kill and a rerun, and the commands
that read the state. The state contract itself runs on both backends in test_state_contract.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapter import crashpoints
from adapter.cli import main
from adapter.state import State, locked
from builders import anc, patient

pytestmark = pytest.mark.integration


def config_file(tmp_path: Path, base_url: str, url: str, **fhir: object) -> Path:
    path = tmp_path / "adapter.toml"
    extra = "".join(f"{key} = {value}\n" for key, value in fhir.items())
    path.write_text(f'[fhir]\nbase_url = "{base_url}"\n{extra}'
                    f'[output]\nresources = ["Flag", "RiskAssessment"]\n[state]\nurl = "{url}"\n')
    return path


def cli(config: Path, *args: str, crash_at: str | None = None, **popen: object) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    if crash_at:
        env[crashpoints.ENV] = crash_at
    return subprocess.Popen([sys.executable, "-m", "adapter", *args, "--config", str(config),
                             "--log-format", "json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def finished(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def summary(stderr: str) -> dict:
    return [json.loads(line) for line in stderr.splitlines() if '"run-summary"' in line][-1]["summary"]


def cohort(server) -> None:
    server.load(patient("p1"), anc("o1", "p1", 0.3), patient("p2"), anc("o2", "p2", 0.8),
                patient("p3"), anc("o3", "p3", 2.4), patient("p4"), anc("o4", "p4", 1.2),
                anc("o5", "p4", 1.1, unit="mmol/L"))  # quarantined: an unknown unit


def test_a_run_with_postgresql_state_then_a_second_run_writes_nothing(fhir_server, tmp_path, pg_url, capsys):
    cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url, pg_url)
    assert main(["run", "--config", str(config), "--log-format", "json"]) == 0
    first = summary(capsys.readouterr().err)
    assert first["created"] == 6 and first["quarantined"] == 1  # a Flag and a RiskAssessment for 3 patients
    assert len(fhir_server.flags()) == 3

    assert main(["run", "--config", str(config), "--log-format", "json"]) == 0
    second = summary(capsys.readouterr().err)
    assert (second["created"], second["updated"]) == (0, 0)

    state = State.open(pg_url)
    assert state.watermark() is not None
    assert [r["exit_code"] for r in state.last_runs()] == [0, 0]
    assert [q.observation_id for q in state.quarantined()] == ["o5"]
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["watermark"] == state.watermark() and status["observations"]["classified"] == 4


def test_a_dry_run_with_postgresql_state_changes_neither_the_server_nor_the_state(fhir_server, tmp_path, pg_url,
                                                                                  capsys):
    cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url, pg_url)
    assert main(["run", "--config", str(config), "--dry-run"]) == 0
    planned = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["resourceType"] for r in planned} == {"Flag", "RiskAssessment"} and len(planned) == 6
    assert fhir_server.flags() == []
    state = State.open(pg_url)
    assert state.watermark() is None and state.last_runs() == [] and state.counts_by_outcome() == {}


@pytest.mark.parametrize("crash_at", ["write-accepted:1", "write-accepted:2", "committed:1"])
def test_killed_after_the_server_accepted_then_rerun_leaves_no_duplicate(fhir_server, tmp_path, pg_url, crash_at):
    cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url, pg_url, page_size=1, max_bundle_entries=2)
    code, err = finished(cli(config, "run", crash_at=crash_at))
    assert code == -signal.SIGKILL, err[-2000:]
    code, err = finished(cli(config, "run"))
    assert code == 0, err[-2000:]
    flags = fhir_server.flags()
    assert sorted(f["subject"]["reference"] for f in flags) == ["Patient/p1", "Patient/p2", "Patient/p4"]
    risks = sorted(r["identifier"][0]["value"] for r in fhir_server.search("RiskAssessment"))
    assert risks == ["p1/o1", "p2/o2", "p4/o4"]
    code, err = finished(cli(config, "run"))
    assert code == 0 and (summary(err)["created"], summary(err)["updated"]) == (0, 0)


class HangingServer:
    """A 'FHIR server' that accepts a connection and never answers: a run that reached it is inside its
    pass, holding the state's lock, until the test lets it go."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/fhir"

    def wait_for_a_run(self) -> socket.socket:
        self.listener.settimeout(60)
        connection, _ = self.listener.accept()
        return connection


def lock_is_free(url: str) -> bool:
    try:
        with locked(url):
            return True
    except Exception:
        return False


def test_a_second_instance_against_one_database_exits_5_and_the_lock_dies_with_the_first(tmp_path, pg_url):
    hanging = HangingServer()
    config = config_file(tmp_path, hanging.base_url, pg_url, retries=0, timeout_s=300)
    first = cli(config, "run")
    connection = hanging.wait_for_a_run()  # the first run has the lock and waits for /metadata
    try:
        code, err = finished(cli(config, "run"))
        assert code == 5, err[-2000:]
        assert "another run holds the lock" in err
        code, _ = finished(cli(config, "quarantine", "discard", "o1"))
        assert code == 5  # hand work on the quarantine waits for its turn too
        first.send_signal(signal.SIGKILL)  # the pod dies: no clean exit, no unlock
        first.wait(timeout=60)
    finally:
        connection.close()
        hanging.listener.close()
        if first.poll() is None:
            first.kill()
    # The server ends the dead client's session, and its lock with it; that takes a moment.
    deadline = time.monotonic() + 60
    while not lock_is_free(pg_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lock_is_free(pg_url)


def test_two_schemas_of_one_database_are_two_states_with_two_locks(pg_url):
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA site_a")
        admin.execute("CREATE SCHEMA site_b")
    site_a, site_b = (f"{pg_url}?options=-csearch_path%3D{schema}" for schema in ("site_a", "site_b"))
    with locked(site_a):
        assert lock_is_free(site_b) and not lock_is_free(site_a)
        a = State.open(site_a)
        with a.transaction():
            a.set_watermark("2026-11-26T00:00:00+00:00")
    assert State.open(site_b).watermark() is None and State.open(site_a).watermark() is not None


def test_state_backup_of_a_postgresql_state_points_to_pg_dump(tmp_path, pg_url, capsys):
    assert main(["state", "backup", str(tmp_path / "copy"), "--state", pg_url]) == 2
    assert "pg_dump" in capsys.readouterr().err
    assert not (tmp_path / "copy").exists()


def test_a_database_set_to_lose_recent_commits_is_overruled_for_the_state(pg_url, monkeypatch):
    monkeypatch.setenv("PGOPTIONS", "-c synchronous_commit=off")  # as if the DBA had set it for the role
    state = State.open(pg_url)
    assert state.db.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
    monkeypatch.setenv("PGOPTIONS", "-c synchronous_commit=remote_apply")  # stronger: kept as it is
    state = State.open(pg_url)
    assert state.db.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "remote_apply"


def test_a_dry_run_review_of_a_postgresql_state_is_kept_in_the_named_file_for_the_report(
        fhir_server, tmp_path, pg_url, capsys):
    """Go-live review with the state in PostgreSQL: the dry run's review file is named (a PostgreSQL state
    has no folder beside it), `report --state` reads it, and the live state is untouched."""
    cohort(fhir_server)
    config = config_file(tmp_path, fhir_server.base_url, pg_url)
    review = tmp_path / "review.sqlite3"
    assert main(["run", "--config", str(config), "--dry-run", "--review-state", str(review)]) == 0
    capsys.readouterr()
    assert main(["report", "--config", str(config), "--html", str(tmp_path / "r.html")]) == 2  # says how
    assert main(["report", "--config", str(config), "--state", str(review), "--html", str(tmp_path / "r.html")]) == 0
    assert "from the dry-run review state" in capsys.readouterr().out
    html = (tmp_path / "r.html").read_text()
    for flagged in ("p1", "p2", "p4"):  # the cohort's neutropenic patients, each with its own chart
        assert f"Patient <code>{flagged}</code>" in html or f">{flagged}<" in html, flagged
    assert fhir_server.flags() == []
    assert State.open(pg_url).last_runs() == []
