"""Pipeline HTTP behaviour with mocks: patients read once when not _included, one transaction per page."""

from __future__ import annotations

import json
import re

import pytest
import responses
from responses import matchers

from adapter.cli import main
from builders import anc, patient

BASE = "https://fhir.example.org/r4"
CAPABILITY = {
    "resourceType": "CapabilityStatement",
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
        {"type": "Flag", "conditionalUpdate": True, "searchParam": [{"name": "identifier"}]},
    ]}],
}


FLAG_SEARCH = re.compile(rf"{re.escape(BASE)}/Flag\b.*")
EMPTY_SEARCH = {"resourceType": "Bundle", "type": "searchset", "entry": []}


def page(*resources, next_url=None, included=()):
    links = [{"relation": "next", "url": next_url}] if next_url else []
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    entries += [{"resource": r, "search": {"mode": "include"}} for r in included]
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


# The deletion check of a run with something live (an active Flag): every Observation asked for by `_id`
# still exists. Register it before the general Observation search, which would answer it otherwise.
ID_SEARCH = [matchers.query_param_matcher({"_elements": "id"}, strict_match=False)]


def ids_exist(request):
    return 200, {}, json.dumps(page(*({"resourceType": "Observation", "id": i}
                                      for i in request.params["_id"].split(","))))


def transaction_echo(request):
    bundle = json.loads(request.body)
    entries = [{"response": {"status": "201 Created", "location": f"Flag/f{i}/_history/1"}}
               for i, _ in enumerate(bundle["entry"])]
    return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})


@pytest.fixture
def server():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=ids_exist, match=ID_SEARCH)
        mock.add_callback(responses.POST, BASE, callback=transaction_echo)
        yield mock


def posted(mock) -> list[dict]:
    return [json.loads(c.request.body) for c in mock.calls if c.request.method == "POST"]


def test_patients_not_included_are_read_once_each_per_run(server, tmp_path):
    server.get(f"{BASE}/Observation", json=page(
        anc("o1", "a", 0.4), anc("o2", "b", 0.9), anc("o3", "a", 0.3, effective="2026-11-21T08:00:00Z"),
        next_url=f"{BASE}/Observation?page=2"))
    server.get(f"{BASE}/Observation?page=2", json=page(anc("o4", "b", 0.8, effective="2026-11-22T08:00:00Z")))
    server.get(f"{BASE}/Patient/a", json=patient("a", "2026-06-01"))  # an infant
    server.get(f"{BASE}/Patient/b", json=patient("b", "1970-01-01"))
    assert main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
    reads = [c.request.url for c in server.calls if "/Patient/" in c.request.url]
    assert sorted(reads) == [f"{BASE}/Patient/a", f"{BASE}/Patient/b"]
    # Page 2 has another count of b: the two pages are one batch, and each Flag is written once (issue 13;
    # this asserted one transaction per page before).
    assert len(posted(server)) == 1
    first_page_flags = {e["resource"]["subject"]["reference"]: e for e in posted(server)[0]["entry"]}
    assert set(first_page_flags) == {"Patient/a", "Patient/b"}
    assert all(e["request"]["method"] == "PUT" and "Flag?identifier=" in e["request"]["url"]
               for e in posted(server)[0]["entry"])


def test_pages_with_no_patient_in_common_are_written_page_by_page(server, tmp_path):
    server.get(f"{BASE}/Observation", json=page(anc("o1", "a", 0.4), anc("o2", "b", 0.9),
                                                included=[patient("a"), patient("b")],
                                                next_url=f"{BASE}/Observation?page=2"))
    server.get(f"{BASE}/Observation?page=2", json=page(anc("o3", "c", 0.3), included=[patient("c")]))
    assert main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
    # No alert waits for a page it does not depend on: one transaction per page.
    assert [sorted(e["resource"]["subject"]["reference"] for e in bundle["entry"]) for bundle in posted(server)] \
        == [["Patient/a", "Patient/b"], ["Patient/c"]]


