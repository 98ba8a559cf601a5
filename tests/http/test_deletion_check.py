"""The deletion check with mocks: batched `_id` searches, a read confirming each id the search left out,
and only 404/410 withdrawing anything."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from adapter import source
from adapter.cli import main
from adapter.errors import PermanentHttpError
from adapter.fhir.client import FhirClient, RetryPolicy
from builders import anc, patient
from test_pipeline import BASE, CAPABILITY

OBSERVATION_READ = re.compile(rf"{re.escape(BASE)}/Observation/[^/?]+$")


def bundle(*resources):
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def asked(request) -> list[str]:
    return parse_qs(urlsplit(request.url).query)["_id"][0].split(",")


def id_search(exists):
    """Answers an `_id` search with the asked ids for which exists(id) is true."""
    def answer(request):
        found = [{"resourceType": "Observation", "id": i} for i in asked(request) if exists(i)]
        return 200, {}, json.dumps(bundle(*found))
    return answer


def client() -> FhirClient:
    return FhirClient(BASE, requests.Session(), retry=RetryPolicy(attempts=1))


def id_searches(mock) -> list:
    return [c.request for c in mock.calls if "_id=" in c.request.url]


def test_ids_are_checked_in_batches_of_100_and_nothing_present_is_read():
    ids = [f"o{n:03d}" for n in range(250)]
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=id_search(lambda i: True))
        assert source.deleted(client(), ids) == set()
        searches = id_searches(mock)
        assert [asked(r) for r in searches] == [ids[:100], ids[100:200], ids[200:]]
        assert all(int(parse_qs(urlsplit(r.url).query)["_count"][0]) >= len(asked(r)) for r in searches)
        assert len(mock.calls) == 3  # no read: every id came back


def test_long_ids_make_smaller_batches_so_the_url_stays_short():
    ids = [f"{n:03d}-" + "x" * 60 for n in range(100)]  # 64 characters, the most a FHIR id may have
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=id_search(lambda i: True))
        source.deleted(client(), ids)
        searches = id_searches(mock)
        assert len(searches) == 2 and sum(len(asked(r)) for r in searches) == 100
        assert all(len(r.url) < 8000 for r in searches)


@pytest.mark.parametrize("read_status,gone", [(410, True), (404, True), (200, False), (400, False), (403, False)])
def test_an_id_the_search_left_out_is_gone_only_when_a_read_says_so(read_status, gone):
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=id_search(lambda i: i != "o2"))
        body = {"resourceType": "Observation", "id": "o2"} if read_status == 200 else \
            {"resourceType": "OperationOutcome", "issue": [{"code": "deleted"}]}
        mock.get(f"{BASE}/Observation/o2", status=read_status, json=body)
        assert source.deleted(client(), ["o1", "o2", "o3"]) == ({"o2"} if gone else set())
        assert [c.request.url for c in mock.calls if "_id=" not in c.request.url] == [f"{BASE}/Observation/o2"]


def test_a_search_that_ignores_id_withdraws_nothing():
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/Observation", json=bundle({"resourceType": "Observation", "id": "someone-else"}))
        with pytest.raises(PermanentHttpError):
            source.deleted(client(), ["o1", "o2"])
        assert len(mock.calls) == 1  # and no read of o1, o2


def test_reads_per_call_are_capped_so_a_mass_deletion_drains_over_runs():
    ids = [f"o{n:03d}" for n in range(150)]
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=id_search(lambda i: False))
        mock.get(OBSERVATION_READ, status=410)
        gone = source.deleted(client(), ids)
        assert gone == set(ids[:100])
        assert len(mock.calls) == 2 + 100


# -- the whole run ------------------------------------------------------------------------------------------

def transaction_echo(request):
    entries = [{"response": {"status": "201 Created", "location": f"Flag/f{i}/_history/1"}}
               for i, _ in enumerate(json.loads(request.body)["entry"])]
    return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})


class Lab:
    """A mocked server whose Observations can be hard-deleted between runs."""

    def __init__(self, mock, observations, patients):
        self.deleted: set[str] = set()
        self.hidden_from_search: set[str] = set()
        self.id_search_status = 200
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"), json=bundle())
        mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/Observation(\?.*)?$"), callback=self.search)
        mock.add_callback(responses.GET, OBSERVATION_READ, callback=self.read)
        mock.add_callback(responses.POST, BASE, callback=transaction_echo)
        self.observations = {o["id"]: o for o in observations}
        self.patients = patients

    def search(self, request):
        if "_id=" in request.url and self.id_search_status != 200:
            return self.id_search_status, {}, json.dumps({"resourceType": "OperationOutcome", "issue": []})
        if "_id=" in request.url:
            return 200, {}, json.dumps(bundle(*(self.observations[i] for i in asked(request)
                                                if i not in self.deleted | self.hidden_from_search)))
        live = [o for i, o in self.observations.items() if i not in self.deleted]
        return 200, {}, json.dumps(bundle(*live, *self.patients))

    def read(self, request):
        observation_id = request.url.rsplit("/", 1)[1]
        if observation_id in self.deleted:
            return 410, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "deleted"}]})
        return 200, {}, json.dumps(self.observations[observation_id])


def posted(mock) -> list[dict]:
    return [e["resource"] for c in mock.calls if c.request.method == "POST" for e in json.loads(c.request.body)["entry"]]


def last_summary(state: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", "--json", "--state", state]) == 0
    return json.loads(capsys.readouterr().out)["last_runs"][0]["summary"]


def test_a_run_checks_active_flags_in_one_request_per_100_and_withdraws_the_deleted(tmp_path, capsys):
    state = str(tmp_path / "s.sqlite3")
    observations = [anc(f"o{n:03d}", f"p{n:03d}", 0.4) for n in range(250)]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        lab = Lab(mock, observations, [patient(f"p{n:03d}") for n in range(250)])
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        first = last_summary(state, capsys)
        assert (first["evidence_checked"], first["evidence_requests"]) == (0, 0)  # nothing live yet
        assert not id_searches(mock)

        lab.deleted = {"o007"}
        lab.hidden_from_search = {"o100"}  # left out by the search, but still there
        before = len(mock.calls)
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        second = last_summary(state, capsys)
        assert [len(asked(r)) for r in id_searches(mock)] == [100, 100, 50]
        reads = [c.request.url for c in mock.calls[before:] if OBSERVATION_READ.match(c.request.url)]
        assert sorted(reads) == [f"{BASE}/Observation/o007", f"{BASE}/Observation/o100"]
        assert (second["evidence_checked"], second["evidence_requests"], second["evidence_deleted"]) == (250, 5, 1)
        [withdrawn] = posted(mock)[250:]
        assert withdrawn["subject"]["reference"] == "Patient/p007" and withdrawn["status"] == "entered-in-error"

        searches_before = len(id_searches(mock))
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        assert len(posted(mock)) == 251  # nothing more
        assert len(id_searches(mock)) == searches_before + 3  # 249 still live: 3 searches again


def test_a_backfill_does_not_check_and_a_dry_run_shows_the_withdrawal_without_writing(tmp_path, capsys):
    state = str(tmp_path / "s.sqlite3")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        lab = Lab(mock, [anc("o1", "a", 0.4)], [patient("a")])
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        lab.deleted = {"o1"}
        assert main(["run", "--fhir-url", BASE, "--state", state, "--since", "2026-11-01T00:00:00Z"]) == 0
        assert not id_searches(mock)  # a backfill re-reads its window and nothing else
        capsys.readouterr()
        assert main(["run", "--fhir-url", BASE, "--state", state, "--dry-run"]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["resourceType"], r["status"]) for r in printed] == [("Flag", "entered-in-error")]
        assert len(posted(mock)) == 1  # only the first run's Flag
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0  # the dry run left state as it was
        assert [r["status"] for r in posted(mock)] == ["active", "entered-in-error"]


def test_a_result_created_again_is_graded_even_when_its_version_ids_restart(tmp_path):
    # A server that purges a deleted resource's history starts the new one at versionId 1 again: the
    # version we ledgered before the deletion must not make us skip it.
    state = str(tmp_path / "s.sqlite3")
    original = anc("o1", "a", 0.4, meta={"versionId": "1", "lastUpdated": "2026-11-20T09:00:00Z"})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        lab = Lab(mock, [original], [patient("a")])
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        lab.deleted = {"o1"}
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        lab.observations["o1"] = anc("o1", "a", 0.3, meta={"versionId": "1", "lastUpdated": "2026-11-25T09:00:00Z"})
        lab.deleted = set()
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        assert [(r["status"], r["code"]["coding"][-1]["code"]) for r in posted(mock)] == [
            ("active", "severe"), ("entered-in-error", "165517008"), ("active", "severe")]
        lab.observations["o1"] = original  # a stale copy of the deleted version changes nothing
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        assert len(posted(mock)) == 3


def test_a_check_the_server_cannot_answer_withdraws_nothing_and_does_not_stop_the_poll(tmp_path):
    state = str(tmp_path / "s.sqlite3")
    config = tmp_path / "adapter.toml"
    config.write_text("[fhir]\nretries = 0\n")
    args = ["run", "--config", str(config), "--fhir-url", BASE, "--state", state]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        lab = Lab(mock, [anc("o1", "a", 0.4)], [patient("a")])
        assert main(args) == 0
        lab.id_search_status = 503
        lab.deleted = {"o1"}
        lab.observations["o2"] = anc("o2", "b", 0.3)
        lab.patients.append(patient("b"))
        assert main(args) == 0
        assert [(r["subject"]["reference"], r["status"]) for r in posted(mock)] == [
            ("Patient/a", "active"), ("Patient/b", "active")]  # a kept, b's new alert written
        assert [c.response.status_code for c in mock.calls if "_id=" in c.request.url] == [503]
