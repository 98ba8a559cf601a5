"""HTTP behaviour of the FHIR client: paging, refused links, retries, error types (responses mocks)."""

from __future__ import annotations

import email.utils
import json
from datetime import datetime, timedelta, timezone

import pytest
import requests
import responses

from adapter.errors import AuthError, PermanentHttpError, SearchTruncated, TransientHttpError
from adapter.fhir.client import FhirClient, RetryPolicy

BASE = "https://fhir.example.org/r4"


def bundle(*ids: str, next_url: str | None = None) -> dict:
    links = [{"relation": "self", "url": f"{BASE}/Observation"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"resource": {"resourceType": "Observation", "id": i}} for i in ids],
    }


def client(max_pages: int = 100, attempts: int = 4) -> tuple[FhirClient, list[float]]:
    sleeps: list[float] = []
    return (
        FhirClient(BASE, requests.Session(), timeout_s=5, max_pages=max_pages,
                   retry=RetryPolicy(attempts=attempts, budget_s=60, initial_s=0.01), sleep=sleeps.append),
        sleeps,
    )


def ids(pages) -> list[list[str]]:
    return [[e["resource"]["id"] for e in page["entry"]] for page in pages]


@responses.activate
def test_follows_next_links_exactly_as_given_including_host_relative_ones():
    responses.get(f"{BASE}/Observation", json=bundle("a", next_url="/r4/opaque?page=XYZ"))
    responses.get(f"{BASE}/opaque", json=bundle("b", next_url=f"{BASE}/opaque2?t=1"))
    responses.get(f"{BASE}/opaque2", json=bundle("c"))
    fhir, _ = client()
    assert ids(fhir.search("Observation", {"code": "x"})) == [["a"], ["b"], ["c"]]
    assert [c.request.url.split("?")[0] for c in responses.calls] == [
        f"{BASE}/Observation", f"{BASE}/opaque", f"{BASE}/opaque2"]
    assert fhir.request_count == 3


@pytest.mark.parametrize("elsewhere", [
    "https://evil.example.org/r4/Observation?page=2",   # other host
    "http://fhir.example.org/r4/Observation?page=2",    # scheme downgrade
    "https://fhir.example.org:8443/r4/Observation?p=2",  # other port
])
@responses.activate
def test_a_next_link_off_the_configured_server_is_refused(elsewhere):
    responses.get(f"{BASE}/Observation", json=bundle("a", next_url=elsewhere))
    fhir, _ = client()
    pages = fhir.search("Observation", {})
    assert ids([next(pages)]) == [["a"]]
    with pytest.raises(PermanentHttpError, match="away from the configured server"):
        next(pages)
    assert len(responses.calls) == 1  # nothing was sent to the other server


@responses.activate
def test_paging_stops_on_an_empty_page_even_with_a_bogus_next():
    responses.get(f"{BASE}/Observation", json=bundle("a", next_url=f"{BASE}/p2"))
    responses.get(f"{BASE}/p2", json={**bundle(next_url=f"{BASE}/p3"), "entry": []})
    fhir, _ = client()
    assert ids(fhir.search("Observation", {})) == [["a"]]
    assert len(responses.calls) == 2


@responses.activate
def test_paging_stops_on_a_repeated_next_link():
    responses.get(f"{BASE}/Observation", json=bundle("a", next_url=f"{BASE}/loop"))
    responses.get(f"{BASE}/loop", json=bundle("b", next_url=f"{BASE}/loop"))
    fhir, _ = client()
    pages = []
    with pytest.raises(SearchTruncated, match="repeated a next link"):
        for page in fhir.search("Observation", {}):
            pages.append(page)
    assert ids(pages) == [["a"], ["b"]]  # every page read is handed over before the pass is called short
    assert len(responses.calls) == 2


@responses.activate
def test_paging_stops_at_the_page_cap():
    responses.get(f"{BASE}/Observation", json=bundle("a", next_url=f"{BASE}/p?n=1"))
    for n in range(1, 10):
        responses.get(f"{BASE}/p?n={n}", json=bundle(f"x{n}", next_url=f"{BASE}/p?n={n + 1}"))
    fhir, _ = client(max_pages=3)
    pages = []
    with pytest.raises(SearchTruncated, match="page cap"):
        for page in fhir.search("Observation", {}):
            pages.append(page)
    assert len(pages) == 3


@responses.activate
def test_an_operation_outcome_instead_of_a_bundle_is_an_error():
    responses.get(f"{BASE}/Observation", json={"resourceType": "OperationOutcome", "issue": []})
    fhir, _ = client()
    with pytest.raises(PermanentHttpError, match="not a Bundle"):
        list(fhir.search("Observation", {}))


@responses.activate
def test_retries_5xx_then_succeeds():
    responses.get(f"{BASE}/metadata", status=503)
    responses.get(f"{BASE}/metadata", status=502)
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    fhir, sleeps = client()
    assert fhir.get("metadata")["resourceType"] == "CapabilityStatement"
    assert len(sleeps) == 2
    assert dict(fhir.requests_by_status) == {"503": 1, "502": 1, "200": 1}


@responses.activate
def test_429_honours_retry_after_in_seconds_and_as_http_date():
    when = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    responses.get(f"{BASE}/metadata", status=429, headers={"Retry-After": "7"})
    responses.get(f"{BASE}/metadata", status=429, headers={"Retry-After": when})
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    fhir, sleeps = client()
    fhir.get("metadata")
    assert sleeps[0] == 7
    assert 25 <= sleeps[1] <= 30


