"""Subscription mode on the real engine: Sekmet delivers R4 rest-hook notifications to `anc-adapter serve`
(a process on loopback), which grades and writes without any `run`; a `run` afterwards writes nothing.
Waits poll the FHIR server with generous limits; nothing here asserts how long anything took."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from adapter import config as config_module
from adapter import subscriptions
from adapter.cli import run_once
from adapter.localserver import sekmet
from adapter.state import State
from builders import LOINC, anc, patient, transaction
from cdshooks import ServeProcess, serve_process

pytestmark = pytest.mark.integration

FHIR_JSON = {"Content-Type": "application/fhir+json"}
WAIT_S = 60.0
RECENT = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
SYSTEM_BASE = "https://hospital.example/fhir/anc-adapter"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Setup:
    def __init__(self, base_url: str, directory: Path, state_url: str = ""):
        self.base_url = base_url
        self.directory = directory
        self.state_path = state_url or directory / "state.sqlite3"  # a SQLite file, or PostgreSQL
        self.config_path = directory / "adapter.toml"
        self.port = _free_port()  # fixed, so a restart keeps the endpoint URL
        where = f'url = "{state_url}"' if state_url else f'path = "{self.state_path}"'
        self.config_path.write_text(f"""
[fhir]
base_url = "{base_url}"

[state]
{where}

[serve]
subscriptions = true
""")
        self.starts = 0

    def serve(self):
        self.starts += 1
        return serve_process(self.config_path, self.directory, port=self.port, log_name=f"serve-{self.starts}.log")

    def put(self, resource: dict) -> None:
        url = f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
        response = requests.put(url, json=resource, headers=FHIR_JSON, timeout=30)
        assert response.status_code in (200, 201), response.text[:300]

    def load(self, *resources: dict) -> None:
        response = requests.post(self.base_url, json=transaction(*resources), headers=FHIR_JSON, timeout=60)
        assert response.status_code == 200, response.text[:300]

    def flags(self, patient_id: str) -> list[dict]:
        bundle = requests.get(f"{self.base_url}/Flag", params={"subject": f"Patient/{patient_id}"}, timeout=30).json()
        return [e["resource"] for e in bundle.get("entry", [])]

    def wait_for_flag(self, patient_id: str) -> list[dict]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = self.flags(patient_id)
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no Flag for Patient/{patient_id} within {WAIT_S:.0f} s")

    def our_subscriptions(self) -> list[dict]:
        bundle = requests.get(f"{self.base_url}/Subscription", params={"_count": "100"}, timeout=30).json()
        return [e["resource"] for e in bundle.get("entry", [])
                if any(t.get("code") == "anc-adapter" for t in e["resource"].get("meta", {}).get("tag", []))]

    def ledger(self, observation_id: str):
        state = State.open(self.state_path)
        try:
            return state.ledger(observation_id)
        finally:
            state.db.close()

    def token(self, name: str) -> str:
        state = State.open(self.state_path)
        try:
            return state._meta(f"subscription-token:{name}")
        finally:
            state.db.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # post-endpoint is one of Sekmet's two classic modes; the other (put-resource, its default and what
    # the R4 specification and HAPI do) is used by the restart test's second server below.
    with sekmet(settings="subscriptions: {notify_method: post-endpoint, retries: 2}\n") as base_url:
        yield Setup(base_url, tmp_path_factory.mktemp("subs"))


@pytest.fixture(scope="module")
def served(setup):
    with setup.serve() as process:
        yield process


def events(process: ServeProcess, name: str) -> list[dict]:
    return [e for e in process.events() if e.get("event") == name]


def wait_for_log(process: ServeProcess, name: str, condition) -> list[dict]:
    """A batch logs once its writes are on the server and the state lock is released: a Flag can be seen
    a moment before its batch's line."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not condition(events(process, name)):
        time.sleep(0.05)
    return events(process, name)


def test_a_notified_count_gets_its_flag_without_a_run_and_the_next_run_writes_nothing(setup, served):
    setup.load(patient("rt-severe"))
    setup.put(anc("rt-severe-1", "rt-severe", 0.3, effective=RECENT))
    flags = setup.wait_for_flag("rt-severe")
    assert len(flags) == 1 and flags[0]["status"] == "active"
    batches = wait_for_log(served, "notified-batch", lambda found: any(e["summary"].get("created") for e in found))
    assert any(e["summary"].get("created") == 1 for e in batches)
    assert setup.ledger("rt-severe-1").version == "1"

    config = config_module.load(setup.config_path)
    code, summary = run_once(config, setup.state_path, "cron-after-notification")
    assert code == 0
    assert summary.observations_read >= 1 and summary.already_processed == summary.observations_read
    assert (summary.created, summary.updated) == (0, 0)
    assert setup.flags("rt-severe") == flags


