"""run --bulk against a mocked Bulk Data server: kick-off, polling, manifest, streaming, cancel."""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import json
import os
import re
import signal
import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from adapter.cli import main
from adapter.errors import ExitCode, PermanentHttpError
from adapter.fhir.client import FhirClient, RetryPolicy
from adapter.sources import bulk
from builders import LOINC, anc, patient

BASE = "https://fhir.example.org/r4"
STATUS = f"{BASE}/bulk-status/job1"
CAPABILITY = {
    "resourceType": "CapabilityStatement",
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
        {"type": "Flag", "conditionalUpdate": True, "searchParam": [{"name": "identifier"}]},
    ]}],
}
EMPTY_SEARCH = {"resourceType": "Bundle", "type": "searchset", "entry": []}


def ndjson(*resources) -> str:
    return "".join(json.dumps(r) + "\n" for r in resources)


def manifest(*outputs, error=()) -> dict:
    return {"transactionTime": "2026-11-26T10:00:00Z", "request": f"{BASE}/$export", "requiresAccessToken": True,
            "output": [{"type": t, "url": u} for t, u in outputs], "error": list(error)}


def transaction_echo(request):
    entries = [{"response": {"status": "201 Created", "location": f"Flag/f{i}/_history/1"}}
               for i, _ in enumerate(json.loads(request.body)["entry"])]
    return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})


class Clock:
    """Injected time: sleeping advances it, so polling is tested without waiting."""

    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def client() -> FhirClient:
    return FhirClient(BASE, requests.Session(), retry=RetryPolicy(attempts=1))


@pytest.fixture
def server():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"), json=EMPTY_SEARCH)
        mock.add_callback(responses.POST, BASE, callback=transaction_echo)
        mock.delete(STATUS, status=202)
        yield mock


def kicked_off(mock) -> None:
    mock.get(f"{BASE}/$export", status=202, headers={"Content-Location": STATUS})


def deletes(mock) -> list[str]:
    return [c.request.url for c in mock.calls if c.request.method == "DELETE"]


