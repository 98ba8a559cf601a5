from __future__ import annotations

import itertools
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

from adapter.localserver import sekmet  # noqa: E402
from builders import transaction  # noqa: E402
import pgcluster  # noqa: E402

DATA = Path(__file__).parent / "data"


class Server:
    """A fresh real FHIR server (Sekmet on loopback) with helpers to load and inspect it."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = requests.Session()
        self.http.headers["Content-Type"] = "application/fhir+json"

    def load(self, *resources: dict) -> None:
        response = self.http.post(self.base_url, json=transaction(*resources), timeout=60)
        assert response.status_code == 200, response.text[:500]

    def search(self, resource_type: str, **params: str) -> list[dict]:
        found, url, query = [], f"{self.base_url}/{resource_type}", {"_count": "500", **params}
        while url:
            bundle = self.http.get(url, params=query, timeout=60).json()
            found += [e["resource"] for e in bundle.get("entry", [])
                      if e["resource"]["resourceType"] == resource_type and e.get("search", {}).get("mode") != "include"]
            url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
            query = None
        return found

    def risk_assessments(self, patient_id: str) -> list[dict]:
        # Sekmet 0.1.1 has no search parameters for RiskAssessment: filter here.
        return [r for r in self.search("RiskAssessment") if r["subject"]["reference"] == f"Patient/{patient_id}"]

    def flags(self, patient_id: str | None = None) -> list[dict]:
        params = {"subject": f"Patient/{patient_id}"} if patient_id else {}
        return self.search("Flag", **params)

    def history_count(self, resource_type: str, resource_id: str) -> int:
        bundle = self.http.get(f"{self.base_url}/{resource_type}/{resource_id}/_history", timeout=30).json()
        return len(bundle.get("entry", []))


@pytest.fixture
def fhir_server():
    """A fresh server per test: the adapter reads every ANC on a server, so tests must not share one."""
    with sekmet() as base_url:
        yield Server(base_url)


# -- state on both backends -------------------------------------------------------------------------
# A test that takes `state` (or `state_location`) runs once on SQLite and once on PostgreSQL: the state
# contract is one suite. PostgreSQL is a throwaway cluster started by the test run, one per session, with
# a fresh database per test.

@pytest.fixture(scope="session")
def postgres_cluster():
    bin_dir = pgcluster.binaries()
    if bin_dir is None:
        message = "PostgreSQL is not installed (no initdb; Debian: apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must run the PostgreSQL state tests", pytrace=False)
        pytest.skip(message)
    cluster = pgcluster.Cluster(bin_dir).start()
    yield cluster
    cluster.stop()


_databases = itertools.count()


@pytest.fixture
def pg_url(postgres_cluster):
    """A new, empty database of the test cluster; its URL (no password: trust on loopback)."""
    import psycopg

    name = f"state_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres_cluster.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_cluster.url(name)
    with psycopg.connect(postgres_cluster.url(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")  # also ends sessions a test left open


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request, tmp_path):
    """Where a state lives: a SQLite file path, or a postgresql:// URL."""
    if request.param == "sqlite":
        return tmp_path / "state.sqlite3"
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request):
    """A fresh, empty State on each backend."""
    from adapter.state import State

    if request.param == "sqlite":
        opened = State(sqlite3.connect(":memory:", isolation_level=None))
    else:
        opened = State.open(request.getfixturevalue("pg_url"))
    yield opened
    opened.db.close()
