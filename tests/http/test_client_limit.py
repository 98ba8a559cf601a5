"""[fhir] max_requests_per_s in the FHIR client (responses mocks, a fake clock): every try of every call
takes its slot from the bucket — retries and the background page prefetch included."""

from __future__ import annotations

import requests
import responses
from responses import matchers

from adapter.fhir import auth
from adapter.fhir.client import FhirClient, RetryPolicy
from adapter.fhir.throttle import TokenBucket
from fakeclock import Clock

BASE = "https://fhir.example.org/r4"


def limited_client(clock: Clock, rate: float = 2.0) -> FhirClient:
    return FhirClient(BASE, requests.Session(), timeout_s=5,
                      retry=RetryPolicy(attempts=4, budget_s=60, initial_s=0.0), sleep=lambda s: None,
                      limit=TokenBucket(rate, clock=clock, sleep=clock.sleep))


@responses.activate
def test_retries_wait_for_their_slot_too():
    responses.get(f"{BASE}/metadata", status=503)
    responses.get(f"{BASE}/metadata", status=429)
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    clock = Clock()
    assert limited_client(clock).get("metadata")["resourceType"] == "CapabilityStatement"
    assert len(responses.calls) == 3
    assert clock.slept == [0.5, 0.5]  # the first try at once, each retry one interval (1/2 s) later


@responses.activate
def test_paging_with_prefetch_is_limited():
    pages = 4
    for n in range(pages):
        link = [{"relation": "next", "url": f"{BASE}/Observation?page={n + 1}"}] if n + 1 < pages else []
        responses.get(f"{BASE}/Observation", match=[matchers.query_param_matcher({"page": str(n)} if n else {})],
                      json={"resourceType": "Bundle", "link": link,
                            "entry": [{"resource": {"resourceType": "Observation", "id": f"o{n}"}}]})
    clock = Clock()
    assert len(list(limited_client(clock).search("Observation", {}))) == pages
    assert len(responses.calls) == pages
    assert clock.slept == [0.5] * (pages - 1)



class Tokens:
    """Stands in for a token endpoint: a new token each time one is invalidated."""

    token_url = "https://login.example.org/token"

    def __init__(self) -> None:
        self.issued = 1

    def token(self) -> str:
        return f"token-{self.issued}"

    def invalidate(self, token: str) -> None:
        self.issued += 1


@responses.activate
def test_the_retry_after_a_401_the_auth_sends_itself_is_limited_too():
    """TokenAuth resends a refused request straight through the transport adapter, past the client's
    retry loop: the limit sits in the adapter so that request waits for its slot as well."""
    responses.get(f"{BASE}/metadata", status=401)
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    clock = Clock()
    client = limited_client(clock)
    client.session.auth = auth.TokenAuth(Tokens())
    assert client.get("metadata")["resourceType"] == "CapabilityStatement"
    assert [c.request.headers["Authorization"] for c in responses.calls] == ["Bearer token-1", "Bearer token-2"]
    assert clock.slept == [0.5]
