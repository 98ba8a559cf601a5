"""The notification endpoint over HTTP (Starlette's test client), and putting our Subscriptions in place
against a mocked FHIR server: created when missing, left alone when equal, updated when changed or
switched off by the server."""

from __future__ import annotations

import json

import pytest
import responses
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from adapter import mappings, subscriptions
from adapter.config import Config
from adapter.fhir.client import FhirClient, RetryPolicy, session
from adapter.realtime import Batcher, Receiver
from adapter.serve import CdsService
from builders import anc

FHIR = "http://fhir.test/r4"
TOKEN = "per-subscription-secret"


class Recorded:
    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch)

    @property
    def notified(self):
        return [item for batch in self.batches for item in batch]


@pytest.fixture
def endpoint():
    config = Config()
    loaded = mappings.load("")
    service = CdsService(config, loaded, base_url="http://adapter.test")
    receiver = Receiver(config, loaded, client=None, output=None,
                        tokens={"anc": TOKEN, "temperature": "other-secret"}, registry=service.registry)
    recorded = Recorded()
    receiver.batcher = Batcher(recorded, quiet_s=600, max_wait_s=600)
    receiver.batcher.start()
    service.receiver = receiver
    with TestClient(service.app()) as client:
        yield client, recorded, receiver
    receiver.batcher.stop()


def bearer(token=TOKEN):
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": "Bearer other-secret"}, {"Authorization": f"Basic {TOKEN}"}])
def test_without_the_subscriptions_own_token_401_and_nothing_queued(endpoint, headers):
    client, recorded, receiver = endpoint
    response = client.post("/notifications/anc", content=json.dumps(anc("o1", "p1", 0.3)), headers=headers)
    assert response.status_code == 401
    receiver.batcher.stop()
    assert recorded.notified == []


def test_an_unknown_subscription_is_404(endpoint):
    client, _, _ = endpoint
    assert client.post("/notifications/nope", content=b"", headers=bearer()).status_code == 404


def test_full_resource_put_and_post_are_queued(endpoint):
    client, recorded, receiver = endpoint
    observation = anc("o2", "p1", 0.3)
    assert client.put("/notifications/anc/Observation/o2", content=json.dumps(observation),
                      headers=bearer()).status_code == 200
    assert client.post("/notifications/anc", content=json.dumps(observation), headers=bearer()).status_code == 200
    receiver.batcher.stop()
    assert [n.notification.observations for n in recorded.notified] == [(observation,), (observation,)]
    assert {n.subscription for n in recorded.notified} == {"anc"}


def test_handshake_and_heartbeat_are_answered_without_work(endpoint):
    from sekmet.subscriptions import backport

    client, recorded, receiver = endpoint
    subscription = {"id": "s1", "criteria": "http://topic.test/anc", "status": "requested"}
    for kind in ("handshake", "heartbeat"):
        body = backport.notification_bundle(subscription, FHIR, kind, 0)
        assert client.post("/notifications/anc", content=json.dumps(body), headers=bearer()).status_code == 200
    receiver.batcher.stop()
    assert recorded.notified == []
    metrics = client.get("/metrics").text
    assert 'anc_adapter_notifications_total{kind="handshake",subscription="anc"} 1.0' in metrics


def test_id_only_is_queued_as_ids(endpoint):
    from sekmet.subscriptions import backport

    client, recorded, receiver = endpoint
    body = backport.notification_bundle({"id": "s1", "criteria": "http://topic.test/anc"}, FHIR,
                                        "event-notification", 1, [{"number": 1, "focus": "Observation/o3"}])
    assert client.post("/notifications/anc", content=json.dumps(body), headers=bearer()).status_code == 200
    receiver.batcher.stop()
    assert [n.notification.observation_ids for n in recorded.notified] == [("o3",)]


def test_a_malformed_body_is_400_without_a_stack_trace(endpoint):
    client, recorded, receiver = endpoint
    response = client.post("/notifications/anc", content=b"{oops", headers=bearer())
    assert response.status_code == 400 and "Traceback" not in response.text
    receiver.batcher.stop()
    assert recorded.notified == []


def test_without_subscription_mode_there_is_no_endpoint():
    service = CdsService(Config(), mappings.load(""), base_url="http://adapter.test")
    with TestClient(service.app()) as client:
        assert client.post("/notifications/anc", content=b"", headers=bearer()).status_code == 404


# -- putting the Subscriptions in place ------------------------------------------------------------------

def fhir_client() -> FhirClient:
    return FhirClient(FHIR, session(), timeout_s=5, retry=RetryPolicy(attempts=1))


def wanted() -> dict:
    spec = subscriptions.specs(mappings.load(""), derive=False)[0]
    return subscriptions.build(spec, "https://hospital.example/fhir/anc-adapter", "http://adapter.test", TOKEN)


@responses.activate
def test_a_missing_subscription_is_created_with_a_put_to_its_id():
    resource = wanted()
    url = f"{FHIR}/Subscription/{resource['id']}"
    responses.get(url, status=404, json={"resourceType": "OperationOutcome"})
    put = responses.put(url, status=201, json=resource)
    assert subscriptions.ensure(fhir_client(), resource) == "created"
    assert json.loads(put.calls[0].request.body) == resource


@responses.activate
@pytest.mark.parametrize("status", ["active", "requested"])
def test_an_equal_live_subscription_is_left_alone(status):
    resource = wanted()
    url = f"{FHIR}/Subscription/{resource['id']}"
    responses.get(url, json={**resource, "status": status, "meta": {"versionId": "3"}})
    assert subscriptions.ensure(fhir_client(), resource) == "unchanged"
    assert [c.request.method for c in responses.calls] == ["GET"]


@responses.activate
@pytest.mark.parametrize("change", [
    {"status": "error", "error": "delivery failed"},
    {"status": "off"},
    {"channel_endpoint": "http://old-address.test/notifications/anc"},
    {"channel_header": ["Authorization: Bearer a-lost-token"]},
    {"criteria": "Observation?code=http://loinc.org|751-8"},
])
def test_a_changed_or_switched_off_subscription_is_updated(change):
    resource = wanted()
    current = json.loads(json.dumps(resource))
    for key, value in change.items():
        if key.startswith("channel_"):
            current["channel"][key.removeprefix("channel_")] = value
        else:
            current[key] = value
    url = f"{FHIR}/Subscription/{resource['id']}"
    responses.get(url, json=current)
    put = responses.put(url, json=resource)
    assert subscriptions.ensure(fhir_client(), resource) == "updated"
    assert json.loads(put.calls[0].request.body)["status"] == "requested"