def test_included_patients_are_not_read_again(server, tmp_path):
    server.get(f"{BASE}/Observation", json=page(anc("o1", "a", 0.4), included=[patient("a", "1970-01-01")]))
    assert main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
    assert not [c for c in server.calls if "/Patient/" in c.request.url]


def test_search_asks_for_every_anc_code_since_watermark_minus_overlap(server, tmp_path):
    server.get(f"{BASE}/Observation", json=page(anc("o1", "a", 0.4, meta={"lastUpdated": "2026-11-20T10:00:00Z",
                                                                          "versionId": "1"}),
                                                included=[patient("a")]))
    state = str(tmp_path / "s.sqlite3")
    assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
    assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
    searches = [c.request for c in server.calls if "/Observation" in c.request.url]
    query = searches[-1].params
    assert query["_lastUpdated"] == "ge2026-11-20T09:55:00Z"  # watermark 10:00 minus the 5-minute overlap
    assert set(query["code"].split(",")) == {"http://loinc.org|751-8", "http://loinc.org|753-4",
                                             "http://loinc.org|26499-4", "http://loinc.org|752-6"}
    assert query["_include"] == "Observation:subject"
    assert len(posted(server)) == 1  # the re-read of the same version wrote nothing


def test_a_patient_whose_writes_the_server_refuses_does_not_block_the_others(tmp_path, capsys):
    refuse_a = {"on": True}

    def answer(request):
        bundle = json.loads(request.body)
        if refuse_a["on"] and any(e["resource"]["subject"]["reference"] == "Patient/a" for e in bundle["entry"]):
            return 422, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [{"code": "invalid"}]})
        return transaction_echo(request)

    state = str(tmp_path / "s.sqlite3")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=ids_exist, match=ID_SEARCH)
        mock.get(f"{BASE}/Observation", json=page(anc("o1", "a", 0.4), anc("o2", "b", 0.3),
                                                  included=[patient("a"), patient("b")]))
        mock.add_callback(responses.POST, BASE, callback=answer)
        # Exit 3: the refused patient is neither written nor quarantined; the others were written.
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 3
        accepted = [e for b in posted(mock) for e in b["entry"]]
        assert any(e["resource"]["subject"]["reference"] == "Patient/b" for e in accepted)
        capsys.readouterr()
        assert main(["status", "--json", "--state", state]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [f["patient_id"] for f in report["write_failures"]] == ["a"]
        assert "422" in report["write_failures"][0]["reason"]

        refuse_a["on"] = False  # the site fixed whatever the server objected to
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        last = posted(mock)[-1]
        assert [e["resource"]["subject"]["reference"] for e in last["entry"]] == ["Patient/a"]
        capsys.readouterr()
        assert main(["status", "--json", "--state", state]) == 0
        assert json.loads(capsys.readouterr().out)["write_failures"] == []


def test_batch_is_used_when_the_server_has_no_transactions_and_a_failed_entry_commits_nothing(tmp_path):
    batch_only = {**CAPABILITY, "rest": [{**CAPABILITY["rest"][0], "interaction": [{"code": "batch"}]}]}
    outcomes = iter(["201 Created", "400 Bad Request"])

    def batch_answer(request):
        bundle = json.loads(request.body)
        assert bundle["type"] == "batch"
        entries = [{"response": {"status": next(outcomes, "200 OK"), "location": f"Flag/f{i}/_history/1"}}
                   for i, _ in enumerate(bundle["entry"])]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    state = str(tmp_path / "s.sqlite3")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=batch_only)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.get(f"{BASE}/Observation", json=page(anc("o1", "a", 0.4), anc("o2", "b", 0.3),
                                                  included=[patient("a"), patient("b")]))
        mock.add_callback(responses.POST, BASE, callback=batch_answer)
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        bodies = [json.loads(c.request.body) for c in mock.calls if c.request.method == "POST"]
        # The batch with a refused entry is not trusted as a whole: each patient is sent again alone
        # (the entry that did succeed is repeated harmlessly: it is a PUT to the same identity).
        assert [len(b["entry"]) for b in bodies] == [2, 1, 1]