def test_a_bad_token_is_401_and_nothing_is_processed(setup, served):
    setup.load(patient("rt-forged"), patient("rt-barrier"))
    forged = anc("rt-forged-1", "rt-forged", 0.1, effective=RECENT, meta={"versionId": "1"})
    endpoint = f"{served.base_url}/notifications/anc"
    for headers in ({}, {"Authorization": "Bearer not-the-token"},
                    {"Authorization": f"Bearer {setup.token('temperature')}"}):  # another subscription's token
        response = requests.post(endpoint, json=forged, headers={**FHIR_JSON, **headers}, timeout=30)
        assert response.status_code == 401
        assert "Testperson" not in response.text
    # A genuine notification sent after the forged ones is processed after them too: once its Flag is
    # there, a forged one that had been queued would have been processed as well.
    setup.put(anc("rt-barrier-1", "rt-barrier", 0.3, effective=RECENT))
    setup.wait_for_flag("rt-barrier")
    assert setup.flags("rt-forged") == []
    assert setup.ledger("rt-forged-1") is None
    metrics = requests.get(f"{served.base_url}/metrics", timeout=30).text
    assert 'anc_adapter_notifications_total{kind="unauthorised",subscription="anc"} 3.0' in metrics
    assert "not-the-token" not in served.log() and setup.token("anc") not in served.log()


def test_a_burst_is_processed_in_fewer_batches_than_notifications(setup, served):
    patients = [f"rt-burst-{i}" for i in range(30)]
    setup.load(*[patient(p) for p in patients])
    already = len(events(served, "notified-batch"))
    setup.load(*[anc(f"{p}-1", p, 0.4, effective=RECENT) for p in patients])
    for p in patients:
        setup.wait_for_flag(p)
    burst = wait_for_log(served, "notified-batch",
                         lambda found: sum(b["observations"] for b in found[already:]) >= 30)[already:]
    assert sum(b["observations"] for b in burst) >= 30
    assert sum(b["notifications"] for b in burst) >= 30
    assert len(burst) < sum(b["notifications"] for b in burst)


def test_temperatures_reach_the_context_seam_and_not_the_ledger(setup, served):
    setup.load(patient("rt-fever"))
    temperature = {"resourceType": "Observation", "id": "rt-fever-t1", "status": "final",
                   "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
                   "subject": {"reference": "Patient/rt-fever"}, "effectiveDateTime": RECENT,
                   "valueQuantity": {"value": 38.6, "unit": "Cel", "system": "http://unitsofmeasure.org",
                                     "code": "Cel"}}
    setup.put(temperature)
    batches = wait_for_log(served, "notified-batch", lambda found: any(e["temperatures"] for e in found))
    assert any(e["temperatures"] == 1 for e in batches)
    assert setup.ledger("rt-fever-t1") is None


def test_a_notified_fever_escalates_the_live_flag_without_a_run(setup, served):
    """CONTRACT §5b: a fever recorded after the count escalates the live Flag — here within seconds, as
    context through the same batch path, and the cron run after it writes nothing."""
    setup.load(patient("rt-febrile"))
    setup.put(anc("rt-febrile-1", "rt-febrile", 0.3, effective=RECENT))
    [flag] = setup.wait_for_flag("rt-febrile")
    assert flag["status"] == "active" and "Febrile" not in flag["code"]["text"]
    fever_at = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    setup.put({"resourceType": "Observation", "id": "rt-febrile-t1", "status": "final",
               "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
               "subject": {"reference": "Patient/rt-febrile"}, "effectiveDateTime": fever_at,
               "valueQuantity": {"value": 38.6, "unit": "Cel", "system": "http://unitsofmeasure.org",
                                 "code": "Cel"}})
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        [flag] = setup.flags("rt-febrile")
        if any(c.get("code") == "409089005" for c in flag["code"]["coding"]):
            break
        time.sleep(0.1)
    assert any(c.get("code") == "409089005" for c in flag["code"]["coding"]), flag["code"]
    assert flag["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C")
    details = [e["valueReference"]["reference"] for e in flag["extension"] if e["url"].endswith("flag-detail")]
    assert details == ["Observation/rt-febrile-1", "Observation/rt-febrile-t1"]
    code, summary = run_once(config_module.load(setup.config_path), setup.state_path, "cron-after-fever")
    assert code == 0 and (summary.created, summary.updated) == (0, 0)
    assert setup.flags("rt-febrile") == [flag]


