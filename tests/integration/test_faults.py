"""Nothing lost, nothing duplicated: the adapter runs through a proxy that fails one request in five (drops,
resets, 429, 503, HTML 502 pages, cut bodies, slow answers; writes applied by the server but failed towards
the client). Rerun until a run exits 0, then check the real server directly, not through the proxy."""

from __future__ import annotations

from collections import Counter

import pytest
import requests

from adapter.cli import main
from adapter.fhir.client import FhirClient, RetryPolicy
from adapter.localserver import sekmet
from builders import anc, patient, transaction
from faultproxy import ALL_KINDS, BATCH_READ, LOST_WRITE, RESET, SLOW, TRUNCATED, fault_proxy

pytestmark = pytest.mark.integration

MAX_RUNS = 10  # per poll cycle
CONFIG = """\
[fhir]
retries = 8
retry_budget_s = 30
timeout_s = 5
page_size = 10

[output]
resources = ["Flag", "RiskAssessment"]
"""
# Lab results arriving over three poll cycles: (patient id prefix, how many, ANC in cells/µL per cycle).
# None: no new result for that patient in that cycle. Every patient is an adult.
TIMELINES = (
    ("normal", 10, (2500, None, 3000)),
    ("mild", 6, (1200, None, None)),
    ("moderate", 6, (700, None, None)),
    ("severe", 6, (300, None, None)),
    ("worsening", 3, (1300, 200, None)),  # one episode, graded by its latest count: severe
    ("recovering", 3, (400, 3100, None)),  # the Flag ends: inactive
    ("relapsing", 3, (400, 3100, 900)),  # a closed episode and a new active one: two Flags
    ("late", 3, (None, None, 800)),  # first result in the last cycle
)
CYCLES = 3
UNITS = ("10*3/uL", "/uL", "10*9/L", "K/uL")  # K/uL comes from the mappings' aliases


def _grade(anc_per_ul: float) -> str:
    return "severe" if anc_per_ul < 500 else "moderate" if anc_per_ul < 1000 else "mild" if anc_per_ul < 1500 \
        else "normal"


def _patients() -> list[tuple[str, tuple[int | None, ...]]]:
    return [(f"{prefix}-{n}", values) for prefix, size, values in TIMELINES for n in range(size)]


def cycle_resources(cycle: int) -> list[dict]:
    """What the lab sends in one poll cycle (the Patients come with the first)."""
    resources = []
    for index, (patient_id, values) in enumerate(_patients()):
        if cycle == 0:
            resources.append(patient(patient_id, birth_date=f"19{50 + index % 40}-03-0{1 + index % 9}"))
        anc_per_ul = values[cycle]
        if anc_per_ul is None:
            continue
        unit = UNITS[index % len(UNITS)]
        value = anc_per_ul if unit == "/uL" else anc_per_ul / 1000
        resources.append(anc(f"o-{patient_id}-{cycle}", patient_id, value, unit=unit,
                             effective=f"2026-11-{10 + cycle:02d}T{index % 24:02d}:15:00Z"))
    return resources


def expected_flags() -> set[tuple[str, str, str]]:
    """(identifier, status, grade) of every Flag: one per episode of consecutive abnormal counts, named
    after the episode's first abnormal Observation."""
    flags = set()
    for patient_id, values in _patients():
        first, latest = None, None
        for cycle, anc_per_ul in enumerate(values):
            if anc_per_ul is None:
                continue
            if _grade(anc_per_ul) != "normal":
                first = first if latest is not None else f"o-{patient_id}-{cycle}"
                latest = _grade(anc_per_ul)
            elif latest is not None:
                flags.add((f"{patient_id}/{first}", "inactive", latest))
                latest = None
        if latest is not None:
            flags.add((f"{patient_id}/{first}", "active", latest))
    return flags


def abnormal_observations() -> set[str]:
    return {f"o-{patient_id}-{cycle}" for patient_id, values in _patients()
            for cycle, anc_per_ul in enumerate(values) if anc_per_ul is not None and _grade(anc_per_ul) != "normal"}


def grade_of(resource: dict) -> str:
    return next(c["code"] for c in resource["code"]["coding"] if c["system"].endswith("/neutropenia-grade"))


def identifier_value(resource: dict) -> str:
    return next(i["value"] for i in resource["identifier"] if i["system"].endswith(f"/{resource['resourceType']}"))


def run_until_done(proxy, tmp_path) -> list[int]:
    """One poll cycle: run (as cron would, again and again) until a run finishes."""
    config = tmp_path / "adapter.toml"
    config.write_text(CONFIG)
    codes: list[int] = []
    while len(codes) < MAX_RUNS and (not codes or codes[-1] != 0):
        codes.append(main(["run", "--config", str(config), "--fhir-url", proxy.base_url,
                           "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json"]))
        assert codes[-1] in (0, 3), f"run {len(codes)} exited {codes[-1]} (1 = internal error); codes {codes}"
    assert codes[-1] == 0, f"no run finished in {MAX_RUNS}: {codes}"
    return codes