def test_an_older_version_served_after_a_newer_one_is_ignored(server, tmp_path):
    v2 = anc("o1", "a", 3.0, status="corrected", meta={"versionId": "2", "lastUpdated": "2026-11-20T10:00:00Z"})
    v1 = anc("o1", "a", 0.3, meta={"versionId": "1", "lastUpdated": "2026-11-20T09:00:00Z"})
    server.get(f"{BASE}/Observation", json=page(v2, included=[patient("a")]))
    server.get(f"{BASE}/Observation", json=page(v1, included=[patient("a")]))  # a lagging replica
    state = str(tmp_path / "s.sqlite3")
    assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
    assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
    assert posted(server) == []  # 3000 is normal; the stale 300 must not raise an alert


def test_the_write_mode_is_pinned_at_first_use(tmp_path):
    without_conditional = {**CAPABILITY, "rest": [{**CAPABILITY["rest"][0], "resource": []}]}
    state = str(tmp_path / "s.sqlite3")
    urls = []
    for statement, observation in ((CAPABILITY, anc("o1", "a", 0.4)), (without_conditional, anc("o2", "b", 0.4))):
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            mock.get(f"{BASE}/metadata", json=statement)
            mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
            mock.add_callback(responses.GET, f"{BASE}/Observation", callback=ids_exist, match=ID_SEARCH)
            mock.get(f"{BASE}/Observation", json=page(observation, included=[patient("a"), patient("b")]))
            mock.add_callback(responses.POST, BASE, callback=transaction_echo)
            assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
            urls += [e["request"]["url"] for b in posted(mock) for e in b["entry"]]
    assert all(url.startswith("Flag?identifier=") for url in urls), urls


def test_a_failed_run_still_logs_one_summary_line(tmp_path, capsys):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.get(f"{BASE}/Observation", status=400)
        assert main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3"), "--log-format", "json"]) == 3
    summaries = [json.loads(l) for l in capsys.readouterr().err.splitlines() if '"run-summary"' in l]
    assert len(summaries) == 1 and summaries[0]["exit_code"] == 3


def test_quarantine_retry_grades_only_the_named_ids_and_does_not_search(tmp_path):
    import shutil
    from pathlib import Path

    site = tmp_path / "mappings"
    shutil.copytree(Path(__file__).parents[2] / "mappings", site)
    config = tmp_path / "adapter.toml"
    config.write_text(f'[mappings]\npath = "{site}"\n')
    state = str(tmp_path / "s.sqlite3")
    args = ["--config", str(config), "--fhir-url", BASE, "--state", state]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.get(f"{BASE}/Observation", json=page(anc("q1", "a", 0.4, unit="Giga/L"), anc("q2", "b", 0.4, unit="Giga/L"),
                                                  included=[patient("a"), patient("b")]))
        mock.get(f"{BASE}/Patient/a", json=patient("a"))
        mock.add_callback(responses.POST, BASE, callback=transaction_echo)
        assert main(["run", *args]) == 0
        (site / "units.toml").write_text((site / "units.toml").read_text() + '"Giga/L" = 1000\n')
        searches = sum("/Observation" in c.request.url for c in mock.calls)
        assert main(["quarantine", "retry", "q1", *args]) == 0
        assert sum("/Observation" in c.request.url for c in mock.calls) == searches  # no new search
        written = [e["resource"]["subject"]["reference"] for b in posted(mock) for e in b["entry"]]
        assert written == ["Patient/a"]


