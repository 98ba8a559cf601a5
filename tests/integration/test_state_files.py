"""The state holds patient data (CONTRACT §7): private file modes, and nothing of a quarantined
Observation's names or free text in the bytes on disk."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from adapter import crashpoints
from adapter.cli import main
from builders import anc, patient

pytestmark = pytest.mark.integration

NAME = "Quillon Vexmoor"  # synthetic; looked for in the raw bytes of every state file
ROOT = Path(__file__).parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def state_files(state: Path) -> list[Path]:
    return [state.with_name(state.name + suffix) for suffix in ("", "-wal", "-shm")]


def site_config(tmp_path: Path, base_url: str, state: Path) -> Path:
    site = tmp_path / "site-mappings"
    shutil.copytree(ROOT / "mappings", site)
    config = tmp_path / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{base_url}"\n[mappings]\npath = "{site}"\n'
                      f'[state]\npath = "{state}"\n')
    return config


def run_subprocess(config: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    if crash_at:
        env[crashpoints.ENV] = crash_at
    # umask 0: the modes must come from the adapter, not from a careful operator's shell.
    return subprocess.run([sys.executable, "-m", "adapter", "run", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120, umask=0)


def quarantined_with_names() -> dict:
    return anc("o-named", "p", 0.35, unit="Giga/L",
               subject={"reference": "Patient/p", "display": NAME},
               performer=[{"reference": "Practitioner/d", "display": f"Dr {NAME}"}],
               note=[{"text": f"{NAME} fainted during the draw"}],
               text={"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{NAME}</div>'},
               specimen={"reference": "Specimen/s", "display": f"venous blood, {NAME}"})


def test_files_are_private_and_hold_no_name_of_a_quarantined_observation(fhir_server, tmp_path):
    state = tmp_path / "new" / "dir" / "state.sqlite3"
    config = site_config(tmp_path, fhir_server.base_url, state)
    fhir_server.load(patient("p", name=NAME), quarantined_with_names())

    # Killed right after the commit: the WAL is left as it was, holding the newest pages.
    killed = run_subprocess(config, crash_at="committed")
    assert killed.returncode == -9, killed.stderr
    files = state_files(state)
    assert all(f.exists() for f in files)
    assert {f.name: oct(mode(f)) for f in [*files, state.with_name(state.name + ".lock")]} == {
        "state.sqlite3": "0o600", "state.sqlite3-wal": "0o600", "state.sqlite3-shm": "0o600",
        "state.sqlite3.lock": "0o600"}
    assert (oct(mode(tmp_path / "new")), oct(mode(tmp_path / "new" / "dir"))) == ("0o700", "0o700")
    raw = b"".join(f.read_bytes() for f in files)
    assert b"o-named" in raw and b"Giga/L" in raw  # the quarantine row is there, readable: not vacuous
    assert NAME.encode() not in raw

    assert run_subprocess(config).returncode == 0
    assert fhir_server.flags("p") == []
    units = tmp_path / "site-mappings" / "units.toml"
    units.write_text(units.read_text() + '"Giga/L" = 1000\n')
    assert run_subprocess(config).returncode == 0  # graded from what state kept
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "active"
    assert "ANC 350 cells/µL" in flag["code"]["text"]
    assert NAME.encode() not in b"".join(f.read_bytes() for f in state_files(state) if f.exists())


def test_loose_state_files_are_tightened_with_a_warning(fhir_server, tmp_path, capsys):
    state = tmp_path / "state.sqlite3"
    fhir_server.load(patient("p", name=NAME), anc("o1", "p", 0.4))
    holder = sqlite3.connect(state)  # keeps -wal and -shm in place, as a crashed run would
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    files = state_files(state)
    for f in files:
        os.chmod(f, 0o644)
    try:
        assert main(["run", "--fhir-url", fhir_server.base_url, "--state", str(state), "--log-format", "json"]) == 0
        assert [oct(mode(f)) for f in files] == ["0o600"] * 3
    finally:
        holder.close()
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    tightened = [e for e in events if e.get("event") == "state-permissions-tightened"]
    assert sorted((Path(e["file"]).name, e["mode"]) for e in tightened) == [
        ("state.sqlite3", "0644"), ("state.sqlite3-shm", "0644"), ("state.sqlite3-wal", "0644")]
    assert all(e["level"] == "warning" for e in tightened)


def test_a_version_2_state_keeps_only_the_retry_fields_and_no_old_bytes(tmp_path):
    from adapter import extract
    from adapter.state import State

    path = tmp_path / "state.sqlite3"
    named = {**quarantined_with_names(), "note": [{"text": f"{NAME} " * 500}]}  # spills to overflow pages
    old = State.open(path)
    with old.transaction():  # as version 2 stored it: the whole resource
        old.db.execute("INSERT INTO quarantine VALUES ('o-named', '1', 'p', 'unknown-unit', 'x', 't', 't', ?)",
                       (json.dumps(named),))
        old.db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    assert NAME.encode() in b"".join(f.read_bytes() for f in state_files(path) if f.exists())

    upgraded = State.open(path)
    assert upgraded.quarantined_resources() == [extract.kept_for_retry(named)]
    assert NAME.encode() not in b"".join(f.read_bytes() for f in state_files(path) if f.exists())
    old.db.close()
    upgraded.db.close()
