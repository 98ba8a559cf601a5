"""Subscription notification bodies -> the Observations they name. Backport bundles are built with
Sekmet's own notification builder (what a real engine sends), R4B and id-only shapes as the Backport IG
and HAPI send them."""

from __future__ import annotations

import json

import pytest

from adapter.sources.notifications import NotificationError, parse
from builders import anc

BASE = "http://fhir.test/fhir"
SUBSCRIPTION = {"resourceType": "Subscription", "id": "s1", "status": "active", "criteria": "http://topic.test/anc",
                "channel": {"type": "rest-hook", "endpoint": "http://adapter.test/notifications/anc"}}


def sekmet_bundle(kind: str, events: list[dict] | None = None, resources: list[dict] | None = None) -> bytes:
    from sekmet.subscriptions import backport

    return json.dumps(backport.notification_bundle(SUBSCRIPTION, BASE, kind, 3, events, resources)).encode()


def r4b_bundle(kind: str, focus: list[str], resources: list[dict] = ()) -> bytes:
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
              "subscription": {"reference": f"{BASE}/Subscription/s1"},
              "notificationEvent": [{"eventNumber": str(i), "focus": {"reference": f}} for i, f in enumerate(focus)]}
    entries = [{"fullUrl": "urn:uuid:1", "resource": status}] + [{"resource": r} for r in resources]
    return json.dumps({"resourceType": "Bundle", "type": "history", "entry": entries}).encode()


@pytest.mark.parametrize("kind", ["handshake", "heartbeat", "query-status"])
def test_handshake_heartbeat_and_status_carry_no_work(kind):
    notification = parse(sekmet_bundle(kind))
    assert notification.kind == kind and not notification.work


def test_backport_full_resource_gives_the_resources():
    observation = anc("o1", "p1", 0.3, meta={"versionId": "2"})
    notification = parse(sekmet_bundle("event-notification", [{"number": 4, "focus": "Observation/o1"}],
                                       [observation]))
    assert notification.kind == "event-notification"
    assert notification.observations == (observation,) and notification.observation_ids == ()


def test_backport_id_only_gives_the_ids_to_read():
    events = [{"number": 4, "focus": "Observation/o1"}, {"number": 5, "focus": "Observation/o2"},
              {"number": 6, "focus": "Observation/o1"}]
    notification = parse(sekmet_bundle("event-notification", events))
    assert notification.observations == () and notification.observation_ids == ("o1", "o2")


def test_id_only_entries_with_full_urls_and_versioned_focus_are_read_too():
    # HAPI's id-only: an entry per focus with its fullUrl and no resource; a focus may name a version.
    body = json.loads(r4b_bundle("event-notification", [f"{BASE}/Observation/o3/_history/7"]))
    body["entry"].append({"fullUrl": f"{BASE}/Observation/o4", "request": {"method": "POST", "url": "Observation"}})
    notification = parse(json.dumps(body).encode())
    assert notification.observation_ids == ("o3", "o4")


def test_r4b_subscription_status_with_full_resource():
    observation = anc("o5", "p1", 1.1)
    notification = parse(r4b_bundle("event-notification", ["Observation/o5"], [observation]))
    assert notification.observations == (observation,) and notification.observation_ids == ()


def test_other_resource_types_are_counted_and_ignored():
    notification = parse(sekmet_bundle("event-notification", [{"number": 1, "focus": "Patient/p1"}]))
    assert not notification.work and notification.other == 1


def test_classic_put_of_the_resource_to_its_own_path():
    observation = anc("o6", "p1", 0.4)
    notification = parse(json.dumps(observation).encode(), ("Observation", "o6"))
    assert notification.observations == (observation,)


def test_classic_post_of_the_resource():
    observation = anc("o7", "p1", 0.4)
    assert parse(json.dumps(observation).encode()).observations == (observation,)


def test_empty_post_is_a_ping_and_an_empty_put_names_its_resource():
    assert parse(b"").kind == "ping" and not parse(b"").work
    assert parse(b" ", ("Observation", "o8")).observation_ids == ("o8",)


@pytest.mark.parametrize("body, path, message", [
    (b"{not json", None, "not JSON"),
    (b"[]", None, "not a FHIR resource"),
    (json.dumps(anc("o9", "p1", 0.4)).encode(), ("Observation", "other"), "not the one named by the path"),
    (json.dumps({"resourceType": "Bundle", "type": "history", "entry": []}).encode(), None, "starts with its status"),
    (json.dumps({"resourceType": "Observation"}).encode(), None, "no valid id"),
    (b"", ("Observation", ".."), "FHIR id"),
])
def test_unusable_bodies_are_refused_naming_the_part(body, path, message):
    with pytest.raises(NotificationError, match=message):
        parse(body, path)


def test_an_unknown_notification_type_is_refused():
    body = json.loads(sekmet_bundle("heartbeat"))
    for parameter in body["entry"][0]["resource"]["parameter"]:
        if parameter["name"] == "type":
            parameter["valueCode"] = "surprise"
    with pytest.raises(NotificationError, match="type"):
        parse(json.dumps(body).encode())
