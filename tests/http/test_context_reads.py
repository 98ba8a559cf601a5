"""How clinical context is read (CONTRACT §5b), seen on the wire with `responses`: batched by subject, never
one request per patient; only searches the server declares; the poll asks live patients only; a Medication
the server did not include is read once; a failed context search never holds back the count's alert."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest
import responses

from adapter import context_source
from adapter.cli import main
from adapter.state import State
from builders import anc, patient

BASE = "https://fhir.example.org/r4"
CONTEXT_TYPES = ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure", "Condition")
PARAMS = ("subject", "code", "date", "effective-time", "authoredon", "_lastUpdated")
EMPTY = {"resourceType": "Bundle", "type": "searchset", "entry": []}
ANC_CODE = "http://loinc.org|751-8"


def capability(types=CONTEXT_TYPES, system=("transaction",)) -> dict:
    resources = [{"type": kind, "interaction": [{"code": "search-type"}],
                  "searchParam": [{"name": name} for name in PARAMS]} for kind in types]
    resources.append({"type": "Flag", "conditionalUpdate": True, "searchParam": [{"name": "identifier"}]})
    return {"resourceType": "CapabilityStatement",
            "rest": [{"mode": "server", "interaction": [{"code": code} for code in system], "resource": resources}]}


def bundle(*resources) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


class Server:
    """ANC search answered from `counts`; context searches from `context` (by type); writes accepted."""

    def __init__(self, mock: responses.RequestsMock, statement: dict):
        self.counts: list[dict] = []
        self.context: dict[str, list[dict]] = {}
        self.medications: dict[str, dict] = {}
        self.down: dict[str, int] = {}  # context searches of this type answer 503 this many more times
        self.posted: list[dict] = []
        self.batches: list[list[str]] = []  # the GET urls of each batch of searches posted
        self.batch_answers = "in order"  # or "refused" (400), "down" (503 every time), "one short", "reversed"
        self.next_pages: dict[str, list[dict]] = {}  # a context search of this type has a second page of these
        self.next_page_fails = False  # … which answers 400
        mock.get(f"{BASE}/metadata", json=statement)
        mock.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"), json=EMPTY)
        mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/Medication/[^/?]+"),
                          callback=self._medication)
        for kind in CONTEXT_TYPES:
            mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/{kind}\b(\?.*)?$"),
                              callback=self._search)
        mock.add_callback(responses.POST, BASE, callback=self._transaction)
        self.mock = mock

    def requests(self, kind: str) -> list[dict[str, list[str]]]:
        """Query parameters of every context search of this type (the ANC search and the deleted-evidence
        check, an `_id` search, left out)."""
        found = []
        for call in self.mock.calls:
            url = urlparse(call.request.url)
            query = parse_qs(url.query)
            if url.path.endswith(f"/{kind}") and ANC_CODE not in query.get("code", [""])[0] and "_id" not in query:
                found.append(query)
        return found

    def _search(self, request) -> tuple[int, dict, str]:
        url = urlparse(request.url)
        kind = url.path.rsplit("/", 1)[1]
        query = parse_qs(url.query)
        if kind == "Observation" and ANC_CODE in query.get("code", [""])[0]:
            return 200, {}, json.dumps(bundle(*self.counts))
        if kind == "Observation" and "_id" in query:  # the deleted-evidence check: every count still exists
            ids = set(query["_id"][0].split(","))
            return 200, {}, json.dumps(bundle(*[r for r in self.counts if r.get("id") in ids]))
        if self.down.get(kind):
            self.down[kind] -= 1
            return 503, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "transient"}]})
        if "page" in query:  # a second page of this type's search
            if self.next_page_fails:
                return 400, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "invalid"}]})
            return 200, {}, json.dumps(bundle(*self.next_pages.pop(kind, [])))
        subjects = set(query.get("subject", [""])[0].split(","))
        since = query.get("_lastUpdated", ["ge"])[0][2:]  # like a server: only what changed since then
        answer = bundle(*[r for r in self.context.get(kind, []) if r["subject"]["reference"] in subjects
                          and r.get("meta", {}).get("lastUpdated", "9999") >= since])
        if self.next_pages.get(kind):
            answer["link"] = [{"relation": "next", "url": f"{BASE}/{kind}?page=2"}]
        return 200, {}, json.dumps(answer)

    def _medication(self, request) -> tuple[int, dict, str]:
        medication_id = urlparse(request.url).path.rsplit("/", 1)[1]
        if medication_id not in self.medications:
            return 404, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "not-found"}]})
        return 200, {}, json.dumps(self.medications[medication_id])

    def _transaction(self, request) -> tuple[int, dict, str]:
        sent = json.loads(request.body)
        if sent["type"] == "batch" and all(e["request"]["method"] == "GET" for e in sent["entry"]):
            return self._searches(sent)
        self.posted.append(sent)
        entries = [{"response": {"status": "201 Created", "location": f"X/x{i}/_history/1"}}
                   for i, _ in enumerate(sent["entry"])]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

    def _searches(self, sent: dict) -> tuple[int, dict, str]:
        """A batch of searches: each entry answered as the same GET would be."""
        urls = [e["request"]["url"] for e in sent["entry"]]
        self.batches.append(urls)
        if self.batch_answers == "refused":
            return 400, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "not-supported"}]})
        if self.batch_answers == "down":
            return 503, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "transient"}]})
        entries = []
        for url in urls:
            status, _, body = self._search(SimpleNamespace(url=f"{BASE}/{url}"))
            entries.append({"resource": json.loads(body), "response": {"status": f"{status} OK"}} if status == 200
                           else {"response": {"status": str(status), "outcome": json.loads(body)}})
        if self.batch_answers == "one short":
            entries = entries[:-1]
        elif self.batch_answers == "reversed":
            entries = entries[::-1]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    def batched(self, kind: str) -> list[dict[str, list[str]]]:
        """Query parameters of every context search of this type sent inside a batch."""
        return [parse_qs(urlparse(url).query) for urls in self.batches for url in urls
                if urlparse(url).path == kind]

    def flags(self) -> dict[str, dict]:
        return {e["resource"]["subject"]["reference"]: e["resource"] for b in self.posted for e in b["entry"]
                if e["resource"]["resourceType"] == "Flag"}


def run(tmp_path, *extra: str) -> int:
    return main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3"), *extra])


@pytest.fixture
def server():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield Server(mock, capability())


def test_context_is_read_in_batches_of_subjects_never_one_request_per_patient(server, tmp_path):
    # (Issue 13 raised the batch from 50 to context_source.BATCH = 200 patients; this test asserted 60 = 50 + 10.)
    n = context_source.BATCH + 10
    server.counts = [anc(f"o{i}", f"p{i:03d}", 0.3) for i in range(n)] + [patient(f"p{i:03d}") for i in range(n)]
    assert run(tmp_path) == 0
    for kind in ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure"):
        searches = server.requests(kind)
        assert len(searches) == 2, kind  # BATCH + 10 patients: BATCH, then 10
        subjects = [s["subject"][0].split(",") for s in searches]
        assert [len(s) for s in subjects] == [context_source.BATCH, 10]
        assert sorted(p for s in subjects for p in s) == [f"Patient/p{i:03d}" for i in range(n)]
    assert server.requests("Condition") == []  # no Duffy-null codes configured: nothing to ask
    temperatures = server.requests("Observation")[0]
    assert set(temperatures["code"][0].split(",")) == {"http://loinc.org|8310-5", "http://loinc.org|8331-1"}
    assert temperatures["date"] == ["ge2026-11-19T08:00:00Z"]  # 24 h before the earliest count graded
    assert server.requests("MedicationAdministration")[0]["effective-time"] == ["ge2026-10-09T08:00:00Z"]
    assert server.requests("MedicationAdministration")[0]["_include"] == ["MedicationAdministration:medication"]

    # The next run polls the live patients for what changed, again in two batches per type.
    calls = len(server.mock.calls)
    assert run(tmp_path) == 0
    polled = [q for q in server.requests("Observation")[2:]]
    assert len(polled) == 2 and all("_lastUpdated" in q and "date" not in q for q in polled)
    assert len(server.mock.calls) - calls < 20


def test_the_poll_asks_only_for_patients_with_an_active_flag(server, tmp_path):
    server.counts = [anc("o-sick", "sick", 0.3), anc("o-well", "well", 3.0), patient("sick"), patient("well")]
    assert run(tmp_path) == 0
    before = len(server.requests("Observation"))
    assert run(tmp_path) == 0
    polls = server.requests("Observation")[before:]
    assert polls and all(q["subject"] == ["Patient/sick"] for q in polls)


def test_a_search_the_server_does_not_declare_is_not_sent(tmp_path):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = Server(mock, capability(types=("Observation", "Procedure")))
        server.counts = [anc("o1", "p", 0.3), patient("p")]
        assert run(tmp_path) == 0
        assert server.requests("MedicationAdministration") == [] and server.requests("MedicationRequest") == []
        assert len(server.requests("Procedure")) == 1 and len(server.requests("Observation")) == 1
        assert server.flags()["Patient/p"]["status"] == "active"


def test_a_medication_the_server_did_not_include_is_read_once(server, tmp_path):
    server.counts = [anc("o1", "p", 0.3), anc("o2", "q", 0.3), patient("p"), patient("q")]
    server.medications["m1"] = {"resourceType": "Medication", "id": "m1", "code": {"coding": [
        {"system": "http://www.whocc.no/atc", "code": "L01XA02", "display": "carboplatin"}]}}
    server.context["MedicationAdministration"] = [
        {"resourceType": "MedicationAdministration", "id": f"ma-{pid}", "status": "completed",
         "medicationReference": {"reference": "Medication/m1"}, "subject": {"reference": f"Patient/{pid}"},
         "effectiveDateTime": "2026-11-17T09:00:00Z"} for pid in ("p", "q")]
    assert run(tmp_path) == 0
    reads = [c for c in server.mock.calls if "/Medication/" in c.request.url]
    assert len(reads) == 1
    for pid in ("p", "q"):
        flag = server.flags()[f"Patient/{pid}"]
        assert "after chemotherapy: carboplatin on 2026-11-17 (2 days before this count)" in flag["code"]["text"]
        details = [e["valueReference"]["reference"] for e in flag["extension"] if "valueReference" in e]
        assert details == [f"Observation/o{1 if pid == 'p' else 2}", f"MedicationAdministration/ma-{pid}"]


def test_a_failed_context_search_still_writes_the_alert(server, tmp_path):
    server.mock.replace(responses.GET, re.compile(rf"{re.escape(BASE)}/Procedure\b(\?.*)?$"), status=400,
                        json={"resourceType": "OperationOutcome", "issue": [{"code": "not-supported"}]})
    server.counts = [anc("o1", "p", 0.3), patient("p")]
    assert run(tmp_path) == 0
    assert [c.response.status_code for c in server.mock.calls if "/Procedure" in c.request.url] == [400]
    flag = server.flags()["Patient/p"]
    assert flag["status"] == "active" and flag["code"]["text"].startswith("Severe neutropenia: ANC 300")


@pytest.mark.parametrize("status", [403, 503])
def test_a_context_search_refused_or_down_still_writes_the_alert(server, tmp_path, status):
    # A token without Procedure read (403), or a Procedure search that keeps failing (503 after retries):
    # context is secondary; the severe count's Flag must still go out, as for a 400.
    server.mock.replace(responses.GET, re.compile(rf"{re.escape(BASE)}/Procedure\b(\?.*)?$"), status=status,
                        json={"resourceType": "OperationOutcome", "issue": [{"code": "forbidden"}]})
    server.counts = [anc("o1", "p", 0.3), patient("p")]
    assert run(tmp_path) == 0
    flag = server.flags()["Patient/p"]
    assert flag["status"] == "active" and flag["code"]["text"].startswith("Severe neutropenia: ANC 300")


def test_a_context_read_that_failed_is_read_again_until_it_succeeds(server, tmp_path):
    """The temperature search is down when the count is graded; the fever was recorded before the count,
    so the next run's incremental poll (what changed since its watermark) would never bring it back: the
    patient's read around the count is kept pending and done again, and the Flag becomes febrile."""
    fever = {"resourceType": "Observation", "id": "t1", "status": "final",
             "meta": {"lastUpdated": "2026-01-01T00:00:00Z"},  # long before any poll's watermark
             "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
             "subject": {"reference": "Patient/p"}, "effectiveDateTime": "2026-11-20T06:00:00Z",
             "valueQuantity": {"value": 38.6, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}
    server.context["Observation"] = [fever]
    server.counts = [anc("o1", "p", 0.3), patient("p")]
    server.down["Observation"] = 100  # every try of this run, retries included
    config = tmp_path / "adapter.toml"
    config.write_text("[fhir]\nretries = 1\nretry_budget_s = 1\n")
    assert run(tmp_path, "--config", str(config)) == 0
    assert not server.flags()["Patient/p"]["code"]["text"].startswith("Febrile")
    server.down["Observation"] = 0
    assert run(tmp_path, "--config", str(config)) == 0
    flag = server.flags()["Patient/p"]
    assert flag["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C"), flag["code"]["text"]
    reads = len(server.requests("Observation"))
    assert run(tmp_path, "--config", str(config)) == 0  # the read succeeded: it is no longer pending
    assert [q for q in server.requests("Observation")[reads:] if "_lastUpdated" not in q] == []


def test_context_is_read_only_for_patients_whose_writes_it_can_change(server, tmp_path):
    """A patient with only normal counts and nothing of ours written gets no write, so its context is not
    read; a normal count that closes a live Flag, and every abnormal count, still are."""
    server.counts = [anc("o-sick", "sick", 0.3), anc("o-well", "well", 3.0), patient("sick"), patient("well")]
    assert run(tmp_path) == 0
    asked = {s for q in server.requests("Observation") if "_lastUpdated" not in q
             for s in q["subject"][0].split(",")}
    assert asked == {"Patient/sick"}
    before = len(server.requests("Observation"))
    server.counts = [anc("o-sick-2", "sick", 3.0, effective="2026-11-21T08:00:00Z"), patient("sick")]
    assert run(tmp_path) == 0
    around = [q for q in server.requests("Observation")[before:] if "_lastUpdated" not in q]
    assert [q["subject"] for q in around] == [["Patient/sick"]]  # its Flag closes: its context still counts
    assert server.flags()["Patient/sick"]["status"] == "inactive"


def test_a_batch_of_subjects_stays_within_the_url_budget_however_long_the_ids():
    long_ids = [f"{i:03d}" + "x" * 61 for i in range(120)]  # 64 characters, the longest FHIR id
    batches = list(context_source._batches(long_ids))
    assert [p for b in batches for p in b] == long_ids  # every patient once, in order
    assert all(len(",".join(f"Patient/{p}" for p in b)) <= context_source.SUBJECT_CHARS for b in batches)
    assert len(batches) == 3  # 48 a request at 73 characters each
    assert [len(b) for b in context_source._batches([f"p{i}" for i in range(450)])] == [200, 200, 50]


FEVER = {"resourceType": "Observation", "id": "t1", "status": "final", "meta": {"lastUpdated": "2026-11-20T07:00:00Z"},
         "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
         "subject": {"reference": "Patient/p000"}, "effectiveDateTime": "2026-11-20T06:00:00Z",
         "valueQuantity": {"value": 38.6, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}

NORMAL_TEMPERATURE = {**FEVER, "id": "t0", "valueQuantity": {**FEVER["valueQuantity"], "value": 37.0},
                      "effectiveDateTime": "2026-11-20T05:00:00Z"}


@pytest.fixture
def batching():
    """A server that declares batches: the context searches of a group of patients go in one."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield Server(mock, capability(system=("transaction", "batch")))


def test_a_server_with_batches_gets_each_groups_context_searches_in_one_request(batching, tmp_path):
    n = context_source.BATCH + 10
    batching.counts = [anc(f"o{i}", f"p{i:03d}", 0.3) for i in range(n)] + [patient(f"p{i:03d}") for i in range(n)]
    batching.context["Observation"] = [FEVER]
    assert run(tmp_path) == 0
    assert len(batching.batches) == 2  # BATCH + 10 patients: two groups, one request each
    for kind in ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure"):
        assert batching.requests(kind) == [], kind  # no search of its own
        searches = batching.batched(kind)
        # The same searches as one by one (test_context_is_read_in_batches_of_subjects_never_one_request_per_patient)
        assert [len(s["subject"][0].split(",")) for s in searches] == [context_source.BATCH, 10], kind
        assert searches[0]["_count"] == ["1000"]
    temperatures = batching.batched("Observation")[0]
    assert set(temperatures["code"][0].split(",")) == {"http://loinc.org|8310-5", "http://loinc.org|8331-1"}
    assert temperatures["date"] == ["ge2026-11-19T08:00:00Z"]
    assert batching.batched("MedicationAdministration")[0]["_include"] == ["MedicationAdministration:medication"]
    # What a batch answered is used as a search's answer is: the fever makes the Flag febrile.
    assert batching.flags()["Patient/p000"]["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C")


def test_a_search_whose_batch_entry_failed_is_sent_on_its_own(batching, tmp_path):
    batching.counts = [anc("o1", "p000", 0.3), patient("p000")]
    batching.context["Observation"] = [FEVER]
    batching.down["Observation"] = 1  # its entry in the batch answers 503; the GET after it succeeds
    assert run(tmp_path) == 0
    assert len(batching.batches) == 1 and len(batching.batched("Observation")) == 1
    [alone] = batching.requests("Observation")
    assert alone == batching.batched("Observation")[0]  # the same search, on its own
    assert batching.requests("Procedure") == []  # the others were answered in the batch
    assert batching.flags()["Patient/p000"]["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C")


def test_a_batch_answer_with_a_next_page_is_paged_as_a_search(batching, tmp_path):
    batching.counts = [anc("o1", "p000", 0.3), patient("p000")]
    batching.context["Observation"] = [NORMAL_TEMPERATURE]
    batching.next_pages["Observation"] = [FEVER]  # the fever is on the second page only
    assert run(tmp_path) == 0
    assert len(batching.batches) == 1
    pages = [c.request.url for c in batching.mock.calls if "page=2" in c.request.url]
    assert pages == [f"{BASE}/Observation?page=2"]
    assert batching.flags()["Patient/p000"]["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C")


@pytest.mark.parametrize("answers", ["refused", "down", "one short", "reversed"])
def test_a_batch_that_fails_or_cannot_be_placed_gets_the_searches_one_by_one_for_the_rest_of_the_run(
        batching, tmp_path, answers):
    """Refused, down after its retries (each group would wait them out again), an answer missing, or answers
    that are not their searches' (out of order, which FHIR forbids): the searches are sent alone, as without
    batches, and the fever still reaches the Flag."""
    n = context_source.BATCH + 10
    batching.counts = [anc(f"o{i}", f"p{i:03d}", 0.3) for i in range(n)] + [patient(f"p{i:03d}") for i in range(n)]
    batching.context["Observation"] = [FEVER]
    batching.context["Procedure"] = [{"resourceType": "Procedure", "id": "pr1", "status": "completed",
                                      "subject": {"reference": "Patient/p001"}, "performedDateTime": "2026-11-18T09:00:00Z",
                                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "367336001"}]}}]
    batching.batch_answers = answers
    config = tmp_path / "adapter.toml"
    config.write_text("[fhir]\nretries = 1\nretry_budget_s = 1\n")
    assert run(tmp_path, "--config", str(config)) == 0
    assert len({tuple(urls) for urls in batching.batches}) == 1  # the first group's batch only (and its retries)
    assert len(batching.batches) == (2 if answers == "down" else 1)  # retried once ([fhir] retries = 1)
    for kind in ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure"):
        assert len(batching.requests(kind)) == 2, kind  # both groups' searches, one by one
    assert batching.flags()["Patient/p000"]["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C")


def test_a_batch_answer_whose_next_page_fails_leaves_the_read_to_be_done_again(batching, tmp_path):
    batching.counts = [anc("o1", "p000", 0.3), patient("p000")]
    batching.context["Observation"] = [NORMAL_TEMPERATURE]
    batching.next_pages["Observation"] = [FEVER]
    batching.next_page_fails = True
    assert run(tmp_path) == 0
    assert not batching.flags()["Patient/p000"]["code"]["text"].startswith("Febrile")
    assert State.open(tmp_path / "s.sqlite3").context_pending()  # the read around the count is done again