@responses.activate
def test_gives_up_after_the_retry_limit_with_a_transient_error():
    responses.get(f"{BASE}/metadata", status=503)
    fhir, sleeps = client(attempts=3)
    with pytest.raises(TransientHttpError):
        fhir.get("metadata")
    assert len(responses.calls) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("status", [400, 404, 409, 412, 422])
@responses.activate
def test_other_4xx_are_not_retried(status):
    responses.get(f"{BASE}/Patient/x", status=status, json={"resourceType": "OperationOutcome",
                                                             "issue": [{"code": "invalid"}]})
    fhir, sleeps = client()
    with pytest.raises(PermanentHttpError) as raised:
        fhir.get("Patient/x")
    assert raised.value.status == status
    assert len(responses.calls) == 1 and sleeps == []


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_401_and_403_are_auth_errors_not_retried(status):
    responses.get(f"{BASE}/metadata", status=status)
    fhir, _ = client()
    with pytest.raises(AuthError):
        fhir.get("metadata")
    assert len(responses.calls) == 1


@responses.activate
def test_an_html_page_from_a_proxy_is_retried_then_fails_as_transient():
    responses.get(f"{BASE}/metadata", body="<html><body>502 Bad Gateway</body></html>", status=200,
                  content_type="text/html")
    fhir, _ = client(attempts=2)
    with pytest.raises(TransientHttpError, match="not JSON"):
        fhir.get("metadata")
    assert len(responses.calls) == 2


@responses.activate
def test_connection_errors_are_retried():
    responses.get(f"{BASE}/metadata", body=requests.ConnectionError("reset"))
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    fhir, _ = client()
    assert fhir.get("metadata")["resourceType"] == "CapabilityStatement"
    assert fhir.requests_by_status["error"] == 1


@responses.activate
def test_a_transaction_is_retried_because_its_entries_are_conditional_updates():
    responses.post(BASE, status=503)
    responses.post(BASE, json={"resourceType": "Bundle", "type": "transaction-response", "entry": []})
    fhir, _ = client()
    assert fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})["type"] == \
        "transaction-response"
    assert len(responses.calls) == 2


@responses.activate
def test_every_call_has_a_timeout():
    seen = []

    class Recording(requests.Session):
        def request(self, *args, **kwargs):
            seen.append(kwargs.get("timeout"))
            return super().request(*args, **kwargs)

    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement"})
    FhirClient(BASE, Recording(), timeout_s=12).get("metadata")
    assert seen == [12]


@responses.activate
def test_a_held_prefetch_is_sent_on_release_or_when_its_page_is_asked_for_and_never_after_an_early_end():
    responses.get(f"{BASE}/Observation", json=bundle("a", next_url=f"{BASE}/p2"))
    responses.get(f"{BASE}/p2", json=bundle("b", next_url=f"{BASE}/p3"))
    responses.get(f"{BASE}/p3", json=bundle("c", next_url=f"{BASE}/p4"))
    responses.get(f"{BASE}/p4", json=bundle("d"))
    fhir, _ = client()
    pages = fhir.search("Observation", {"code": "x"})
    with fhir.prefetch_held():
        assert ids([next(pages)]) == [["a"]]  # p2 is held
    responses.get(f"{BASE}/other", json=bundle("z"))
    assert ids([fhir.get("other")]) == [["z"]]  # a request of our own meets no page fetch
    fetched = [c.request.url.split("?")[0] for c in responses.calls]
    assert fetched == [f"{BASE}/Observation", f"{BASE}/other"]
    assert ids([next(pages)]) == [["b"]]  # asked for: sent though never released (no deadlock)
    with fhir.prefetch_held():
        assert ids([next(pages)]) == [["c"]]  # p4 is held
    fhir.release_prefetch()
    pages.close()  # p4 was released: the early end lets it finish, as any prefetch
    assert [c.request.url.split("?")[0] for c in responses.calls][-1] == f"{BASE}/p4"
    pages = fhir.search("Observation", {"code": "x"})
    with fhir.prefetch_held():
        next(pages)
    pages.close()  # held and never released: not sent at all
    assert [c.request.url.split("?")[0] for c in responses.calls].count(f"{BASE}/p2") == 1  # only the first search sent it


@responses.activate
def test_bodies_orjson_refuses_are_read_as_the_standard_library_reads_them():
    # NaN and a byte-order mark are not JSON; we read them all the same (liberal in what we read), and a
    # NaN count is then quarantined, not a failed run.
    responses.get(f"{BASE}/Observation/nan", body='{"resourceType": "Observation", "valueQuantity": {"value": NaN}}',
                  content_type="application/fhir+json")
    responses.get(f"{BASE}/Observation/bom", body='\ufeff{"resourceType": "Observation", "id": "bom"}'.encode(),
                  content_type="application/fhir+json")
    fhir, _ = client()
    value = fhir.get("Observation/nan")["valueQuantity"]["value"]
    assert value != value  # NaN
    assert fhir.get("Observation/bom")["id"] == "bom"


@responses.activate
def test_a_transaction_is_sent_as_utf8_json_that_reads_back_equal_asking_for_a_minimal_answer():
    sent = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Flag", "code": {"text": "ANC 450 cells/µL ≥ 38.0 °C"}},
         "request": {"method": "PUT", "url": "Flag?identifier=s|p/o"}}]}
    responses.post(BASE, json={"resourceType": "Bundle", "type": "transaction-response", "entry": []})
    fhir, _ = client()
    fhir.transaction(sent)
    request = responses.calls[0].request
    assert request.headers["Content-Type"] == "application/fhir+json"
    assert request.headers["Prefer"] == "return=minimal"  # status and location are all we read
    assert json.loads(request.body.decode("utf-8")) == sent
