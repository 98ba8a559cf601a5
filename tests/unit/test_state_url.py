"""`[state] url`: validation (one backend, no password in the file), `--state URL`, redaction, and the
PostgreSQL dialect layer (pure: no server)."""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import pytest

from adapter import state, state_pg
from adapter.cli import _state_override
from adapter.config import Config, StateConfig, _build, _validated
from adapter.errors import ConfigError


def configured(**section: str) -> Config:
    return _validated(_build(Config, {"state": section}, ""))


def test_the_default_is_sqlite_and_a_url_selects_postgresql():
    assert state.where(configured().state) == Path("state/anc-adapter.sqlite3")
    url = "postgresql://anc@db.hospital.example:5432/anc?sslmode=verify-full"
    assert state.where(configured(url=url).state) == url


@pytest.mark.parametrize("section,message", [
    ({"url": "postgresql://anc@db/anc", "path": "/var/lib/anc/state.sqlite3"}, "state.url and state.path"),
    ({"url": "mysql://anc@db/anc"}, "state.url: must be a postgresql:// URL"),
    ({"url": "postgresql://anc:s3cret@db/anc"}, "state.url: holds a password"),
    ({"url": "postgresql://anc@db/anc?sslmode=require&password=s3cret"}, "state.url: holds a password"),
])
def test_a_wrong_state_section_is_a_config_error_naming_the_keys(section, message):
    with pytest.raises(ConfigError) as error:
        configured(**section)
    assert str(error.value).startswith(message)
    assert "s3cret" not in str(error.value)


def test_the_state_option_names_the_state_outright():
    url = "postgresql://anc@db/anc"
    on_postgresql = configured(path="/var/lib/anc/state.sqlite3")
    assert state.where(on_postgresql.with_overrides(state=_state_override(url)).state) == url
    on_sqlite = configured(url=url).with_overrides(state=_state_override("/tmp/s.sqlite3"))
    assert state.where(on_sqlite.state) == Path("/tmp/s.sqlite3")
    assert _state_override(None) == {} and StateConfig().url == ""


@pytest.mark.parametrize("url,shown", [
    ("postgresql://anc:s3cret@db:5432/anc", "postgresql://anc:***@db:5432/anc"),
    ("postgresql://anc@db/anc?password=s3cret&sslmode=require", "postgresql://anc@db/anc?password=***&sslmode=require"),
    ("postgres://db/anc", "postgres://db/anc"),
])
def test_a_url_is_shown_without_its_password(url, shown):
    assert state_pg.redacted(url) == shown


@pytest.mark.parametrize("sqlite,postgresql", [
    ("SELECT value FROM meta WHERE key = ?", "SELECT value FROM meta WHERE key = %s"),
    ("BEGIN IMMEDIATE", "BEGIN"),
    ("CREATE TABLE t (v REAL NOT NULL, realm TEXT)", "CREATE TABLE t (v DOUBLE PRECISION NOT NULL, realm TEXT)"),
    ("ALTER TABLE t ADD COLUMN w REAL", "ALTER TABLE t ADD COLUMN w DOUBLE PRECISION"),
    ("SELECT 5 % 2, ?", "SELECT 5 %% 2, %s"),  # psycopg would read a lone % as a placeholder
])
def test_the_dialect_layer_translates_only_what_differs(sqlite, postgresql):
    assert state_pg.translate(sqlite) == postgresql


def test_each_schema_has_its_own_lock_key_that_fits_a_bigint():
    keys = {state_pg.lock_key(schema) for schema in ("public", "site_a", "site_b")}
    assert len(keys) == 3 and all(-2**63 <= k < 2**63 for k in keys)
    # Pinned: a new version must take the same lock as the old one, or during a rolling upgrade an old
    # and a new pod could run a pass at the same time.
    assert state_pg.lock_key("public") == -4477041987558031092


def test_every_table_of_the_schema_is_copied_for_a_dry_run():
    assert state._TABLES == ("meta", "observations", "derive_inputs", "quarantine", "written",
                             "write_failures", "context_facts", "context_pending", "runs")


def test_the_kubernetes_postgresql_recipe_is_a_valid_config_without_disk_or_password():
    recipe = (Path(__file__).parents[2] / "config/kubernetes/cronjob-postgresql.yaml").read_text()
    block = recipe.split("adapter.toml: |\n", 1)[1].split("\n---", 1)[0]
    loaded = _validated(_build(Config, tomllib.loads(textwrap.dedent(block)), ""))
    assert state_pg.is_url(state.where(loaded.state))
    assert "persistentVolumeClaim" not in recipe and "PersistentVolumeClaim" not in recipe
    assert "name: ANC_STATE_PASSWORD" in recipe and "key: state-password" in recipe


def test_the_state_sql_stays_in_the_subset_both_engines_speak():
    # A merge that brings back SQLite-only upserts would break every PostgreSQL state at its first write.
    source = (Path(__file__).parents[2] / "adapter/state.py").read_text()
    assert not re.findall(r"INSERT\s+OR\s+(?:REPLACE|IGNORE)\s+INTO|REPLACE\s+INTO", source)
    with pytest.raises(ValueError, match="_upsert"):
        state_pg.translate("INSERT OR REPLACE INTO meta VALUES (?, ?)")