def test_kick_off_asks_for_anc_observations_and_patients_since(server):
    kicked_off(server)
    codes = ((LOINC, "751-8"), (LOINC, "26499-4"))
    assert "_since" not in bulk.kickoff_params(codes, None)  # no --since: everything
    params = bulk.kickoff_params(codes, datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert bulk._kick_off(client(), params) == STATUS
    request = server.calls[-1].request
    assert request.headers["Prefer"] == "respond-async"
    assert request.headers["Accept"] == "application/fhir+json"
    query = parse_qs(urlsplit(request.url).query)
    assert query["_type"] == ["Observation,Patient"]
    assert query["_since"] == ["2024-01-01T00:00:00Z"]
    # One _typeFilter query whose own commas are encoded, so a server splitting the list keeps every code.
    (type_filter,) = query["_typeFilter"]
    assert "," not in type_filter
    resource_type, _, inner = type_filter.partition("?")
    assert resource_type == "Observation"
    assert parse_qs(inner)["code"] == [f"{LOINC}|751-8,{LOINC}|26499-4"]


def test_polling_honours_retry_after_and_logs_progress(server, caplog):
    kicked_off(server)
    server.get(STATUS, status=202, headers={"Retry-After": "7", "X-Progress": "collecting"})
    server.get(STATUS, status=202, headers={"Retry-After": "3", "X-Progress": "writing 50%"})
    server.get(STATUS, json=manifest(("Observation", f"{BASE}/files/o.ndjson")))
    clock = Clock()
    caplog.set_level("INFO")
    with bulk.export(client(), {}, budget_s=60, sleep=clock.sleep, clock=clock) as found:
        assert [o.url for o in found.outputs] == [f"{BASE}/files/o.ndjson"]
    assert clock.slept == [7.0, 3.0]
    progress = [r.progress for r in caplog.records if getattr(r, "event", "") == "bulk-progress"]
    assert progress == ["collecting", "writing 50%"]
    assert deletes(server) == [STATUS]  # done: the server may drop the files


def test_export_not_ready_within_the_budget_is_cancelled(server):
    kicked_off(server)
    server.get(STATUS, status=202, headers={"Retry-After": "20"})
    clock = Clock()
    with pytest.raises(bulk.ExportNotReady, match="not ready within 50 s"):
        with bulk.export(client(), {}, budget_s=50, sleep=clock.sleep, clock=clock):
            pytest.fail("no manifest expected")
    assert clock.slept == [20.0, 20.0]  # a third wait would end past the budget: cancelled instead
    assert deletes(server) == [STATUS]


def test_an_error_while_reading_cancels_the_export(server):
    kicked_off(server)
    server.get(STATUS, json=manifest())
    with pytest.raises(RuntimeError):
        with bulk.export(client(), {}, budget_s=50, sleep=Clock().sleep):
            raise RuntimeError("stopped while processing")
    assert deletes(server) == [STATUS]


def test_manifest_puts_patients_first():
    with responses.RequestsMock() as mock:
        mock.get(STATUS, json=manifest(("Observation", f"{BASE}/o.ndjson"), ("Patient", "p.ndjson")))
        response = requests.get(STATUS)
        found = bulk._manifest(client(), response)
    assert [(o.resource_type, o.url) for o in found.outputs] == [
        ("Patient", f"{BASE}/p.ndjson"), ("Observation", f"{BASE}/o.ndjson")]


def test_a_file_on_another_origin_is_refused(server, tmp_path):
    kicked_off(server)
    server.get(STATUS, json=manifest(("Observation", "https://storage.example.net/o.ndjson")))
    code = main(["run", "--bulk", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")])
    assert code == ExitCode.UNREACHABLE
    assert not [c for c in server.calls if "storage.example.net" in c.request.url]
    assert deletes(server) == [STATUS]


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_server_without_export_says_to_use_paged_search(server, tmp_path, status, capsys):
    server.get(f"{BASE}/$export", status=status)
    code = main(["run", "--bulk", "--since", "2024-01-01T00:00:00Z", "--fhir-url", BASE,
                 "--state", str(tmp_path / "s.sqlite3")])
    assert code == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "offers no Bulk Data $export" in err and "anc-adapter run --since" in err
    assert not [c for c in server.calls if "/Observation" in c.request.url]  # no silent paged fallback


def test_until_is_refused_with_bulk(tmp_path):
    code = main(["run", "--bulk", "--since", "2024-01-01T00:00:00Z", "--until", "2025-01-01T00:00:00Z",
                 "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")])
    assert code == ExitCode.CONFIG


def test_bulk_run_grades_from_streamed_files_and_counts_bad_lines(server, tmp_path):
    kicked_off(server)
    server.get(STATUS, status=202, headers={"Retry-After": "0"})
    server.get(STATUS, json=manifest(("Observation", f"{BASE}/files/o.ndjson"),
                                     ("Patient", f"{BASE}/files/p.ndjson")))
    observations = ndjson(anc("o1", "kid", 0.4)) + "{not json\n\n" + ndjson(
        patient("wrong-file"), anc("o2", "adult", 0.9), anc("o3", "adult", 7.0))
    server.get(f"{BASE}/files/o.ndjson", body=observations, content_type="application/fhir+ndjson")
    server.get(f"{BASE}/files/p.ndjson", body=ndjson(patient("kid", "2020-05-01"), patient("adult", "1970-01-01")),
               content_type="application/fhir+ndjson")
    state = tmp_path / "s.sqlite3"
    assert main(["run", "--bulk", "--since", "2024-01-01T00:00:00Z", "--fhir-url", BASE,
                 "--state", str(state)]) == 0
    files = [c.request for c in server.calls if "/files/" in c.request.url]
    assert [urlsplit(r.url).path.rsplit("/", 1)[1] for r in files] == ["p.ndjson", "o.ndjson"]
    assert all(r.headers["Accept"] == "application/fhir+ndjson" for r in files)
    assert not [c for c in server.calls if "/Patient/" in c.request.url]  # the export's Patients sufficed
    flags = [e["resource"] for b in (json.loads(c.request.body) for c in server.calls
                                     if c.request.method == "POST") for e in b["entry"]]
    assert sorted(f["subject"]["reference"] for f in flags) == ["Patient/adult", "Patient/kid"]
    status = _status(tmp_path, state)
    last = status["last_runs"][0]
    assert last["mode"] == "bulk"
    assert last["summary"]["observations_read"] == 3
    assert last["summary"]["malformed"] == 2  # the broken line and the Patient in the Observation file
    assert status["watermark"] is None  # a backfill never moves the live watermark
    assert deletes(server) == [STATUS]


def test_patients_missing_from_the_export_are_read(server, tmp_path):
    # _since applies to Patients too: one not updated since is not in the export, and is read instead.
    kicked_off(server)
    server.get(STATUS, json=manifest(("Observation", f"{BASE}/files/o.ndjson")))
    server.get(f"{BASE}/files/o.ndjson", body=ndjson(anc("o1", "old", 0.4)))
    server.get(f"{BASE}/Patient/old", json=patient("old", "1960-01-01"))
    assert main(["run", "--bulk", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
    assert [c.request.url for c in server.calls if "/Patient/" in c.request.url] == [f"{BASE}/Patient/old"]


class CountingBody(io.RawIOBase):
    """An NDJSON body that records how many of its lines the client has taken so far."""

    def __init__(self, lines: list[bytes]):
        self.data = b"".join(lines)
        self.offsets = list(itertools.accumulate(len(line) for line in lines))  # where each line ends
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data[self.position:self.position + len(buffer)]
        buffer[:len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)

    @property
    def lines_taken(self) -> int:
        return bisect.bisect_right(self.offsets, self.position)


def test_files_are_streamed_a_page_at_a_time():
    lines = [(json.dumps(anc(f"o{i}", "a", 0.4)) + "\n").encode() for i in range(20_000)]
    body = CountingBody(lines)
    held: list[int] = []
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/o.ndjson", body=io.BufferedReader(body))
        found = bulk.Manifest(None, (bulk.Output("Observation", f"{BASE}/o.ndjson"),))
        for page in bulk.pages(client(), found, page_size=100):
            assert len(page.observations) <= 100
            held.append(body.lines_taken)
    assert len(held) == 200
    # When each page is handed over, the stream has been read only a chunk past it: far from the whole file.
    chunk_lines = bulk._CHUNK_BYTES // min(len(line) for line in lines) + 1
    assert max(taken - 100 * (i + 1) for i, taken in enumerate(held)) <= chunk_lines
    assert held[0] < len(lines) // 10


def test_patient_lookup_is_bounded_and_the_rest_fall_back_to_reads():
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/p.ndjson", body=ndjson(*(patient(f"p{i}") for i in range(50))))
        mock.get(f"{BASE}/o.ndjson", body=ndjson(anc("o1", "p1", 0.4)))
        found = bulk.Manifest(None, (bulk.Output("Patient", f"{BASE}/p.ndjson"),
                                     bulk.Output("Observation", f"{BASE}/o.ndjson")))
        (page,) = list(bulk.pages(client(), found, page_size=100, lookup_max=10))
    assert len(page.patients) == 10


def test_status_url_on_another_origin_is_refused():
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/$export", status=202, headers={"Content-Location": "https://elsewhere.example/s/1"})
        with pytest.raises(PermanentHttpError, match="another server"):
            bulk._kick_off(client(), {})


def _status(tmp_path, state) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--json", "--state", str(state), "--fhir-url", BASE]) == 0
    return json.loads(out.getvalue())


def test_max_duration_stops_after_a_committed_page_and_cancels(server, tmp_path):
    kicked_off(server)
    server.get(STATUS, json=manifest(("Observation", f"{BASE}/files/o.ndjson")))
    server.get(f"{BASE}/files/o.ndjson", body=ndjson(*(anc(f"o{i}", "a", 0.4) for i in range(3))))
    server.get(f"{BASE}/Patient/a", json=patient("a"))
    config = tmp_path / "adapter.toml"
    config.write_text("[fhir]\npage_size = 1\n")
    state = tmp_path / "s.sqlite3"
    assert main(["run", "--bulk", "--max-duration", "0", "--config", str(config), "--fhir-url", BASE,
                 "--state", str(state)]) == 0
    summary = _status(tmp_path, state)["last_runs"][0]["summary"]
    assert (summary["observations_read"], summary["complete"]) == (1, False)
    assert deletes(server) == [STATUS]


@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, reason="SIGTERM handled already")
def test_sigterm_while_waiting_cancels_the_export(server):
    kicked_off(server)
    server.get(STATUS, status=202, headers={"Retry-After": "5"})

    def terminated(seconds: float) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here, in the main thread

    with pytest.raises(KeyboardInterrupt):
        with bulk._sigterm_interrupts(), bulk.export(client(), {}, budget_s=60, sleep=terminated):
            pytest.fail("no manifest expected")
    assert deletes(server) == [STATUS]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_a_signal_while_waiting_for_the_export_stops_with_exit_6_and_cancels_the_job(server, tmp_path):
    """`run --bulk` under the CLI's graceful stop (CONTRACT §1 exit 6): the signal cuts the wait short,
    nothing new is asked of the status URL, and the DELETE that cancels the job still goes out."""
    kicked_off(server)
    polls = []

    def status(request):
        polls.append(request.url)
        os.kill(os.getpid(), signal.SIGTERM)  # the operator stops the run while the server exports
        return 202, {"Retry-After": "30"}, ""

    server.add_callback(responses.GET, STATUS, callback=status)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", "--bulk", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == ExitCode.STOPPED
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
    assert polls == [STATUS]  # the 30 s wait was given up at once, and no second poll was sent
    assert deletes(server) == [STATUS]


def test_derived_anc_inputs_are_exported_when_derivation_is_on(server, tmp_path):
    server.get(f"{BASE}/$export", status=501)
    config = tmp_path / "adapter.toml"
    asked = []
    for toml in ("", "[classify]\nderive = true\n"):
        config.write_text(toml)
        assert main(["run", "--bulk", "--config", str(config), "--fhir-url", BASE,
                     "--state", str(tmp_path / "s.sqlite3")]) == ExitCode.CONFIG
        kickoff = [c.request.url for c in server.calls if "$export" in c.request.url][-1]
        (type_filter,) = parse_qs(urlsplit(kickoff).query)["_typeFilter"]
        asked.append(set(parse_qs(type_filter.partition("?")[2])["code"][0].split(",")))
    assert f"{LOINC}|751-8" in asked[0] and f"{LOINC}|6690-2" not in asked[0]
    assert asked[0] < asked[1] and f"{LOINC}|6690-2" in asked[1]  # leukocytes, an input of the derivation
