"""The Subscriptions we build, their tokens, and the burst batcher."""

from __future__ import annotations

import pytest
from fhir.resources.R4B.subscription import Subscription

from adapter import mappings, subscriptions
from adapter.realtime import Batcher
from adapter.state import State

BASE = "https://hospital.example/fhir/anc-adapter"


@pytest.mark.parametrize("derive", [False, True])
def test_one_valid_rest_hook_subscription_per_criteria(derive):
    loaded = mappings.load("")
    built = [subscriptions.build(spec, BASE, "https://adapter.example/rt/", "secret-token")
             for spec in subscriptions.specs(loaded, derive)]
    assert [b["channel"]["endpoint"] for b in built] == [
        "https://adapter.example/rt/notifications/anc", "https://adapter.example/rt/notifications/temperature"]
    for resource in built:
        Subscription.model_validate(resource)
        assert resource["channel"]["type"] == "rest-hook"
        assert resource["channel"]["payload"] == "application/fhir+json"
        assert resource["channel"]["header"] == ["Authorization: Bearer secret-token"]
        assert resource["meta"]["tag"] == [{"system": f"{BASE}/tag", "code": "anc-adapter"}]
    anc_codes = built[0]["criteria"].removeprefix("Observation?code=").split(",")
    assert {f"{s}|{c}" for s, c in loaded.anc_codes} <= set(anc_codes)
    assert ({f"{s}|{c}" for s, c in loaded.input_kinds()} <= set(anc_codes)) == derive
    # The temperature codes `run` reads (mappings/context.toml), not a list of the subscription's own.
    assert built[1]["criteria"] == "Observation?code=http://loinc.org|8310-5,http://loinc.org|8331-1"


def test_ids_are_stable_per_deployment_and_differ_between_deployments():
    first = subscriptions.subscription_id(BASE, "anc")
    assert first == subscriptions.subscription_id(BASE + "/", "anc")
    assert first != subscriptions.subscription_id("https://other.example/anc-adapter", "anc")
    assert first != subscriptions.subscription_id(BASE, "temperature")


def test_a_token_is_random_per_subscription_and_survives_reopening_the_state(tmp_path):
    path = tmp_path / "state.sqlite3"
    state = State.open(path)
    anc, temperature = subscriptions.token(state, "anc"), subscriptions.token(state, "temperature")
    state.db.close()
    assert anc != temperature and len(anc) >= 40
    again = State.open(path)
    assert subscriptions.token(again, "anc") == anc
    assert (path.stat().st_mode & 0o777) == 0o600


class Recorder:
    def __init__(self):
        self.batches: list[list[int]] = []

    def __call__(self, batch):
        self.batches.append(batch)


def test_a_burst_is_handed_over_in_batches_of_at_most_max_batch_and_stop_drains():
    recorder = Recorder()
    # Long quiet and wait times: only the batch size and the stop end a batch, so the test is exact.
    batcher = Batcher(recorder, quiet_s=600, max_wait_s=600, max_batch=10)
    batcher.start()
    for item in range(25):
        assert batcher.add(item)
    batcher.stop()
    assert [item for batch in recorder.batches for item in batch] == list(range(25))
    assert all(len(batch) <= 10 for batch in recorder.batches)
    assert len(recorder.batches) == 3


def test_a_full_queue_refuses_instead_of_growing():
    batcher = Batcher(lambda batch: None, max_queued=2)  # not started: nothing is taken off the queue
    assert batcher.add(1) and batcher.add(2)
    assert not batcher.add(3)


def test_a_failing_batch_does_not_stop_the_worker():
    handled = []

    def handle(batch):
        handled.append(batch)
        if len(handled) == 1:
            raise RuntimeError("a bug")

    batcher = Batcher(handle, quiet_s=600, max_wait_s=600, max_batch=1)
    batcher.start()
    batcher.add("first")
    batcher.add("second")
    batcher.stop()
    assert handled == [["first"], ["second"]]


def test_a_burst_naming_one_observation_twice_keeps_the_later_version_whatever_the_offsets():
    """Notifications may carry lastUpdated with different offsets: 10:30+02:00 is 08:30Z, earlier than
    09:00Z, though it sorts after it as text."""
    from adapter import realtime

    earlier = {"resourceType": "Observation", "id": "o1", "meta": {"lastUpdated": "2026-11-26T10:30:00+02:00"}}
    later = {"resourceType": "Observation", "id": "o1", "meta": {"lastUpdated": "2026-11-26T09:00:00Z"}}
    assert realtime._updated(later) > realtime._updated(earlier)
    assert realtime._updated({"id": "o1"}) < realtime._updated(earlier)  # no lastUpdated: never preferred
