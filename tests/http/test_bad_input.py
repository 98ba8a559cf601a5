"""Bad input from the server (tests/data/bad/), served by `responses` to a whole run of the CLI: the run never
ends as an internal error (exit 1). Either it stops with a clear error (exit 3), or the bad record is skipped
or quarantined with a reason while the good records around it are still written."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import responses

from adapter.cli import main

BASE = "https://fhir.example.org/r4"
ELSEWHERE = "https://evil.example.org/r4"
DATA = Path(__file__).parents[1] / "data"
BAD = DATA / "bad"
FHIR_JSON = "application/fhir+json"
CONFIG = """\
[fhir]
retries = 1
retry_budget_s = 5
timeout_s = 5
page_size = 10

[output]
resources = ["Flag", "RiskAssessment"]
"""
GOOD_FLAGS = {"p-mild": "mild", "p-severe": "severe"}  # o-good-normal (p-normal) gets none
GOOD_ASSESSMENTS = {"o-good-mild", "o-good-severe"}


class FakeServer:
    """The mocked FHIR server: /metadata, Patient reads, transactions answered as accepted, search pages."""

    def __init__(self, mock: responses.RequestsMock, metadata: Path = DATA / "capability-minimal.json"):
        self.mock = mock
        self.transactions: list[dict[str, Any]] = []
        mock.get(f"{BASE}/metadata", body=metadata.read_text(), content_type=FHIR_JSON)
        mock.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"), content_type=FHIR_JSON,  # no Flags of ours yet
                 json={"resourceType": "Bundle", "type": "searchset", "entry": []})
        mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/Patient/[^/?]+"),
                          callback=self._patient, content_type=FHIR_JSON)
        mock.add_callback(responses.POST, BASE, callback=self._transaction, content_type=FHIR_JSON)

    def serve(self, first: str, status: int = 200, content_type: str = FHIR_JSON, **more: str) -> None:
        """`first` answers the search; `more` maps a path under BASE (a next link) to its page."""
        self.mock.get(f"{BASE}/Observation", body=(BAD / first).read_text(), status=status,
                      content_type=content_type)
        for path, name in more.items():
            self.mock.get(f"{BASE}/{path}", body=(BAD / name).read_text(), content_type=FHIR_JSON)

    def calls_to(self, prefix: str) -> int:
        return sum(1 for call in self.mock.calls if call.request.url.startswith(prefix))

    def written(self, resource_type: str) -> list[dict[str, Any]]:
        return [e["resource"] for bundle in self.transactions for e in bundle["entry"]
                if e["resource"]["resourceType"] == resource_type]

    def flag_grades(self) -> dict[str, str]:
        return {f["subject"]["reference"].removeprefix("Patient/"): _grade(f) for f in self.written("Flag")
                if f["status"] == "active"}

    def assessed(self) -> set[str]:
        # identifier value = "<patient>/<observation>": keep the Observation id
        return {r["identifier"][0]["value"].split("/", 1)[1] for r in self.written("RiskAssessment")}

    def _patient(self, request: Any) -> tuple[int, dict, str]:
        patient_id = request.url.rsplit("/", 1)[1]
        return 200, {}, json.dumps({"resourceType": "Patient", "id": patient_id, "birthDate": "1970-01-01"})

    def _transaction(self, request: Any) -> tuple[int, dict, str]:
        bundle = json.loads(request.body)
        self.transactions.append(bundle)
        entries = [
            {"response": {"status": "201 Created",
                          "location": f"{e['resource']['resourceType']}/srv-{len(self.transactions)}-{n}/_history/1"}}
            for n, e in enumerate(bundle["entry"])
        ]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})


def _grade(resource: dict[str, Any]) -> str:
    return next(c["code"] for c in resource["code"]["coding"] if c["system"].endswith("/neutropenia-grade"))


@pytest.fixture
def server():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeServer(mock)


@pytest.fixture
def adapter(tmp_path, capsys):
    """Run the CLI in-process against BASE; `status()` is the `status --json` report."""

    class Adapter:
        config = tmp_path / "adapter.toml"
        state = tmp_path / "state.sqlite3"

        def run(self) -> int:
            return main(["run", "--config", str(self.config), "--fhir-url", BASE, "--state", str(self.state),
                         "--log-format", "json"])

        def status(self) -> dict[str, Any]:
            capsys.readouterr()
            assert main(["status", "--json", "--config", str(self.config), "--state", str(self.state)]) == 0
            return json.loads(capsys.readouterr().out)

        def quarantine(self) -> dict[str, str]:
            return {q["observation_id"]: q["reason"] for q in self.status()["quarantine"]}

        def last_run(self) -> dict[str, Any]:
            return self.status()["last_runs"][0]

    Adapter.config.write_text(CONFIG)
    return Adapter()


# -- the whole answer is unusable: a clear error, nothing written ---------------------------------

@pytest.mark.parametrize("name, status, content_type", [
    ("malformed-json.json", 200, FHIR_JSON),
    ("empty-body.json", 200, FHIR_JSON),
    ("json-array.json", 200, FHIR_JSON),
    ("html-502.html", 502, "text/html"),
    ("html-502.html", 200, "text/html"),  # a gateway that says 200 over its error page
    ("operation-outcome.json", 200, FHIR_JSON),
    ("operation-outcome.json", 400, FHIR_JSON),
    ("operation-outcome.json", 500, FHIR_JSON),
])
def test_an_unusable_search_answer_ends_the_run_with_exit_3(server, adapter, name, status, content_type):
    server.serve(name, status=status, content_type=content_type)
    assert adapter.run() == 3
    assert 1 <= server.calls_to(f"{BASE}/Observation") <= 2  # the first try and one retry at most
    assert server.transactions == []
    report = adapter.status()
    assert report["watermark"] is None
    assert report["last_runs"][0]["exit_code"] == 3


# -- one bad record among good ones: quarantined with a reason, the good ones written -------------

@pytest.mark.parametrize("name, quarantined", [
    ("no-subject.json", {
        "o-no-subject": "no-subject", "o-group-subject": "no-subject", "o-string-subject": "no-subject",
        "o-display-only-subject": "no-subject",
    }),
    ("bad-effective-time.json", {
        "o-eff-word": "no-effective-time", "o-eff-month-13": "no-effective-time",
        "o-eff-month-only": "no-effective-time", "o-eff-number": "no-effective-time",
        "o-eff-offset-25h": "no-effective-time", "o-eff-missing": "no-effective-time",
    }),
    ("string-value.json", {
        "o-value-string": "implausible-value", "o-value-word": "implausible-value",
        "o-value-bool": "implausible-value", "o-value-null": "no-value",  # null: no value at all
        "o-value-list": "implausible-value", "o-value-negative": "implausible-value",
    }),
    ("huge-numbers.json", {"o-value-1e400": "implausible-value", "o-value-10e400": "implausible-value"}),
])
def test_a_bad_record_is_quarantined_and_the_good_ones_around_it_are_written(server, adapter, name, quarantined):
    server.serve(name)
    assert adapter.run() == 0
    assert adapter.quarantine() == quarantined
    assert server.flag_grades() == GOOD_FLAGS
    assert server.assessed() == GOOD_ASSESSMENTS
    assert adapter.last_run()["summary"]["quarantined"] == len(quarantined)


@pytest.mark.parametrize("name, malformed", [
    ("wrong-resource-type.json", 1),  # a Condition among the Observations
    ("broken-entries.json", 6),  # null, a string, {}, a string resource, an Observation without / with a bad id
])
def test_entries_that_are_not_usable_observations_are_counted_and_skipped(server, adapter, name, malformed):
    server.serve(name)
    assert adapter.run() == 0
    assert adapter.quarantine() == {}
    assert server.flag_grades() == GOOD_FLAGS
    assert server.assessed() == GOOD_ASSESSMENTS
    assert adapter.last_run()["summary"]["malformed"] == malformed


def test_a_bundle_whose_entry_is_not_a_list_is_a_clear_error_not_a_silent_skip(server, adapter):
    # Exit 0 would claim every Observation was written or quarantined; the one inside was neither.
    server.serve("entry-not-a-list.json")
    assert adapter.run() == 3
    assert server.transactions == []
    assert adapter.status()["watermark"] is None


def test_an_unknown_modifier_extension_is_quarantined_not_classified(server, adapter):
    server.serve("modifier-extension.json")
    assert adapter.run() == 0
    assert adapter.quarantine() == {"o-modified": "unknown-modifier"}
    assert server.flag_grades() == GOOD_FLAGS


def test_an_unrelated_odd_element_does_not_stop_classification(server, adapter):
    """Unknown extensions, an element no FHIR version defines, contained resources: we read only our fields."""
    server.serve("odd-elements.json")
    assert adapter.run() == 0
    assert adapter.quarantine() == {}
    assert server.flag_grades() == {**GOOD_FLAGS, "p-odd": "moderate"}
    assert server.assessed() == GOOD_ASSESSMENTS | {"o-odd"}


# -- paging ---------------------------------------------------------------------------------------

def test_a_next_link_to_another_host_is_refused(server, adapter):
    server.serve("next-other-host-1.json")
    server.mock.get(f"{ELSEWHERE}/Observation", body=(BAD / "next-other-host-2.json").read_text(),
                    content_type=FHIR_JSON)
    assert adapter.run() == 3
    assert server.calls_to("https://evil.example.org") == 0
    assert "p-elsewhere" not in server.flag_grades()
    assert adapter.status()["watermark"] is None


def test_a_next_link_loop_ends_paging_and_every_page_is_read_once(server, adapter):
    server.serve("next-loop-1.json", **{"_page/2": "next-loop-2.json", "_page/3": "next-loop-3.json"})
    assert adapter.run() == 0
    assert server.calls_to(f"{BASE}/_page/2") == 1
    assert server.calls_to(f"{BASE}/_page/3") == 1
    assert server.flag_grades() == {**GOOD_FLAGS, "p-moderate": "moderate"}
    assert server.assessed() == GOOD_ASSESSMENTS | {"o-loop-moderate"}


def test_duplicate_entries_across_pages_are_written_once(server, adapter):
    server.serve("duplicates-1.json", **{"_page/2": "duplicates-2.json"})
    assert adapter.run() == 0
    flags = [f["identifier"][0]["value"] for f in server.written("Flag")]
    assessments = [r["identifier"][0]["value"].split("/", 1)[1] for r in server.written("RiskAssessment")]
    assert sorted(flags) == sorted(set(flags)) and len(flags) == 3
    assert sorted(assessments) == sorted(GOOD_ASSESSMENTS | {"o-dup-moderate"})
    assert server.flag_grades() == {**GOOD_FLAGS, "p-moderate": "moderate"}


# -- odd values in the server's own fields --------------------------------------------------------

def test_a_malformed_capability_statement_does_not_crash_the_run(adapter):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock, metadata=BAD / "metadata-malformed-rest.json")
        server.serve("wrong-resource-type.json")
        assert adapter.run() in (0, 3)


def test_a_last_updated_beyond_year_9999_does_not_crash_the_run(server, adapter):
    """9999-12-31T23:59:59-14:00 is a valid FHIR instant, but 10000-01-01 in UTC."""
    server.serve("last-updated-beyond-year-9999.json")
    assert adapter.run() in (0, 3)
    assert set(GOOD_FLAGS.items()) <= set(server.flag_grades().items())


def test_a_last_updated_in_the_future_does_not_move_the_watermark_past_now(server, adapter):
    """A server clock gone wrong on one record must not make every later Observation invisible."""
    server.serve("last-updated-in-the-future.json")
    assert adapter.run() == 0
    assert server.flag_grades() == {**GOOD_FLAGS, "p-future": "severe"}
    watermark = adapter.status()["watermark"]
    assert watermark is None or datetime.fromisoformat(watermark) <= datetime.now(timezone.utc), watermark