def test_backport_handshake_heartbeat_and_id_only_notifications(setup, served):
    """A topic-based (Backport IG) Subscription pointed at our endpoint, id-only, with heartbeats: the
    shapes HAPI sends. Sekmet has no built-in Observation topic, so the test defines one."""
    from sekmet.subscriptions import backport

    topic = backport.topic_basic("anc-test", "ANC", "An ANC Observation", "Observation", "true",
                                 [("code", "Observation")])
    setup.put(topic)
    subscription = backport.build_subscription(
        f"{backport.SEKMET_TOPIC_BASE}/anc-test", f"{served.base_url}/notifications/anc",
        filters=["Observation?code=http://loinc.org|26499-4"], content="id-only",
        headers=[f"Authorization: Bearer {setup.token('anc')}"], heartbeat=1)
    subscription["id"] = "rt-backport"
    setup.put(subscription)
    received = wait_for_log(served, "notification",
                            lambda found: {"handshake", "heartbeat"} <= {e["kind"] for e in found})
    assert {"handshake", "heartbeat"} <= {e["kind"] for e in received}
    status = requests.get(f"{setup.base_url}/Subscription/rt-backport", timeout=30).json()["status"]
    assert status == "active"  # the handshake was answered 200

    setup.load(patient("rt-idonly"))
    setup.put(anc("rt-idonly-1", "rt-idonly", 0.3, effective=RECENT, code="26499-4"))
    setup.wait_for_flag("rt-idonly")
    assert any(e["kind"] == "event-notification" and e["ids"] == 1 and e["observations"] == 0
               for e in events(served, "notification"))
    requests.delete(f"{setup.base_url}/Subscription/rt-backport", timeout=30)


def test_a_restart_keeps_the_subscriptions_and_their_tokens(setup, served):
    before = {s["id"]: s for s in setup.our_subscriptions()}
    assert sorted(before) == sorted(subscriptions.subscription_id(SYSTEM_BASE, name)
                                    for name in (subscriptions.ANC, subscriptions.TEMPERATURE))
    served.stop()
    with setup.serve() as again:
        actions = {e["subscription"]: e["action"] for e in events(again, "subscription")}
        assert actions == {"anc": "unchanged", "temperature": "unchanged"}
        after = {s["id"]: s for s in setup.our_subscriptions()}
        assert sorted(after) == sorted(before)
        assert all(s["status"] == "active" for s in after.values())
        # The token survived the restart: a notification the server sends now still authenticates.
        setup.load(patient("rt-after-restart"))
        setup.put(anc("rt-after-restart-1", "rt-after-restart", 0.3, effective=RECENT))
        setup.wait_for_flag("rt-after-restart")


def test_put_resource_delivery_and_a_subscription_in_error_is_revived(tmp_path):
    """Sekmet's default (PUT [endpoint]/Observation/<id>, as in the R4 specification and HAPI); a
    Subscription the server set to `error` (deliveries failed while we were down) is made active again
    at start."""
    with sekmet() as base_url:
        setup = Setup(base_url, tmp_path)
        with setup.serve():
            pass
        for found in setup.our_subscriptions():
            setup.put({**found, "status": "error", "error": "delivery failed"})
        with setup.serve() as process:
            actions = {e["subscription"]: e["action"] for e in events(process, "subscription")}
            assert actions == {"anc": "updated", "temperature": "updated"}
            assert all(s["status"] == "active" for s in setup.our_subscriptions())
            setup.load(patient("rt-put"))
            setup.put(anc("rt-put-1", "rt-put", 0.3, effective=RECENT))
            setup.wait_for_flag("rt-put")
            assert any(e["observations"] == 1 for e in events(process, "notification"))


def test_with_the_state_in_postgresql_notified_counts_share_the_ledger_with_cron(tmp_path, pg_url):
    """Pods that keep no disk: `serve` and the cron job share one PostgreSQL state — a notified count is
    ledgered there (under the advisory lock), so the cron run after it writes nothing."""
    with sekmet(settings="subscriptions: {notify_method: post-endpoint, retries: 2}\n") as base_url:
        setup = Setup(base_url, tmp_path, state_url=pg_url)
        with setup.serve():
            setup.load(patient("pg-severe"))
            setup.put(anc("pg-severe-1", "pg-severe", 0.3, effective=RECENT))
            flags = setup.wait_for_flag("pg-severe")
            deadline = time.monotonic() + WAIT_S
            while setup.ledger("pg-severe-1") is None and time.monotonic() < deadline:
                time.sleep(0.1)  # the batch commits its state a moment after the Flag is on the server
            assert setup.ledger("pg-severe-1") is not None
        code, summary = run_once(config_module.load(setup.config_path), pg_url, "cron-after-notification")
        assert code == 0 and (summary.created, summary.updated) == (0, 0)
        assert setup.flags("pg-severe") == flags and len(flags) == 1