def poll_all_cycles_through(proxy, server, tmp_path) -> None:
    for cycle in range(CYCLES):
        server.load(*cycle_resources(cycle))
        run_until_done(proxy, tmp_path)
    # A state restored from nothing (lost disk): everything is read and written again, over the same faults.
    (tmp_path / "state.sqlite3").unlink()
    run_until_done(proxy, tmp_path)


def assert_server_holds_exactly_one_of_everything(server) -> None:
    flags = server.flags()
    flag_ids = Counter(identifier_value(f) for f in flags)
    assert sorted(v for v, n in flag_ids.items() if n > 1) == [], "duplicate Flags"
    assert {(identifier_value(f), f["status"], grade_of(f)) for f in flags} == expected_flags()
    active = Counter(f["subject"]["reference"] for f in flags if f["status"] == "active")
    assert sorted(ref for ref, n in active.items() if n > 1) == [], "more than one active Flag for a patient"
    flagged = {f["subject"]["reference"] for f in flags}
    assert not any(ref.startswith("Patient/normal-") for ref in flagged), "a normal patient has a Flag"

    assessments = server.search("RiskAssessment")
    ra_ids = Counter(identifier_value(r) for r in assessments)
    assert sorted(v for v, n in ra_ids.items() if n > 1) == [], "duplicate RiskAssessments"
    observations = {value.split("/", 1)[1] for value in ra_ids}  # "<patient>/<observation>"
    assert observations == abnormal_observations(), "one RiskAssessment per abnormal Observation, no other"
    for assessment in assessments:
        observation_id = identifier_value(assessment).split("/", 1)[1]
        assert {"reference": f"Observation/{observation_id}"} in assessment["basis"]


def test_every_abnormal_count_is_written_once_through_one_fault_in_five(fhir_server, tmp_path):
    """Drops, resets mid-body, 429, 503, HTML 502 pages, short and cut bodies, slow answers; writes the
    server applied but failed towards the client. Three poll cycles, then a replay with the state lost."""
    with fault_proxy(fhir_server.base_url, rate=0.2, seed=1) as proxy:
        poll_all_cycles_through(proxy, fhir_server, tmp_path)

    assert len([kind for kind in ALL_KINDS if proxy.counts[kind]]) >= 5, proxy.counts
    assert proxy.counts[RESET] + proxy.counts[TRUNCATED] > 0, f"no body broken after its headers: {proxy.counts}"
    assert proxy.counts[LOST_WRITE] > 0, f"no write was applied and then failed: {proxy.counts}"
    assert_server_holds_exactly_one_of_everything(fhir_server)


# -- each kind alone, one fault, straight at the client ----------------------------------------------

@pytest.fixture(scope="module")
def shared_base_url():
    """One server for the one-fault tests: they read /metadata and write their own Patients."""
    with sekmet() as base_url:
        yield base_url


def one_fault_client(base_url: str) -> FhirClient:
    return FhirClient(base_url, requests.Session(), timeout_s=5, sleep=lambda seconds: None,
                      retry=RetryPolicy(attempts=3, budget_s=10, initial_s=0.01))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_read_that_fails_once_is_retried(shared_base_url, kind):
    with fault_proxy(shared_base_url, rate=1.0, kinds=(kind,), max_faults=1) as proxy:
        statement = one_fault_client(proxy.base_url).get("metadata")
    assert statement["resourceType"] == "CapabilityStatement"
    assert proxy.counts[kind] == 1 and proxy.requests["GET"] == (1 if kind == SLOW else 2)


def test_a_batch_of_searches_is_a_read_to_the_fault_plan(shared_base_url):
    # The context searches go in a batch, a POST: it must neither count as a lost write nor use up the fates of
    # the writes after it.
    with fault_proxy(shared_base_url, rate=1.0, kinds=(RESET,), max_faults=1, write_applied_share=1.0) as proxy:
        answer = one_fault_client(proxy.base_url).batch({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Patient?_count=1"}}]})
    assert answer["type"] == "batch-response"
    assert proxy.counts[RESET] == 1 and proxy.counts[LOST_WRITE] == 0
    assert proxy.requests[BATCH_READ] == 2 and proxy.requests["POST"] == 0


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_write_applied_then_failed_is_retried_into_one_resource(shared_base_url, kind):
    patient_id = f"lost-{kind}"
    with fault_proxy(shared_base_url, rate=1.0, kinds=(kind,), max_faults=1, write_applied_share=1.0) as proxy:
        response = one_fault_client(proxy.base_url).transaction(transaction(patient(patient_id)))
    assert response["type"] == "transaction-response"
    assert proxy.counts[LOST_WRITE] == (0 if kind == SLOW else 1)
    assert proxy.forwarded["POST"] == (1 if kind == SLOW else 2)  # the server applied it twice ...
    found = requests.get(f"{shared_base_url}/Patient", params={"_id": patient_id}, timeout=10).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [patient_id]  # ... into one resource
