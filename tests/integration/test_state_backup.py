"""`anc-adapter state backup`: a consistent copy while a run goes on, and a restore that duplicates nothing."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from collections import Counter
from pathlib import Path

import pytest

from adapter.cli import main
from adapter.state import State, locked
from builders import anc, patient

pytestmark = pytest.mark.integration


def backup(state: Path, copy: Path, *extra: str) -> int:
    return main(["state", "backup", str(copy), "--state", str(state), "--log-format", "json", *extra])


def test_backup_while_a_run_holds_the_lock_and_a_write_transaction(tmp_path):
    state_path, copy = tmp_path / "state.sqlite3", tmp_path / "backups" / "copy.sqlite3"
    with locked(state_path):  # as a run does: the lock, then its own connection
        state = State.open(state_path)
        with state.transaction():
            state.set_watermark("2026-11-20T08:00:00+00:00")
        state.db.execute("BEGIN IMMEDIATE")  # a run in the middle of a page: not committed yet
        state.set_watermark("2026-11-21T08:00:00+00:00")
        assert backup(state_path, copy) == 0
        state.db.execute("ROLLBACK")
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    with sqlite3.connect(copy) as opened:
        assert opened.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert opened.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone() == (
            "2026-11-20T08:00:00+00:00",)  # the committed state, not the open transaction
    assert not list(copy.parent.glob(".*partial*"))
    assert {p.name for p in copy.parent.iterdir()} == {"copy.sqlite3"}  # one self-contained file


def test_backup_refuses_to_overwrite_unless_forced_and_needs_an_existing_state(tmp_path, capsys):
    state_path, copy = tmp_path / "state.sqlite3", tmp_path / "copy.sqlite3"
    assert backup(state_path, copy) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not state_path.exists() and not copy.exists()  # neither the state nor a copy was created

    state = State.open(state_path)
    with state.transaction():
        state.set_watermark("2026-11-20T08:00:00+00:00")
    copy.write_text("an older backup")
    assert backup(state_path, copy) == 2
    assert "already exists" in capsys.readouterr().err
    assert copy.read_text() == "an older backup"
    assert backup(state_path, state_path, "--force") == 2  # never onto the live state, even forced
    assert backup(state_path, copy, "--force") == 0
    with sqlite3.connect(copy) as opened:
        assert opened.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone() == (
            "2026-11-20T08:00:00+00:00",)


def restore(copy: Path, state_path: Path) -> None:
    """The runbook: (cron stopped) put the copy back as the state path (a new file, mode kept, renamed
    into place), remove the old -wal/-shm."""
    incoming = state_path.with_name(state_path.name + ".restoring")
    shutil.copy2(copy, incoming)
    for suffix in ("-wal", "-shm"):
        state_path.with_name(state_path.name + suffix).unlink(missing_ok=True)
    os.replace(incoming, state_path)


def test_restoring_an_old_backup_after_more_runs_leaves_one_flag_per_patient(fhir_server, tmp_path, capsys):
    state_path, copy = tmp_path / "state.sqlite3", tmp_path / "old-backup.sqlite3"
    args = ["run", "--fhir-url", fhir_server.base_url, "--state", str(state_path), "--log-format", "json"]
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.3, effective="2026-11-20T08:00:00Z"),
                     patient("p2"), anc("o2", "p2", 0.8, effective="2026-11-20T08:00:00Z"))
    assert main(args) == 0
    assert backup(state_path, copy) == 0

    # After the backup: p1 worsens then improves a little (same episode), p2 recovers, p3 appears.
    fhir_server.load(anc("o1b", "p1", 0.7, effective="2026-11-21T08:00:00Z"),
                     anc("o2b", "p2", 2.5, effective="2026-11-21T08:00:00Z"),
                     patient("p3"), anc("o3", "p3", 0.4, effective="2026-11-21T08:00:00Z"))
    assert main(args) == 0
    # p3's episode then grows backwards: recomputed from nothing it would be named after o3-early, not o3.
    fhir_server.load(anc("o3b", "p3", 0.2, effective="2026-11-22T08:00:00Z"),
                     anc("o3-early", "p3", 0.9, effective="2026-11-20T20:00:00Z"))
    assert main(args) == 0
    before = {f["id"]: (f["status"], f["code"]["text"]) for f in fhir_server.flags()}

    restore(copy, state_path)
    capsys.readouterr()
    assert main(args) == 0
    [summary] = [json.loads(line)["summary"] for line in capsys.readouterr().err.splitlines()
                 if '"run-summary"' in line]
    assert summary["adopted"] == 1  # p3's Flag, unknown to the old backup, found on the server
    assert main(args) == 0  # and again: settled, nothing new
    flags = fhir_server.flags()
    assert Counter(f["subject"]["reference"] for f in flags) == Counter(
        {"Patient/p1": 1, "Patient/p2": 1, "Patient/p3": 1})  # no second Flag for anyone
    assert {f["id"]: (f["status"], f["code"]["text"]) for f in flags} == before
    assert {f["subject"]["reference"]: f["status"] for f in flags} == {
        "Patient/p1": "active", "Patient/p2": "inactive", "Patient/p3": "active"}
    assert stat.S_IMODE(os.stat(state_path).st_mode) == 0o600