def test_an_observation_twice_on_one_page_sees_its_first_version(server, tmp_path):
    # The page's graded counts reach state together at its end: the second copy of an id must still be
    # judged against the first (already processed; a unit we cannot read keeps the earlier grade).
    v1 = {"versionId": "1", "lastUpdated": "2026-11-20T09:00:00Z"}
    v2 = {"versionId": "2", "lastUpdated": "2026-11-20T09:30:00Z"}
    server.get(f"{BASE}/Observation", json=page(
        anc("o1", "a", 0.4, meta=v1), anc("o1", "a", 0.4, meta=v1),
        anc("o2", "b", 0.3, meta=v1), anc("o2", "b", 0.3, unit="Giga/L", meta=v2),
        included=[patient("a"), patient("b")]))
    state = str(tmp_path / "s.sqlite3")
    assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
    from pathlib import Path

    from adapter.state import State

    opened = State.open(Path(state))
    assert opened.counts_by_outcome() == {"classified": 2}
    assert opened.ledger("o2").version == "1"  # the graded version stays in effect
    assert [(q.observation_id, q.version) for q in opened.quarantined()] == [("o2", "2")]
    written = sorted(e["resource"]["subject"]["reference"] for b in posted(server) for e in b["entry"])
    assert written == ["Patient/a", "Patient/b"]


@pytest.mark.parametrize("repeated,moves", [(False, True), (True, False)])
def test_an_observation_read_twice_in_one_pass_keeps_the_watermark(tmp_path, repeated, moves):
    # Under offset paging an Observation updated while we page shows up again at the end, and everything
    # after its old place slid back one: an entry may have been skipped, so the window is read again.
    first = anc("o1", "a", 2.5, meta={"versionId": "1", "lastUpdated": "2026-11-20T09:00:00Z"})
    again = anc("o1", "a", 2.6, meta={"versionId": "2", "lastUpdated": "2026-11-20T10:00:30Z"})
    other = anc("o2", "b", 2.5, meta={"versionId": "1", "lastUpdated": "2026-11-20T10:00:30Z"})
    state = str(tmp_path / "s.sqlite3")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.get(f"{BASE}/Observation", json=page(first, next_url=f"{BASE}/Observation?page=2",
                                                  included=[patient("a")]))
        mock.get(f"{BASE}/Observation?page=2", json=page(again if repeated else other,
                                                         included=[patient("a"), patient("b")]))
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
    from pathlib import Path

    from adapter.state import State

    watermark = State.open(Path(state)).watermark()
    assert (watermark == "2026-11-20T10:00:30+00:00") if moves else watermark is None


def test_a_page_of_writes_is_split_into_bundles_between_patients(server, tmp_path):
    observations = [anc(f"o{i}", f"p{i}", 0.4) for i in range(5)]
    # p9 has two episodes (severe, normal, severe): its two Flags must travel in one bundle.
    observations += [anc("o9a", "p9", 0.3, effective="2026-11-18T08:00:00Z"),
                     anc("o9b", "p9", 2.5, effective="2026-11-19T08:00:00Z"),
                     anc("o9c", "p9", 0.3, effective="2026-11-20T08:00:00Z")]
    server.get(f"{BASE}/Observation", json=page(*observations, included=[patient(f"p{i}") for i in (0, 1, 2, 3, 4, 9)]))
    config = tmp_path / "adapter.toml"
    config.write_text("[fhir]\nmax_bundle_entries = 3\n")
    assert main(["run", "--config", str(config), "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
    bundles = [[e["resource"]["subject"]["reference"] for e in b["entry"]] for b in posted(server)]
    # p0-p2 | p3, p4 | p9's two Flags together (adding them to the second part would exceed 3)
    assert bundles == [["Patient/p0", "Patient/p1", "Patient/p2"], ["Patient/p3", "Patient/p4"],
                       ["Patient/p9", "Patient/p9"]]


def test_a_bundle_refused_as_such_is_not_retried_patient_by_patient(tmp_path):
    state = str(tmp_path / "s.sqlite3")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json=EMPTY_SEARCH)  # no Flags of ours yet
        mock.get(f"{BASE}/Observation", json=page(anc("o1", "a", 0.4), anc("o2", "b", 0.3),
                                                  included=[patient("a"), patient("b")]))
        mock.post(BASE, status=405)
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 3
        assert len([c for c in mock.calls if c.request.method == "POST"]) == 1
    from pathlib import Path

    from adapter.state import State

    assert State.open(Path(state)).processed_version("o1") is None  # nothing committed: read again next run
