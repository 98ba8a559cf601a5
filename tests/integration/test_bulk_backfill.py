"""run --bulk on the real local server ($export) writes what a paged run --since writes, once."""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest

from adapter.cli import main
from adapter.localserver import sekmet
from builders import LOINC, anc, patient
from conftest import Server

pytestmark = pytest.mark.integration

SINCE = "2020-01-01T00:00:00Z"


def cohort(seed: int = 14) -> list[dict]:
    """60 patients (some children), ~300 ANC results across every grade and the ANC codes, and non-ANC
    results that the export's _typeFilter must leave out."""
    rng = random.Random(seed)
    resources: list[dict] = []
    for p in range(60):
        born = f"{rng.choice([1950, 1970, 1990, 2012, 2020])}-0{rng.randint(1, 9)}-15"
        resources.append(patient(f"p{p}", born))
        for n in range(5):
            effective = f"2026-11-{10 + n:02d}T0{rng.randint(0, 9)}:00:00Z"
            value = rng.choice([0.05, 0.3, 0.7, 1.2, 1.8, 2.5, 4.0])
            code = rng.choice(["751-8", "751-8", "26499-4", "753-4"])
            resources.append(anc(f"o{p}-{n}", f"p{p}", value, code=code, effective=effective))
        for n in range(2):
            other = anc(f"hb{p}-{n}", f"p{p}", 12.5, unit="g/dL")
            other["code"] = {"coding": [{"system": LOINC, "code": "718-7"}]}  # hemoglobin
            resources.append(other)
    return resources


def comparable(flags: list[dict]) -> list[tuple]:
    # Ids are the server's (conditional PUT by our identifier): compare everything we decide instead.
    return sorted((
        json.dumps(f["identifier"], sort_keys=True), f["subject"]["reference"], f["status"],
        json.dumps(f["code"], sort_keys=True), json.dumps(f.get("period"), sort_keys=True),
        json.dumps(f.get("category"), sort_keys=True),
    ) for f in flags)


def status(config, state) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--json", "--config", str(config), "--state", str(state)]) == 0
    return json.loads(out.getvalue())


def test_bulk_backfill_writes_the_same_flags_as_paged_search_and_nothing_twice(tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text("[fhir]\npage_size = 50\n")  # several pages either way
    resources = cohort()
    anc_results = sum(r["resourceType"] == "Observation" and r["id"].startswith("o") for r in resources)
    with sekmet() as bulk_url, sekmet() as paged_url:
        bulk_server, paged_server = Server(bulk_url), Server(paged_url)
        for server in (bulk_server, paged_server):
            server.load(*resources)

        def run(url: str, state: str, *extra: str) -> dict:
            assert main(["run", "--config", str(config), "--fhir-url", url, "--state", str(tmp_path / state),
                         "--log-format", "json", "--since", SINCE, *extra]) == 0
            return status(config, tmp_path / state)

        bulk_status = run(bulk_url, "bulk.sqlite3", "--bulk")
        paged_status = run(paged_url, "paged.sqlite3")
        bulk_flags, paged_flags = bulk_server.flags(), paged_server.flags()
        assert len(bulk_flags) >= 20  # the cohort has abnormal counts in many patients
        assert {f["status"] for f in bulk_flags} == {"active", "inactive"}
        assert comparable(bulk_flags) == comparable(paged_flags)

        summary = bulk_status["last_runs"][0]["summary"]
        assert bulk_status["last_runs"][0]["mode"] == "bulk"
        assert summary["observations_read"] == anc_results  # the hemoglobins never came
        assert summary["classified"] == paged_status["last_runs"][0]["summary"]["classified"]
        assert bulk_status["watermark"] is None  # the live watermark is untouched

        history = {f["id"]: bulk_server.history_count("Flag", f["id"]) for f in bulk_flags}
        again = run(bulk_url, "bulk.sqlite3", "--bulk")["last_runs"][0]["summary"]
        assert (again["created"], again["updated"]) == (0, 0)
        assert again["already_processed"] == anc_results
        assert {f["id"]: bulk_server.history_count("Flag", f["id"]) for f in bulk_server.flags()} == history
